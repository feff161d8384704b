"""Every scan backend against the sequential definition, forward and backward."""

import pytest
import torch
from conftest import reference_scan

from modeling_minrnn.scan import (
    chunked_scan,
    linear_recurrence,
    log_space_scan,
    resolve_backend,
    sequential_scan,
)


def random_gates(batch, seq, dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Decays spread over (0, 1) like trained minGRU gates; b of order one.
    log_a = -torch.nn.functional.softplus(torch.randn(batch, seq, dim, generator=g) * 2)
    log_b = torch.randn(batch, seq, dim, generator=g) - 1
    return log_a.to(dtype), log_b.to(dtype)


BACKENDS = {"log_space": log_space_scan, "chunked": chunked_scan}
# The log-space scan loses relative precision as cumsum(log_a) grows; the others are exact to fp32 rounding.
RTOL = {"log_space": 1e-4, "chunked": 1e-5}

SHAPES = [(2, 1, 3), (1, 7, 5), (3, 64, 16), (2, 130, 33)]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_backend_matches_sequential(name, shape, with_initial_state):
    log_a, log_b = random_gates(*shape)
    h0 = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(12)) if with_initial_state else None
    expected = sequential_scan(log_a, log_b, h0)
    got = BACKENDS[name](log_a, log_b, h0)
    torch.testing.assert_close(got, expected, rtol=RTOL[name], atol=1e-5)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 3), (2, 37, 6), (1, 200, 4)])
def test_backend_gradients_match_sequential(name, shape):
    log_a, log_b = random_gates(*shape, seed=1)
    g = torch.Generator().manual_seed(11)
    h0 = torch.randn(shape[0], shape[2], generator=g)
    weights = torch.randn(shape, generator=g)

    def grads(fn):
        inputs = [t.clone().requires_grad_() for t in (log_a, log_b, h0)]
        (fn(*inputs) * weights).sum().backward()
        return [t.grad for t in inputs]

    for got, expected in zip(grads(BACKENDS[name]), grads(sequential_scan)):
        if name == "log_space":
            # Its gradients flow through cumsum/logcumsumexp and carry that rounding (measured: ~1e-4 relative
            # for d log_a at T=200, against ~1e-8 for the other backends): compare as a whole.
            assert ((got - expected).norm() / expected.norm()).item() < 1e-3
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_chunked_gradcheck_float64():
    log_a, log_b = random_gates(2, 11, 3, seed=2)
    inputs = [log_a.double().requires_grad_(), log_b.double().requires_grad_(), torch.randn(2, 3, dtype=torch.float64)]
    inputs[2].requires_grad_()
    # The backend computes in fp32 by contract, so compare analytic and numeric gradients loosely.
    assert torch.autograd.gradcheck(
        lambda a, b, h: chunked_scan(a, b, h).double(), inputs, eps=1e-3, atol=5e-3, rtol=5e-3
    )


def test_padding_positions_leave_state_untouched():
    log_a, log_b = random_gates(1, 9, 4, seed=3)
    log_a[:, 4:6], log_b[:, 4:6] = 0.0, float("-inf")
    log_a[:, :2], log_b[:, :2] = 0.0, float("-inf")  # left padding too: nothing before it to add to
    for name, fn in {"sequential": sequential_scan, **BACKENDS}.items():
        log_a_, log_b_ = log_a.clone().requires_grad_(), log_b.clone().requires_grad_()
        h = fn(log_a_, log_b_)
        torch.testing.assert_close(h[:, 4], h[:, 3], msg=name)
        torch.testing.assert_close(h[:, 5], h[:, 3], msg=name)
        h.sum().backward()
        assert torch.isfinite(log_a_.grad).all() and (log_b_.grad[:, 4:6] == 0).all(), name
        # The decay at left padding multiplies a zero state: no gradient (up to log-space rounding, never NaN).
        assert (h[:, :2] == 0).all() and (log_b_.grad[:, :2] == 0).all(), name
        assert log_a_.grad[:, :2].abs().max() < 1e-5, name


def test_bf16_inputs_compute_in_fp32():
    log_a, log_b = random_gates(2, 50, 8, seed=4, dtype=torch.bfloat16)
    h = linear_recurrence(log_a, log_b)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, reference_scan(log_a, log_b).float(), rtol=1e-5, atol=1e-5)


def test_single_step_decoding_matches_scan():
    log_a, log_b = random_gates(3, 1, 5, seed=5)
    h0 = torch.randn(3, 5)
    torch.testing.assert_close(linear_recurrence(log_a, log_b, h0), sequential_scan(log_a, log_b, h0))


def test_default_backend_is_exact_at_65536_steps():
    """The paper's fp32 log-space scan drifts at this length; the default must not."""
    log_a, log_b = random_gates(1, 65536, 4, seed=6)
    # Slow decays (a close to 1) make the cumulative sums large, as in long-memory channels.
    log_a = log_a * 0.01
    expected = reference_scan(log_a, log_b)
    default = linear_recurrence(log_a, log_b).double()
    rel_default = ((default - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
    assert rel_default < 1e-5, rel_default
    chunked = chunked_scan(log_a, log_b).double()
    assert ((chunked - expected).abs() / expected.abs().clamp_min(1.0)).max().item() < 1e-5
    log_space = log_space_scan(log_a, log_b).double()
    rel_log_space = ((log_space - expected).abs() / expected.abs().clamp_min(1.0)).max().item()
    assert rel_log_space > 10 * rel_default  # documents why log_space is not the default


def test_bad_shapes_and_backends_are_rejected():
    log_a, log_b = random_gates(2, 4, 3)
    with pytest.raises(ValueError, match="shape"):
        linear_recurrence(log_a, log_b[:, :2])
    with pytest.raises(ValueError, match="initial_state"):
        linear_recurrence(log_a, log_b, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="Unknown scan backend"):
        linear_recurrence(log_a, log_b, backend="magic")
    assert resolve_backend(None, log_a) in ("cpu", "chunked")


def random_resets(batch, seq, seed=0, at_start=True):
    """Sequence starts at ~1 in 6 steps, several in a row included, and at t = 0 of row 0 (drops the initial state)."""
    reset = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) < 0.17
    reset[0, 0] = at_start
    if seq > 4:
        reset[-1, 2:4] = True  # one-token sequences
    return reset


ALL_BACKENDS = {"sequential": sequential_scan, **BACKENDS}


@pytest.mark.parametrize("name", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 3), (3, 37, 6), (2, 130, 5)])
def test_resets_match_reference_values_and_gradients(name, shape):
    log_a, log_b = random_gates(*shape, seed=7)
    g = torch.Generator().manual_seed(8)
    h0 = torch.randn(shape[0], shape[2], generator=g)
    weights = torch.randn(shape, generator=g)
    reset = random_resets(shape[0], shape[1])

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (log_a, log_b, h0)]
        h = fn(*inputs, reset=reset)
        return h, torch.autograd.grad((h * weights.to(h.dtype)).sum(), inputs)

    h, grads = run(ALL_BACKENDS[name], torch.float32)
    h_ref, grads_ref = run(reference_scan, torch.float64)
    torch.testing.assert_close(h.double(), h_ref, rtol=RTOL.get(name, 1e-5), atol=1e-5)
    for got, expected in zip(grads, grads_ref):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    if reset[:, 0].all():
        assert (grads[2] == 0).all()
    # Exactly zero gradient for log_a at a start: it never enters the result.
    assert (grads[0][reset] == 0).all()


@pytest.mark.parametrize("name", ALL_BACKENDS)
def test_reset_row_equals_each_sequence_alone(name):
    """A row of several sequences gives each of them what it gives alone, from a zero state."""
    fn = ALL_BACKENDS[name]
    lengths = [5, 1, 9, 3]
    log_a, log_b = random_gates(1, sum(lengths), 4, seed=9)
    reset = torch.zeros(1, sum(lengths), dtype=torch.bool)
    reset[0, torch.tensor([0, *lengths[:-1]]).cumsum(0)] = True
    h0 = torch.randn(1, 4)  # dropped by the start at t = 0
    packed = fn(log_a, log_b, h0, reset=reset)
    alone = torch.cat([fn(a, b) for a, b in zip(log_a.split(lengths, 1), log_b.split(lengths, 1))], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)


def test_chunked_gradcheck_with_resets_float64():
    log_a, log_b = random_gates(2, 11, 3, seed=2)
    reset = random_resets(2, 11, seed=3)
    inputs = [log_a.double().requires_grad_(), log_b.double().requires_grad_(), torch.randn(2, 3, dtype=torch.float64)]
    inputs[2].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, h: chunked_scan(a, b, h, reset=reset).double(), inputs, eps=1e-3, atol=5e-3, rtol=5e-3
    )


def test_log_space_resets_with_padding_and_no_nan():
    """The segment-aware log-space scan: padding inside a sequence, starts next to padding, all finite."""
    log_a, log_b = random_gates(2, 20, 3, seed=10)
    log_a[:, 6:9], log_b[:, 6:9] = 0.0, float("-inf")
    reset = torch.zeros(2, 20, dtype=torch.bool)
    reset[:, [5, 9, 15]] = True
    leaves = [log_a.clone().requires_grad_(), log_b.clone().requires_grad_()]
    h = log_space_scan(*leaves, reset=reset)
    h.sum().backward()
    assert all(torch.isfinite(t).all() for t in (h, leaves[0].grad))
    torch.testing.assert_close(h.double(), reference_scan(log_a, log_b, reset=reset), rtol=1e-5, atol=1e-5)


def test_single_step_decoding_honours_reset():
    log_a, log_b = random_gates(3, 1, 5, seed=5)
    h0 = torch.randn(3, 5)
    reset = torch.tensor([[True], [False], [True]])
    torch.testing.assert_close(
        linear_recurrence(log_a, log_b, h0, reset=reset), reference_scan(log_a, log_b, h0, reset).float()
    )


def test_bad_reset_is_rejected():
    log_a, log_b = random_gates(2, 4, 3)
    for bad in (torch.zeros(2, 4), torch.zeros(2, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="reset"):
            linear_recurrence(log_a, log_b, backend="chunked", reset=bad)


@pytest.mark.parametrize("name", ["sequential", "log_space", "chunked"])
def test_forward_with_resets_reads_no_tensor_values(name):
    """On meta tensors every read of a value (`bool()`, `int()`, `.item()`) fails: on an accelerator each would be a
    host-device sync, once per layer and step. Resets and an initial state included."""
    log_a = torch.zeros(2, 9, 4, device="meta")
    reset = torch.zeros(2, 9, dtype=torch.bool, device="meta")
    h = linear_recurrence(log_a, log_a, torch.zeros(2, 4, device="meta"), backend=name, reset=reset)
    assert h.shape == (2, 9, 4) and h.dtype == torch.float32
