"""The learning-rate schedule and the weight-decay policy of every training script of the project.

`scripts/pretrain.py`, `scripts/shakespeare_compare.py`, `scripts/selective_copying.py` and
`benchmarks/context_usage.py` all train with AdamW under these two, so their runs differ only where their
settings do.
"""

from __future__ import annotations

import math


def lr_at(step: float, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps` (held after it).

    A pure function of the step, so a resumed run needs only its step counter. `step` counts from 0 and may be
    fractional (a schedule over a time budget: `progress * max_steps`). The first step already trains at
    `lr / warmup_steps` (transformers' `get_cosine_with_min_lr_schedule_with_warmup` gives it 0).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer, lr: float) -> None:
    """Give every parameter group of `optimizer` the learning rate `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: `weight_decay` on every tensor of two or more dimensions (matrices, embeddings, conv
    filters), none on vectors (biases, norm scales).

    nanoGPT's rule (`configure_optimizers`), which decays the embedding too, as transformers' `Trainer` does.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
