"""Checkpoints of a training run, and the rules of its output folder.

`checkpoints/step-0000200/` holds accelerate's `save_state` (model, optimizer, RNG states of every process), each
process's data position (`data_state_rank{i}.json`) and carried state (`carried_state_rank{i}.pt`), the run's
`trainer_state.json` (step, tokens seen, settings) and its tokenizer (`tokenizer/`). The weights are written once:
the `save_pretrained` folder is the run's final output (and `pretrained/` in a checkpoint only when it is published
with `push_to_hub`).

Kept custom, beside accelerate's `save_state` / `load_state`: the atomic write (a temporary folder, fsynced,
renamed), the file sizes that `--resume` verifies (and, with `checkpoint_hashes`, sha256 hashes computed after the
checkpoint is complete by a thread of the main process, while training goes on), and the rotation after the new
checkpoint is complete. accelerate's `ProjectConfiguration(total_limit=...)` deletes old checkpoints *before*
writing the new one straight into its final folder, so a crash mid-save can leave no complete checkpoint at all; and its
`register_for_checkpointing` saves from the main process only, while the data position and the carried state
differ from process to process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig, warn

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "checkpoint_complete.json"


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str) -> list[Path]:
    """The complete checkpoints, lowest step first. Incomplete ones lack the marker."""
    done = [
        path for path in checkpoint_dir(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if (path / COMPLETE_MARKER).is_file() and path.name[len(CHECKPOINT_PREFIX):].isdigit()
    ]
    return sorted(done, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: str) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


HASHES_FILE = "checkpoint_hashes.json"


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checkpoint_manifest(folder: Path) -> dict:
    """`{relative path: size}` of every file in a checkpoint, recorded when it is completed."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != COMPLETE_MARKER)
    return {path.relative_to(folder).as_posix(): path.stat().st_size for path in files}


def write_checkpoint_hashes(folder: Path) -> None:
    """`checkpoint_hashes.json`: `{relative path: sha256}` of a complete checkpoint's files, written atomically (a
    checkpoint without it is verified by sizes only)."""
    recorded = json.loads((folder / COMPLETE_MARKER).read_text())["files"]
    hashes = {name: _sha256(folder / name) for name in recorded}
    tmp = folder / f".{HASHES_FILE}"
    tmp.write_text(json.dumps(hashes))
    os.replace(tmp, folder / HASHES_FILE)


def hash_in_background(folder: Path) -> threading.Thread:
    """`write_checkpoint_hashes(folder)` in a thread: reading the files back costs the training processes nothing.
    Join it before `folder` may be rotated away (the next checkpoint); not a daemon: the interpreter waits for it."""
    thread = threading.Thread(target=write_checkpoint_hashes, args=(folder,), name=f"hash-{folder.name}")
    thread.start()
    return thread


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (missing, truncated, changed), or None if intact."""
    try:
        recorded = json.loads((checkpoint / COMPLETE_MARKER).read_text()).get("files", {})
        hashes_file = checkpoint / HASHES_FILE
        hashes = json.loads(hashes_file.read_text()) if hashes_file.is_file() else {}
    except (ValueError, OSError) as error:
        return f"{checkpoint / COMPLETE_MARKER} or {HASHES_FILE} is unreadable ({error})"
    for name, size in recorded.items():  # sizes first: a truncated file is found without reading the rest
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size:,} bytes, {size:,} when saved"
    for name, digest in hashes.items():
        if _sha256(checkpoint / name) != digest:
            return f"{checkpoint / name} differs from the file saved (sha256)"
    return None


def resumable_checkpoint(output_dir: str) -> Path:
    """The newest intact checkpoint; each damaged newer one is named in a warning (or, if none is intact, an error)."""
    candidates = complete_checkpoints(output_dir)
    if not candidates:
        raise ConfigError(f"--resume: no complete checkpoint in {checkpoint_dir(output_dir)}")
    damage = []
    for checkpoint in reversed(candidates):
        problem = checkpoint_damage(checkpoint)
        if problem is None:
            for text in damage:
                warn(f"damaged checkpoint skipped: {text}; resuming from {checkpoint.name}")
            return checkpoint
        damage.append(problem)
    raise ConfigError(f"--resume: no intact checkpoint in {checkpoint_dir(output_dir)} ({'; '.join(damage)}); "
                      "start over with --overwrite_output_dir")


def _fsync(*paths: Path) -> None:
    """Flush files (or folders: their entries) to disk, so a rename after it never publishes lost data."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(accelerator, model, tokenizer, config: TrainConfig, state: dict, train_data,
                    carried=None) -> Path:
    """Write `checkpoints/step-N` atomically: fill a temporary folder, fsync it, mark it complete with the files'
    sizes, rename it; then rotate old checkpoints.

    A crash at any point leaves either no `step-N` or a complete one; `--resume` ignores the rest. Only the main
    process finishes the checkpoint: the others go on with the next step.
    """
    root = checkpoint_dir(config.output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state['step']:07d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    (tmp / f"data_state_rank{rank}.json").write_text(json.dumps(train_data.state_dict()))
    if carried is not None:
        import torch

        torch.save(carried.state_dict(), tmp / f"carried_state_rank{rank}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "config": dataclasses.asdict(config)}, indent=2))
        _fsync(*sorted(tmp.rglob("*"), reverse=True), tmp)
        # The sizes of what was written: --resume skips a checkpoint damaged since (truncated, missing).
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": state["step"], "files": checkpoint_manifest(tmp)}))
        _fsync(tmp / COMPLETE_MARKER, tmp)
        if final.exists():  # only after a resume from an older step re-reaches this one; the new copy is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        for old in complete_checkpoints(config.output_dir)[: -config.keep_last]:
            shutil.rmtree(old)
    return final


def save_tied_weights_once(accelerator) -> None:
    """Make `accelerator.save_state` leave out the tied copies of a weight (the output head), as save_pretrained
    does; loading re-ties them. accelerate's safetensors save would drop them itself, with a warning at every
    checkpoint."""
    def leave_out_tied_copies(models, weights, folder):
        for wrapped, state in zip(models, weights, strict=True):
            tied = accelerator.unwrap_model(wrapped).all_tied_weights_keys
            for key in [key for key in state if key.removeprefix("module.") in tied]:
                del state[key]

    accelerator.register_save_state_pre_hook(leave_out_tied_copies)


def is_checkpoint(folder: str) -> bool:
    """Whether `folder` is a checkpoint `save_checkpoint` wrote (rather than a `save_pretrained` folder)."""
    return (Path(folder) / "trainer_state.json").is_file()


def load_checkpoint_weights(model, checkpoint: Path) -> None:
    """Load a checkpoint's weights (accelerate's `model.safetensors`) into an unwrapped `model` of its architecture:
    the model of any step of a run, without a `save_pretrained` copy of it."""
    from safetensors.torch import load_file

    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"init_from={str(checkpoint)!r}: no model.safetensors (a checkpoint saved under FSDP or "
                          "DeepSpeed holds its weights otherwise); give the run's final folder instead")
    weights = {key.removeprefix("module."): value for key, value in load_file(path).items()}  # DDP's prefix
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(model.all_tied_weights_keys)  # left out when saved (save_tied_weights_once)
    if unexpected or set(missing) - tied:
        raise ConfigError(f"init_from={str(checkpoint)!r}: its weights do not fit the model (missing "
                          f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    model.tie_weights()


def trainer_state(checkpoint: Path) -> dict:
    """The `trainer_state.json` of a checkpoint: `step`, `tokens_seen`, `world_size` and the run's `config`."""
    return json.loads((checkpoint / "trainer_state.json").read_text())


def load_checkpoint(accelerator, checkpoint: Path, train_data, carried=None) -> None:
    """Restore what `save_checkpoint` wrote: model, optimizer, RNG states, this process's data position and carried
    state (refused when it does not continue at the checkpoint's step)."""
    accelerator.load_state(str(checkpoint))
    rank, step = accelerator.process_index, trainer_state(checkpoint)["step"]
    data_state = checkpoint / f"data_state_rank{rank}.json"
    if data_state.is_file():
        train_data.load_state_dict(json.loads(data_state.read_text()))
    if carried is not None:
        import torch

        state_file = checkpoint / f"carried_state_rank{rank}.pt"
        carried.load_state_dict(torch.load(state_file, map_location=accelerator.device))
        if carried.next_index != step:
            raise ConfigError(f"{state_file} continues at block {carried.next_index}, not at step {step}")


def check_unfinished(output_dir: str) -> None:
    """Refuse `--resume` on a run that finished, saying what to do instead (there is nothing left to continue)."""
    summary = Path(output_dir) / "training_summary.json"
    if summary.is_file():
        steps = json.loads(summary.read_text())["steps"]
        raise ConfigError(
            f"--resume: the run in {output_dir} finished ({steps} steps, {summary.name}); to train its model further "
            f"start a new run from it: --init-from {output_dir} --output-dir NEW_FOLDER, with its own data and "
            "schedule (--dataset, --max-steps, --lr)")


def check_resumable(config: TrainConfig, saved: dict, world_size: int, checkpoint: Path) -> None:
    """Refuse to resume with settings that would change the trajectory (say which)."""
    changed = {
        key: (saved["config"].get(key), value) for key, value in dataclasses.asdict(config).items()
        if key not in RESUMABLE_CHANGES and saved["config"].get(key) != value
    }
    if saved["world_size"] != world_size:
        changed["processes"] = (saved["world_size"], world_size)
    if changed:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise ConfigError(f"cannot resume from {checkpoint}: these settings differ from the checkpoint's ({details})")


def export_pretrained(accelerator, model, tokenizer, folder: Path) -> list[str]:
    """`save_pretrained` model (+ remote code, generation config) and tokenizer into `folder` (collective call);
    returns the names of the files written (on the main process; empty on the others)."""
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return []
    # Written apart, then moved in: the names moved are the model's files, whatever else the folder holds.
    staging = folder / ".tmp-pretrained"
    shutil.rmtree(staging, ignore_errors=True)
    accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    names = sorted(path.name for path in staging.iterdir())
    for name in names:
        os.replace(staging / name, folder / name)
    staging.rmdir()
    return names


# Files and folders a run writes into output_dir besides its final model.
RUN_RECORDS = (
    "checkpoints", "train_log.jsonl", "training_summary.json", "loss_curve.png", "tensorboard", "tokenizer")


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds another one (unless told to replace it)."""
    found = [name for name in RUN_RECORDS if (Path(output_dir) / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} holds another run ({', '.join(found)}); continue it with --resume, "
            "choose a new --output-dir, or pass --overwrite_output_dir to delete it and start over")


def remove_run(output_dir: str) -> None:
    """Delete a previous run's records and final model (`--overwrite_output_dir`), nothing else in the folder."""
    summary = Path(output_dir) / "training_summary.json"
    # The final model's files, as training_summary.json lists them (no summary: the run wrote no final model).
    model_files = json.loads(summary.read_text()).get("model_files", []) if summary.is_file() else []
    for name in (*RUN_RECORDS, *model_files):
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
