"""Triton GPU kernels for the minRNN recurrence `h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t)`.

Two variants of one kernel family, forward and backward:

- **fused**: one program per (batch, block of channels) walks the whole sequence. It is recurrent in time like
  flash-linear-attention's `fused_recurrent` HGRN kernels, but one tile of `BLOCK_T` steps at a time: the tile is
  loaded at once and scanned in registers with `tl.associative_scan`, then joined to the state carried from the
  previous tile. The memory latency is paid once per tile instead of once per step, so large batch x channel
  problems run at memory bandwidth.
- **chunked**: for few channels and long sequences, where the fused grid would leave most of the GPU idle. Three
  passes: (1) every chunk of time is scanned from a zero state in parallel, keeping only its total decay and end
  state; (2) a short scan over those per-chunk summaries gives the state entering each chunk; (3) the fix-up
  re-runs every chunk from its true entering state, writing the outputs. Re-running reads the inputs again instead
  of reading and rewriting stored partial states, which moves fewer bytes and matches the sequential arithmetic.

All arithmetic is in fp32 in linear space (the tile scan combines `(a, b)` pairs, never `exp(cumsum(log_a))`), so
nothing drifts with the length. Inputs may be fp16/bf16/fp32; states are fp32; gradients come back in the dtype of
the input they belong to. `log_b = -inf` (padding) gives `b = 0`: exactly no contribution and a zero gradient.
A sequence start (`reset`, packed sequences) sets `a = 0` where it is loaded, so neither the forward state nor the
backward's adjoint crosses it; a chunk holding one has total decay 0, so pass (2) needs no change.

The backward pass is the same recurrence run backwards in time, `dh_t = g_t + a_{t+1} dh_{t+1}`, followed by
`d log_a_t = dh_t a_t h_{t-1}`, `d log_b_t = dh_t b_t` and `d h_0 = a_1 dh_1` (1-based), computed in the tiles.

The forward and backward are `torch.library.triton_op` operators with registered autograd: torch.compile keeps them
(and sees into them), and their fake kernels give shapes and dtypes without a GPU.

Triton is optional: without it (or without CUDA, unless `TRITON_INTERPRET=1`) this module still imports and
`triton_scan_available` says False. `import triton` stays inside `try:` so transformers' remote-code import check
does not require it.
"""

import contextlib
import hashlib

import torch

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:
    _HAS_TRITON = False


# Largest tile: 16 time steps x 64 channels. A 64-channel row of bf16/fp32 is one or two full 128-byte
# transactions. Built for sm_90 (Triton 3.9, 4 warps) the kernels then take 72 (forward) and 138 (backward)
# registers per thread with no spills; 32-step tiles took 156 and 213, fitting fewer programs on a multiprocessor.
# Short chunks and few channels get smaller tiles (powers of two), so a decoding step (seq = 1) scans no padding.
# `benchmarks/gpu_scan_check.py` times the alternatives.
_MAX_BLOCK_T = 16
_MAX_BLOCK_D = 64
_NUM_WARPS = 4
# A chunk must span several tiles, or pass (2) and the extra launches cost more than the parallelism gains.
_MIN_CHUNK = 8 * _MAX_BLOCK_T
# Programs wanted per streaming multiprocessor before the fused kernel counts as filling the GPU.
_PROGRAMS_PER_SM = 4
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if _HAS_TRITON:

    @triton.jit
    def _combine(a_first, b_first, a_second, b_second):
        # Two steps `h -> a h + b` applied in order, as one step.
        return a_first * a_second, a_second * b_first + b_second

    @triton.jit
    def _tile_times(chunk_start, tile, REVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
        """Time index of each row of tile number `tile` of a chunk, in scan order: rows run backwards in time when
        REVERSE, so one forward `associative_scan` serves both directions."""
        rows = tl.arange(0, BLOCK_T)
        if REVERSE:
            rows = BLOCK_T - 1 - rows
        return chunk_start + tile * BLOCK_T + rows

    @triton.jit
    def _scan_tile(a, b, carry, BLOCK_T: tl.constexpr):
        """States of one (BLOCK_T, BLOCK_D) tile entered with `carry` (BLOCK_D,), the tile's total decay and its
        last state (both (BLOCK_D,)). Rows past the data must hold the identity step a = 1, b = 0."""
        decay, local = tl.associative_scan((a, b), 0, _combine)
        states = local + decay * carry[None, :]
        last = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[:, None]
        return states, tl.sum(tl.where(last, decay, 0.0), 0), tl.sum(tl.where(last, states, 0.0), 0)

    @triton.jit
    def _entering_state(h0_ptr, chunk_state_ptr, batch, chunk, num_chunks, channels, dim, channel_mask,
                        HAS_H0: tl.constexpr, HAS_CHUNK_STATE: tl.constexpr, REVERSE: tl.constexpr):
        """State entering this chunk: the previous chunk's end state (from pass 2) if there is one, else h0 or 0."""
        state = tl.zeros(channels.shape, tl.float32)
        if HAS_H0:
            state = tl.load(h0_ptr + batch * dim + channels, mask=channel_mask, other=0.0).to(tl.float32)
        if HAS_CHUNK_STATE:
            neighbour = chunk + 1 if REVERSE else chunk - 1
            has_neighbour = (neighbour >= 0) & (neighbour < num_chunks)
            # Clamped so the load stays in bounds; its value is discarded where there is no neighbour.
            neighbour = tl.minimum(tl.maximum(neighbour, 0), num_chunks - 1)
            previous = tl.load(chunk_state_ptr + (batch * num_chunks + neighbour) * dim + channels,
                               mask=channel_mask, other=0.0)
            state = tl.where(has_neighbour, previous, state)
        return state

    @triton.jit
    def _reset_decay(a, reset_ptr, batch, seq, times, in_range, HAS_RESET: tl.constexpr):
        """`a` with its rows at sequence starts (`reset`, (batch, seq) uint8) set to 0."""
        if HAS_RESET:
            starts = tl.load(reset_ptr + batch * seq + times, mask=in_range, other=0)
            a = tl.where((starts != 0)[:, None], 0.0, a)
        return a

    @triton.jit
    def _forward_kernel(x_ptr, y_ptr, h0_ptr, chunk_state_ptr, reset_ptr, out_ptr, decay_ptr, end_ptr, seq, dim,
                        chunk_size, LOG_SPACE: tl.constexpr, REVERSE: tl.constexpr, HAS_H0: tl.constexpr,
                        HAS_CHUNK_STATE: tl.constexpr, HAS_RESET: tl.constexpr, STORE_STATES: tl.constexpr,
                        STORE_SUMMARY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """Scan `h = a h + b` over one chunk of one (batch, channel block), grid (channel blocks, batch, chunks).

        LOG_SPACE: `(x, y)` are `(log a, log b)`, else `(a, b)` themselves (the pass-2 scan over chunk summaries).
        STORE_STATES writes every state to `out`; STORE_SUMMARY writes the chunk's total decay and end state.
        `out` may alias `y` (pass 2 overwrites the end states with the carried states): each tile is read before
        it is written, by the same program.
        """
        channels = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        batch = tl.program_id(1).to(tl.int64)
        chunk = tl.program_id(2)
        num_chunks = tl.num_programs(2)
        channel_mask = channels < dim
        chunk_start = chunk * chunk_size
        chunk_end = tl.minimum(chunk_start + chunk_size, seq)
        base = batch * seq * dim + channels[None, :]

        carry = _entering_state(h0_ptr, chunk_state_ptr, batch, chunk, num_chunks, channels, dim, channel_mask,
                                HAS_H0, HAS_CHUNK_STATE, REVERSE)
        total_decay = tl.full(channels.shape, 1.0, tl.float32)
        num_tiles = tl.cdiv(chunk_end - chunk_start, BLOCK_T)
        for i in range(num_tiles):
            tile = num_tiles - 1 - i if REVERSE else i
            times = _tile_times(chunk_start, tile, REVERSE, BLOCK_T)
            in_chunk = (times >= chunk_start) & (times < chunk_end)
            mask = in_chunk[:, None] & channel_mask[None, :]
            offsets = base + times.to(tl.int64)[:, None] * dim
            # Masked rows load the identity step: a = 1 (log a = 0), b = 0 (log b = -inf).
            if LOG_SPACE:
                a = tl.exp(tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
                b = tl.exp(tl.load(y_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32))
            else:
                a = tl.load(x_ptr + offsets, mask=mask, other=1.0).to(tl.float32)
                b = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            a = _reset_decay(a, reset_ptr, batch, seq, times, in_chunk, HAS_RESET)
            states, tile_decay, carry = _scan_tile(a, b, carry, BLOCK_T)
            total_decay *= tile_decay
            if STORE_STATES:
                tl.store(out_ptr + offsets, states, mask=mask)
        if STORE_SUMMARY:
            summary = (batch * num_chunks + chunk) * dim + channels
            tl.store(decay_ptr + summary, total_decay, mask=channel_mask)
            tl.store(end_ptr + summary, carry, mask=channel_mask)

    @triton.jit
    def _backward_kernel(log_a_ptr, log_b_ptr, h_ptr, h0_ptr, grad_ptr, chunk_state_ptr, reset_ptr, d_log_a_ptr,
                         d_log_b_ptr, d_h0_ptr, decay_ptr, end_ptr, seq, dim, chunk_size, HAS_H0: tl.constexpr,
                         HAS_CHUNK_STATE: tl.constexpr, HAS_RESET: tl.constexpr, STORE_GRADS: tl.constexpr,
                         STORE_SUMMARY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """Reverse scan `dh_t = g_t + a_{t+1} dh_{t+1}` over one chunk, grid (channel blocks, batch, chunks).

        The carry is `dh` at the chunk's first step. STORE_GRADS turns each tile's `dh` into the input gradients
        (and `d h0` in chunk 0); STORE_SUMMARY writes the chunk's total decay and `dh` at its start from a zero
        carry, for pass 2.
        """
        channels = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        batch = tl.program_id(1).to(tl.int64)
        chunk = tl.program_id(2)
        num_chunks = tl.num_programs(2)
        channel_mask = channels < dim
        chunk_start = chunk * chunk_size
        chunk_end = tl.minimum(chunk_start + chunk_size, seq)
        base = batch * seq * dim + channels[None, :]

        carry = _entering_state(h0_ptr, chunk_state_ptr, batch, chunk, num_chunks, channels, dim, channel_mask,
                                False, HAS_CHUNK_STATE, True)
        if HAS_H0:
            h0 = tl.load(h0_ptr + batch * dim + channels, mask=channel_mask, other=0.0).to(tl.float32)
        total_decay = tl.full(channels.shape, 1.0, tl.float32)
        num_tiles = tl.cdiv(chunk_end - chunk_start, BLOCK_T)
        for i in range(num_tiles):
            times = _tile_times(chunk_start, num_tiles - 1 - i, True, BLOCK_T)
            in_chunk = (times >= chunk_start) & (times < chunk_end)
            mask = in_chunk[:, None] & channel_mask[None, :]
            offsets = base + times.to(tl.int64)[:, None] * dim
            # Step t of the reverse scan multiplies by a_{t+1}, which may lie in the next chunk; past the sequence
            # end and on masked rows it is the identity (log a = 0).
            has_next = in_chunk & (times + 1 < seq)
            next_mask = has_next[:, None] & channel_mask[None, :]
            a_next = tl.exp(tl.load(log_a_ptr + offsets + dim, mask=next_mask, other=0.0).to(tl.float32))
            a_next = _reset_decay(a_next, reset_ptr, batch, seq, times + 1, has_next, HAS_RESET)
            g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dh, tile_decay, carry = _scan_tile(a_next, g, carry, BLOCK_T)
            total_decay *= tile_decay
            if STORE_GRADS:
                a = tl.exp(tl.load(log_a_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
                a = _reset_decay(a, reset_ptr, batch, seq, times, in_chunk, HAS_RESET)
                b = tl.exp(tl.load(log_b_ptr + offsets, mask=mask, other=float("-inf")).to(tl.float32))
                h_prev = tl.load(h_ptr + offsets - dim, mask=mask & (times >= 1)[:, None], other=0.0)
                if HAS_H0:
                    h_prev = tl.where((times == 0)[:, None], h0[None, :], h_prev)
                tl.store(d_log_a_ptr + offsets, dh * a * h_prev, mask=mask)
                tl.store(d_log_b_ptr + offsets, dh * b, mask=mask)
        # d h0 = a_1 dh_1, from the chunk that starts the sequence. A runtime `if` of its own: compile-time flags
        # and runtime values do not mix in one condition, and the interpreter rejects a scalar in a load mask.
        if STORE_GRADS and HAS_H0:  # noqa: SIM102
            if chunk == 0:
                a_first = tl.exp(tl.load(log_a_ptr + batch * seq * dim + channels, mask=channel_mask,
                                         other=0.0).to(tl.float32))
                if HAS_RESET:
                    a_first = tl.where(tl.load(reset_ptr + batch * seq) != 0, 0.0, a_first)
                tl.store(d_h0_ptr + batch * dim + channels, a_first * carry, mask=channel_mask)
        if STORE_SUMMARY:
            summary = (batch * num_chunks + chunk) * dim + channels
            tl.store(decay_ptr + summary, total_decay, mask=channel_mask)
            tl.store(end_ptr + summary, carry, mask=channel_mask)

    # Kernels built under TRITON_INTERPRET=1 run on the CPU interpreter, which accepts tensors on any device.
    _INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


def triton_scan_available(tensor):
    """True when `triton_scan` can run on `tensor`: Triton imports and the tensor is on CUDA (any device under
    `TRITON_INTERPRET=1`)."""
    return _HAS_TRITON and (tensor.is_cuda or _INTERPRETED)


def _cdiv(x, y):
    return -(-x // y)


def _launch(kernel, batch, dim, num_chunks, chunk_steps, *args, **flags):
    """Run `kernel` on grid (channel blocks, batch, chunks) with tiles sized for `chunk_steps` steps per chunk.

    Through `wrap_triton`, so that torch.compile sees the launch. Full-size tiles are decided by a comparison, so a
    graph compiled for dynamic shapes holds for every length and width past one tile."""
    block_d = _MAX_BLOCK_D if dim >= _MAX_BLOCK_D else triton.next_power_of_2(dim)
    block_t = _MAX_BLOCK_T if chunk_steps >= _MAX_BLOCK_T else triton.next_power_of_2(chunk_steps)
    grid = (_cdiv(dim, block_d), batch, num_chunks)
    torch.library.wrap_triton(kernel)[grid](*args, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_NUM_WARPS, **flags)


def _default_chunk_size(batch, seq, dim, device):
    """Time steps per chunk so that (batch x channel blocks x chunks) programs fill the GPU, or None where the fused
    kernel's batch x channel blocks already do (or the sequence is too short to split)."""
    fused_programs = batch * _cdiv(dim, _MAX_BLOCK_D)
    real_gpu = device.type == "cuda" and torch.cuda.is_available()  # not for fake tensors traced without a GPU
    processors = torch.cuda.get_device_properties(device).multi_processor_count if real_gpu else 128
    num_chunks = min(_cdiv(_PROGRAMS_PER_SM * processors, fused_programs), seq // _MIN_CHUNK)
    if num_chunks < 2:
        return None
    return _cdiv(_cdiv(seq, num_chunks), _MAX_BLOCK_T) * _MAX_BLOCK_T


def _device_scope(tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's. Fake CUDA tensors (shapes only, as
    # torch.compile traces) may exist where no GPU does.
    real_gpu = tensor.is_cuda and torch.cuda.is_available()
    return torch.cuda.device(tensor.device) if real_gpu else contextlib.nullcontext()


def _forward(log_a, log_b, initial_state, reset, chunk_size):
    """States `(batch, seq, dim)` fp32; `chunk_size` None runs the fused kernel, else the three chunked passes.
    `reset` is a `(batch, seq)` uint8 view of the bool mask, or None."""
    batch, seq, dim = log_a.shape
    h = torch.empty(batch, seq, dim, device=log_a.device, dtype=torch.float32)
    flags = {"REVERSE": False, "HAS_H0": initial_state is not None}
    has_reset = reset is not None
    if chunk_size is None or chunk_size >= seq:
        _launch(_forward_kernel, batch, dim, 1, seq, log_a, log_b, initial_state, None, reset, h, None, None, seq, dim,
                seq, LOG_SPACE=True, HAS_CHUNK_STATE=False, HAS_RESET=has_reset, STORE_STATES=True,
                STORE_SUMMARY=False, **flags)
        return h
    num_chunks = _cdiv(seq, chunk_size)
    decay = torch.empty(batch, num_chunks, dim, device=log_a.device, dtype=torch.float32)
    chunk_state = torch.empty_like(decay)
    # (1) each chunk from a zero state: its total decay and end state.
    _launch(_forward_kernel, batch, dim, num_chunks, chunk_size, log_a, log_b, None, None, reset, None, decay,
            chunk_state, seq, dim, chunk_size, LOG_SPACE=True, REVERSE=False, HAS_H0=False, HAS_CHUNK_STATE=False,
            HAS_RESET=has_reset, STORE_STATES=False, STORE_SUMMARY=True)
    # (2) the same recurrence over chunks, in place: chunk_state[c] becomes the true state after chunk c.
    _launch(_forward_kernel, batch, dim, 1, num_chunks, decay, chunk_state, initial_state, None, None, chunk_state,
            None, None, num_chunks, dim, num_chunks, LOG_SPACE=False, HAS_CHUNK_STATE=False, HAS_RESET=False,
            STORE_STATES=True, STORE_SUMMARY=False, **flags)
    # (3) each chunk again, from the state after the chunk before it.
    _launch(_forward_kernel, batch, dim, num_chunks, chunk_size, log_a, log_b, initial_state, chunk_state, reset, h,
            None, None, seq, dim, chunk_size, LOG_SPACE=True, HAS_CHUNK_STATE=True, HAS_RESET=has_reset,
            STORE_STATES=True, STORE_SUMMARY=False, **flags)
    return h


def _backward(grad_h, log_a, log_b, initial_state, reset, h, chunk_size):
    """Gradients of `_forward` for the upstream `grad_h` (batch, seq, dim), each in its input's dtype."""
    batch, seq, dim = log_a.shape
    d_log_a = torch.empty_like(log_a)
    d_log_b = torch.empty_like(log_b)
    has_h0 = initial_state is not None
    has_reset = reset is not None
    d_h0 = torch.empty_like(initial_state) if has_h0 else None
    if chunk_size is None or chunk_size >= seq:
        _launch(_backward_kernel, batch, dim, 1, seq, log_a, log_b, h, initial_state, grad_h, None, reset, d_log_a,
                d_log_b, d_h0, None, None, seq, dim, seq, HAS_H0=has_h0, HAS_CHUNK_STATE=False, HAS_RESET=has_reset,
                STORE_GRADS=True, STORE_SUMMARY=False)
        return d_log_a, d_log_b, d_h0
    num_chunks = _cdiv(seq, chunk_size)
    decay = torch.empty(batch, num_chunks, dim, device=log_a.device, dtype=torch.float32)
    chunk_state = torch.empty_like(decay)
    # (1) each chunk from a zero carry: its total decay and dh at its first step.
    _launch(_backward_kernel, batch, dim, num_chunks, chunk_size, log_a, None, None, None, grad_h, None, reset, None,
            None, None, decay, chunk_state, seq, dim, chunk_size, HAS_H0=False, HAS_CHUNK_STATE=False,
            HAS_RESET=has_reset, STORE_GRADS=False, STORE_SUMMARY=True)
    # (2) over chunks from the last one back, in place: chunk_state[c] becomes the true dh at chunk c's first step.
    _launch(_forward_kernel, batch, dim, 1, num_chunks, decay, chunk_state, None, None, None, chunk_state, None,
            None, num_chunks, dim, num_chunks, LOG_SPACE=False, REVERSE=True, HAS_H0=False, HAS_CHUNK_STATE=False,
            HAS_RESET=False, STORE_STATES=True, STORE_SUMMARY=False)
    # (3) each chunk again from the dh of the chunk after it, turning dh into the gradients.
    _launch(_backward_kernel, batch, dim, num_chunks, chunk_size, log_a, log_b, h, initial_state, grad_h, chunk_state,
            reset, d_log_a, d_log_b, d_h0, None, None, seq, dim, chunk_size, HAS_H0=has_h0, HAS_CHUNK_STATE=True,
            HAS_RESET=has_reset, STORE_GRADS=True, STORE_SUMMARY=False)
    return d_log_a, d_log_b, d_h0


# The kernels as operators: torch.compile sees into them (`triton_op` + `wrap_triton`), and the function body is its
# own fake kernel. The namespace is this module's own, so that a remote-code copy of this file registers its own.
_NAMESPACE = "minrnn_" + hashlib.sha256(__name__.encode()).hexdigest()[:12]

if _HAS_TRITON:

    @torch.library.triton_op(f"{_NAMESPACE}::triton_scan", mutates_args=())
    def _scan_op(log_a: torch.Tensor, log_b: torch.Tensor, initial_state: torch.Tensor | None,
                 reset: torch.Tensor | None, chunk_size: int | None) -> torch.Tensor:
        with _device_scope(log_a):
            return _forward(log_a, log_b, initial_state, reset, chunk_size)

    @torch.library.triton_op(f"{_NAMESPACE}::triton_scan_backward", mutates_args=())
    def _scan_backward_op(grad_h: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                          initial_state: torch.Tensor | None, reset: torch.Tensor | None, h: torch.Tensor,
                          chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with _device_scope(log_a):
            d_log_a, d_log_b, d_h0 = _backward(grad_h.contiguous(), log_a, log_b, initial_state, reset, h, chunk_size)
        # An operator returns tensors only: no initial state, an empty gradient for it (dropped by `_scan_grads`).
        return d_log_a, d_log_b, log_a.new_empty(0) if d_h0 is None else d_h0

    def _save_scan(ctx, inputs, output):
        log_a, log_b, initial_state, reset, chunk_size = inputs
        ctx.save_for_backward(log_a, log_b, initial_state, reset, output)
        ctx.chunk_size = chunk_size

    def _scan_grads(ctx, grad_h):
        log_a, log_b, initial_state, reset, h = ctx.saved_tensors
        d_log_a, d_log_b, d_h0 = _scan_backward_op(grad_h, log_a, log_b, initial_state, reset, h, ctx.chunk_size)
        return d_log_a, d_log_b, d_h0 if initial_state is not None else None, None, None

    _scan_op.register_autograd(_scan_grads, setup_context=_save_scan)


def triton_scan(log_a, log_b, initial_state=None, chunked=None, chunk_size=None, reset=None):
    """`h_t = exp(log_a_t) * h_{t-1} + exp(log_b_t)` with Triton kernels, differentiable.

    Args:
        log_a, log_b: `(batch, seq, dim)`, fp16/bf16/fp32, on CUDA (any device under `TRITON_INTERPRET=1`).
        initial_state: `(batch, dim)` state before the first step, or None (zeros).
        chunked: True/False forces the chunked/fused kernels; None picks chunked when batch x channel blocks are
            too few to fill the GPU and the sequence is long enough to split.
        chunk_size: time steps per chunk for the chunked kernels (implies chunked); None picks one.
        reset: `(batch, seq)` bool on `log_a`'s device, True where a new sequence starts (`a = 0` there: the state
            before it, the initial state included, is dropped), or None.
    Returns:
        `(batch, seq, dim)` fp32 states.
    """
    if not triton_scan_available(log_a):
        raise RuntimeError(
            f"triton_scan needs Triton and CUDA tensors (or TRITON_INTERPRET=1); Triton "
            f"{'is' if _HAS_TRITON else 'is not'} installed and `log_a` is on {log_a.device}."
        )
    if log_a.dim() != 3 or log_a.shape != log_b.shape:
        raise ValueError(
            f"`log_a` and `log_b` must both have shape (batch, seq, dim); got {tuple(log_a.shape)} and "
            f"{tuple(log_b.shape)}."
        )
    for name, tensor in (("log_a", log_a), ("log_b", log_b), ("initial_state", initial_state)):
        if tensor is None:
            continue
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"`{name}` must be one of {_SUPPORTED_DTYPES}; got {tensor.dtype}.")
        if tensor.device != log_a.device:
            raise ValueError(f"`{name}` is on {tensor.device} but `log_a` is on {log_a.device}.")
    batch, seq, dim = log_a.shape
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim):
        raise ValueError(
            f"`initial_state` must have shape (batch, dim) = {(batch, dim)}; got {tuple(initial_state.shape)}."
        )
    if reset is not None:
        if reset.dtype != torch.bool or tuple(reset.shape) != (batch, seq):
            raise ValueError(
                f"`reset` must be a bool tensor of shape (batch, seq) = {(batch, seq)}; got {reset.dtype} "
                f"{tuple(reset.shape)}."
            )
        if reset.device != log_a.device:
            raise ValueError(f"`reset` is on {reset.device} but `log_a` is on {log_a.device}.")
        # The same bytes viewed as uint8, which the kernels load and compare with 0 (no copy).
        reset = reset.contiguous().view(torch.uint8)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None; got {chunk_size!r}.")
    if chunk_size is not None and chunked is False:
        raise ValueError("`chunk_size` was given with `chunked=False`; drop one of them.")
    if chunked not in (None, True, False):
        raise ValueError(f"`chunked` must be True, False or None; got {chunked!r}.")

    if log_a.numel() == 0:
        # Nothing to launch; keeps autograd connected so that empty batches still backpropagate (zeros).
        h = log_a.float() + log_b.float()
        return h if initial_state is None else h + initial_state.float().unsqueeze(1)
    if chunk_size is None and chunked is not False:
        chunk_size = _default_chunk_size(batch, seq, dim, log_a.device)
        if chunk_size is None and chunked:
            chunk_size = _cdiv(seq, 2)
    return _scan_op(log_a.contiguous(), log_b.contiguous(),
                    None if initial_state is None else initial_state.contiguous(), reset, chunk_size)
