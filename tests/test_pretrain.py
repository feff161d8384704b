"""scripts/pretrain.py: the main job end to end, data parallelism, exact resume, early errors.

Runs are real subprocesses (`accelerate launch` or `python`) on a tiny model; each takes seconds.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pretrain.py"
sys.path.insert(0, str(REPO / "scripts"))

import pretrain  # noqa: E402
from text_data import PackedBlocks, load_text_splits, split_by_characters  # noqa: E402

# A model and data small enough that process start-up dominates each run.
TINY = [
    "--hidden-size", "32", "--num-hidden-layers", "1", "--intermediate-size", "64", "--block-size", "32",
    "--tokenizer-vocab-size", "300", "--eval-batches", "2", "--sample-tokens", "8", "--log-with", "none",
    "--warmup-steps", "2", "--lr", "3e-3",
]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def run(args, *, launcher=(sys.executable,), timeout=300, check=True, cwd=REPO, script=SCRIPT):
    """Run pretrain.py with `args`; returns the CompletedProcess (output captured)."""
    result = subprocess.run([*launcher, str(script), *args], cwd=cwd, env=_env(), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain.py {args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def accelerate_launch(*flags):
    return (sys.executable, "-m", "accelerate.commands.launch", *flags)


# Every value the launcher would otherwise warn about ("values were not passed ... had defaults used instead").
ONE_CPU_PROCESS = ("--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no")


def train_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def step_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_log(output_dir) if "loss" in r}


# ------------------------------------------------------------------------------------------------ the main job


def test_main_job_learns_and_output_loads(tmp_path):
    """The no-argument recipe (fewer steps): loss falls; the folder loads as remote code and generates."""
    out = tmp_path / "tiny"
    result = run(["--max-steps", "16", "--eval-every", "8", "--save-every", "8", "--output-dir", str(out)],
                 launcher=accelerate_launch("--num_processes", "1", "--cpu"))
    assert "eval loss" in result.stdout and "perplexity" in result.stdout and "--- sample ---" in result.stdout
    losses = step_losses(out)
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (15, 16)) / 2
    assert last < first - 0.3, f"training loss did not fall: {first:.3f} -> {last:.3f}"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["dataset"] == "pydoc_data.topics" and summary["steps"] == 16
    assert summary["tokens_seen"] == 16 * 16 * 128
    assert summary["final_eval_loss"] < math.log(1024) and summary["config"]["max_steps"] == 16
    assert math.isclose(summary["final_eval_perplexity"], math.exp(summary["final_eval_loss"]))
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))

    # Loaded where the package is not importable: only the folder's own code files serve.
    check = f"""
import sys
sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
text = generator("The class", max_new_tokens=8, do_sample=False)[0]["generated_text"]
assert text.startswith("The class") and len(text) > len("The class"), text
print("OK", repr(text))
"""
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and "OK" in loaded.stdout, loaded.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ data parallel


def test_two_processes_match_one(tmp_path):
    """2 gloo processes x 4 rows == 1 process x 8 rows: different shards per process, same trajectory.

    accelerate 1.15's `--cpu` launcher starts one process (several need mpirun); `--multi_gpu` starts
    them with torchrun, and pretrain.py joins them over gloo when the machine has no accelerator.
    """
    common = [*TINY, "--max-steps", "5", "--eval-every", "5", "--save-every", "5"]
    run([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    run([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")],
        launcher=accelerate_launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"))
    one, two = train_log(tmp_path / "one"), train_log(tmp_path / "two")
    steps_two = [r for r in two if "loss" in r]
    assert all(len(r["batch_crc32"]) == 2 and r["batch_crc32"][0] != r["batch_crc32"][1] for r in steps_two), \
        "the two processes trained on the same rows"
    for a, b in zip([r for r in one if "loss" in r], steps_two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a, b)
    eval_one = json.loads((tmp_path / "one" / "training_summary.json").read_text())["final_eval_loss"]
    eval_two = json.loads((tmp_path / "two" / "training_summary.json").read_text())["final_eval_loss"]
    assert eval_one == pytest.approx(eval_two, rel=1e-4)


# ------------------------------------------------------------------------------------------------ resume


def test_sigkill_then_resume_gives_the_same_losses(tmp_path):
    """Killed after a checkpoint (possibly mid-save), `--resume` continues bit for bit: data, RNG (dropout), AdamW."""
    common = [*TINY, "--batch-size", "4", "--dropout", "0.1", "--max-steps", "30", "--eval-every", "10"]
    reference = tmp_path / "reference"
    run([*common, "--save-every", "30", "--output-dir", str(reference)])

    crashed = tmp_path / "crashed"
    process = subprocess.Popen([sys.executable, str(SCRIPT), *common, "--save-every", "3", "--output-dir", str(crashed)],
                               cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while pretrain.latest_checkpoint(str(crashed)) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed after its first checkpoint"
    assert not (crashed / "training_summary.json").exists()

    resumed = run([*common, "--save-every", "3", "--output-dir", str(crashed), "--resume"])
    start = int(resumed.stdout.split("resuming at step ")[1].split()[0])
    assert 3 <= start < 30
    expected, got = step_losses(reference), step_losses(crashed)
    assert sorted(got) == list(range(1, 31))
    assert [got[s] for s in range(start + 1, 31)] == [expected[s] for s in range(start + 1, 31)]
    final = [json.loads((d / "training_summary.json").read_text())["final_eval_loss"] for d in (reference, crashed)]
    assert final[0] == final[1]


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
        "loss_curve.png, tokenizer); continue it with --resume, choose a new --output-dir, or pass "
        "--overwrite_output_dir to delete it and start over"]
    assert (first / "training_summary.json").read_text() == summary

    shutil.copytree(first, tmp_path / "copy")
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
    root = tmp_path / "checkpoints" / "step-0000004"
    (root / "pretrained").mkdir(parents=True)
    (root / "pretrained" / "model.safetensors").write_bytes(b"weights")
    (root / pretrain.COMPLETE_MARKER).write_text(json.dumps({"step": 4, "files": pretrain.checkpoint_manifest(root)}))
    assert pretrain.resumable_checkpoint(str(tmp_path)) == root
    (root / "pretrained" / "model.safetensors").write_bytes(b"weighty")
    with pytest.raises(pretrain.ConfigError, match=r"no intact checkpoint in .*model.safetensors differs from the file "
                                                   r"saved \(sha256\)\); start over with --overwrite_output_dir"):
        pretrain.resumable_checkpoint(str(tmp_path))


def test_diverged_loss_is_one_line(tmp_path):
    result = run([*TINY, "--batch-size", "2", "--max-steps", "5", "--lr", "1e30", "--min-lr", "1e30", "--warmup-steps",
                  "0", "--output-dir", str(tmp_path / "out")], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"\nerror: training loss became (nan|inf) at step \d; lower lr \(now 1e\+30\)", result.stderr)


def test_missing_side_output_packages_and_unapplied_fsdp(tmp_path):
    """Without matplotlib and tensorboard the run warns before the first step and trains to the end; an FSDP
    accelerate config that accelerate cannot apply on CPUs is named at start."""
    hide = tmp_path / "without_plots.py"
    hide.write_text("import runpy, sys\n"
                    "sys.modules.update(matplotlib=None, tensorboard=None, tensorboardX=None)  # import fails\n"
                    f"sys.argv[0] = {str(SCRIPT)!r}\n"
                    f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    out = tmp_path / "out"
    result = run([*TINY, "--log-with", "tensorboard", "--batch-size", "2", "--max-steps", "2", "--eval-every", "1",
                  "--output-dir", str(out)], script=hide,
                 launcher=accelerate_launch("--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
                                            "--num_processes", "1", "--main_process_port", "0"))
    first_step = result.stderr.index("training:")  # the progress bar
    assert result.stderr.index("warning: TensorBoard logs skipped: tensorboard is not installed") < first_step
    assert result.stderr.index("warning: loss_curve.png skipped: matplotlib is not installed") < first_step
    assert "step 2: eval loss" in result.stdout
    assert ("warning: the accelerate config asks for FSDP, but accelerate runs MULTI_CPU here (no GPU): every "
            "process holds the whole model") in result.stderr
    assert "1 process(es), distributed mode MULTI_CPU" in result.stdout
    assert (out / "training_summary.json").is_file() and not (out / "loss_curve.png").exists()
    assert not (out / "tensorboard").exists()


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}
    for name, kind in kinds.items():
        config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
        assert config.distributed_type.name == kind and config.num_processes == 8
    fsdp = load_config_from_file(str(REPO / "configs" / "accelerate" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "MinRNNBlock"
    import modeling_minrnn.modeling_minrnn as modeling

    assert hasattr(modeling, fsdp["fsdp_transformer_layer_cls_to_wrap"])


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step-0000004", True), ("step-0000008", False), (".tmp-step-0000012", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / pretrain.COMPLETE_MARKER).write_text("{}")
    assert pretrain.latest_checkpoint(str(tmp_path)) == root / "step-0000004"


def test_resume_refuses_changed_settings(tmp_path):
    config = pretrain.TrainConfig(output_dir=str(tmp_path))
    saved = {"config": {**pretrain.dataclasses.asdict(config), "lr": 1.0, "eval_every": 7}, "world_size": 1}
    with pytest.raises(pretrain.ConfigError, match=r"lr: 1.0 -> 0.003") as info:
        pretrain.check_resumable(config, saved, 1, tmp_path)
    assert "eval_every" not in str(info.value)
    with pytest.raises(pretrain.ConfigError, match=r"processes: 1 -> 2"):
        pretrain.check_resumable(config, {**saved, "config": pretrain.dataclasses.asdict(config)}, 2, tmp_path)


# ------------------------------------------------------------------------------------------------ settings, data


def test_recipe_and_overrides():
    config, options = pretrain.parse_args(
        ["--max-steps", "50", "--lr=1e-3", "--streaming", "--dataset", "x.txt", "--resume"])
    assert (config.max_steps, config.lr, config.streaming, config.dataset, options.resume) == (
        50, 1e-3, True, ["x.txt"], True)
    assert pretrain.parse_args(["--max_steps", "7", "--vocab-size", "none"])[0].max_steps == 7
    assert config.hidden_size == 128  # from configs/tiny.yaml
    shakespeare, _ = pretrain.parse_args(["--config", str(REPO / "configs" / "shakespeare_char.yaml")])
    assert (shakespeare.char_level, shakespeare.num_hidden_layers, shakespeare.hidden_size, shakespeare.block_size,
            shakespeare.batch_size, shakespeare.dropout, shakespeare.lr, shakespeare.min_lr, shakespeare.max_steps) == (
        True, 6, 384, 256, 64, 0.2, 1e-3, 1e-4, 5000)
    web, _ = pretrain.parse_args(["--config", str(REPO / "configs" / "web_125m.yaml")])
    assert web.streaming and web.mixed_precision == "bf16"


@pytest.mark.parametrize("argv, message", [
    (["--max-stepz", "5"], r"unknown argument '--max-stepz' \(did you mean --max-steps\?\)"),
    (["--lr", "fast"], r"argument --lr: invalid float value: 'fast'"),
    (["--cell-type", "gru"], r"invalid choice: 'gru' \(choose from 'mingru', 'minlstm'\)"),
    (["--block-size", "0"], r"block_size=0 must be >= 1"),
    (["--config", "nope.yaml"], r"--config nope.yaml: no such file"),
    (["stray"], r"unknown argument 'stray'"),
])
def test_bad_settings_are_clear_errors(argv, message):
    with pytest.raises(pretrain.ConfigError, match=message):
        pretrain.parse_args(argv)


def test_setting_choices_match_the_model():
    from modeling_minrnn import SCAN_BACKENDS
    from modeling_minrnn.configuration_minrnn import CELL_TYPES

    assert pretrain.typing.get_args(pretrain.CellType) == CELL_TYPES
    assert pretrain.typing.get_args(pretrain.ScanBackend) == SCAN_BACKENDS


BAD_INPUTS = {
    "list.yaml": ("max_steps: [100, 200]\n", r"list.yaml: max_steps=\[100, 200\] is a list; give one int"),
    "mapping.yaml": ("lr:\n  peak: 0.003\n", r"mapping.yaml: lr=\{'peak': 0.003\} is a dict; give one float"),
    "syntax.yaml": ("max_steps: 5\nlr: [0.1\n",
                    r"syntax.yaml, line 3, column 1: YAML syntax error: expected ',' or ']'"),
    "binary.txt": (b"text, then \xff\xfe bytes",
                   r"dataset file '.*binary.txt' is not UTF-8 text: byte 0xff at offset 11 \(invalid start byte\)"),
    "nul.txt": (b"\x00\x01\x02\x00", r"dataset file '.*nul.txt' is not text: it holds NUL bytes"),
}


def test_bad_input_is_one_line_before_any_work(tmp_path):
    """Recipe and data errors end the run with one line before torch is even imported (no tokenizer, no kernel)."""
    for name, (content, _) in BAD_INPUTS.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    check = f"""
import json, sys, time
sys.path.insert(0, {str(REPO / "scripts")!r})
import pretrain
for name in {list(BAD_INPUTS)!r}:
    flag = "--dataset" if name.endswith(".txt") else "--config"
    start = time.perf_counter()
    try:
        pretrain.main([flag, {str(tmp_path)!r} + "/" + name, "--output-dir", {str(tmp_path / "out")!r}])
    except SystemExit as exit:
        print(json.dumps([name, str(exit), "torch" in sys.modules, time.perf_counter() - start]))
"""
    result = subprocess.run([sys.executable, "-c", check], env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [name for name, *_ in answers] == list(BAD_INPUTS)
    for name, message, torch_imported, seconds in answers:
        assert re.match(f"error: .*{BAD_INPUTS[name][1]}", message) and "\n" not in message, (name, message)
        assert not torch_imported, f"{name}: torch was imported before the error"
    assert not (tmp_path / "out").exists()


def test_bad_input_under_accelerate_launch_is_one_line(tmp_path):
    """`accelerate launch -q`: the script's one line and a non-zero exit, no launcher warning or traceback."""
    recipe = tmp_path / "syntax.yaml"
    recipe.write_text(BAD_INPUTS["syntax.yaml"][0])
    start = time.monotonic()
    result = run(["--config", str(recipe)], launcher=accelerate_launch("-q", *ONE_CPU_PROCESS), check=False)
    assert result.returncode != 0 and time.monotonic() - start < 60
    assert result.stderr.strip().splitlines() == [
        f"error: {recipe}, line 3, column 1: YAML syntax error: expected ',' or ']', but got '<stream end>'"]


def test_dataset_list_in_recipe_and_on_the_command_line(tmp_path):
    for name, text in (("a.txt", "first file " * 50), ("b.txt", "second file " * 50)):
        (tmp_path / name).write_text(text)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"dataset: [{tmp_path / 'a.txt'}, {tmp_path / 'b.txt'}]\n")
    from_recipe = pretrain.parse_args(["--config", str(recipe)])[0].dataset
    from_options = pretrain.parse_args(["--dataset", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])[0].dataset
    assert from_recipe == from_options == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    splits = load_text_splits(from_recipe)
    assert splits.train[0].startswith("first file") and splits.validation[-1].endswith("second file ")
    assert pretrain.parse_args(["--dataset", "none"])[0].dataset is None


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 5\nhiden_size: 3\n")
    with pytest.raises(pretrain.ConfigError, match=r"r.yaml: unknown setting 'hiden_size'"):
        pretrain.parse_args(["--config", str(recipe)])


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "missing/file.txt"], r"matches no readable file"),
    (["--dataset", "nobody-h4/no-such-dataset"], r"could not be loaded from the Hub"),
    (["--dataset", "EMPTY"], r"has no text"),
    (["--block-size", "200000"], r"block_size=200000 is larger than the validation data"),
    (["--vocab-size", "100"], r"vocab_size=100 is smaller than the tokenizer's 300 tokens"),
    (["--resume"], r"--resume: no complete checkpoint in"),
])
def test_bad_input_fails_before_training(tmp_path, monkeypatch, extra, message):
    import datasets
    import huggingface_hub

    # A Hub id that cannot load must fail the same way offline; offline it fails at once (no retries).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    extra = [str(empty) if arg == "EMPTY" else arg for arg in extra]
    with pytest.raises(SystemExit, match=f"(?s)^error: .*{message}"):
        pretrain.main([*TINY, "--output-dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_text_file_split_is_nanogpt_and_blocks_are_exact(tmp_path):
    path = tmp_path / "a.txt"
    text = "".join(chr(65 + i % 26) for i in range(1000))
    path.write_text(text)
    splits = load_text_splits(str(path))
    assert splits.train == [text[:900]] and splits.validation == [text[900:]]
    assert split_by_characters(["abcd", "efgh"], 0.25) == (["abcd", "ef"], ["gh"])

    import numpy as np

    with pytest.raises(ValueError, match=r"block_size=10 is larger than the training data \(9 tokens\)"):
        PackedBlocks(np.arange(9), block_size=10, seed=1)
    tokens = np.arange(103)
    blocks = PackedBlocks(tokens, block_size=10, seed=1)
    assert blocks.blocks_per_epoch == 9
    # Two processes' rows of a global batch are the single process's rows, in order.
    whole = blocks.batch(3, batch_size=4)
    assert (np.concatenate([blocks.batch(3, 2, rank, 2) for rank in (0, 1)]) == whole).all()
    epoch = np.concatenate([blocks.batch(i, 1) for i in range(9)])
    offset = int(epoch[0, 0]) % 10
    assert sorted(int(row[0]) for row in epoch) == [offset + 10 * k for k in range(9)]
    assert all((row == np.arange(row[0], row[0] + 10)).all() for row in epoch)


def test_streamed_blocks_resume_exactly(tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    from text_data import StreamedBlocks
    from train_tokenizer import train_char_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"body": f"document {i} " * (i % 5 + 1)}) + "\n" for i in range(200)))
    train_char_tokenizer(["document 0123456789 "]).save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")

    def blocks():
        splits = load_text_splits(str(data), text_column="body", streaming=True, val_documents=10)
        return StreamedBlocks(splits.train, tokenizer, block_size=16, eos_token_id=tokenizer.eos_token_id)

    first = blocks()
    first.batch(3)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.batch(3) for _ in range(4)]
    second = blocks()
    second.load_state_dict(state)
    assert all((second.batch(3) == want).all() for want in expected)
    stream = np.concatenate([b.ravel() for b in expected])
    assert tokenizer.eos_token_id in stream


def test_learning_rate_schedule():
    config = pretrain.TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert pretrain.lr_at(0, config) == pytest.approx(0.1)
    assert pretrain.lr_at(9, config) == pytest.approx(1.0)
    assert pretrain.lr_at(60, config) == pytest.approx(0.55)
    assert pretrain.lr_at(110, config) == pytest.approx(0.1)


def test_push_to_hub_publishes_checkpoints_and_final_folder(tmp_path, monkeypatch, capsys):
    """`--push-to-hub` hands each checkpoint's model folder (branch step-N) and the final folder (main) to hub_upload;
    a failed upload is a warning, the run goes on."""
    sys.path.insert(0, str(REPO))
    import hub_upload.push_to_hub as hub

    pushed = []

    def fake_push(folder, repo_id, **kwargs):
        hub.collect_checkpoint(folder)  # the uploader's own checks: a complete save_pretrained folder
        pushed.append((Path(folder), repo_id, kwargs["revision"]))
        if kwargs["revision"] == "step-1":
            raise hub.PublishError("cannot reach the Hub at https://hub.test (ConnectionError)")

    monkeypatch.setattr(hub, "push_checkpoint", fake_push)
    out = tmp_path / "out"
    pretrain.main([*TINY, "--batch-size", "2", "--max-steps", "2", "--save-every", "1", "--output-dir", str(out),
                   "--push-to-hub", "me/tiny"])
    checkpoints = out / "checkpoints"
    assert pushed == [(checkpoints / "step-0000001" / "pretrained", "me/tiny", "step-1"),
                      (checkpoints / "step-0000002" / "pretrained", "me/tiny", "step-2"),
                      (out, "me/tiny", None)]
    first = checkpoints / "step-0000001" / "pretrained"
    assert (f"warning: {first} not published (cannot reach the Hub at https://hub.test (ConnectionError)); retry "
            f"with python hub_upload/push_to_hub.py --checkpoint {first} --repo-id me/tiny --revision step-1"
            ) in capsys.readouterr().err
