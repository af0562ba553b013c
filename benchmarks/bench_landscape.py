"""Landscape toolkit: ICS and line probes, each against its baseline in the same run (the fused
multi-tensor statistics they use: bench_grad_stats.py).

    pytest benchmarks/bench_landscape.py --benchmark-only [--benchmark-json out.json]
    python benchmarks/bench_landscape.py out.json      # markdown table with the ratios

ics          Definition 2.1 for all 16 layers of a VGG-16 (width 1/4, BN, batch 32, train mode):
               shared    bnext.landscape.ics (shared-prefix sweep)
               naive     bnext.landscape.ics(scheme="naive"): a full forward per layer, backward to W_i only
               textbook  one full forward + full backward per layer (written here)
             Target: shared <= 0.6 x textbook.
line_probe   8 step sizes along the gradient, same VGG: batched (vmap) vs sequential.
"""
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import bnext
from bnext import landscape
from conftest import ratio_table, synced, vgg16

ROUNDS = int(os.environ.get("BNEXT_BENCH_ROUNDS", "15"))
HEAVY_ROUNDS = max(3, min(ROUNDS, 5))  # the ICS / line-probe rounds take seconds each on a CPU
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def xent(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


# -------------------------------------------------------------------------------------------------
# ICS
# -------------------------------------------------------------------------------------------------

def textbook_ics(model, loss_fn, batch, lr):
    """One full forward + full backward per layer (and one for G): Definition 2.1 done plainly.
    Layers 1..i-1 of the flat Sequential are the entries before layer i."""
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def grads(values):
        leaves = [v.detach().requires_grad_(True) for v in values]
        bufs = {n: t.clone() for n, t in buffers.items()}
        loss = loss_fn(functional_call(model, (dict(zip(names, leaves)), bufs), (batch[0],)), batch[1])
        return torch.autograd.grad(loss, leaves)

    G = grads(params)
    new = [p.detach() - lr * g for p, g in zip(params, G)]
    out = []
    for idx, layer in enumerate(model):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        values = [nv if int(n.split(".")[0]) < idx else p.detach() for n, p, nv in zip(names, params, new)]
        Gp = grads(values)
        w = names.index(f"{idx}.weight")
        out.append(bnext.grad_stats([G[w]], [Gp[w]]))
    return out


def vgg_setup(device, width=0.25, batch=32):
    torch.manual_seed(0)
    model = vgg16(width).to(device).train()
    data = (torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device))
    return model, data


ICS_IMPLS = ["shared", "naive", "textbook"]


@pytest.mark.parametrize("impl", ICS_IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def bench_ics_vgg16(benchmark, device, impl):
    model, batch = vgg_setup(device)
    if impl == "textbook":
        step = lambda: textbook_ics(model, lambda out, y: F.cross_entropy(out, y), batch, 0.1)  # noqa: E731
    else:
        scheme = "shared_prefix" if impl == "shared" else "naive"
        step = lambda: landscape.ics(model, xent, batch, lr=0.1, scheme=scheme)  # noqa: E731
    step = synced(step, device)
    step()
    benchmark.group = f"{device} ics vgg16 width 1/4 batch 32 (16 layers)"
    benchmark.pedantic(step, rounds=HEAVY_ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(bench="ics", variant=impl, device=device)


# -------------------------------------------------------------------------------------------------
# Line probe
# -------------------------------------------------------------------------------------------------

ETAS = [0.1 * 2 ** (k / 7 * 3) * 0.5 for k in range(8)]  # 8 log-spaced points in [0.05, 0.4]


@pytest.mark.parametrize("mode", ["batched", "sequential"])
@pytest.mark.parametrize("device", DEVICES)
def bench_line_probe_vgg16(benchmark, device, mode):
    model, batch = vgg_setup(device)
    step = synced(lambda: landscape.line_probe(model, xent, batch, ETAS, mode=mode), device)
    probe = step()
    assert probe.batched == (mode == "batched")
    benchmark.group = f"{device} line_probe vgg16 width 1/4 batch 32, K={len(ETAS)}"
    benchmark.pedantic(step, rounds=HEAVY_ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(bench="line_probe", variant=mode, device=device)


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

BASELINE = {"ics": ("shared", ["naive", "textbook"]), "line_probe": ("batched", ["sequential"])}


def report(paths):
    """Markdown table: median per variant and the ratio of the bnext variant to each baseline."""
    return ratio_table(paths, BASELINE)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/bench_landscape.py run.json [more.json ...]")
    print(report(sys.argv[1:]))
