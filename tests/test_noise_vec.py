"""The CPU noise generator: vectorized lanes (AVX2, AVX-512) bitwise equal to the scalar definition of
csrc/common/noise.h, and every instruction set giving bitwise-identical noisy BatchNorm and l_p results.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on PATH")
def test_vectorized_generator_is_bitwise_equal_to_scalar(tmp_path):
    # Counters the kernels can only reach with > 2^32-element tensors (high word, wrap inside a vector)
    # are covered here by calling the generator directly.
    from torch.utils.cpp_extension import include_paths, library_paths
    exe = tmp_path / "noise_vec_check"
    lib = library_paths()[0]
    cmd = ["c++", "-O2", "-std=c++17", "-ffp-contract=off", "-w", f"-I{ROOT / 'csrc'}",
           *[f"-I{p}" for p in include_paths()], str(ROOT / "tests" / "native" / "noise_vec_check.cpp"),
           f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "noise_vec: OK" in result.stdout


_ISA_SCRIPT = r"""
import sys, math, torch, bnext
from bnext.ops import noisy_batch_norm_noise
torch.manual_seed(0)
out = {}
shapes = [(4, 6, 33, 17), (3, 5, 7), (64, 19), (2, 3, 9, 5, 4)]
for shape in shapes:
    for layout in ("contiguous", "channels_last"):
        if layout == "channels_last" and len(shape) not in (4, 5):
            continue
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype) * 3 + 1
            dy = torch.randn(shape, dtype=dtype)
            if layout == "channels_last":
                fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
                x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
            C = shape[1]
            w = torch.rand(C, dtype=dtype) + 0.5
            b = torch.randn(C, dtype=dtype)
            key = f"{shape} {layout} {dtype}"
            seed = torch.tensor(0x5EED_1234_ABCD)
            noise = [0.5, 1.25, 0.1, 0.1]
            fwd = torch.ops.bnext.noisy_batch_norm_forward(x, w, b, 1e-5, seed, noise, C)
            bwd = torch.ops.bnext.noisy_batch_norm_backward(dy, x, w, b, fwd[1], fwd[2], 1e-5, seed, noise, C)
            out["noisy " + key] = [t.contiguous() for t in fwd + bwd]
            if C % 2 == 0 or C == 5:  # a period shorter than C (the vmap fold)
                P = 1 if C == 5 else C // 2
                out["noisy period " + key] = [t.contiguous() for t in
                    torch.ops.bnext.noisy_batch_norm_forward(x, w, b, 1e-5, seed, noise, P)]
            for p in (1.0, 2.0, math.inf):
                f = torch.ops.bnext.lp_norm_forward(x, p, w, b, None, None, True, 1e-5)
                g = torch.ops.bnext.lp_norm_backward(dy, x, p, w, b, f[1], f[2], f[3], True, 1e-5)
                out[f"lp{p} " + key] = [t.contiguous() for t in f + g]
big = torch.zeros(3, 8, 129, 257)  # ~800k counters
out["noise"] = list(noisy_batch_norm_noise(big, torch.tensor(987654321), [0.5, 1.25, 0.1, 0.1]))
torch.save(out, sys.argv[1])
"""


def test_results_identical_across_instruction_sets(tmp_path):
    results = {}
    for isa in ("baseline", "avx2", "avx512"):  # each is capped to what the CPU has
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, BNEXT_CPU_ISA=isa)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env, timeout=600)
        results[isa] = torch.load(path)
    for isa in ("avx2", "avx512"):
        for key, ref in results["baseline"].items():
            got = results[isa][key]
            for i, (a, b) in enumerate(zip(ref, got)):
                assert torch.equal(a, b), f"{isa} differs from baseline: {key}, output {i}"


@pytest.mark.parametrize("shape,channels_last", [((4, 3000), False), ((2, 2500, 2, 3), True), ((3, 5, 4100), False)])
def test_noise_and_gradients_past_one_tile(shape, channels_last):
    # More channels (interleaved) or spatial values (planar) than one kernel tile of 2048 values: the
    # noise is drawn in several pieces per row / run and must still be the documented stream.
    import torch.nn.functional as F
    from bnext.ops import noisy_batch_norm_noise
    from test_noisy_batch_norm import PAPER, reference_noise
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seed = torch.tensor(77)
    s, m = noisy_batch_norm_noise(x, seed, PAPER)
    s_ref, m_ref = reference_noise(77, shape)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=1e-6)
    C = shape[1]
    w, b = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
    y, mean, var = torch.ops.bnext.noisy_batch_norm_forward(x, w, b, 1e-5, seed, list(PAPER), C)
    xr = x.clone().requires_grad_()
    ref = s * F.batch_norm(xr, None, None, w, b, True) + m
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)
    dy = torch.randn(shape, dtype=torch.float64)
    dx = torch.ops.bnext.noisy_batch_norm_backward(dy, x, w, b, mean, var, 1e-5, seed, list(PAPER), C)[0]
    (dx_ref,) = torch.autograd.grad(ref, xr, dy)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-10)
