"""One optimizer step, the same in pretraining and in the experiment scripts.

AdamW under the project's weight-decay policy (`schedule.decay_groups`), the step's learning rate
(`schedule.lr_at`), its micro-steps accumulated by accelerate (`accelerator.accumulate`: gradients synced once per
step under DDP, fp16 loss scaling), gradient clipping, then the step. What a micro-step computes is the caller's
(`forward_backward`): a causal-LM loss in pretraining, a chunked backward over long blocks, a task's own loss in an
experiment. torchtitan's `train_step` / `forward_backward_step` split, on accelerate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .schedule import decay_groups, set_lr


def make_optimizer(model, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)):
    """AdamW over `model`'s trainable parameters, `weight_decay` on matrices only (`schedule.decay_groups`)."""
    import torch

    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas)


def backward(accelerator, loss):
    """`accelerator.backward(loss)`; returns `loss` detached (a micro-step's result for `optimizer_step`)."""
    accelerator.backward(loss)
    return loss.detach()


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float  # the mean micro-step loss over the step's micro-steps and every process
    grad_norm: float  # the gradient norm before clipping


def optimizer_step(accelerator, model, optimizer, forward_backward: Callable[[int], object], *, lr: float,
                   grad_clip: float) -> StepResult:
    """One optimizer step at learning rate `lr`: `forward_backward(micro)` for each of the accelerator's
    `gradient_accumulation_steps` micro-steps (it runs the backward, e.g. with `backward`, and returns the detached
    loss), then clipping to `grad_clip` and the optimizer's step on the last one.

    `model` and `optimizer` are what `accelerator.prepare` returned (its optimizer steps only where gradients sync).
    One collective: the mean loss over the processes.
    """
    import torch

    set_lr(optimizer, lr)
    loss_sum = torch.zeros((), device=accelerator.device)
    grad_norm = None
    for micro in range(accelerator.gradient_accumulation_steps):
        with accelerator.accumulate(model):
            loss_sum += forward_backward(micro)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    loss = float(accelerator.reduce(loss_sum, reduction="mean")) / accelerator.gradient_accumulation_steps
    return StepResult(loss, float(grad_norm) if grad_norm is not None else math.nan)


def one_process_accelerator(device):
    """An `Accelerator` for one process on `device` (a `torch.device`), in fp32: the experiment scripts' setting
    (`accelerate launch` and its environment do not change it)."""
    from accelerate import Accelerator

    return Accelerator(cpu=device.type == "cpu", mixed_precision="no")
