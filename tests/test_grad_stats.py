"""bnext.grad_stats / l2_distance / cosine / multi_axpy against naive float64 references."""
import pytest
import torch

import bnext
from helpers import at_thread_counts

CHUNK = 1 << 16  # csrc/multi_tensor.h kMultiTensorChunk
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_stats(a, b):
    rows = []
    for x, y in zip(a, b):
        x, y = x.double(), y.double()
        rows.append(torch.stack([(x * x).sum(), (y * y).sum(), ((x - y) ** 2).sum(), (x * y).sum()]))
    return torch.stack(rows) if rows else torch.zeros((0, 4), dtype=torch.float64)


def pair_list(dtype, device="cpu"):
    """Shapes around the chunk size, 0-d, empty, and odd sizes."""
    shapes = [(), (0,), (1,), (7, 3), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (3, CHUNK + 5), (64, 3, 3, 3)]
    a = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    b = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    return a, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_stats_matches_float64_reference(dtype, device):
    a, b = pair_list(dtype, device)
    out = bnext.grad_stats(a, b)
    assert out.shape == (len(a), 4) and out.dtype == torch.float64 and out.device.type == device
    # Inputs are exactly representable in fp64, so only the summation order differs.
    torch.testing.assert_close(out.cpu(), reference_stats([t.cpu() for t in a], [t.cpu() for t in b]),
                               rtol=1e-12, atol=1e-12)


def test_grad_stats_mixed_dtypes_noncontiguous_and_many_tensors():
    base = torch.randn(40, 30)
    a = [base.t(), base[::2, 1:], torch.randn(5, dtype=torch.float64), torch.randn(300).half()]
    b = [torch.randn(30, 40).t().contiguous().t(), torch.randn(20, 29), torch.randn(5, dtype=torch.float64),
         torch.randn(300).half()]
    a += [torch.randn(17) for _ in range(500)]
    b += [torch.randn(17) for _ in range(500)]
    torch.testing.assert_close(bnext.grad_stats(a, b), reference_stats(a, b), rtol=1e-12, atol=1e-12)


def test_grad_stats_independent_of_thread_count():
    a, b = pair_list(torch.float32)
    (one,) = at_thread_counts(lambda: bnext.grad_stats(a, b), (1,))
    assert torch.equal(one, bnext.grad_stats(a, b))


def test_grad_stats_difference_of_nearly_equal_tensors_is_accurate():
    # ||a - b||^2 is accumulated directly: deriving it as |a|^2 + |b|^2 - 2<a,b> would lose all digits.
    a = torch.randn(100_000, dtype=torch.float64) * 1e3
    delta = torch.randn(100_000, dtype=torch.float64) * 1e-9
    out = bnext.grad_stats([a], [a + delta])
    exact = ((a + delta) - a).pow(2).sum()
    torch.testing.assert_close(out[0, 2], exact, rtol=1e-10, atol=0)


def test_grad_stats_detaches_and_accepts_tuples():
    w = torch.randn(10, requires_grad=True)
    out = bnext.grad_stats((w,), (w * 2,))
    assert not out.requires_grad
    torch.testing.assert_close(out[0], reference_stats([w.detach()], [2 * w.detach()])[0])


def test_grad_stats_empty_lists():
    out = bnext.grad_stats([], [])
    assert out.shape == (0, 4) and out.dtype == torch.float64


def test_l2_distance_and_cosine():
    a = [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 1.0]), torch.zeros(3), torch.zeros(2), torch.ones(2)]
    b = [torch.tensor([0.0, 4.0]), torch.tensor([2.0, 2.0]), torch.zeros(3), torch.ones(2), -torch.ones(2)]
    s = bnext.grad_stats(a, b)
    torch.testing.assert_close(bnext.l2_distance(s), torch.tensor([5.0, 2 ** 0.5, 0.0, 2 ** 0.5, 8 ** 0.5],
                                                                   dtype=torch.float64))
    # Two zero vectors: cosine 1 (equal); zero vs non-zero: 0.
    torch.testing.assert_close(bnext.cosine(s), torch.tensor([0.0, 1.0, 1.0, 0.0, -1.0], dtype=torch.float64))
    flat_a, flat_b = torch.cat(a).double(), torch.cat(b).double()
    torch.testing.assert_close(bnext.l2_distance(s, total=True), (flat_a - flat_b).norm())
    torch.testing.assert_close(bnext.cosine(s, total=True),
                               torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multi_axpy_matches_reference(dtype, device):
    x, d = pair_list(dtype, device)
    etas = [0.0, 0.5, -2.0, 1e-3]
    out = bnext.multi_axpy(x, d, etas)
    assert len(out) == len(x)
    for o, xi, di in zip(out, x, d):
        assert o.shape == (len(etas), *xi.shape) and o.dtype == dtype and o.is_contiguous()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        ref = torch.stack([xi.to(acc) - e * di.to(acc) for e in etas]).to(dtype)
        # One rounding to dtype of a value computed in acc: at most 1 ulp of dtype away from ref.
        torch.testing.assert_close(o, ref, rtol=torch.finfo(dtype).eps, atol=0)
        assert torch.equal(o[0], xi)


def test_multi_axpy_etas_as_tensor_noncontiguous_and_empty():
    x = [torch.randn(6, 4).t(), torch.randn(3)]
    d = [torch.randn(4, 6), torch.randn(3)]
    out = bnext.multi_axpy(x, d, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(out[0][1], x[0] - 2.0 * d[0])
    assert [o.shape for o in bnext.multi_axpy(x, d, [])] == [(0, 4, 6), (0, 3)]
    assert bnext.multi_axpy([], [], [1.0]) == []


def test_multi_axpy_output_is_a_fresh_leaf():
    w = torch.randn(5, requires_grad=True)
    (o,) = bnext.multi_axpy([w], [torch.ones(5)], [1.0])
    assert not o.requires_grad and o.data_ptr() != w.data_ptr()


@pytest.mark.parametrize("call", [
    lambda a, b: bnext.grad_stats(a, b),
    lambda a, b: bnext.multi_axpy(a, b, [1.0]),
    lambda a, b: torch.ops.bnext.grad_stats(a, b),
    lambda a, b: torch.ops.bnext.multi_axpy(a, b, [1.0]),
])
def test_bad_arguments_raise_clear_errors(call):
    with pytest.raises(ValueError, match="same length"):
        call([torch.randn(3)], [torch.randn(3), torch.randn(3)])
    with pytest.raises(ValueError, match=r"\[1\] has shape \[3\] but .*\[1\] has shape \[4\]"):
        call([torch.randn(2), torch.randn(3)], [torch.randn(2), torch.randn(4)])
    with pytest.raises(TypeError, match=r"\[0\] has dtype"):
        call([torch.randn(3)], [torch.randn(3, dtype=torch.float64)])
    with pytest.raises(TypeError, match="must be float64, float32, float16 or bfloat16"):
        call([torch.arange(3)], [torch.arange(3)])
    with pytest.raises(ValueError, match=r"\[1\] is on meta but .*\[0\] is on cpu"):
        call([torch.randn(3), torch.randn(3, device="meta")], [torch.randn(3), torch.randn(3)])


def test_wrappers_reject_non_lists():
    with pytest.raises(TypeError, match="list or tuple of tensors"):
        bnext.grad_stats(torch.randn(3), torch.randn(3))
    with pytest.raises(TypeError, match=r"direction\[0\] must be a Tensor"):
        bnext.multi_axpy([torch.randn(3)], [3.0], [1.0])
    with pytest.raises(TypeError, match="etas must be"):
        bnext.multi_axpy([torch.randn(3)], [torch.randn(3)], ["big"])


def test_opcheck():
    a = [torch.randn(5, 3), torch.randn(70_000), torch.randn(2, dtype=torch.float64)]
    b = [torch.randn_like(t) for t in a]
    torch.library.opcheck(torch.ops.bnext.grad_stats.default, (a, b))
    torch.library.opcheck(torch.ops.bnext.multi_axpy.default, (a, b, [0.5, 2.0]))


def test_torch_compile_fullgraph():
    a = [torch.randn(5, 3), torch.randn(40)]
    b = [torch.randn_like(t) for t in a]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, b):
        s = torch.ops.bnext.grad_stats(a, b)
        outs = torch.ops.bnext.multi_axpy(a, b, [1.0, 2.0])
        return s[:, 2].sqrt(), outs

    dist, outs = f(a, b)
    torch.testing.assert_close(dist, reference_stats(a, b)[:, 2].sqrt())
    torch.testing.assert_close(outs[1][1], a[1] - 2.0 * b[1])


_ISA_SCRIPT = """
import sys, torch, bnext
torch.manual_seed(0)
shapes = [(7, 3), (70_001,), (33,)]
out = {}
for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
    a = [torch.randn(s, dtype=dtype) for s in shapes]
    b = [torch.randn(s, dtype=dtype) for s in shapes]
    out[str(dtype)] = (bnext.grad_stats(a, b), bnext.multi_axpy(a, b, [0.3, -1.7]))
torch.save(out, sys.argv[1])
"""


def test_results_identical_across_instruction_sets(tmp_path):
    import os
    import subprocess
    import sys
    results = {}
    for isa in ("baseline", "avx512"):  # avx512 is capped to what the CPU has
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, BNEXT_CPU_ISA=isa)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env)
        results[isa] = torch.load(path)
    for key, (stats, outs) in results["baseline"].items():
        stats2, outs2 = results["avx512"][key]
        assert torch.equal(stats, stats2), key
        assert all(torch.equal(o, o2) for o, o2 in zip(outs, outs2)), key
