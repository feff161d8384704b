"""The paper-reproduction scripts: the task generator against its specification, the parameter matching and the
shape of the quality-comparison baselines (Llama, GPT-2, the community minGRU, Mamba), the data splits, and a
few-step smoke run of each script end to end (pipeline only, not final accuracy)."""

import json
from pathlib import Path

import pytest
import selective_copying as sc  # scripts/ is on the tests' path (pyproject's pytest `pythonpath`)
import shakespeare_compare as shakespeare
import torch

ROOT = Path(__file__).resolve().parent.parent


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


ALL_MODELS = ["mingru", "minlstm", "llama", "gpt2", "mamba"] + (
    ["community-mingru"] if shakespeare.community_available() else [])
needs_community = pytest.mark.skipif(not shakespeare.community_available(),
                                     reason="minGRU-pytorch is not installed (pip install 'minrnn[compare]')")


def test_shakespeare_baselines_have_matched_parameter_counts():
    settings = shakespeare.Settings(hidden_size=64, num_hidden_layers=2, num_heads=2, context=32, models=ALL_MODELS)
    shapes = shakespeare.matched_shapes(settings, vocab_size=65)
    counts = {kind: shakespeare.build_model(kind, settings, 65, **shapes[kind]).num_parameters()
              for kind in settings.models}
    for kind, count in counts.items():
        assert abs(count / counts["gpt2"] - 1) < 0.05, (kind, count, counts["gpt2"])


def test_llama_baseline_is_the_modern_transformer():
    settings = shakespeare.Settings(hidden_size=64, num_hidden_layers=2, num_heads=2, context=32)
    model = shakespeare.build_model("llama", settings, 65, intermediate_size=96)
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.endswith("bias") for name in names), "no biases"
    assert not any("position" in name for name in names), "rotary positions, no learned table"
    assert model.model.layers[0].mlp.up_proj.out_features == 96 and model.config.hidden_act == "silu"
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@needs_community
def test_community_mingru_is_the_packages_model_at_the_solved_width():
    from minGRU_pytorch.minLM import minLM

    settings = shakespeare.Settings(hidden_size=48, num_hidden_layers=2, context=32, dropout=0.0)
    for width in (96, 100, 160):
        model = shakespeare.build_model("community-mingru", settings, 65, intermediate_size=width)
        assert isinstance(model.lm, minLM)
        # MLP width exactly as solved, despite minLM's int(dim * ff_mult).
        assert model.lm.layers[0][4][0].out_features == width
    ids = torch.randint(65, (2, 10))
    assert torch.equal(model(input_ids=ids).logits, model.lm(ids))


def test_splits_are_disjoint_and_cover_the_text(tmp_path):
    text = "".join(chr(97 + i % 7) for i in range(1000))
    path = tmp_path / "text.txt"
    path.write_text(text)
    data = shakespeare.load_chars(path, val_fraction=0.1)
    # nanoGPT's test split (last 10%); validation is the last 10% of the rest.
    assert (len(data.train), len(data.validation), len(data.test)) == (810, 90, 100) and data.vocab_size == 7
    chars = sorted(set(text))
    decoded = "".join(chars[i] for i in torch.cat([data.train, data.validation, data.test]).tolist())
    assert decoded == text
    inputs, targets = shakespeare.test_windows(data.test, 16)
    assert inputs.shape == (6, 16) and torch.equal(inputs.flatten()[1:], targets.flatten()[:-1])


def test_bpe_corpus_is_split_before_the_tokenizer_is_trained():
    settings = shakespeare.Settings(data="embedded", tokenizer="bpe", bpe_vocab_size=300)
    data = shakespeare.load_data(settings)
    assert data.vocab_size == 300 and "byte-level BPE" in data.description
    sizes = [len(part) for part in (data.train, data.validation, data.test)]
    # About 81% / 9% / 10% of the characters, so of the tokens.
    assert 0.06 < sizes[1] / sum(sizes) < 0.12 and 0.07 < sizes[2] / sum(sizes) < 0.13
    assert all(int(part.max()) < 300 for part in (data.train, data.validation, data.test))


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


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "grid,steps"], "--lr-grid"),
    (["--lr-grid", "1e-3,2e-3"], "--budgets grid"),
    (["--tokenizer", "wordpiece"], "--tokenizer wordpiece"),
    (["--data", "embedded"], "--tokenizer bpe"),
    (["--models", "mingru,rwkv"], "--models mingru,rwkv"),
    (["--dropout-grid", "0,1.5"], "--dropout-grid"),
    (["--seeds", "1,1"], "must not repeat"),
])
def test_shakespeare_rejects_bad_settings(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        shakespeare.main(argv + ["--output-dir", str(tmp_path)])


@pytest.mark.slow  # three models trained and evaluated: ~10 s of 2 CPU cores; the BPE smoke stays
def test_shakespeare_smoke(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    models = ["mingru", "llama"] + (["community-mingru"] if shakespeare.community_available() else [])
    argv = [
        "--data", str(data), "--models", ",".join(models), "--budgets", "grid,steps,time",
        "--lr-grid", "1e-3,1e-2", "--grid-time-s", "0.25", "--time-budget-s", "0.2", "--dropout", "0",
        "--hidden-size", "32", "--num-hidden-layers", "1", "--num-heads", "2", "--context", "16",
        "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "1",
        "--num-threads", "1", "--output-dir", str(tmp_path / "out"),
    ]
    runs = shakespeare.main(argv)
    by_budget = {(run["budget"], run["name"]): run for run in runs}
    assert set(by_budget) == {(b, m) for b in ("grid", "steps", "time") for m in models}
    grid = [json.loads(path.read_text()) for path in (tmp_path / "out" / "runs").glob("grid-*.json")]
    assert len(grid) == 2 * len(models)
    for kind in models:
        # Each model's later budgets run at the rate with its lowest validation loss in the grid.
        best = min((run for run in grid if run["name"] == kind), key=lambda run: run["val_loss"])
        assert by_budget["grid", kind]["lr"] == by_budget["steps", kind]["lr"] == by_budget["time", kind]["lr"] \
            == best["lr"]
        assert by_budget["steps", kind]["steps"] == 3
        assert by_budget["time", kind]["train_time_s"] >= 0.2 and by_budget["grid", kind]["train_time_s"] >= 0.25
    # After a few hundred steps at the better rate, well below the uniform guess over 28 characters (ln 28).
    assert all(run["test_loss"] < 3.0 and run["tokens_per_s"] > 0 for run in runs if run["budget"] == "grid")
    out = tmp_path / "out"
    assert all((out / f"curves_{budget}.png").exists() for budget in ("grid", "steps", "time"))
    results = (out / "results.md").read_text()
    assert "Learning-rate grid" in results and "| llama |" in results and "CPU s" in results
    # A rerun reuses every saved run and trains nothing.
    capsys.readouterr()
    again = shakespeare.main(argv)
    assert capsys.readouterr().out.count(": reusing ") == 4 * len(models)
    assert [run["test_loss"] for run in again] == [run["test_loss"] for run in runs]


@pytest.mark.slow  # a dropout grid, then three seeds: ~30 s of 2 CPU cores
def test_shakespeare_dropout_grid_then_seeds(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    models = ["mingru", "llama"]
    argv = [
        "--data", str(data), "--models", ",".join(models), "--budgets", "steps", "--lr", "1e-2",
        "--dropout", "0", "--dropout-grid", "0,0.3", "--seed", "5", "--seeds", "5,6",
        "--hidden-size", "32", "--num-hidden-layers", "1", "--num-heads", "2", "--context", "16",
        "--batch-size", "4", "--max-steps", "4", "--warmup-steps", "1", "--eval-every", "2", "--eval-batches", "1",
        "--num-threads", "1", "--jobs", "2", "--output-dir", str(tmp_path / "out"),
    ]
    runs = shakespeare.main(argv)
    runs_dir = tmp_path / "out" / "runs"
    # Runs at the settings' dropout and seed keep the names they had before dropout and seeds were varied.
    grid = {(kind, dropout): json.loads((runs_dir / f"steps-{kind}-lr0.01{suffix}.json").read_text())
            for kind in models for dropout, suffix in ((0.0, ""), (0.3, "-dropout0.3"))}
    assert [(run["name"], run["seed"]) for run in runs] == [(kind, seed) for kind in models for seed in (5, 6)]
    for kind in models:
        assert grid[kind, 0.0]["dropout"] == 0.0 and grid[kind, 0.3]["dropout"] == 0.3
        assert grid[kind, 0.0]["val_loss"] != grid[kind, 0.3]["val_loss"]
        best = min((grid[kind, 0.0], grid[kind, 0.3]), key=lambda run: run["val_loss"])
        first, second = (run for run in runs if run["name"] == kind)
        # Every seed at the dropout with the lowest validation loss; seed 5 there is the dropout grid's own run.
        assert first["dropout"] == second["dropout"] == best["dropout"] and first["test_loss"] == best["test_loss"]
        # The other seed draws other weights and batches.
        assert second["settings"]["seed"] == 6 and second["test_loss"] != first["test_loss"]
    results = (tmp_path / "out" / "results.md").read_text()
    assert "Dropout grid" in results and "Over seeds 5, 6" in results and "| mingru | 0.01 |" in results
    assert (tmp_path / "out" / "curves_steps_dropout.png").exists()
    # A run saved before runs recorded their dropout and seed is still reused, and reported with both.
    saved = json.loads((runs_dir / "steps-llama-lr0.01.json").read_text())
    del saved["dropout"], saved["seed"]
    (runs_dir / "steps-llama-lr0.01.json").write_text(json.dumps(saved))
    capsys.readouterr()
    again = shakespeare.main(argv)
    assert capsys.readouterr().out.count(": reusing ") == 4 * len(models)
    assert [(run["dropout"], run["seed"], run["test_loss"]) for run in again] == \
        [(run["dropout"], run["seed"], run["test_loss"]) for run in runs]


def test_shakespeare_bpe_smoke(tmp_path):
    runs = shakespeare.main([
        "--data", "embedded", "--tokenizer", "bpe", "--bpe-vocab-size", "300", "--models", "minlstm,gpt2",
        "--budgets", "steps", "--hidden-size", "32", "--num-hidden-layers", "1", "--num-heads", "2",
        "--context", "16", "--batch-size", "32", "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "2",
        "--eval-batches", "1", "--num-threads", "1", "--output-dir", str(tmp_path),
    ])
    assert [run["name"] for run in runs] == ["minlstm", "gpt2"]
    # Near the uniform guess over 300 tokens (ln 300 = 5.7) after 3 steps.
    assert all(5.0 < run["test_loss"] < 6.5 for run in runs)
    assert "byte-level BPE of 300 tokens" in (tmp_path / "results.md").read_text()


def test_missing_community_baseline_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shakespeare, "community_available", lambda: False)
    data = tmp_path / "text.txt"
    data.write_text("to be or not to be, that is the question\n" * 100)
    runs = shakespeare.main([
        "--data", str(data), "--models", "gpt2,community-mingru", "--budgets", "steps", "--hidden-size", "16",
        "--num-hidden-layers", "1", "--num-heads", "2", "--context", "8", "--batch-size", "2", "--max-steps", "2",
        "--warmup-steps", "0", "--eval-every", "2", "--eval-batches", "1", "--output-dir", str(tmp_path / "out"),
    ])
    assert [run["name"] for run in runs] == ["gpt2"]
    assert "community-mingru: skipped, the minGRU-pytorch package is not installed" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_experiment_configs_load(path):
    script = sc if path.name.startswith("selective_copying") else shakespeare
    settings = script.parse_settings(script.Settings, ["--config", str(path)], "")
    assert settings.output_dir.startswith("results/")
