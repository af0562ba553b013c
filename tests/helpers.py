"""Small helpers the per-op test files share: inputs in each memory layout, runs at several torch
thread counts, and torch.compile against eager. (The tolerance rule against float64 references is
tests/tolerances.py.)"""
import torch


def make_input(shape, dtype, layout, scale=3.0, shift=1.5):
    """randn * scale + shift drawn in float64, rounded to dtype, in the layout named: "contiguous",
    "channels_last" (4-d and 5-d inputs) or "slice" (every other element along the last dim)."""
    x = (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "slice":
        big = (torch.randn(*shape[:-1], shape[-1] * 2, dtype=torch.float64) * scale + shift).to(dtype)
        x = big[..., ::2]
        assert not x.is_contiguous()
    return x


def channel_inputs(shape, layout):
    """fp32 opcheck inputs: x (requiring grad) in layout, weight and bias (requiring grad), a running
    mean and a positive second running buffer."""
    C = shape[1]
    x = make_input(shape, torch.float32, layout).requires_grad_()
    w = torch.rand(C).add_(0.5).requires_grad_()
    b = torch.randn(C).requires_grad_()
    return x, w, b, torch.randn(C), torch.rand(C) + 0.5


def at_thread_counts(step, counts=(1, 2)):
    """[step() run with torch.set_num_threads(n) for n in counts]; the thread count is restored."""
    old = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(step())
        return results
    finally:
        torch.set_num_threads(old)


def assert_fwd_bwd_thread_independent(fn, x, counts=(1, 2)):
    """fn(x) and its input gradient for a fixed upstream gradient are bitwise equal at each thread count."""
    g = torch.randn_like(x)

    def step():
        y = fn(x)
        return (y, *torch.autograd.grad(y, x, g))

    first, *others = at_thread_counts(step, counts)
    for other in others:
        for a, b in zip(first, other):
            assert torch.equal(a, b)


def assert_compiled_matches(model, ref, x, after_backward=lambda: ()):
    """torch.compile(model, fullgraph=True) against ref (same state) on x: training outputs, the first
    layer's weight gradient after backward of the outputs' sum, the (got, want, assert_close keywords)
    triples after_backward() gives (running statistics), then eval outputs."""
    compiled = torch.compile(model, fullgraph=True)
    y, y_ref = compiled(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad, rtol=1e-3, atol=1e-4)
    for got, want, tol in after_backward():
        torch.testing.assert_close(got, want, **tol)
    model.eval(), ref.eval()
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-4)
