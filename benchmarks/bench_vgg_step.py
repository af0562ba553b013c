"""The experiments' VGG end to end: one SGD training step, and one measurement step (ICS of all
layers + a line probe, bnext.landscape), with bnext's normalization layers against native PyTorch.

    pytest benchmarks/bench_vgg_step.py --benchmark-only [--benchmark-json out.json]
    python benchmarks/bench_vgg_step.py out.json [more.json ...]     # the markdown tables

Network: bnext.experiments.models.build_vgg (VGG-16 layout, conv -> norm -> ReLU, 13 normalization
layers), batch 128 of 3x32x32 inputs, cross-entropy, torch.optim.SGD(lr=0.01); widths 1/8 and 1/2
(VGG_WIDTHS). Per normalization, the implementations:
  bn        torch: torch.nn.BatchNorm2d (convert(to="torch"))
            bnext: bnext.nn.BatchNorm2d with the block's ReLU fused into it (activation="relu")
            bnext_unfused: bnext.nn.BatchNorm2d, the block's nn.ReLU kept (drop-in convert(to="bn"))
  noisy_bn  torch: torch.nn.BatchNorm2d followed by the experiments' ChannelNoise (the same noise from
            torch.rand/randn, materialized)          bnext: bnext.nn.NoisyBatchNorm2d
  l1/l2/linf torch: the eager composition bnext.ops.lp_norm_reference in a module (batch statistics;
            it keeps no running statistics, bnext's layer does)   bnext: bnext.nn.LpNorm2d
  none      the unnormalized network (the normalization's share of a step = step - this)
Measurement step (bench_vgg_measure, width 1/8): bnext.landscape.ics(lr=0.1) over all 14 weight
layers, then bnext.landscape.line_probe with 8 step sizes (batched with torch.func.vmap where the
model allows it, else sequential; `batched` is recorded), per implementation as above, for the
normalizations in BNEXT_VGG_MEASURE_NORMS (default none,bn,noisy_bn,l2: one such step takes
seconds on 2 cores).
Rounds: ~2 s of training steps per implementation (at least 3, at most BNEXT_BENCH_ROUNDS); 2 rounds
of the measurement step after one warm-up call.
BNEXT_VGG_NORMS (comma list) limits the normalizations, BNEXT_VGG_WIDTHS the widths (e.g. "0.125").
"""
import math
import os
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnext
from bnext import landscape
from bnext.experiments.models import ChannelNoise, build_vgg
from bnext.ops import lp_norm_reference

from conftest import ROUNDS, benchmark_rows

BATCH = 128
WIDTHS = [float(w) for w in os.environ.get("BNEXT_VGG_WIDTHS", "0.125,0.5").split(",")]
NORMS = os.environ.get("BNEXT_VGG_NORMS", "none,bn,noisy_bn,l1,l2,linf").split(",")
IMPLS = {"none": ["torch"], "bn": ["bnext", "bnext_unfused", "torch"], "noisy_bn": ["bnext", "torch"],
         "l1": ["bnext", "torch"], "l2": ["bnext", "torch"], "linf": ["bnext", "torch"]}
P = {"l1": 1.0, "l2": 2.0, "linf": math.inf}


class EagerLpNorm(nn.Module):
    """l_p normalization composed of torch eager ops (bnext.ops.lp_norm_reference), batch statistics."""

    def __init__(self, num_features, p, eps=1e-5):
        super().__init__()
        self.p, self.eps = p, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        return lp_norm_reference(x, self.p, self.weight, self.bias, None, None, None, True, self.eps)


def build(norm, impl, width, seed=0):
    torch.manual_seed(seed)
    if norm == "none":
        return build_vgg("none", width)
    if impl == "bnext_unfused":
        return build_vgg("bn", width)
    if impl == "bnext":
        model = build_vgg(norm, width)
        if norm == "bn":
            for block in model.blocks():  # conv -> BN+ReLU in one kernel
                block.norm.activation = "relu"
                block.relu = nn.Identity()
        return model
    model = build_vgg("torch", width) if norm in ("bn", "noisy_bn") else build_vgg("none", width)
    for block in model.blocks():
        C = block.conv.out_channels
        if norm == "noisy_bn":
            block.norm = nn.Sequential(block.norm, ChannelNoise())
        elif norm in P:
            block.norm = EagerLpNorm(C, P[norm])
    return model


def batch_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def plan_rounds(step, budget_s=2.0, least=3):
    t0 = time.perf_counter()
    step()
    t = time.perf_counter() - t0
    return int(min(ROUNDS, max(least, budget_s / max(t, 1e-6))))


def width_id(w):
    return f"1/{round(1 / w)}" if w < 1 else f"{w:g}"


CASES = [(n, i) for n in NORMS for i in IMPLS[n]]
MEASURE_NORMS = os.environ.get("BNEXT_VGG_MEASURE_NORMS", "none,bn,noisy_bn,l2").split(",")
MEASURE_CASES = [(n, i) for n in MEASURE_NORMS for i in IMPLS[n] if i != "bnext_unfused"]


@pytest.mark.parametrize("width", WIDTHS, ids=width_id)
@pytest.mark.parametrize("norm,impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def bench_vgg_step(benchmark, norm, impl, width):
    model = build(norm, impl, width).train()
    x, y = batch_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(2):
        step()
    rounds = plan_rounds(step)
    benchmark.group = f"vgg step width {width_id(width)} batch {BATCH}"
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(bench="vgg_step", norm=norm, impl=impl, width=width, batch=BATCH,
                                threads=torch.get_num_threads())


ETAS = [0.05 * 2 ** (3 * k / 7) for k in range(8)]  # 8 log-spaced step sizes in [0.05, 0.4]


def xent(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("norm,impl", MEASURE_CASES, ids=[f"{n}-{i}" for n, i in MEASURE_CASES])
def bench_vgg_measure(benchmark, norm, impl):
    width = 0.125
    model = build(norm, impl, width).train()
    batch = batch_data()
    batched = {}

    def step():
        ics = landscape.ics(model, xent, batch, lr=0.1)
        probe = landscape.line_probe(model, xent, batch, ETAS)
        batched["line_probe"] = probe.batched
        return ics, probe

    step()
    benchmark.group = f"vgg measurement step (ICS all layers + line probe K={len(ETAS)}) width 1/8 batch {BATCH}"
    benchmark.pedantic(step, rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(bench="vgg_measure", norm=norm, impl=impl, width=width, batch=BATCH,
                                threads=torch.get_num_threads(), line_probe_batched=batched["line_probe"])


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

def load(paths):
    rows = {}
    for bench, info in benchmark_rows(paths, ("vgg_step", "vgg_measure")):
        key = (info["bench"], info["threads"], info["width"])
        rows.setdefault(key, {})[(info["norm"], info["impl"])] = (bench["stats"]["median"], info)
    return rows


def tables(rows):
    out = []
    for (bench, threads, width), r in sorted(rows.items()):
        title = "SGD training step" if bench == "vgg_step" else "measurement step (ICS + line probe)"
        out += [f"#### VGG {title}, width {width_id(width)}, batch {BATCH}, {threads} thread"
                f"{'s' if threads > 1 else ''}", "",
                "| normalization | torch ms | bnext ms | bnext vs torch | norm share, torch ms | "
                "norm share, bnext ms | share ratio |" + (" line probe batched (torch / bnext) |"
                                                          if bench == "vgg_measure" else ""),
                "|---|---:|---:|---:|---:|---:|---:|" + ("---|" if bench == "vgg_measure" else "")]
        plain = r.get(("none", "torch"), (None, None))[0]
        for norm in (NORMS if bench == "vgg_step" else MEASURE_NORMS):
            if norm == "none":
                if plain is not None:
                    out.append(f"| none (unnormalized) | {plain * 1e3:.1f} | | | | | |"
                               + (" |" if bench == "vgg_measure" else ""))
                continue
            t_torch = r.get((norm, "torch"), (None, {}))
            for impl in IMPLS[norm]:
                if impl == "torch" or (norm, impl) not in r:
                    continue
                t_ours, info = r[(norm, impl)]
                label = norm if impl == "bnext" else f"{norm} ({impl})"
                ratio = f"{t_torch[0] / t_ours:.2f}x" if t_torch[0] else "-"
                share_t = (t_torch[0] - plain) if (t_torch[0] and plain) else None
                share_b = (t_ours - plain) if plain else None
                share_ratio = f"{share_b / share_t:.2f}" if share_t and share_b is not None and share_t > 0 else "-"
                fmt = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
                line = (f"| {label} | {fmt(t_torch[0])} | {t_ours * 1e3:.1f} | {ratio} | {fmt(share_t)} | "
                        f"{fmt(share_b)} | {share_ratio} |")
                if bench == "vgg_measure":
                    line += f" {t_torch[1].get('line_probe_batched', '-')} / {info.get('line_probe_batched')} |"
                out.append(line)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/bench_vgg_step.py run.json [more.json ...]")
    print(tables(load(sys.argv[1:])))
