"""The minRNN recurrence `h_t = a_t * h_{t-1} + b_t`, computed for a whole sequence.

Both cells (minGRU, minLSTM) hand over their gates in log space, as in the paper: `log_a = log(a_t)` and
`log_b = log(b_t)`, so that `0 < a_t < 1` and `b_t > 0` hold by construction. Padding enters as `log_a = 0,
log_b = -inf` (a = 1, b = 0), which leaves the state untouched. A sequence start (packed sequences) enters as a
`reset` mask: there `a_t = 0`, so `h_t = b_t` and nothing before it (the initial state included) reaches it.

One public entry point, `linear_recurrence`, dispatches to interchangeable backends:

- `"sequential"`: the definition, one step at a time. Every other backend is tested against it.
- `"log_space"`: the paper's parallel scan (Heinsen, 2023) with `cumsum` + `logcumsumexp`. Kept as the faithful
  formulation; it loses precision at long lengths in fp32 (the running `cumsum(log_a)` grows without bound).
- `"chunked"`: the default PyTorch path. Exact in linear space, `O(sqrt(T))` Python steps, with a hand-written
  backward (the same recurrence run in reverse), so it stays accurate at any length and needs no autograd graph
  over time steps.
- `"cpu"`: a native multi-threaded loop (`scan_cpu.py`), used automatically for CPU tensors when it builds.
- `"triton"`: fused GPU kernels (`scan_triton.py`), used automatically for CUDA tensors when Triton is present.

All backends compute in fp32 whatever the input dtype and return fp32 states.
"""

import math

import torch

from .scan_cpu import cpu_scan, cpu_scan_available
from .scan_triton import triton_scan, triton_scan_available

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


def log_space_scan(log_a, log_b, initial_state=None, reset=None):
    """The paper's parallel scan in log space (Heinsen): `log h = a* + logcumsumexp(log_b - a*)`, `a* = cumsum(log_a)`.

    The initial state enters linearly (`h0 * exp(a*)`), so it may have any sign. A reset cannot enter as
    `log_a = -inf` (the cumsum would give `-inf - -inf = NaN`): each sequence is moved to a row of its own, scanned
    from its own start, and moved back. Shapes as in `sequential_scan`.
    """
    log_a, log_b, initial_state = _as_fp32(log_a, log_b, initial_state, reset)
    if reset is None or not bool(reset.any()):
        return _log_space_core(log_a, log_b, initial_state)
    batch, seq, dim = log_a.shape
    starts = reset.clone()
    starts[:, 0] = True  # every row opens a segment; it continues the initial state unless reset there
    flat_starts = starts.reshape(-1)
    segment = flat_starts.cumsum(0) - 1  # segment of each token, over the flattened batch
    index = torch.arange(batch * seq, device=reset.device)
    position = index - torch.where(flat_starts, index, 0).cummax(0).values  # within its segment
    n_segments, length = int(segment[-1]) + 1, int(position.max()) + 1
    # Positions past a segment's end hold the identity step (a = 1, b = 0) and are never read back. The decay at a
    # start multiplies nothing (the segment starts from zero): 0, so that its gradient is exactly 0.
    log_a = log_a.masked_fill(reset.unsqueeze(-1), 0.0)
    seg_log_a = log_a.new_zeros(n_segments, length, dim).index_put((segment, position), log_a.reshape(-1, dim))
    seg_log_b = log_b.new_full((n_segments, length, dim), float("-inf")).index_put(
        (segment, position), log_b.reshape(-1, dim)
    )
    seg_initial = None
    if initial_state is not None:
        row_first = segment.view(batch, seq)[:, 0]
        carried = initial_state.masked_fill(reset[:, :1], 0.0)  # a row reset at t = 0 drops the initial state
        seg_initial = initial_state.new_zeros(n_segments, dim).index_put((row_first,), carried)
    h = _log_space_core(seg_log_a, seg_log_b, seg_initial)
    return h[segment, position].view(batch, seq, dim)


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


def resolve_backend(backend, tensor):
    """Return the concrete backend name that `linear_recurrence` would use for `tensor`.

    While torch.compile or torch.export traces, the native CPU kernel (an eager-mode fast path, JIT-built behind a
    lock) is replaced by the chunked PyTorch scan, so the traced graph holds only standard ops."""
    tracing = torch.compiler.is_compiling()
    if tracing and backend in (None, "auto", "cpu") and tensor.device.type == "cpu":
        return "chunked"
    if backend is None or backend == "auto":
        if tensor.is_cuda and triton_scan_available(tensor):
            return "triton"
        if tensor.device.type == "cpu" and cpu_scan_available():
            return "cpu"
        return "chunked"
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"Unknown scan backend {backend!r}; valid backends are {SCAN_BACKENDS}.")
    if backend == "cpu" and not (tensor.device.type == "cpu" and cpu_scan_available()):
        raise RuntimeError(
            "scan backend 'cpu' needs CPU tensors and a working C++ compiler; use backend='auto' to fall back."
        )
    if backend == "triton" and not triton_scan_available(tensor):
        raise RuntimeError("scan backend 'triton' needs Triton and a CUDA tensor; use backend='auto' to fall back.")
    return backend


_BACKEND_FUNCTIONS = {
    "sequential": sequential_scan,
    "log_space": log_space_scan,
    "chunked": chunked_scan,
    "cpu": cpu_scan,
    "triton": triton_scan,
}


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
        # A single decoding step: one fused multiply-add, no kernel launch or graph worth having.
        log_a, log_b, initial_state = _as_fp32(log_a, log_b, initial_state, reset)
        h = log_b.exp()
        return h if initial_state is None else torch.addcmul(h, _decay(log_a, reset), initial_state.unsqueeze(1))
    return _BACKEND_FUNCTIONS[name](log_a, log_b, initial_state, reset=reset)
