"""grad_stats, the fused multi-tensor statistics of the landscape measurements, against its baselines
in the same run.

    pytest benchmarks/bench_grad_stats.py --benchmark-only [--benchmark-json out.json]
    python benchmarks/bench_grad_stats.py out.json      # markdown table with the ratios

[|a|^2, |b|^2, |a-b|^2, <a,b>] for every pair of two VGG-16 (CIFAR, width 1, BN) parameter lists
(58 tensors, 15.2 M fp32 values each):
  bnext     bnext.grad_stats (one parallel pass, fp64 accumulation)
  loop      Python loop, per pair torch.stack([a.pow(2).sum(), b.pow(2).sum(), (a - b).pow(2).sum(),
            (a * b).sum()])                                                   (fp32 accumulation)
  loop_f64  the same loop on float64 copies (the numerics bnext gives)
  foreach   torch._foreach_norm of a, b and _foreach_sub(a, b); dot by polarization
Bytes counted: a and b read once (2 passes); GB/s against the copy bandwidth of the run.
"""
import os
import sys

import pytest
import torch

import bnext
from conftest import ratio_table, synced, vgg16

ROUNDS = int(os.environ.get("BNEXT_BENCH_ROUNDS", "15"))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


IMPLS = {"bnext": bnext.grad_stats, "loop": loop_stats, "loop_f64": loop_stats_f64, "foreach": foreach_stats}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", DEVICES)
def bench_grad_stats_vgg16(benchmark, copy_gbps, device, impl):
    torch.manual_seed(0)
    params = list(vgg16(1.0).to(device).parameters())
    a = [torch.randn_like(p) for p in params]
    b = [torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    fn = IMPLS[impl]
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


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/bench_grad_stats.py run.json [more.json ...]")
    print(ratio_table(sys.argv[1:], {"grad_stats": ("bnext", ["loop", "loop_f64", "foreach"])}))
