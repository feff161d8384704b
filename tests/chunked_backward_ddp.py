"""Run under 2 gloo processes by tests/test_long_sequence_training.py: optimizer steps with and without chunked
backward, counting DDP's gradient all-reduces (a comm hook) and recording the synced gradients of every step.

Writes `rank{i}.json` per process into the working folder: `{"full": {...}, "chunked": {...}}`, each with the
all-reduces per optimizer step, the step losses and the gradients the optimizer saw.
"""

import functools
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from minrnn_training.chunked_backward import chunked_backward
from minrnn_training.step import backward, make_optimizer, optimizer_step
from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM

STEPS, ACCUMULATION, ROWS, SEQ, CHUNK = 3, 2, 2, 24, 7


def forward_backward(accelerator, model, chunk_size, step, micro):
    # Each process, step and micro-step its own rows.
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + accelerator.process_index)
    ids = torch.randint(0, 64, (ROWS, SEQ), generator=generator)
    if chunk_size:
        return chunked_backward(accelerator, model, ids, chunk_size=chunk_size).loss
    return backward(accelerator, model(input_ids=ids, labels=ids, use_cache=False).loss)


def train(chunk_size):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    torch.manual_seed(0)
    model = MinRNNForCausalLM(MinRNNConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64))
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    all_reduces = [0]

    def counting_hook(process_group, bucket):
        all_reduces[0] += 1
        return allreduce_hook(process_group, bucket)

    model.register_comm_hook(None, counting_hook)
    grads = []
    optimizer.optimizer.register_step_pre_hook(
        lambda *_: grads.append([p.grad.tolist() for p in model.parameters()]))
    per_step, losses = [], []
    for step in range(STEPS):
        before = all_reduces[0]
        result = optimizer_step(accelerator, model, optimizer,
                                functools.partial(forward_backward, accelerator, model, chunk_size, step),
                                lr=1e-2, grad_clip=1.0)
        per_step.append(all_reduces[0] - before)
        losses.append(result.loss)
    return {"all_reduces": per_step, "losses": losses, "grads": grads}


if __name__ == "__main__":
    chunk = int(sys.argv[1]) if len(sys.argv) > 1 else CHUNK
    runs = {"full": train(None), "chunked": train(chunk)}
    Path(f"rank{Accelerator().process_index}.json").write_text(json.dumps(runs))
