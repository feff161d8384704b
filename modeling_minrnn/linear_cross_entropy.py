"""The next-token loss straight from the last hidden states, without the `(tokens, vocab)` logits in memory.

transformers' causal-LM loss takes the full logits: `lm_head` writes `tokens x vocab` of them, the loss upcasts them
to fp32 (a copy), and the backward writes a zero-filled gradient of the same size and the softmax over it again. On
a small model that is most of the memory traffic of a training step (at vocab 8,192, 256 MB per 8,192 tokens, four
or five times over), and on a CPU it is time: `_log_softmax`, its backward, `fill_` and the fp32 copy took ~30% of a
bf16 training step of the benchmark's model.

`linear_cross_entropy` computes the same loss one chunk of tokens at a time: the chunk's logits (in the matmul dtype,
bf16 under autocast), their log-sum-exp in fp32, and, when a gradient is wanted, the gradient of the chunk's logits
(`softmax - onehot`), turned at once into the gradients of the hidden states and of the head's weight. The matmuls
are the ones the unfused loss runs (forward, and the two of the backward), so nothing is computed twice; only one
chunk's logits exist at a time. The backward then only scales the two stored gradients (the loss is a scalar).

The same idea as Liger Kernel's fused linear cross-entropy (Triton, CUDA only); this one is plain PyTorch, so it runs
on any device, under autocast and under `torch.compile`.
"""

import torch

# Tokens per chunk: the chunk's fp32 logits (chunk x vocab) stay within a few MB of cache-friendly memory for the
# vocabularies of small models, and the matmuls stay large enough to run at full speed.
DEFAULT_CHUNK_SIZE = 512


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype an `nn.Linear` would use here: autocast's where it is on, else the inputs' common dtype."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor, ignore_index, chunk_size, compute_dtype):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # softmax and sums: fp32 at least
        total = hidden.new_zeros((), dtype=acc)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_weight else None
        for start in range(0, h.shape[0], chunk_size):
            h_chunk = h[start : start + chunk_size]
            t_chunk = targets[start : start + chunk_size]
            valid = t_chunk != ignore_index
            safe = t_chunk.masked_fill(~valid, 0).unsqueeze(1)
            log_probs = torch.log_softmax((h_chunk @ w.t()).to(acc), dim=-1)
            total = total - torch.where(valid, log_probs.gather(1, safe).squeeze(1), 0.0).sum()
            if want_hidden or want_weight:
                # d loss / d logits = (softmax - onehot) * scale, scale = 1 / divisor on counted tokens, 0 on ignored
                # ones; applied to the chunk's rows of hidden / of the result (tokens x hidden), not to the logits.
                grad = log_probs.exp_().scatter_add_(1, safe, torch.full_like(safe, -1, dtype=log_probs.dtype))
                grad = grad.to(compute_dtype)
                scale = (valid.to(acc) / divisor).unsqueeze(1)
                if want_hidden:
                    grad_hidden[start : start + chunk_size] = ((grad @ w).to(acc) * scale).to(hidden.dtype)
                if want_weight:
                    grad_weight = grad_weight + (grad.t() @ (h_chunk * scale).to(compute_dtype)).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """`ForCausalLMLoss(hidden_states @ weight.T, labels, ...)` without materialising the logits.

    Args:
        hidden_states: `(batch, seq, hidden)` the model's last hidden states.
        weight: `(vocab, hidden)` the output head's weight (no bias).
        labels: `(batch, seq)` token ids, shifted here as transformers does (`labels = input_ids` works); `-100`
            (`ignore_index`) is not counted.
        num_items_in_batch: divide the summed loss by this (gradient accumulation, as transformers' Trainer passes
            it) instead of taking the mean over the counted tokens.
        shift_labels: already-shifted targets `(batch, seq)`, used instead of shifting `labels`.
        chunk_size: tokens whose logits exist at once.
    Returns:
        The scalar loss (fp32, or fp64 for fp64 inputs), equal to transformers' loss on the full logits up to
        rounding.
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"`labels` must have one target per position: {hidden.shape[0]} positions, {targets.shape[0]} targets."
        )
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum()
    else:
        divisor = torch.as_tensor(num_items_in_batch, device=hidden.device)
    compute_dtype = _compute_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, divisor, ignore_index, chunk_size, compute_dtype)
