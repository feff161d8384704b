"""minrnn_training.config: recipes and options read by `HfArgumentParser`, and every bad setting as one line.

The experiments' settings go through the same parser (`parse_settings`).
"""

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
from pretrain_runs import ONE_CPU_PROCESS, REPO, accelerate_launch, env, run

from minrnn_training.config import ConfigError, parse_args, parse_settings
from minrnn_training.data import load_text_splits
from minrnn_training.loop import preflight


def test_recipe_and_overrides():
    config, options = parse_args(
        ["--max-steps", "50", "--lr=1e-3", "--streaming", "--dataset", "x.txt", "--resume"])
    assert (config.max_steps, config.lr, config.streaming, config.dataset, options.resume) == (
        50, 1e-3, True, ["x.txt"], True)
    assert parse_args(["--max_steps", "7", "--vocab-size", "none"])[0].max_steps == 7
    assert config.hidden_size == 128  # from configs/tiny.yaml
    shakespeare, _ = parse_args(["--config", str(REPO / "configs" / "shakespeare_char.yaml")])
    assert (shakespeare.char_level, shakespeare.num_hidden_layers, shakespeare.hidden_size, shakespeare.block_size,
            shakespeare.batch_size, shakespeare.dropout, shakespeare.lr, shakespeare.min_lr, shakespeare.max_steps) == (
        True, 6, 384, 256, 64, 0.2, 1e-3, 1e-4, 5000)
    web, _ = parse_args(["--config", str(REPO / "configs" / "web_125m.yaml")])
    assert web.streaming and web.mixed_precision == "bf16"

    assert parse_args(["--no-tie-word-embeddings"])[0].tie_word_embeddings is False


def test_help_of_a_negated_option_says_what_it_does():
    """`--no_x` had the help of `--x` (and its own default, False), so it read as its opposite."""
    from minrnn_training.config import SettingsParser

    text = " ".join(SettingsParser().format_help().split())
    assert ("--tie_word_embeddings [TIE_WORD_EMBEDDINGS], --tie-word-embeddings [TIE_WORD_EMBEDDINGS] share the "
            "input embedding and the output head (default: True)") in text
    assert ("--no_tie_word_embeddings, --no-tie-word-embeddings set tie_word_embeddings to False (the opposite of "
            "--tie_word_embeddings) --") in text


@pytest.mark.parametrize("argv, message", [
    (["--max-stepz", "5"], r"unknown argument '--max-stepz' \(did you mean --max-steps\?\)"),
    (["--lr", "fast"], r"argument --lr: invalid float value: 'fast'"),
    (["--mixed-precision", "fp64"], r"--mixed-precision: invalid choice: 'fp64' \(choose from 'no', 'fp16'"),
    (["--block-size", "0"], r"block_size=0 must be >= 1"),
    (["--config", "nope.yaml"], r"--config nope.yaml: no such file"),
    (["stray"], r"unknown argument 'stray'"),
])
def test_bad_settings_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


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
from minrnn_training.loop import main
for name in {list(BAD_INPUTS)!r}:
    flag = "--dataset" if name.endswith(".txt") else "--config"
    start = time.perf_counter()
    try:
        main([flag, {str(tmp_path)!r} + "/" + name, "--output-dir", {str(tmp_path / "out")!r}])
    except SystemExit as exit:
        print(json.dumps([name, str(exit), "torch" in sys.modules, time.perf_counter() - start]))
"""
    result = subprocess.run([sys.executable, "-c", check], env=env(), capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [name for name, *_ in answers] == list(BAD_INPUTS)
    for name, message, torch_imported, _seconds in answers:
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
    from_recipe = parse_args(["--config", str(recipe)])[0].dataset
    from_options = parse_args(["--dataset", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])[0].dataset
    assert from_recipe == from_options == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    splits = load_text_splits(from_recipe)
    assert splits.train[0].startswith("first file") and splits.validation[-1].endswith("second file ")
    assert parse_args(["--dataset", "none"])[0].dataset is None


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 5\nhiden_size: 3\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown setting 'hiden_size'"):
        parse_args(["--config", str(recipe)])


@pytest.mark.parametrize("argv, message", [
    (["--cell-type", "gru"], r"^`cell_type` must be one of \('mingru', 'minlstm'\); got 'gru'.$"),
    (["--scan-backend", "fast"], r"^`scan_backend` must be one of \('auto', 'sequential', .*\); got 'fast'.$"),
    (["--chat-template", "{% for %}"], r"chat_template '\{% for %\}': Jinja syntax error at line 1"),
    (["--chat-template", "missing.jinja"], r"chat_template='missing.jinja': no such file"),
])
def test_model_and_template_settings_fail_before_any_work(tmp_path, argv, message):
    """Settings the model (or Jinja) defines are checked by it, before data or training: one line."""
    config, options = parse_args([*argv, "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ConfigError, match=message):
        preflight(config, options)
    assert not (tmp_path / "out").exists()


def test_backprop_chunk_size_must_be_positive():
    with pytest.raises(ConfigError, match=r"^backprop_chunk_size=0 must be >= 1 \(or none: no chunking\)$"):
        parse_args(["--backprop-chunk-size", "0"])
    assert parse_args(["--backprop-chunk-size", "none"])[0].backprop_chunk_size is None


@pytest.mark.parametrize("extra, message", [
    (["--state-reset", "doc"], r"--state-reset: invalid choice: 'doc' \(choose from 'eos', 'none'\)"),
    (["--streaming", "--dataset", "x.txt"], r"carry_state=true needs an in-memory corpus"),
    (["--backprop-chunk-size", "64"], r"carry_state=true and backprop_chunk_size=64 cannot be combined"),
])
def test_carried_state_settings_are_checked(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--carry-state", *extra])


@dataclass
class ExperimentSettings:
    models: list[str] = field(default_factory=lambda: ["a"])
    lr_grid: list[float] = field(default_factory=list)
    steps: int = 10
    data: str | None = None

    def validate(self):
        if self.steps < 1:
            raise SystemExit(f"--steps must be >= 1; got {self.steps}")


def test_experiment_settings_take_lists_both_ways(tmp_path):
    """An experiment's dataclass through the same parser: lists as several values or a comma list, from a recipe
    or options; its own `validate`; errors as one line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models: [x, y]\nlr_grid: [1.0e-3, 3.0e-3]\ndata: embedded\n")
    settings = parse_settings(ExperimentSettings, ["--config", str(recipe), "--steps", "4"])
    assert (settings.models, settings.lr_grid, settings.steps) == (["x", "y"], [1e-3, 3e-3], 4)
    assert settings.data == "embedded"
    assert parse_settings(ExperimentSettings, ["--models", "x,y", "z"]).models == ["x", "y", "z"]
    assert parse_settings(ExperimentSettings, ["--lr-grid", "1e-3,1e-2"]).lr_grid == [1e-3, 1e-2]
    assert parse_settings(ExperimentSettings, ["--data", "none"]).data is None
    with pytest.raises(SystemExit, match=r"^error: command line: unknown argument '--model' \(did you mean --models"):
        parse_settings(ExperimentSettings, ["--model", "x"])
    with pytest.raises(SystemExit, match=r"^error: .*r.yaml: unknown setting 'step' \(did you mean 'steps'\?\)"):
        recipe.write_text("step: 3\n")
        parse_settings(ExperimentSettings, ["--config", str(recipe)])
    with pytest.raises(SystemExit, match=r"^--steps must be >= 1; got 0$"):
        parse_settings(ExperimentSettings, ["--steps", "0"])
