"""Evaluation during training: validation loss, samples, the training log and its loss curve."""

from __future__ import annotations

import json
from pathlib import Path

from .config import TrainConfig


def _isolated_rng(device):
    """Evaluation and sampling must not move the training RNG, or a resumed run would diverge."""
    import torch

    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def evaluate(accelerator, model, val_blocks, config: TrainConfig) -> float:
    """Mean next-token loss over this run's validation blocks (all processes together)."""
    import torch

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for start in range(0, len(val_blocks), config.batch_size):
            batch = torch.from_numpy(val_blocks[start : start + config.batch_size]).to(accelerator.device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            count = torch.tensor(predicted, dtype=torch.float64, device=total.device)
            total += torch.stack([loss.double() * predicted, count])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def sample(accelerator, model, tokenizer, config: TrainConfig, step: int) -> str:
    """`sample_prompt` and a sampled continuation (the prompt follows EOS, where every training document starts)."""
    import torch

    unwrapped = accelerator.unwrap_model(model)
    prompt = [tokenizer.eos_token_id] + tokenizer(config.sample_prompt, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([prompt], device=accelerator.device)
    unwrapped.eval()
    # Every process samples the same way (sharded models need all of them in each forward).
    with _isolated_rng(accelerator.device), torch.no_grad():
        torch.manual_seed(config.seed + step)
        output = unwrapped.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=config.sample_tokens,
            do_sample=True, temperature=config.sample_temperature, top_k=config.sample_top_k or None,
        )
    unwrapped.train()
    return tokenizer.decode(output[0, 1:], skip_special_tokens=False)


def write_loss_curve(log_path: Path, out_path: Path) -> None:
    """`loss_curve.png`: training loss per step and evaluation loss, from `train_log.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def restart_log(log_path: Path, step: int) -> None:
    """Keep only the log lines up to the resumed step (a killed run may have logged further)."""
    if log_path.exists():
        kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))


