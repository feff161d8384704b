"""Pieces shared by the paper-reproduction scripts (`selective_copying.py`, `shakespeare_compare.py`).

Settings: a dataclass of defaults, overridden by a YAML file (`--config`) and then by `--key value` options, read by
the pretraining script's parser (`minrnn_training.config.parse_settings`); the learning-rate schedule and the
weight-decay policy are the pretraining script's too (`minrnn_training.schedule`).
Results: a markdown table printed and written to `results.md`, per-model curves in `history.json`, and a PNG
with one line per model against steps and against wall-clock.
"""

import dataclasses
import json
import os
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def setup_torch(num_threads: int, device: str):
    """Thread count and device (`"auto"` = CUDA when available) for an experiment; returns the `torch.device`."""
    import torch

    if num_threads > 0:
        # On a shared CPU, fewer threads than cores avoids oversubscription, which costs far more than it saves.
        torch.set_num_threads(num_threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def device_name(device) -> str:
    """A short description of the machine for the results table, e.g. `cpu (2 cores, 1 thread), fp32`."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, fp32"
    threads = torch.get_num_threads()
    return f"cpu ({os.cpu_count()} cores, {threads} thread{'s' if threads != 1 else ''}), fp32"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table; floats are written as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(histories: dict[str, list[dict]], y_key: str, y_label: str, title: str, path: Path,
                time_label: str = "training wall-clock (s)") -> None:
    """Two panels, `y_key` against `step` and against `train_time_s`, one line per model in `histories`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, history in histories.items():
        points = [point for point in history if point.get(y_key) is not None]
        for axis, x_key in zip(axes, ("step", "train_time_s")):
            axis.plot([p[x_key] for p in points], [p[y_key] for p in points], marker=".", label=name)
    for axis, x_label in zip(axes, ("training step", time_label)):
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.fill(line, 140) for line in title.splitlines()), fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(output_dir: Path, table: str, header: str, histories: dict, settings) -> None:
    """Write `results.md` (header + table + settings), `history.json`, and print the table."""
    output_dir.mkdir(parents=True, exist_ok=True)
    settings_lines = "\n".join(f"- `{k}`: {v}" for k, v in dataclasses.asdict(settings).items())
    (output_dir / "results.md").write_text(f"{header}\n\n{table}\n\nSettings:\n\n{settings_lines}\n")
    (output_dir / "history.json").write_text(json.dumps(histories, indent=1) + "\n")
    print(f"\n{header}\n\n{table}\n\nwritten to {output_dir}/")
