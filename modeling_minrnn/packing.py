"""The model's inputs beyond the tokens: the attention mask and packed-sequence boundaries, validated and turned
into the two bool masks the blocks use: `padding_mask` (True at real tokens) and `reset` (True where a packed
sequence starts, so the state and the conv window restart there).

One code path on every device: the masks come out of the same tensor operations whatever the inputs hold, so a CPU
test runs the branches a CUDA run takes (and a model on `meta` tensors runs at all). Shapes and dtypes are checked on
every call (free); checks that read values would force a host-device sync on every forward, every decoding step
included, so they run once per call where that is cheap (`generate` checks its prompt's token ids) or on every
forward, on every device, when asked: `with check_input_values():` or `MINRNN_CHECK_INPUT_VALUES=1`.
"""

import os
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers.utils.import_utils import is_torchdynamo_compiling

_check_input_values = ContextVar(
    "minrnn_check_input_values", default=os.environ.get("MINRNN_CHECK_INPUT_VALUES", "0") == "1"
)

@contextmanager
def check_input_values(enabled: bool = True):
    """Validate the values of the model's inputs (token ids in the vocabulary, a 0/1 attention mask, consistent
    packing inputs) on every forward inside this block, on every device: a debugging aid, at one host-device sync per
    check on an accelerator."""
    token = _check_input_values.set(enabled)
    try:
        yield
    finally:
        _check_input_values.reset(token)


def checks_values() -> bool:
    """Whether inputs' values are validated in this forward (`check_input_values`), never inside a traced graph."""
    return not is_torchdynamo_compiling() and _check_input_values.get()  # dynamo cannot trace `ContextVar.get`


def padding_mask_from(attention_mask: torch.Tensor | None, batch_size: int, seq_len: int, has_state: bool):
    """Validate a `(batch, seq)` attention mask and return a bool mask for the current tokens (None without a mask).

    During generation the mask covers the cached tokens too; only its last `seq_len` columns concern this call.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] < seq_len or (
        attention_mask.shape[1] > seq_len and not has_state
    ):
        raise ValueError(
            f"`attention_mask` must have shape (batch, seq) = {(batch_size, seq_len)} (or cover the cached tokens "
            f"too when a cache is passed); got {tuple(attention_mask.shape)}."
        )
    mask = attention_mask[:, attention_mask.shape[1] - seq_len :]
    if checks_values():
        check_mask_values(mask)
    return mask.bool()


def check_mask_values(attention_mask: torch.Tensor) -> None:
    """Refuse an attention mask holding anything but 0 and 1 (an additive 0 / -inf mask, say); reads its values."""
    if attention_mask.dtype == torch.bool:
        return
    bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
    if bad.numel():
        raise ValueError(
            f"`attention_mask` must hold only 0 (padding) and 1 (real token), or be bool; got "
            f"{sorted(set(bad.unique()[:5].tolist()))}. An additive mask (0 / -inf) is not accepted: pass the "
            "tokenizer's 0/1 mask."
        )


def _starts_from_cu_seq_lens(name, cu_seq_lens, max_length, batch_size, seq_len, device):
    """Sequence starts `(batch, seq)` from cumulative lengths over the flattened `(batch * seq)` tokens."""
    total = batch_size * seq_len
    well_formed = (
        isinstance(cu_seq_lens, torch.Tensor)
        and not cu_seq_lens.is_floating_point()
        and cu_seq_lens.dim() == 1
        and cu_seq_lens.numel() >= 2
    )
    offsets = cu_seq_lens.to(device=device, dtype=torch.long) if well_formed else None
    if not well_formed or checks_values() and (
        int(offsets[0]) != 0 or int(offsets[-1]) != total or bool((offsets.diff() < 0).any())
    ):
        if isinstance(cu_seq_lens, torch.Tensor):
            got = cu_seq_lens.tolist() if cu_seq_lens.numel() <= 8 else f"shape {tuple(cu_seq_lens.shape)}"
        else:
            got = type(cu_seq_lens).__name__
        raise ValueError(
            f"`{name}` must be a 1-D integer tensor of cumulative sequence lengths over the flattened batch: 0, then "
            f"non-decreasing, ending at batch * seq = {total}; got {got}."
        )
    lengths = offsets.diff()
    if checks_values() and max_length is not None and int(max_length) < int(lengths.max()):
        raise ValueError(
            f"`{name.replace('cu_seq_lens', 'max_length')}`={int(max_length)} is shorter than the longest sequence in "
            f"`{name}` ({int(lengths.max())})."
        )
    if checks_values() and not bool(torch.isin(torch.arange(1, batch_size, device=device) * seq_len, offsets).all()):
        raise ValueError(
            f"`{name}` has a sequence that runs from one row into the next; with batch size {batch_size}, each row "
            f"(of {seq_len} tokens) must start a sequence: include every multiple of {seq_len}."
        )
    # Counted, not assigned: an empty sequence repeats an offset, which then still starts the next one.
    starts = torch.zeros(total + 1, dtype=torch.long, device=device).index_add_(0, offsets[:-1], (lengths > 0).long())
    return (starts[:total] > 0).view(batch_size, seq_len)


def _as_rows(name, tensor, batch_size, seq_len, broadcast):
    """`tensor` `(batch, seq)`, `(seq,)` or, with `broadcast`, `(1, seq)`, as an integer `(batch, seq)` tensor."""
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    rows = (1, batch_size) if broadcast else (batch_size,)
    if tensor.dim() != 2 or tensor.shape[1] != seq_len or tensor.shape[0] not in rows or tensor.is_floating_point():
        also = " (or (1, seq))" if broadcast else ""
        raise ValueError(
            f"`{name}` must be an integer tensor of shape (batch, seq) = {(batch_size, seq_len)}{also}; got "
            f"{tensor.dtype} {tuple(tensor.shape)}."
        )
    return tensor.expand(batch_size, seq_len)


def sequence_starts(
    batch_size: int, seq_len: int, padding_mask: torch.Tensor | None, device: torch.device, packing: dict
) -> torch.Tensor | None:
    """The `(batch, seq)` bool mask of packed-sequence starts (where the state and conv window restart), or None
    when `packing` (the forward's keyword arguments) holds no packing input or the call has one token.

    Packing collators (transformers' `DataCollatorWithFlattening`, TRL's padding-free packing) mark where each
    sequence starts in any of three ways; every one given is read and they must agree: `position_ids` restart at 0;
    `cu_seq_lens_q/k` hold the start offsets in the flattened `(batch * seq)` tokens, then the total (`max_length_q/k`
    their longest sequence, checked, not needed); `seq_idx` changes value. A row's first real token of the call is
    never a start: the state carried into the call (zeros, or the cache's) continues there, because `generate`
    numbers a continuation's first token 0 too. Padding is never a start (it leaves the state untouched).
    """
    derived = {}
    if packing.get("position_ids") is not None:
        position_ids = _as_rows("position_ids", packing["position_ids"], batch_size, seq_len, broadcast=True)
        derived["position_ids"] = position_ids == 0
    for name, max_length in (("cu_seq_lens_q", "max_length_q"), ("cu_seq_lens_k", "max_length_k")):
        if packing.get(name) is not None:
            derived[name] = _starts_from_cu_seq_lens(
                name, packing[name], packing.get(max_length), batch_size, seq_len, device
            )
    if packing.get("seq_idx") is not None:
        seq_idx = _as_rows("seq_idx", packing["seq_idx"], batch_size, seq_len, broadcast=False)
        derived["seq_idx"] = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True)
    if not derived or seq_len == 1:  # one token is its row's first: never a start (decoding steps pay nothing)
        return None

    real = padding_mask
    if real is None:
        real = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    eligible = real & (real.cumsum(dim=1) > 1)
    (first_name, reset), *others = [(name, starts.to(device) & eligible) for name, starts in derived.items()]
    for name, other in others:
        if checks_values() and not torch.equal(other, reset):
            raise ValueError(
                f"`{first_name}` and `{name}` mark different sequence starts; pass consistent packing inputs (e.g. "
                "all from one collator) or only one of them."
            )
    return reset
