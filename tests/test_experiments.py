"""The paper-reproduction scripts: the task generator against its specification, the parameter matching of the
Shakespeare baselines, and a few-step smoke run of each script end to end (pipeline only, not final accuracy)."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import selective_copying as sc
import shakespeare_compare as shakespeare


def test_selective_copying_batches_follow_the_specification():
    generator = torch.Generator().manual_seed(0)
    inputs, targets = sc.sample_selective_copying(512, 40, 16, generator)
    assert inputs.shape == (512, 56) and targets.shape == (512, 16)
    assert inputs.dtype == targets.dtype == torch.long
    body, markers = inputs[:, :40], inputs[:, 40:]
    assert (markers == sc.PRED).all()
    data = body != sc.EMPTY
    assert (data.sum(1) == 16).all(), "exactly num_memorize data tokens per sample"
    # The data tokens, read left to right, are the targets; all lie in 1..14.
    assert torch.equal(body[data].view(512, 16), targets)
    assert targets.min() >= 1 and targets.max() <= 14
    # Same law as the reference: every position is used about equally (16/40 of samples) and every token value
    # about equally (1/14 of draws); bounds are ~6 standard deviations.
    position_rate = data.float().mean(0)
    assert (position_rate - 16 / 40).abs().max() < 0.13
    token_rate = torch.bincount(targets.flatten(), minlength=15)[1:].float() / targets.numel()
    assert (token_rate - 1 / 14).abs().max() < 0.02
    # Positions are a uniform 16-subset of 40 (not, e.g., 16 independent draws): the first one has mean
    # (L - M) / (M + 1) = 24 / 17 for a uniform subset.
    first = data.float().argmax(1).float()
    assert abs(first.mean().item() - 24 / 17) < 0.25


def test_selective_copying_is_reproducible_and_checks_its_arguments():
    first = sc.sample_selective_copying(4, 64, 16, torch.Generator().manual_seed(3))
    second = sc.sample_selective_copying(4, 64, 16, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(ValueError, match="num_memorize=17"):
        sc.sample_selective_copying(1, 16, 17, torch.Generator())
    with pytest.raises(SystemExit, match="mingru-x"):
        sc.parse_model_name("mingru-x")


def test_shakespeare_baselines_have_matched_parameter_counts():
    settings = shakespeare.Settings(hidden_size=64, num_hidden_layers=2, num_heads=2, context=32,
                                    models=["mingru", "minlstm", "gpt2", "mamba"])
    shapes = shakespeare.matched_shapes(settings, vocab_size=65)
    counts = {kind: shakespeare.build_model(kind, settings, 65, **shapes[kind]).num_parameters()
              for kind in settings.models}
    for kind, count in counts.items():
        assert abs(count / counts["gpt2"] - 1) < 0.05, (kind, count, counts["gpt2"])


def test_shakespeare_split_is_nanogpt(tmp_path):
    text = "".join(chr(97 + i % 7) for i in range(1000))
    path = tmp_path / "text.txt"
    path.write_text(text)
    data = shakespeare.load_chars(path)
    assert data.chars == sorted(set(text)) and len(data.train) == 900 and len(data.test) == 100
    decoded = "".join(data.chars[i] for i in torch.cat([data.train, data.test]).tolist())
    assert decoded == text
    inputs, targets = shakespeare.test_windows(data.test, 16)
    assert inputs.shape == (6, 16) and torch.equal(inputs.flatten()[1:], targets.flatten()[:-1])


def test_selective_copying_smoke(tmp_path):
    runs = sc.main([
        "--models", "mingru-1,minlstm-2", "--seq-len", "24", "--num-memorize", "4", "--batch-size", "8",
        "--max-steps", "4", "--eval-every", "2", "--val-samples", "16", "--test-samples", "16", "--min-lr", "1e-4",
        "--warmup-steps", "1", "--num-threads", "0",
        "--output-dir", str(tmp_path),
    ])
    assert [run["name"] for run in runs] == ["mingru-1", "minlstm-2"]
    assert all(0.0 <= run["test_accuracy"] <= 1.0 and len(run["history"]) == 2 for run in runs)
    # The reported accuracy is that of the best validation checkpoint.
    for run in runs:
        best = max(run["history"], key=lambda point: (point["val_accuracy"], point["step"]))
        assert run["best_step"] == best["step"]
    assert "| minlstm | 2 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert set(json.loads((tmp_path / "history.json").read_text())) == {"mingru-1", "minlstm-2"}


def test_shakespeare_smoke(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    runs = shakespeare.main([
        "--data", str(data),
        "--models", "mingru,gpt2", "--hidden-size", "32", "--num-hidden-layers", "1", "--num-heads", "2",
        "--context", "16", "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "2",
        "--eval-batches", "1", "--num-threads", "0", "--output-dir", str(tmp_path),
    ])
    by_budget = {(run["budget"], run["name"]): run for run in runs}
    assert set(by_budget) == {(b, m) for b in ("steps", "time") for m in ("mingru", "gpt2")}
    assert by_budget["steps", "mingru"]["steps"] == 3
    # Near the uniform guess over the text's 28 characters (ln 28 = 3.33) after 3 steps.
    assert all(2.5 < run["test_loss"] < 4.5 and run["tokens_per_s"] > 0 for run in runs)
    assert (tmp_path / "curves_steps.png").exists() and (tmp_path / "curves_time.png").exists()
    assert "| gpt2 |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_configs_load(path):
    script = sc if path.name.startswith("selective_copying") else shakespeare
    settings = script.parse_settings(script.Settings, ["--config", str(path)], "")
    assert settings.output_dir.startswith("results/")
