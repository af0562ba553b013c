"""Landscape toolkit: fused multi-tensor statistics, ICS, line probes; each against its baseline in
the same run.

    pytest benchmarks/bench_landscape.py --benchmark-only [--benchmark-json out.json]
    python benchmarks/bench_landscape.py out.json      # markdown table with the ratios

grad_stats   [|a|^2, |b|^2, |a-b|^2, <a,b>] for every pair of two VGG-16 (CIFAR, width 1, BN)
             parameter lists (58 tensors, 15.2 M fp32 values each):
               bnext     bnext.grad_stats (one parallel pass, fp64 accumulation)
               loop      Python loop, per pair torch.stack([a.pow(2).sum(), b.pow(2).sum(),
                         (a - b).pow(2).sum(), (a * b).sum()])            (fp32 accumulation)
               loop_f64  the same loop on float64 copies (the numerics bnext gives)
               foreach   torch._foreach_norm of a, b and _foreach_sub(a, b); dot by polarization
             Bytes counted: a and b read once (2 passes); GB/s against the copy bandwidth of the run.
ics          Definition 2.1 for all 16 layers of a VGG-16 (width 1/4, BN, batch 32, train mode):
               shared    bnext.landscape.ics (shared-prefix sweep)
               naive     bnext.landscape.ics(scheme="naive"): a full forward per layer, backward to W_i only
               textbook  one full forward + full backward per layer (written here)
             Target: shared <= 0.6 x textbook.
line_probe   8 step sizes along the gradient, same VGG: batched (vmap) vs sequential.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import bnext
from bnext import landscape

ROUNDS = int(os.environ.get("BNEXT_BENCH_ROUNDS", "15"))
HEAVY_ROUNDS = max(3, min(ROUNDS, 5))  # the ICS / line-probe rounds take seconds each on a CPU
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(width=1.0, num_classes=10):
    """Flat Sequential: conv -> bnext BN -> ReLU blocks, max-pools, 3 linear layers (16 layers)."""
    layers, c = [], 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = max(1, int(round(v * width)))
        layers += [nn.Conv2d(c, out, 3, padding=1), bnext.nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
        c = out
    hidden = max(1, int(round(512 * width)))
    layers += [nn.Flatten(), nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
               nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def xent(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def synced(fn, device):
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


# -------------------------------------------------------------------------------------------------
# grad_stats
# -------------------------------------------------------------------------------------------------

def loop_stats(a, b):
    return torch.stack([torch.stack([x.pow(2).sum(), y.pow(2).sum(), (x - y).pow(2).sum(), (x * y).sum()])
                        for x, y in zip(a, b)])


def loop_stats_f64(a, b):
    return loop_stats([x.double() for x in a], [y.double() for y in b])


def foreach_stats(a, b):
    na, nb = torch._foreach_norm(a), torch._foreach_norm(b)
    nd = torch._foreach_norm(torch._foreach_sub(a, b))
    sa, sb, sd = (torch.stack(v) ** 2 for v in (na, nb, nd))
    return torch.stack([sa, sb, sd, (sa + sb - sd) / 2], 1)


GRAD_STATS_IMPLS = {"bnext": bnext.grad_stats, "loop": loop_stats, "loop_f64": loop_stats_f64,
                    "foreach": foreach_stats}


@pytest.mark.parametrize("impl", list(GRAD_STATS_IMPLS))
@pytest.mark.parametrize("device", DEVICES)
def bench_grad_stats_vgg16(benchmark, copy_gbps, device, impl):
    torch.manual_seed(0)
    params = list(vgg16(1.0).to(device).parameters())
    a = [torch.randn_like(p) for p in params]
    b = [torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    fn = GRAD_STATS_IMPLS[impl]
    cols = 3 if impl == "foreach" else 4  # foreach's dot comes from polarization: fp32 cancellation
    torch.testing.assert_close(fn(a, b).double().cpu()[:, :cols], bnext.grad_stats(a, b).cpu()[:, :cols],
                               rtol=1e-3, atol=1e-3)
    step = synced(lambda: fn(a, b), device)
    for _ in range(2):
        step()
    benchmark.group = f"{device} grad_stats vgg16 ({len(a)} tensors, {numel / 1e6:.1f} M values)"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    nbytes = 2 * numel * 4
    copy = copy_gbps(numel, torch.float32, device)
    benchmark.extra_info.update(bench="grad_stats", variant=impl, device=device, tensors=len(a), numel=numel,
                                bytes=nbytes, copy_gbps=copy)
    if benchmark.stats is not None:
        gbps = nbytes / benchmark.stats.stats.median / 1e9
        benchmark.extra_info.update(gbps=gbps, fraction_of_copy=gbps / copy)


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

BASELINE = {"grad_stats": ("bnext", ["loop", "loop_f64", "foreach"]), "ics": ("shared", ["naive", "textbook"]),
            "line_probe": ("batched", ["sequential"])}


def report(paths):
    """Markdown table: median per variant and the ratio of the bnext variant to each baseline."""
    rows = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            if info.get("bench") not in BASELINE:
                continue
            rows.setdefault((info["device"], info["bench"], bench["group"]), {})[info["variant"]] = (bench["stats"]["median"], info)
    lines = ["| device | benchmark | variant | median (ms) | speedup of bnext's variant | GB/s (of copy) |",
             "|---|---|---|---|---|---|"]
    for (device, name, group), variants in rows.items():
        ours, bases = BASELINE[name]
        t_ours = variants.get(ours, (None,))[0]
        for v in [ours] + bases:
            if v not in variants:
                continue
            t, info = variants[v]
            speed = "" if v == ours or t_ours is None else f"{t / t_ours:.2f}x"
            bw = f"{info['gbps']:.1f} ({info['fraction_of_copy']:.0%})" if "gbps" in info else ""
            lines.append(f"| {device} | {group} | {v} | {t * 1e3:.2f} | {speed} | {bw} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/bench_landscape.py run.json [more.json ...]")
    print(report(sys.argv[1:]))
