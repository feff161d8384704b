"""The native CPU scan and fused cells (`modeling_minrnn/scan_cpu.py`) against float64 references.

The scan is checked against a float64 loop over time; the fused cells against the model's own log-space gates
(`modeling_minrnn.py`, evaluated in float64) followed by that loop.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import reference_scan

from modeling_minrnn.cells import mingru_log_gates, minlstm_log_gates
from modeling_minrnn.scan_cpu import cpu_cell_scan, cpu_scan, cpu_scan_available

pytestmark = pytest.mark.skipif(
    not cpu_scan_available(), reason="the native CPU scan extension cannot be built here (no compiler?)"
)


def make_inputs(batch, seq, dim, with_initial, dtype=torch.float32, seed=0):
    """(log_a, log_b, initial_state or None) as leaves; a = sigmoid(x + 2) keeps a long memory."""
    generator = torch.Generator().manual_seed(seed)
    log_a = torch.nn.functional.logsigmoid(torch.randn(batch, seq, dim, generator=generator) + 2)
    log_b = torch.randn(batch, seq, dim, generator=generator) - 1
    initial = torch.randn(batch, dim, generator=generator) if with_initial else None
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()
    return cast(log_a), cast(log_b), cast(initial)


def grads(fn, inputs, grad_h):
    h = fn(*inputs)
    wanted = [t for t in inputs if t is not None]
    return h, torch.autograd.grad(h, wanted, grad_h.to(h.dtype))


def assert_close_to_reference(actual, expected, rtol=1e-5):
    """fp32 result vs float64 reference: errors relative to the largest magnitude in the tensor."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize(
    "shape",
    [(2, 37, 19), (1, 1, 5), (2, 16, 1030), (1, 50, 33), (4, 8, 16)],
    ids=["odd", "one_step_batch_1", "rows_over_1024", "batch_1_split", "one_cache_line"],
)
@pytest.mark.parametrize("with_initial", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_and_backward_match_reference(shape, with_initial, threads):
    inputs = make_inputs(*shape, with_initial)
    grad_h = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the split of rows into tasks depends on it
    try:
        h, got = grads(cpu_scan, inputs, grad_h)
    finally:
        torch.set_num_threads(previous)
    h_ref, expected = grads(reference_scan, inputs, grad_h)
    assert h.dtype == torch.float32 and h.shape == shape
    assert_close_to_reference(h, h_ref)
    for name, g, g_ref in zip(["log_a", "log_b", "initial_state"], got, expected):
        assert g.dtype == torch.float32, name
        assert_close_to_reference(g, g_ref)


def test_bf16_inputs_compute_in_fp32_and_return_bf16_grads():
    inputs = make_inputs(2, 40, 24, with_initial=True, dtype=torch.bfloat16)
    grad_h = torch.randn(2, 40, 24)
    h, got = grads(cpu_scan, inputs, grad_h)
    h_ref, expected = grads(reference_scan, inputs, grad_h)  # the same bf16 values, upcast
    assert h.dtype == torch.float32
    assert_close_to_reference(h, h_ref)
    for g, g_ref in zip(got, expected):
        assert g.dtype == torch.bfloat16
        assert_close_to_reference(g.float(), g_ref, rtol=1e-2)  # one bf16 rounding of the fp32 grad


def test_padding_leaves_state_untouched_with_zero_grads():
    log_a, log_b, initial = make_inputs(3, 30, 20, with_initial=True)
    pad = torch.zeros(3, 30, 1, dtype=torch.bool)
    pad[0, :7] = True  # left padding
    pad[1, 10:15] = True  # a gap
    pad[2, -4:] = True  # right padding
    pad = pad.expand(3, 30, 20)
    log_a = torch.where(pad, 0.0, log_a.detach()).requires_grad_()
    log_b = torch.where(pad, float("-inf"), log_b.detach()).requires_grad_()
    grad_h = torch.randn(3, 30, 20)
    h, (g_a, g_b, g_init) = grads(cpu_scan, (log_a, log_b, initial), grad_h)
    h_ref, expected = grads(reference_scan, (log_a, log_b, initial), grad_h)
    for tensor in (h, g_a, g_b, g_init):
        assert torch.isfinite(tensor).all()
    assert torch.equal(h[0, :7], initial[0].detach().float().expand(7, 20))
    assert torch.equal(h[1, 10:15], h[1, 9:10].expand(5, 20))
    assert torch.equal(g_b[pad], torch.zeros_like(g_b[pad]))
    assert_close_to_reference(h, h_ref)
    for g, g_ref in zip((g_a, g_b, g_init), expected):
        assert_close_to_reference(g, g_ref)


def test_exp_edge_values():
    """The kernel's own exp, through both gates: exact 0 at -inf, subnormal and overflow ranges, NaN."""
    values = torch.tensor([float("-inf"), -200.0, -103.5, -95.0, -87.0, -1e-3, 0.0, 1.5, 88.5, 89.0, 1e4])
    # One time step per row (17 channels: through the vector loop, not only its remainder).
    values = values.view(-1, 1, 1).repeat(1, 1, 17)
    minus_inf = torch.full_like(values, float("-inf"))
    only_b = cpu_scan(minus_inf, values)  # h = 0 * 0 + exp(log_b)
    only_a = cpu_scan(values, minus_inf, torch.ones(values.shape[0], 17))  # h = exp(log_a) * 1 + 0
    for h in (only_b, only_a):
        torch.testing.assert_close(h, values.exp(), rtol=2e-7, atol=0.0)
        assert h[0].eq(0).all() and h[-1].isinf().all()
    nan_h = cpu_scan(torch.full((1, 3, 17), float("nan")), torch.zeros(1, 3, 17))
    assert nan_h.isnan().all()


def test_backward_matches_finite_differences():
    """The backward is the derivative of this forward (not only of the reference): central differences."""
    log_a, log_b, initial = make_inputs(1, 12, 16, with_initial=True)
    weights = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss = lambda *args: (cpu_scan(*args).double() * weights).sum().item()
    h = cpu_scan(log_a, log_b, initial)
    got = torch.autograd.grad(h, (log_a, log_b, initial), weights.float())
    eps = 1e-2
    with torch.no_grad():
        for position, (tensor, grad) in enumerate(zip((log_a, log_b, initial), got)):
            for index in [(0, 3)] if tensor.dim() == 2 else [(0, 0, 0), (0, 5, 7), (0, 11, 15)]:
                shifted = [t.clone() for t in (log_a, log_b, initial)]
                shifted[position][index] += eps
                up = loss(*shifted)
                shifted[position][index] -= 2 * eps
                down = loss(*shifted)
                assert (up - down) / (2 * eps) == pytest.approx(grad[index].item(), rel=2e-3, abs=1e-4)


def test_long_sequence_stays_accurate():
    """T = 65,536 with slow decays (memory up to ~10^4 steps): no drift, unlike a fp32 log-space scan."""
    generator = torch.Generator().manual_seed(3)
    shape = (1, 65536, 4)
    log_a = -torch.empty(shape).uniform_(-9.0, -2.0, generator=generator).exp()
    log_b = torch.randn(shape, generator=generator)
    grad_h = torch.randn(shape, generator=generator)
    log_a.requires_grad_()
    log_b.requires_grad_()
    h, (g_a, g_b) = grads(cpu_scan, (log_a, log_b), grad_h)

    # Float64 reference without autograd (a graph over 65,536 steps takes minutes): the
    # recurrence forwards, then its adjoint dh_t = g_t + a_{t+1} dh_{t+1} backwards.
    a, b, g = (t.detach()[0].double().numpy() for t in (log_a.exp(), log_b.exp(), grad_h))
    h_ref = np.zeros_like(a)
    state = np.zeros(a.shape[1])
    for t in range(a.shape[0]):
        state = a[t] * state + b[t]
        h_ref[t] = state
    dh = np.zeros_like(a)
    carry = np.zeros(a.shape[1])
    for t in reversed(range(a.shape[0])):
        dh[t] = g[t] + carry
        carry = a[t] * dh[t]
    h_prev = np.concatenate([np.zeros((1, a.shape[1])), h_ref[:-1]])
    for actual, expected in ((h, h_ref), (g_a, dh * a * h_prev), (g_b, dh * b)):
        assert_close_to_reference(actual[0], torch.from_numpy(expected))


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 3, 0), (0, 3, 4)], ids=["no_steps", "no_channels", "no_rows"])
def test_empty_inputs(shape):
    log_a, log_b, initial = make_inputs(*shape, with_initial=True)
    h = cpu_scan(log_a, log_b, initial)
    assert h.shape == shape
    g_a, g_b, g_init = torch.autograd.grad(h.sum(), (log_a, log_b, initial), allow_unused=True)
    assert g_a.shape == shape and g_b.shape == shape
    assert torch.equal(g_init, torch.zeros_like(initial))


def test_torch_compile_traces_through():
    """Meta kernels and a lock-free availability check let torch.compile keep one graph."""
    log_a, log_b, initial = make_inputs(2, 9, 5, with_initial=True)
    loss = lambda *args: (cpu_scan(*args) ** 2).sum()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(log_a, log_b, initial), (log_a, log_b, initial))
    expected = torch.autograd.grad(loss(log_a, log_b, initial), (log_a, log_b, initial))
    for g, g_ref in zip(got, expected):
        torch.testing.assert_close(g, g_ref)


def test_rejects_bad_arguments():
    log_a = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="log_a.*shape"):
        cpu_scan(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="log_b.*shape"):
        cpu_scan(log_a, torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="initial_state.*shape"):
        cpu_scan(log_a, log_a, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="log_b.*floating-point"):
        cpu_scan(log_a, torch.zeros(2, 5, 3, dtype=torch.long))


def test_env_var_disables_extension(monkeypatch):
    monkeypatch.setenv("MINRNN_DISABLE_CPU_EXT", "1")
    assert not cpu_scan_available()
    with pytest.raises(RuntimeError, match="MINRNN_DISABLE_CPU_EXT"):
        cpu_scan(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))
    with pytest.raises(RuntimeError, match="MINRNN_DISABLE_CPU_EXT"):
        cpu_cell_scan("mingru", torch.zeros(1, 2, 6))


CELLS = {"mingru": (2, mingru_log_gates), "minlstm": (3, minlstm_log_gates)}


def reference_cell(cell_type, projections, padding_mask=None, initial_state=None, reset=None):
    """The model's log-space gates in float64, padding as the model masks it, then the float64 scan.

    A padded token passes the state through even where `reset` is True, as the kernel documents.
    """
    n, log_gates = CELLS[cell_type]
    log_a, log_b = log_gates(*projections.double().chunk(n, dim=-1))
    if padding_mask is not None:
        keep = padding_mask.unsqueeze(-1)
        log_a = log_a.masked_fill(~keep, 0.0)
        log_b = log_b.masked_fill(~keep, float("-inf"))
        reset = None if reset is None else reset & padding_mask
    return reference_scan(log_a, log_b, initial_state, reset)


def make_cell_inputs(cell_type, batch, seq, dim, with_initial, scale=2.0, dtype=torch.float32, seed=0):
    """(projections, initial_state or None) as leaves; `scale` spreads the projections over both branches of g."""
    generator = torch.Generator().manual_seed(seed)
    projections = torch.randn(batch, seq, CELLS[cell_type][0] * dim, generator=generator) * scale
    initial = torch.randn(batch, dim, generator=generator) if with_initial else None
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()
    return cast(projections), cast(initial)


def check_cell_against_reference(cell_type, projections, padding_mask, initial, rtol=1e-5, reset=None):
    """Values and gradients (projections, initial state) of the fused cell vs `reference_cell`."""
    shape = (*projections.shape[:2], projections.shape[2] // CELLS[cell_type][0])
    grad_h = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    leaves = [t for t in (projections, initial) if t is not None]
    h = cpu_cell_scan(cell_type, projections, padding_mask, initial, reset)
    got = torch.autograd.grad(h, leaves, grad_h)
    h_ref = reference_cell(cell_type, projections, padding_mask, initial, reset)
    expected = torch.autograd.grad(h_ref, leaves, grad_h.double())
    assert h.dtype == torch.float32 and h.shape == shape
    assert_close_to_reference(h, h_ref, rtol)
    for g, g_ref, leaf in zip(got, expected, leaves):
        assert g.dtype == leaf.dtype
        assert torch.isfinite(g).all()
        assert_close_to_reference(g.float(), g_ref, rtol)
    return h, got


@pytest.mark.parametrize("cell_type", sorted(CELLS))
@pytest.mark.parametrize(
    "shape",
    [(2, 37, 19), (1, 1, 5), (1, 50, 33), (3, 9, 1030)],
    ids=["odd", "one_step", "batch_1_split", "rows_over_1024"],
)
@pytest.mark.parametrize("with_initial", [False, True], ids=["zero_state", "initial_state"])
def test_cell_matches_reference(cell_type, shape, with_initial):
    projections, initial = make_cell_inputs(cell_type, *shape, with_initial)
    check_cell_against_reference(cell_type, projections, None, initial)


@pytest.mark.parametrize("cell_type", sorted(CELLS))
def test_cell_padding_passes_state_through_with_zero_grads(cell_type):
    projections, initial = make_cell_inputs(cell_type, 3, 30, 20, with_initial=True)
    keep = torch.ones(3, 30, dtype=torch.bool)
    keep[0, :7] = False  # left padding
    keep[1, 10:15] = False  # a hole
    keep[2, [3, 20, 29]] = False  # single tokens, the last one included
    h, (grad_projections, grad_initial) = check_cell_against_reference(cell_type, projections, keep, initial)
    assert torch.equal(h[0, :7], initial[0].detach().expand(7, 20))
    assert torch.equal(h[1, 10:15], h[1, 9:10].expand(5, 20))
    assert torch.equal(grad_projections[~keep], torch.zeros_like(grad_projections[~keep]))

    # Whatever sits in the padded projections (here inf and NaN) never reaches the state or the gradients.
    garbage = projections.detach().clone()
    garbage[~keep] = float("nan")
    garbage[0, 0] = float("inf")
    garbage.requires_grad_()
    h_garbage = cpu_cell_scan(cell_type, garbage, keep, initial)
    assert torch.equal(h_garbage, h)
    grad_garbage = torch.autograd.grad(h_garbage.sum(), garbage)[0]
    h_clean = cpu_cell_scan(cell_type, projections, keep, initial)
    assert torch.equal(grad_garbage, torch.autograd.grad(h_clean.sum(), projections)[0])


def make_resets(batch, seq, seed=5):
    """Sequence starts at ~1 in 5 steps, at t = 0 of row 0 (drops the initial state), and back to back."""
    reset = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) < 0.2
    reset[0, 0] = True
    reset[-1, 3:6] = True
    return reset


@pytest.mark.parametrize("shape", [(2, 37, 19), (3, 16, 1030), (1, 50, 33)], ids=["odd", "rows_over_1024", "split"])
@pytest.mark.parametrize("threads", [1, 2])
def test_resets_match_reference(shape, threads):
    inputs = make_inputs(*shape, with_initial=True)
    reset = make_resets(shape[0], shape[1])
    grad_h = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h, got = grads(lambda *args: cpu_scan(*args, reset=reset), inputs, grad_h)
    finally:
        torch.set_num_threads(previous)
    h_ref, expected = grads(lambda *args: reference_scan(*args, reset=reset), inputs, grad_h)
    assert_close_to_reference(h, h_ref)
    for g, g_ref in zip(got, expected):
        assert torch.isfinite(g).all()
        assert_close_to_reference(g, g_ref)
    assert torch.equal(got[0][reset], torch.zeros_like(got[0][reset]))  # log_a at a start is never used
    assert torch.equal(got[2][0], torch.zeros_like(got[2][0]))  # row 0 starts at t = 0: h0 is dropped


@pytest.mark.parametrize("cell_type", sorted(CELLS))
@pytest.mark.parametrize("threads", [1, 2])
def test_cell_resets_with_padding_match_reference(cell_type, threads):
    projections, initial = make_cell_inputs(cell_type, 3, 30, 20, with_initial=True)
    reset = make_resets(3, 30)
    keep = torch.ones(3, 30, dtype=torch.bool)
    keep[1, :4] = False  # left padding, then a start
    reset[1, 4] = True
    keep[2, 10:13] = False  # a hole right after a start, and a start on a padded token (ignored)
    reset[2, 9] = reset[2, 11] = True
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h, (grad_projections, grad_initial) = check_cell_against_reference(
            cell_type, projections, keep, initial, reset=reset
        )
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(grad_initial[0], torch.zeros_like(grad_initial[0]))
    # A packed row equals its sequences run alone from a zero state.
    lengths = [6, 1, 10, 13]
    row = torch.zeros(1, 30, dtype=torch.bool)
    row[0, torch.tensor([0, *lengths[:-1]]).cumsum(0)] = True
    packed = cpu_cell_scan(cell_type, projections[:1], None, initial[:1], row)
    alone = torch.cat([cpu_cell_scan(cell_type, p) for p in projections[:1].split(lengths, 1)], 1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=0)


@pytest.mark.parametrize("cell_type", sorted(CELLS))
def test_cell_bf16_projections_compute_in_fp32_and_return_bf16_grads(cell_type):
    projections, initial = make_cell_inputs(cell_type, 2, 40, 24, with_initial=True, dtype=torch.bfloat16)
    # The reference sees the same bf16 values; only the gradient's final bf16 rounding differs.
    check_cell_against_reference(cell_type, projections, None, initial, rtol=1e-2)


@pytest.mark.parametrize("cell_type", sorted(CELLS))
def test_cell_saturated_gates_stay_finite_and_accurate(cell_type):
    """Projections up to |x| = 80 (sigmoids at 1e-35, exp(80) would overflow a naive ratio), every combination."""
    n, _ = CELLS[cell_type]
    # No exact 0: g has a kink there, and the reference's `relu` picks the derivative 0 instead of g'(0+) = 1.
    levels = torch.tensor([-80.0, -45.0, -30.0, -5.0, -0.3, 0.3, 5.0, 30.0, 45.0, 80.0])
    grid = torch.cartesian_prod(*[levels] * n)  # (levels ** n, n): each row one channel's (k, h~) or (f, i, h~)
    projections = grid.T.reshape(1, 1, -1).repeat(1, 3, 1).requires_grad_()  # 3 steps: a and b both matter
    initial = torch.linspace(-2, 2, grid.shape[0]).view(1, -1).requires_grad_()
    check_cell_against_reference(cell_type, projections, None, initial)

    # One step from a zero state is b alone: elementwise relative accuracy, down to ~1e-35.
    one_step = projections.detach()[:, :1]
    b = cpu_cell_scan(cell_type, one_step)
    b_ref = reference_cell(cell_type, one_step)
    torch.testing.assert_close(b.double(), b_ref, rtol=1e-5, atol=1e-37)


def test_cell_empty_inputs():
    for shape in [(2, 0, 5), (2, 3, 0), (0, 3, 4)]:
        projections, initial = make_cell_inputs("minlstm", *shape, with_initial=True)
        h = cpu_cell_scan("minlstm", projections, None, initial)
        assert h.shape == shape
        grad_projections, grad_initial = torch.autograd.grad(h.sum(), (projections, initial), allow_unused=True)
        assert grad_projections.shape == projections.shape
        assert torch.equal(grad_initial, torch.zeros_like(initial))


def test_cell_torch_compile_traces_through():
    projections, initial = make_cell_inputs("mingru", 2, 9, 5, with_initial=True)
    keep = torch.tensor([[False, True] + [True] * 7, [True] * 9])
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[:, 4] = True
    loss = lambda *args: (cpu_cell_scan("mingru", *args) ** 2).sum()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(projections, keep, initial, reset), (projections, initial))
    expected = torch.autograd.grad(loss(projections, keep, initial, reset), (projections, initial))
    for g, g_ref in zip(got, expected):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("with_initial", [True, False])
def test_operators_pass_torch_library_opcheck(with_initial):
    """The kernels' registrations as torch.library checks a custom operator: schema, fake kernel against the real
    one, autograd registration, and AOT dispatch (what torch.compile runs), static and dynamic shapes."""
    from modeling_minrnn import scan_cpu

    log_a, log_b, initial = make_inputs(2, 9, 5, with_initial)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[1, 4] = True
    torch.library.opcheck(scan_cpu._scan_op, (log_a, log_b, initial, reset))
    projections, initial = make_cell_inputs("minlstm", 2, 9, 5, with_initial)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :2] = False
    torch.library.opcheck(scan_cpu._cell_scan_op, ("minlstm", projections, keep, initial, reset))


def test_cell_rejects_bad_arguments():
    projections = torch.zeros(2, 5, 6)
    with pytest.raises(ValueError, match="cell_type.*'gru'"):
        cpu_cell_scan("gru", projections)
    with pytest.raises(ValueError, match=r"projections.*\(batch, seq, 3 \* dim\).*minlstm.*\(2, 5, 4\)"):
        cpu_cell_scan("minlstm", torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="projections.*floating-point"):
        cpu_cell_scan("mingru", projections.long())
    with pytest.raises(ValueError, match="padding_mask.*bool.*torch.int64"):
        cpu_cell_scan("mingru", projections, torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"padding_mask.*\(2, 5\).*\(2, 4\)"):
        cpu_cell_scan("mingru", projections, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"initial_state.*\(2, 3\)"):
        cpu_cell_scan("mingru", projections, None, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="reset.*bool"):
        cpu_cell_scan("mingru", projections, None, None, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"reset.*\(2, 5\)"):
        cpu_scan(torch.zeros(2, 5, 3), torch.zeros(2, 5, 3), reset=torch.zeros(2, 4, dtype=torch.bool))


def _python(code, **env):
    """A fresh interpreter running `code` with the package importable and `env` set."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))), **env}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_failed_build_reports_unavailable_without_raising(tmp_path):
    """No working compiler: one warning says why and what to install; "auto" runs the PyTorch scan; asking for the
    kernel raises with the reason; nothing is rebuilt on each call."""
    process = _python(
        "import torch\n"
        "from modeling_minrnn import scan_cpu\n"
        "from modeling_minrnn.scan import linear_recurrence, resolve_backend\n"
        "x = torch.zeros(1, 3, 2)\n"
        "print('available', scan_cpu.cpu_scan_available(), scan_cpu.cpu_scan_available(), resolve_backend(None, x))\n"
        "print('auto', linear_recurrence(x, x).sum().item())\n"
        "try:\n"
        "    scan_cpu.cpu_scan(x, x)\n"
        "except scan_cpu.KernelUnavailable as error:\n"
        "    print('raised', error)\n",
        CXX=str(tmp_path / "no-such-compiler"),
        TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"),
    )
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert "available False False chunked" in out and "auto 12.0" in out  # h = 1, 2, 3 in 2 channels
    raised = next(line for line in out.splitlines() if line.startswith("raised"))
    assert "could not be built" in raised and "no-such-compiler" in raised and "install a C++ compiler" in raised
    assert err.count("native CPU scan unavailable") == 1 and err.count("compiling the native CPU scan") == 1, err
    assert "install a C++ compiler" in err


@pytest.mark.slow
def test_concurrent_first_builds_share_one_cache(tmp_path):
    """Two processes compiling into an empty cache at once (torch's lock file serialises them)."""
    code = (
        "import torch\nfrom modeling_minrnn.scan_cpu import cpu_scan\n"
        "x = torch.linspace(-3, 0, 24).view(1, 8, 3)\nprint(cpu_scan(x, x).sum().item())"
    )
    processes = [_python(code, TORCH_EXTENSIONS_DIR=str(tmp_path)) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].strip()
