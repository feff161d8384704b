"""minrnn_training.checkpoint: atomic, rotated, verified checkpoints; one run per output folder; exact resume,
even after kill -9 mid-save."""

import dataclasses
import json
import shutil

import pytest
from pretrain_runs import TINY, kill_after_first_checkpoint, run, step_losses

from minrnn_training.checkpoint import (
    COMPLETE_MARKER,
    check_output_dir,
    check_resumable,
    checkpoint_manifest,
    latest_checkpoint,
    remove_run,
    resumable_checkpoint,
    write_checkpoint_hashes,
)
from minrnn_training.config import ConfigError, TrainConfig


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    """Killed after a checkpoint (possibly mid-save), `--resume` continues bit for bit: data, RNG (dropout), AdamW."""
    common = [*TINY, "--batch-size", "4", "--dropout", "0.1", "--max-steps", "30", "--eval-every", "10"]
    reference = tmp_path / "reference"
    run([*common, "--save-every", "30", "--output-dir", str(reference)])

    crashed = tmp_path / "crashed"
    kill_after_first_checkpoint([*common, "--save-every", "3"], crashed)
    assert not (crashed / "training_summary.json").exists()

    resumed = run([*common, "--save-every", "3", "--output-dir", str(crashed), "--resume"])
    start = int(resumed.stdout.split("resuming at step ")[1].split()[0])
    assert 3 <= start < 30
    expected, got = step_losses(reference), step_losses(crashed)
    assert sorted(got) == list(range(1, 31))
    assert [got[s] for s in range(start + 1, 31)] == [expected[s] for s in range(start + 1, 31)]
    final = [json.loads((d / "training_summary.json").read_text())["final_eval_loss"] for d in (reference, crashed)]
    assert final[0] == final[1]


def test_a_folder_holding_a_run_is_refused_in_one_line(tmp_path):
    """Without `--resume` or `--overwrite_output_dir`, a folder holding any record of a run is refused, naming them;
    with `--overwrite_output_dir` only the run's own files are deleted."""
    out = tmp_path / "out"
    (out / "checkpoints" / "step-0000002" / "pretrained").mkdir(parents=True)
    (out / "checkpoints" / "step-0000002" / "pretrained" / "model.safetensors").write_bytes(b"weights")
    for name in ("train_log.jsonl", "model.safetensors", "notes.txt"):
        (out / name).write_text("{}")
    (out / "training_summary.json").write_text(json.dumps({"model_files": ["model.safetensors"]}))
    with pytest.raises(ConfigError, match=r"^output_dir .*out holds another run \(checkpoints, train_log.jsonl, "
                                          r"training_summary.json\); "
                                          r"continue it with --resume, choose a new --output-dir, or pass "
                                          r"--overwrite_output_dir to delete it and start over$"):
        check_output_dir(str(out), overwrite=False)
    check_output_dir(str(out), overwrite=True)
    remove_run(str(out))
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_second_run_is_refused_and_a_damaged_checkpoint_is_skipped(tmp_path):
    """One folder, one run: a second run is refused in one line; `--resume` works from a copy of the folder spelled
    differently and skips a truncated optimizer file with a warning naming it; overwriting leaves only the new run."""
    common = [*TINY, "--batch-size", "4", "--max-steps", "6", "--eval-every", "3", "--save-every", "3",
              "--keep-last", "3"]
    first = tmp_path / "first"
    done = run([*common, "--output-dir", str(first)])
    assert "Removed shared tensor" not in done.stderr  # the tied output head is left out before accelerate saves
    summary = (first / "training_summary.json").read_text()

    again = run([*common, "--output-dir", str(first)], check=False)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [
        f"error: output_dir {first} holds another run (checkpoints, train_log.jsonl, training_summary.json, "
        + "loss_curve.png, tokenizer); continue it with --resume, choose a new --output-dir, or pass "
        + "--overwrite_output_dir to delete it and start over"]
    assert (first / "training_summary.json").read_text() == summary

    shutil.copytree(first, tmp_path / "copy")
    (tmp_path / "copy" / "training_summary.json").unlink()  # as a crash before the end leaves it
    damaged = tmp_path / "copy" / "checkpoints" / "step-0000006" / "optimizer.bin"
    size = damaged.stat().st_size
    with open(damaged, "r+b") as handle:
        handle.truncate(size // 2)
    resumed = run([*common, "--output-dir", "./copy/", "--resume"], cwd=tmp_path)
    assert (f"warning: damaged checkpoint skipped: copy/checkpoints/step-0000006/optimizer.bin has "
            f"{size // 2:,} bytes, {size:,} when saved; resuming from step-0000003") in resumed.stderr
    assert "resuming at step 3 from copy/checkpoints/step-0000003" in resumed.stdout
    assert step_losses(tmp_path / "copy") == step_losses(first)

    run([*common, "--max-steps", "2", "--save-every", "1", "--output-dir", str(first), "--overwrite_output_dir"])
    assert sorted(path.name for path in (first / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert sorted(step_losses(first)) == [1, 2]
    assert json.loads((first / "training_summary.json").read_text())["steps"] == 2


def test_no_intact_checkpoint_is_one_line_naming_the_file(tmp_path):
    """Sizes are always checked; a file changed at the same size is found by its hash, where hashes were recorded."""
    root = tmp_path / "checkpoints" / "step-0000004"
    (root / "pretrained").mkdir(parents=True)
    (root / "pretrained" / "model.safetensors").write_bytes(b"weights")
    (root / COMPLETE_MARKER).write_text(json.dumps({"step": 4, "files": checkpoint_manifest(root)}))
    assert resumable_checkpoint(str(tmp_path)) == root
    (root / "pretrained" / "model.safetensors").write_bytes(b"weighty")
    assert resumable_checkpoint(str(tmp_path)) == root  # same size, no hashes recorded: taken as intact
    write_checkpoint_hashes(root)
    (root / "pretrained" / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(ConfigError, match=r"no intact checkpoint in .*model.safetensors differs from the file "
                                                   r"saved \(sha256\)\); start over with --overwrite_output_dir"):
        resumable_checkpoint(str(tmp_path))
    (root / "pretrained" / "model.safetensors").write_bytes(b"weight")
    with pytest.raises(ConfigError, match=r"model.safetensors has 6 bytes, 7 when saved"):
        resumable_checkpoint(str(tmp_path))


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step-0000004", True), ("step-0000008", False), (".tmp-step-0000012", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / COMPLETE_MARKER).write_text("{}")
    assert latest_checkpoint(str(tmp_path)) == root / "step-0000004"


def test_resume_refuses_changed_settings(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path))
    saved = {"config": {**dataclasses.asdict(config), "lr": 1.0, "eval_every": 7}, "world_size": 1}
    with pytest.raises(ConfigError, match=r"lr: 1.0 -> 0.003") as info:
        check_resumable(config, saved, 1, tmp_path)
    assert "eval_every" not in str(info.value)
    with pytest.raises(ConfigError, match=r"processes: 1 -> 2"):
        check_resumable(config, {**saved, "config": dataclasses.asdict(config)}, 2, tmp_path)


@pytest.mark.parametrize("source", ["packed", "carried", "streamed"])
def test_resume_continues_exactly(tmp_path, source):
    """In one process, for each batch source: a run resumed from its step-2 checkpoint logs the same step-3 loss
    and final eval loss as the run that went on (model, optimizer, RNG, data position, carried state restored)."""
    from minrnn_training.loop import main

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i}: " + "words and more words " * (i % 7 + 1)}) + "\n"
                            for i in range(300)))
    extra = {"packed": [], "carried": ["--carry-state", "true", "--dataset", str(data)],
             "streamed": ["--streaming", "true", "--dataset", str(data), "--val-documents", "20"]}[source]
    out = tmp_path / "out"
    args = [*TINY, *extra, "--batch-size", "2", "--max-steps", "3", "--eval-every", "3", "--save-every", "2",
            "--keep-last", "3", "--dropout", "0.1", "--sample-tokens", "0", "--output-dir", str(out)]
    main(args)
    finished = step_losses(out)
    summary = json.loads((out / "training_summary.json").read_text())
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    (out / "training_summary.json").unlink()  # as a crash after the step-2 checkpoint leaves the folder
    main([*args, "--resume"])
    assert step_losses(out) == finished
    assert json.loads((out / "training_summary.json").read_text())["final_eval_loss"] == summary["final_eval_loss"]
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def test_checkpoint_hashes_are_recorded_and_verified(tmp_path, capsys):
    """With `--checkpoint-hashes`, each checkpoint gets the sha256 of every file the marker lists (written by a
    thread after the checkpoint is complete); `--resume` then finds a file changed at the same size."""
    from minrnn_training.loop import main

    out = tmp_path / "out"
    main([*TINY, "--batch-size", "2", "--max-steps", "2", "--save-every", "1", "--sample-tokens", "0",
          "--checkpoint-hashes", "true", "--output-dir", str(out)])
    latest = out / "checkpoints" / "step-0000002"
    for checkpoint in (out / "checkpoints" / "step-0000001", latest):
        files = json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"]
        assert "model.safetensors" in files and "tokenizer/tokenizer.json" in files
        assert not any(name.startswith("pretrained/") for name in files)  # the weights once: no save_pretrained copy
        assert json.loads((checkpoint / "checkpoint_hashes.json").read_text()).keys() == files.keys()
    with open(latest / "optimizer.bin", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    assert resumable_checkpoint(str(out)) == out / "checkpoints" / "step-0000001"
    assert f"damaged checkpoint skipped: {latest}/optimizer.bin differs from the file saved (sha256)" in (
        capsys.readouterr().err)
