"""The minRNN recurrence `h_t = a_t * h_{t-1} + b_t`, computed for a whole sequence.

Both cells (minGRU, minLSTM) hand over their gates in log space, as in the paper: `log_a = log(a_t)` and
`log_b = log(b_t)`, so that `0 < a_t < 1` and `b_t > 0` hold by construction. Padding enters as `log_a = 0,
log_b = -inf` (a = 1, b = 0), which leaves the state untouched. A sequence start (packed sequences) enters as a
`reset` mask: there `a_t = 0`, so `h_t = b_t` and nothing before it (the initial state included) reaches it.

Two public entry points own all dispatch (backend choice, the one-token step, sequence resets):
`cell_recurrence` runs a whole cell from its input projections (what the model calls), `linear_recurrence` the
recurrence from `(log_a, log_b)`. Behind them, interchangeable backends:

- `"sequential"`: the definition, one step at a time. Every other backend is tested against it.
- `"log_space"`: the paper's parallel scan (Heinsen, 2023) with `cumsum` + `logcumsumexp`. Kept as the faithful
  formulation; it loses precision at long lengths in fp32 (the running `cumsum(log_a)` grows without bound).
- `"chunked"`: the default PyTorch path. Exact in linear space, `O(sqrt(T))` Python steps, with a hand-written
  backward (the same recurrence run in reverse), so it stays accurate at any length and needs no autograd graph
  over time steps.
- `"cpu"`: a native multi-threaded loop (`scan_cpu.py`), used automatically for CPU tensors when it builds.
- `"triton"`: fused GPU kernels (`scan_triton.py`), used automatically for CUDA tensors when Triton is present.

The fast backends are `torch.library` operators: `torch.compile` keeps them in its graph. `torch.export` (ONNX,
ExecuTorch) gets the chunked PyTorch scan under `"auto"`, so exported graphs hold only standard ops.
All backends compute in fp32 whatever the input dtype and return fp32 states.

The fast backends are imported on first use, not here: loading a config imports neither the kernel loader nor
Triton.
"""

import math

import torch

from .cells import CELLS

SCAN_BACKENDS = ("auto", "sequential", "log_space", "chunked", "cpu", "triton")


def _check_reset(reset, batch, seq):
    if reset is not None and (
        not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool or tuple(reset.shape) != (batch, seq)
    ):
        got = f"{reset.dtype} {tuple(reset.shape)}" if isinstance(reset, torch.Tensor) else type(reset).__name__
        raise ValueError(f"`reset` must be a bool tensor of shape (batch, seq) = {(batch, seq)}; got {got}.")


def _as_fp32(log_a, log_b, initial_state, reset=None):
    if log_a.shape != log_b.shape or log_a.dim() != 3:
        raise ValueError(
            f"`log_a` and `log_b` must both have shape (batch, seq, dim); got {tuple(log_a.shape)} and "
            f"{tuple(log_b.shape)}."
        )
    batch, seq, dim = log_a.shape
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim):
        raise ValueError(
            f"`initial_state` must have shape (batch, dim) = {(batch, dim)}; got {tuple(initial_state.shape)}."
        )
    _check_reset(reset, batch, seq)
    to32 = lambda t: None if t is None else t.float()  # noqa: E731
    return to32(log_a), to32(log_b), to32(initial_state)


def _decay(log_a, reset):
    """`a = exp(log_a)`, and exactly 0 at a sequence start: selected, so its gradient there is 0 (never NaN)."""
    a = log_a.exp()
    return a if reset is None else a.masked_fill(reset.unsqueeze(-1), 0.0)


def sequential_scan(log_a, log_b, initial_state=None, reset=None):
    """Reference: `h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t)`, one step at a time; `h_t = exp(log_b_t)` where
    `reset` is True.

    Args: `log_a`, `log_b` `(batch, seq, dim)`; `initial_state` `(batch, dim)` or None (zeros); `reset`
    `(batch, seq)` bool or None.
    Returns: all states `(batch, seq, dim)`, fp32.
    """
    log_a, log_b, h = _as_fp32(log_a, log_b, initial_state, reset)
    a, b = _decay(log_a, reset), log_b.exp()
    if h is None:
        h = a.new_zeros(a.shape[0], a.shape[2])
    states = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    return torch.stack(states, dim=1)


def _log_space_core(log_a, log_b, initial_state):
    # Padding's -inf becomes the most negative finite number: exp still gives exactly 0, and where the running
    # logcumsumexp is still -inf (left padding) its backward gives 0 instead of NaN (-inf - -inf).
    log_b = log_b.clamp(min=torch.finfo(log_b.dtype).min)
    a_star = log_a.cumsum(dim=1)
    h = (a_star + torch.logcumsumexp(log_b - a_star, dim=1)).exp()
    if initial_state is not None:
        h = h + a_star.exp() * initial_state.unsqueeze(1)
    return h


def _segmented_scan(values, starts, combine):
    """Inclusive scan of `values` `(batch, seq, dim)` along seq with `combine`, restarted where `starts` `(batch, seq)`
    is True: Hillis-Steele, `log2(seq)` vectorised steps, no data-dependent shapes (so no host sync)."""
    flags = starts.unsqueeze(-1)
    offset = 1
    while offset < values.shape[1]:
        combined = torch.where(flags[:, offset:], values[:, offset:], combine(values[:, :-offset], values[:, offset:]))
        values = torch.cat([values[:, :offset], combined], dim=1)
        flags = torch.cat([flags[:, :offset], flags[:, offset:] | flags[:, :-offset]], dim=1)
        offset *= 2
    return values


def log_space_scan(log_a, log_b, initial_state=None, reset=None):
    """The paper's parallel scan in log space (Heinsen): `log h = a* + logcumsumexp(log_b - a*)`, `a* = cumsum(log_a)`.

    The initial state enters linearly (`h0 * exp(a*)`), so it may have any sign. A reset cannot enter as
    `log_a = -inf` (the cumsum would give `-inf - -inf = NaN`): with resets, both scans restart at each sequence start
    (a segmented parallel scan), and the initial state reaches only the tokens before a row's first start. Shapes as
    in `sequential_scan`.
    """
    log_a, log_b, initial_state = _as_fp32(log_a, log_b, initial_state, reset)
    if reset is None:
        return _log_space_core(log_a, log_b, initial_state)
    # Padding's -inf as in `_log_space_core`; the decay at a start multiplies nothing, so it is 0 (zero gradient).
    log_b = log_b.clamp(min=torch.finfo(log_b.dtype).min)
    a_star = _segmented_scan(log_a.masked_fill(reset.unsqueeze(-1), 0.0), reset, torch.add)
    h = (a_star + _segmented_scan(log_b - a_star, reset, torch.logaddexp)).exp()
    if initial_state is not None:
        before_any_start = (reset.cumsum(1) == 0).unsqueeze(-1)
        h = h + torch.where(before_any_start, a_star.exp() * initial_state.unsqueeze(1), 0.0)
    return h


def _chunked_forward(a, b, initial_state):
    """Exact linear-space scan in `O(chunk + seq / chunk)` vectorised steps.

    Each chunk is scanned locally from a zero state (all chunks at once), the chunk-end states are carried across
    chunks, and each position then adds the carried state times its within-chunk decay. Products of `a` only span
    one chunk, so nothing drifts with the sequence length.
    """
    batch, seq, dim = a.shape
    chunk = max(1, min(seq, 2 ** round(math.log2(math.sqrt(seq)))))
    pad = (-seq) % chunk
    if pad:  # a = 1, b = 0 past the end: the state just passes through
        a = torch.cat([a, a.new_ones(batch, pad, dim)], dim=1)
        b = torch.cat([b, b.new_zeros(batch, pad, dim)], dim=1)
    n_chunks = a.shape[1] // chunk
    a = a.view(batch, n_chunks, chunk, dim)
    b = b.view(batch, n_chunks, chunk, dim)

    decay = torch.cumprod(a, dim=2)  # a_s * ... * a_t within the chunk, from its start to t
    # Built as a list, not written in place through `out=`: torch.compile and torch.export need a functional graph.
    steps = [b[:, :, 0]]
    for t in range(1, chunk):
        steps.append(torch.addcmul(b[:, :, t], a[:, :, t], steps[-1]))
    local = torch.stack(steps, dim=2)

    carry = a.new_zeros(batch, dim) if initial_state is None else initial_state
    carries = []  # state entering each chunk
    for c in range(n_chunks):
        carries.append(carry)
        carry = torch.addcmul(local[:, c, -1], decay[:, c, -1], carry)
    carries = torch.stack(carries, dim=1).unsqueeze(2)
    h = torch.addcmul(local, decay, carries).view(batch, n_chunks * chunk, dim)
    return h[:, :seq]


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a, log_b, initial_state, reset):
        # a = 0 at a sequence start: the backward's `a` then stops the adjoint there and zeroes d log_a.
        a, b = _decay(log_a, reset), log_b.exp()
        h = _chunked_forward(a, b, initial_state)
        ctx.save_for_backward(a, b, h, initial_state)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, b, h, initial_state = ctx.saved_tensors
        # dL/dh_t = g_t + a_{t+1} dL/dh_{t+1}: the forward recurrence, run backwards in time.
        a_next = torch.cat([a[:, 1:], a.new_zeros(a.shape[0], 1, a.shape[2])], dim=1)
        grad_state = _chunked_forward(a_next.flip(1), grad_h.float().flip(1), None).flip(1)
        h_prev = torch.cat(
            [(h.new_zeros(h.shape[0], 1, h.shape[2]) if initial_state is None else initial_state.unsqueeze(1)),
             h[:, :-1]],
            dim=1,
        )
        grad_log_a = grad_state * h_prev * a
        grad_log_b = grad_state * b
        grad_initial = None if initial_state is None else grad_state[:, 0] * a[:, 0]
        return grad_log_a, grad_log_b, grad_initial, None


def chunked_scan(log_a, log_b, initial_state=None, reset=None):
    """Default PyTorch backend: exact at any length, backward by the reverse recurrence. Shapes as `sequential_scan`."""
    log_a, log_b, initial_state = _as_fp32(log_a, log_b, initial_state, reset)
    return _ChunkedScan.apply(log_a, log_b, initial_state, reset)


def _cpu_scan_available():
    from .scan_cpu import cpu_scan_available

    return cpu_scan_available()


def _triton_scan_available(tensor):
    from .scan_triton import triton_scan_available

    return triton_scan_available(tensor)


def resolve_backend(backend, tensor):
    """Return the concrete backend name that `linear_recurrence` would use for `tensor`.

    `"auto"` (or None) picks the native kernel for CPU tensors when it builds, Triton for CUDA tensors when it is
    installed, else the chunked PyTorch scan; while `torch.export` traces it picks the chunked scan, so that exported
    graphs (ONNX, ExecuTorch) hold only standard ops. Under `torch.compile` the fast kernels stay: they are operators
    with fake kernels and autograd."""
    if backend is not None and backend not in SCAN_BACKENDS:
        raise ValueError(f"Unknown scan backend {backend!r}; valid backends are {SCAN_BACKENDS}.")
    if backend is None or backend == "auto":
        if torch.compiler.is_exporting():
            return "chunked"
        if tensor.is_cuda:
            return "triton" if _triton_scan_available(tensor) else "chunked"
        if tensor.device.type == "cpu" and _cpu_scan_available():
            return "cpu"
        return "chunked"
    if backend == "cpu" and not (tensor.device.type == "cpu" and _cpu_scan_available()):
        raise RuntimeError(
            "scan backend 'cpu' needs CPU tensors and a working C++ compiler; use backend='auto' to fall back."
        )
    if backend == "triton" and not _triton_scan_available(tensor):
        raise RuntimeError("scan backend 'triton' needs Triton and a CUDA tensor; use backend='auto' to fall back.")
    return backend


def _single_step(log_a, log_b, initial_state, reset):
    # A single decoding step: one fused multiply-add, no kernel launch or graph worth having.
    log_a, log_b, initial_state = _as_fp32(log_a, log_b, initial_state, reset)
    h = log_b.exp()
    return h if initial_state is None else torch.addcmul(h, _decay(log_a, reset), initial_state.unsqueeze(1))


def linear_recurrence(log_a, log_b, initial_state=None, backend=None, reset=None):
    """Compute `h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t)` for every t.

    Args:
        log_a: `(batch, seq, dim)` log of the decay, `<= 0`.
        log_b: `(batch, seq, dim)` log of the input term (`-inf` for padding).
        initial_state: `(batch, dim)` state before the first step, or None for zeros.
        backend: one of `SCAN_BACKENDS`; None or `"auto"` picks the fastest available.
        reset: `(batch, seq)` bool, True where a new sequence starts (`h_t = exp(log_b_t)`: the state before it,
            the initial state included, is dropped), or None for none.
    Returns:
        `(batch, seq, dim)` fp32 states; the final state is `h[:, -1]`.
    """
    name = resolve_backend(backend, log_a)
    if log_a.shape[1] == 1 and name != "triton":
        return _single_step(log_a, log_b, initial_state, reset)
    if name == "cpu":
        from .scan_cpu import cpu_scan

        return cpu_scan(log_a, log_b, initial_state, reset=reset)
    if name == "triton":
        from .scan_triton import triton_scan

        return triton_scan(log_a, log_b, initial_state, reset=reset)
    return {"sequential": sequential_scan, "log_space": log_space_scan, "chunked": chunked_scan}[name](
        log_a, log_b, initial_state, reset=reset
    )


def cell_recurrence(cell_type, projections, padding_mask=None, initial_state=None, reset=None, backend=None):
    """All states of a minGRU or minLSTM cell over a sequence, from its input projections.

    Args:
        cell_type: a key of `cells.CELLS` (`"mingru"`: projections `k, h~`; `"minlstm"`: `f, i, h~`).
        projections: `(batch, seq, n * dim)` the cell's input projections, any float dtype.
        padding_mask: `(batch, seq)` bool, True at real tokens, or None. A padded token leaves the state as it was.
        initial_state: `(batch, dim)` state before the first step, or None for zeros.
        reset: `(batch, seq)` bool, True where a new sequence starts, or None.
        backend: one of `SCAN_BACKENDS`; None or `"auto"` picks the fastest available.
    Returns:
        `(batch, seq, dim)` fp32 states.
    """
    cell = CELLS[cell_type]
    name = resolve_backend(backend, projections)
    if name == "cpu":
        from .scan_cpu import cpu_cell_scan

        # The native kernel computes the gates inside the scan: a third of the memory traffic.
        return cpu_cell_scan(cell_type, projections, padding_mask, initial_state, reset)
    if name == "chunked" and projections.shape[1] == 1 and reset is None:
        # One token (a decoding step, and the step graph of an export): no scan, h = a * h + b, in linear space.
        width = projections.shape[-1] // cell.projections  # slices, not chunk: a split leaves XNNPACK's graph
        gates = [projections[..., i * width : (i + 1) * width].to(torch.float32) for i in range(cell.projections)]
        a, b = cell.step_gates(*gates)
        previous = None if initial_state is None else initial_state.unsqueeze(1).to(torch.float32)
        states = b if previous is None else torch.addcmul(b, a, previous)
        if padding_mask is not None:
            # A padded token leaves the state as it was (a = 1, b = 0).
            states = torch.where(padding_mask.unsqueeze(-1), states, 0.0 if previous is None else previous)
        return states
    # Gates in fp32 whatever the weights' dtype: the state accumulates over the whole sequence.
    log_a, log_b = cell.log_gates(*projections.float().chunk(cell.projections, dim=-1))
    if padding_mask is not None:
        # a = 1, b = 0 at padding: the state passes through untouched.
        keep = padding_mask.unsqueeze(-1)
        log_a = log_a.masked_fill(~keep, 0.0)
        log_b = log_b.masked_fill(~keep, float("-inf"))
    return linear_recurrence(log_a, log_b, initial_state, backend=name, reset=reset)
