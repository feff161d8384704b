"""Exact loss gradients over a sequence longer than memory: checkpointing over time, through accelerate.

A minGRU/minLSTM block carries its whole past in its cache layer (the state `h` and the conv window), so a long
sequence splits into chunks that continue exactly where the previous one stopped. `chunked_backward` runs the
chunks forward without a graph, keeping only the states at the chunk boundaries, then walks back through them:
each chunk is recomputed with a graph from its saved entering state and backpropagated from its own share of the
loss plus the gradient that the later chunks sent to its final state; the gradient that reaches its entering
state goes on to the chunk before. The result is the gradient of the full-sequence loss, in the memory of one
chunk's activations plus one state per chunk boundary.

Every chunk's backward is `accelerator.backward` (gradient accumulation's division, fp16's loss scaler), and all
but the last one run under `accelerator.no_sync`: under DDP the gradients are all-reduced once per micro-step, as
for one full backward, not once per chunk. A training algorithm, so it lives here and not in the model package
(which ships as remote code and holds the model and inference only).
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from modeling_minrnn.cache_minrnn import LayerState, MinRNNCache, layer_states

IGNORE_INDEX = -100  # the label transformers' losses skip


@dataclass
class ChunkedBackwardOutput(ModelOutput):
    """
    loss (`torch.FloatTensor` of shape `()`): the next-token loss over the whole sequence, detached: the mean over
        the predicted tokens, as `forward(labels=...)` gives it, or their sum over `num_items_in_batch` if given.
    num_items (`int`): the predicted tokens of this call (targets that are not -100).
    """

    loss: torch.Tensor | None = None
    num_items: int | None = None


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _check_inputs(input_ids, labels, attention_mask, chunk_size, num_items_in_batch):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an int >= 1 (tokens per recomputed chunk); got {chunk_size!r}.")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(
            f"`input_ids` must be a tensor of shape (batch, seq) with seq >= 2 (the first target is the second "
            f"token); got {got}."
        )
    for name, tensor in (("labels", labels), ("attention_mask", attention_mask)):
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.shape != input_ids.shape):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"`{name}` must have the shape of `input_ids` {tuple(input_ids.shape)}; got {got}.")
    if num_items_in_batch is not None and not num_items_in_batch > 0:
        raise ValueError(f"`num_items_in_batch` must be > 0 (the targets the loss is averaged over); got "
                         f"{num_items_in_batch}.")


def chunked_backward(
    accelerator,
    model,
    input_ids: torch.LongTensor,
    labels: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk_size: int = 4096,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> ChunkedBackwardOutput:
    """Next-token loss over `input_ids` `(batch, seq)` and its exact gradients, accumulated into every parameter's
    `.grad` by `accelerator.backward`, in memory bounded by `chunk_size` tokens of activations whatever `seq` is.

    Equals `accelerator.backward(model(input_ids, labels=labels, attention_mask=attention_mask).loss)` (up to float
    rounding): the targets are `labels` (default `input_ids`) shifted by one, -100 ignored, and the loss is their
    mean (or their sum over `num_items_in_batch`). Gradients add to `.grad` as a backward does, divided by the
    accelerator's `gradient_accumulation_steps` and scaled by its fp16 loss scaler, as `accelerator.backward` does;
    under DDP they are all-reduced once, with the last chunk's backward, and only where `accelerator.accumulate`
    syncs. In training mode each chunk is recomputed under the random state of its first pass, so dropout masks
    match. Costs about one forward more than full backprop.

    `model` is a `MinRNNForCausalLM`, or the model `accelerator.prepare` returned (DDP, FSDP) for one.
    """
    _check_inputs(input_ids, labels, attention_mask, chunk_size, num_items_in_batch)
    if getattr(accelerator.unwrap_model(model), "is_activation_checkpointing", False) and model.training:
        raise ValueError(
            "`chunked_backward` recomputes each chunk itself, and activation checkpointing drops the cache that "
            "carries the state between chunks: call `model.activation_checkpointing_disable()` first."
        )
    # Targets shifted once for the whole sequence (as transformers' loss does: -100 after the last token), so that
    # the first token of each chunk is the target of the last position of the chunk before.
    targets = F.pad((labels if labels is not None else input_ids)[:, 1:], (0, 1), value=IGNORE_INDEX)
    num_items = int((targets != IGNORE_INDEX).sum())
    divisor = num_items_in_batch if num_items_in_batch is not None else num_items
    if num_items_in_batch is None and num_items == 0:
        raise ValueError("Every target in `labels` is -100: the mean loss over no tokens is undefined.")
    starts = range(0, input_ids.shape[1], chunk_size)

    def run(start, cache, **kwargs):
        chunk = slice(start, start + chunk_size)
        mask = None if attention_mask is None else attention_mask[:, chunk]
        return model(input_ids=input_ids[:, chunk], attention_mask=mask, cache=cache, use_cache=True, **kwargs)

    # Forward without a graph: keep the state entering each chunk (and the random state it started from).
    device, record_rng = input_ids.device, model.training
    entering, rng_states, cache = [None], [], None
    with torch.no_grad():
        for start in starts:
            rng_states.append(_rng_state(device) if record_rng else None)
            cache = run(start, cache, logits_to_keep=1).cache
            if cache is None:
                raise ValueError("The model returned no cache with `use_cache=True`; its state cannot be carried.")
            # Copies: the cache overwrites its state in place on the next chunk.
            entering.append([LayerState(h.clone(), None if conv is None else conv.clone())
                             for h, conv in layer_states(cache)])
    entering.pop()  # the state after the last chunk feeds nothing
    del cache

    # Backward, last chunk first: recompute with a graph, backprop the chunk's loss and the gradient arriving at its
    # final state, and hand the gradient at its entering state on to the chunk before.
    # `accelerator.backward` multiplies what it backpropagates by a factor (1 / gradient_accumulation_steps, times
    # the fp16 loss scale): the gradients handed on carry it, so they are divided by it before they enter the next
    # chunk's backward, which applies it again. `probe` (0 in the loss, so the value is unchanged) measures it.
    probe = torch.zeros((), device=device, requires_grad=True)
    loss_sum, state_grads, factor = torch.zeros((), device=device), None, None
    on_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_cuda else [], enabled=record_rng,
                               device_type="cuda" if on_cuda else None), torch.enable_grad():
        for index in reversed(range(len(starts))):
            if record_rng:
                _set_rng_state(rng_states[index], device)
            state = entering[index]
            cache = None  # the sequence's start
            if state is not None:
                state = [(h.requires_grad_(), None if conv is None else conv.requires_grad_()) for h, conv in state]
                # The cache copies the entering state into its own buffers: autograd records the copy, so the
                # gradient reaches `state`; the mixer clones what the scan saves before the cache overwrites it.
                cache = MinRNNCache.from_layer_states([LayerState(h, conv) for h, conv in state])
            start = starts[index]
            # DDP all-reduces in the backward of a forward run outside `no_sync`: only the first chunk's, the last
            # backward of the micro-step (and there only if `accelerator.accumulate` syncs this micro-step).
            with accelerator.no_sync(model) if index > 0 else nullcontext():
                out = run(start, cache)
                loss = F.cross_entropy(
                    out.logits.float().flatten(0, 1), targets[:, start : start + chunk_size].flatten(),
                    ignore_index=IGNORE_INDEX, reduction="sum",
                ) / divisor
                objective = loss + probe
                for final, (grad_h, grad_conv) in zip(layer_states(out.cache), state_grads or []):
                    for tensor, grad in ((final.h, grad_h), (final.conv, grad_conv)):
                        if grad is not None and tensor is not None and tensor.requires_grad:
                            # d objective / d out = grad / factor: the backward's factor makes it `grad` again.
                            objective = objective + (tensor * (grad / factor)).sum()
                accelerator.backward(objective)
            factor, probe.grad = probe.grad, None
            loss_sum += loss.detach()
            if state is not None:
                state_grads = [(h.grad, None if conv is None else conv.grad) for h, conv in state]
            entering[index] = None  # free the boundary state once its gradient has moved on
    return ChunkedBackwardOutput(loss=loss_sum, num_items=num_items)
