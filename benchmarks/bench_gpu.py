"""GPU benchmarks of bnext (run by .ci/gpu_check.sh; needs CUDA):

  ops        BatchNorm, BatchNorm+ReLU, noisy BatchNorm and l_p (p = 2, inf), forward and forward+backward,
             bnext against torch eager (cuDNN for BatchNorm; the eager composition for the variants) and,
             on a subset, torch.compile of the torch version; at the VGG-16 layer shapes of width 1, batch
             128 (CIFAR 32x32 inputs) plus 128x64x32x32 and 256x128x16x16; fp32 and bf16; NCHW and
             channels-last. Timed with CUDA events over a loop after warm-up (median of rounds).
             GB/s counts the transfers of a training normalization: forward 3 (x read by the statistics
             and the elementwise pass, y written), forward+backward 8 (+ x and dy read by the sums and
             the dx pass, dx written), against a device-to-device copy measured in the same run
             (read + write counted).
  training   one SGD step of VGG-16 width 1, batch 128, bnext vs torch BatchNorm layers
  line probe bnext.landscape.line_probe, batched (vmap) vs sequential, VGG-16 width 1
  grad_stats bnext.grad_stats on the VGG parameter list vs torch._foreach_norm of the differences

    python benchmarks/bench_gpu.py --json OUT.json [--quick] [--compile-all] [--dry-run]

--dry-run runs the same code on the CPU at small sizes with a wall clock (no GPU needed): it proves
the script before a GPU lease (.ci/gpu_check.sh --dry-run); its numbers measure nothing.

Under pytest (benchmarks/pytest.ini collects bench_*), bench_gpu_quick runs --quick and is skipped
without CUDA.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import pytest
import torch
import torch.nn.functional as F

import bnext
from bnext.ops import lp_norm_reference

VGG_SHAPES = [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4), (128, 512, 2, 2)]
EXTRA_SHAPES = [(256, 128, 16, 16)]  # 128x64x32x32 is VGG's first
# torch.compile costs a compile per case: by default BatchNorm at the first VGG shape in every dtype and
# layout, and noisy BatchNorm there in fp32 NCHW (--compile-all: every case).
COMPILE_CASES = {("bn", (128, 64, 32, 32), d, l) for d in ("fp32", "bf16") for l in ("nchw", "channels_last")} | {
    ("noisy_bn", (128, 64, 32, 32), "fp32", "nchw")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
TRANSFERS = {"fwd": 3, "fwd+bwd": 8}
DEVICE = "cuda"  # "cpu" under --dry-run
BATCH = 128  # the VGG batch; --dry-run uses a small one
WIDTH = 1.0  # the VGG width; --dry-run uses 1/8 (the CPU would take minutes at width 1)
PAPER_NOISE = dict(noise_mean=0.5, noise_std=1.25, noise_mean_spread=0.1, noise_std_spread=0.1)


def cuda_time_ms(fn, reps, rounds=5, warmup=3):
    """Median over `rounds` of (CUDA-event time of `reps` calls) / reps, after `warmup` calls (on the
    CPU of a dry run: wall-clock time of one round of one call)."""
    if DEVICE != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copy_gbps(nbytes=1 << 28):
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def noisy_composite(x, w, b):
    """Noisy BatchNorm composed of torch ops (the noise has to be materialized)."""
    y = F.batch_norm(x, None, None, w, b, True)
    view = [1, -1] + [1] * (x.dim() - 2)
    C = x.shape[1]
    mu = (torch.rand(C, device=x.device, dtype=torch.float32) * 2 - 1) * 0.5
    sigma = 1 + torch.rand(C, device=x.device, dtype=torch.float32) * 0.25
    s = torch.randn_like(y) * 0.1 + sigma.view(view).to(y.dtype)
    m = (torch.rand_like(y) * 2 - 1) * 0.1 + mu.view(view).to(y.dtype)
    return s * y + m


def op_fns(group, C, device):
    """(bnext fn, torch fn) of one op group: f(x, w, b) -> y, training mode, running stats where the
    op keeps them."""
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    if group == "bn":
        return (lambda x, w, b: bnext.batch_norm(x, rm, rv, w, b, training=True),
                lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=True))
    if group == "bn_relu":
        return (lambda x, w, b: bnext.batch_norm(x, rm, rv, w, b, training=True, activation="relu"),
                lambda x, w, b: F.relu(F.batch_norm(x, rm, rv, w, b, training=True)))
    if group == "noisy_bn":
        return (lambda x, w, b: bnext.noisy_batch_norm(x, None, None, w, b, training=True, **PAPER_NOISE),
                noisy_composite)
    p = {"lp_norm_p2": 2.0, "lp_norm_pinf": math.inf}[group]
    return (lambda x, w, b: bnext.lp_norm(x, p, None, None, w, b, training=True),
            lambda x, w, b: lp_norm_reference(x, p, w, b, None, None, None, True, 1e-5))


def pass_fn(f, x, w, b, dy, which):
    if which == "fwd":
        return lambda: f(x, w, b)
    leaves = (x, w, b)
    return lambda: torch.autograd.grad(f(x, w, b), leaves, dy)


def bench_ops(quick, rows, errors, save, compiled):
    """Every case with bnext and torch eager (compiled=False), or the torch.compile subset
    (compiled=True: one compile per case, so few cases unless --compile-all)."""
    shapes = VGG_SHAPES[:1] if quick else VGG_SHAPES + EXTRA_SHAPES
    shapes = [(min(n, BATCH),) + tuple(rest) for n, *rest in shapes]
    groups = ["bn", "noisy_bn"] if quick else ["bn", "bn_relu", "noisy_bn", "lp_norm_p2", "lp_norm_pinf"]
    dtypes = {"fp32": torch.float32} if quick else DTYPES
    for group in groups:
        for shape in shapes:
            for dname, dtype in dtypes.items():
                for layout in LAYOUTS:
                    if compiled and not (compiled == "all" or (group, shape, dname, layout) in COMPILE_CASES):
                        continue
                    try:
                        bench_case(group, shape, dname, dtype, layout, rows, compiled)
                    except Exception as e:  # one failing case must not hide the others
                        errors.append(f"{group} {shape} {dname} {layout}{' compile' if compiled else ''}: "
                                      f"{type(e).__name__}: {e}")
                        traceback.print_exc()
                    save()


def bench_case(group, shape, dname, dtype, layout, rows, compiled):
    C = shape[1]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(shape, device=DEVICE, generator=gen).to(dtype)
    dy = torch.randn(shape, device=DEVICE, generator=gen).to(dtype)
    if layout == "channels_last":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    pdtype = torch.float32  # parameters stay fp32, as in mixed-precision training
    w = (torch.rand(C, device=DEVICE, generator=gen, dtype=pdtype) + 0.5).requires_grad_()
    b = torch.randn(C, device=DEVICE, generator=gen, dtype=pdtype).requires_grad_()
    ours, theirs = op_fns(group, C, DEVICE)
    impls = {"compile": torch.compile(theirs, fullgraph=True, dynamic=False)} if compiled else {
        "bnext": ours, "torch": theirs}
    numel = x.numel()
    reps = 20 if numel > (1 << 22) else 50
    for which, transfers in TRANSFERS.items():
        for impl, f in impls.items():
            ms = cuda_time_ms(pass_fn(f, x, w, b, dy, which), reps=reps)
            nbytes = transfers * numel * x.element_size()
            rows.append({"group": group, "shape": list(shape), "dtype": dname, "layout": layout, "pass": which,
                         "impl": impl, "ms": ms, "bytes": nbytes, "gbps": nbytes / (ms * 1e-3) / 1e9})


def vgg_pair(device):
    from bnext.experiments.models import build_vgg
    torch.manual_seed(0)
    return build_vgg("bn", WIDTH).to(device), build_vgg("torch", WIDTH).to(device)


def bench_training_step(quick, out):
    models = dict(zip(("bnext", "torch"), vgg_pair(DEVICE)))
    x = torch.randn(BATCH, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (BATCH,), device=DEVICE)
    for name, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
        out[f"{name}_ms"] = round(cuda_time_ms(step, reps=3 if quick else 10, rounds=3), 4)
    out["case"] = f"VGG-16 width {WIDTH:g}, batch {BATCH}, fp32 NCHW, SGD"


def _xent(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def bench_line_probe(quick, out):
    from bnext.landscape import line_probe
    model, _ = vgg_pair(DEVICE)
    model.train()
    batch = (torch.randn(BATCH, 3, 32, 32, device=DEVICE), torch.randint(0, 10, (BATCH,), device=DEVICE))
    etas = [0.05 * (k + 1) for k in range(4 if quick else 8)]
    for mode in ("batched", "sequential"):
        probe = lambda: line_probe(model, _xent, batch, etas, mode=mode)  # noqa: E731
        result = probe()
        if mode == "batched" and not result.batched:
            raise RuntimeError(f"line_probe fell back to sequential: {result.fallback_reason}")
        out[f"{mode}_ms"] = round(cuda_time_ms(probe, reps=1, rounds=3, warmup=1), 3)
    out["case"] = f"VGG-16 width {WIDTH:g}, batch {BATCH}, {len(etas)} step sizes"


def bench_grad_stats(quick, out):
    model, _ = vgg_pair(DEVICE)
    a = [p.detach().clone() for p in model.parameters()]
    b = [t + 1e-3 * torch.randn_like(t) for t in a]
    out["bnext_ms"] = round(cuda_time_ms(lambda: bnext.grad_stats(a, b), reps=20), 4)
    out["foreach_norm_ms"] = round(cuda_time_ms(
        lambda: torch._foreach_norm(torch._foreach_sub(a, b)), reps=20), 4)
    out["case"] = f"VGG-16 width {WIDTH:g} parameters ({len(a)} tensors, {sum(t.numel() for t in a)} values)"


def run(path, quick=False, compile_all=False):
    """Runs everything, rewriting the JSON at `path` after every case (a run cut off by its caller
    still leaves what it measured); torch.compile comes last, being the slowest to set up."""
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else f"{DEVICE} (dry run: timings measure nothing)"
    result = {"device": device, "torch": torch.__version__, "bnext": bnext.build_info(),
              "quick": quick, "dry_run": DEVICE != "cuda", "rows": [], "errors": [], "complete": False}
    t0 = time.time()

    def save():
        result["seconds"] = round(time.time() - t0, 1)
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)

    result["copy_gbps"] = copy_gbps(1 << 20 if DEVICE != "cuda" else 1 << 26 if quick else 1 << 28)
    bench_ops(quick, result["rows"], result["errors"], save, compiled=False)
    for name, fn in (("training_step", bench_training_step), ("line_probe", bench_line_probe),
                     ("grad_stats", bench_grad_stats)):
        part = {}
        try:
            fn(quick, part)
            result[name] = part
        except Exception as e:
            result["errors"].append(f"{name}: {type(e).__name__}: {e}")
            traceback.print_exc()
        save()
    if not quick:
        bench_ops(quick, result["rows"], result["errors"], save, compiled="all" if compile_all else True)
    result["complete"] = True
    save()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="one shape, fp32, BN and noisy BN only")
    parser.add_argument("--compile-all", action="store_true", help="torch.compile every case (slow: one compile each)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the code on the CPU at small sizes (checks the script; measures nothing)")
    args = parser.parse_args(argv)
    global DEVICE, BATCH, WIDTH
    DEVICE, BATCH, WIDTH = ("cpu", 4, 0.125) if args.dry_run else ("cuda", 128, 1.0)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gpu: no GPU (torch.cuda.is_available() is False); nothing was run", file=sys.stderr)
        return 2
    result = run(args.json, args.quick, args.compile_all)
    print(f"bench_gpu: {len(result['rows'])} timings, {len(result['errors'])} errors, {result['seconds']} s "
          f"-> {args.json}")
    return 1 if result["errors"] else 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def bench_gpu_quick(tmp_path):
    assert main(["--json", str(tmp_path / "bench.json"), "--quick"]) == 0


if __name__ == "__main__":
    sys.exit(main())
