"""The benchmark command (`benchmarks/benchmark.py`): a `--quick` run of every section, and its measuring tools."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark", BENCHMARK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_run_writes_every_section(bench, tmp_path, restore_threads):
    report = bench.main(["--quick", "--no-compile", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    text = report.read_text()
    for heading in ("## Targets", "## Scan backends", "## One layer", "## Language models", "## Decoding", "## Memory"):
        assert heading in text
    assert (tmp_path / "benchmark_cpu.png").stat().st_size > 10_000
    assert (tmp_path / "decode_profile_cpu.txt").read_text().strip()
    results = json.loads((tmp_path / "benchmark_cpu.json").read_text())
    for section in bench.SECTIONS:
        assert results[section], section
    timed = [row for row in results["scan"] + results["layer"] if row["forward_backward_s"] is not None]
    assert all(row["forward_backward_s"] > 0 for row in timed)
    assert all(row["tokens_per_s"] > 0 for row in results["train"])
    models = {row["model"] for row in results["train"]}
    assert {"minrnn (minGRU)", "GPT-2 (sdpa)", "Mamba"} <= models


def test_peak_memory_sees_a_known_allocation(bench):
    def allocate_and_free():
        big = torch.ones(1_000_000)  # 4 MB, freed on return
        small = big[:10].clone()
        return small

    peak = bench.peak_memory_bytes(allocate_and_free, "cpu")
    assert 4_000_000 <= peak < 4_100_000


def test_language_models_have_equal_parameter_counts(bench):
    """The full-size models compared for training speed are within 5% of minrnn's parameter count."""
    models = bench.language_models(bench.FULL)
    counts = {name: bench.count_params(model, exclude=("wpe",)) for name, (model, _) in models.items()}
    reference = counts["minrnn (minGRU)"]
    assert 5_000_000 < reference < 7_000_000, counts
    for name, count in counts.items():
        assert abs(count / reference - 1) <= 0.05, (name, counts)


@pytest.mark.slow
def test_compiled_static_cache_decoding_matches_eager(bench, tmp_path, restore_threads):
    """`generate(cache_implementation="static")` with `torch.compile` gives the eager tokens (compiling: ~1 minute)."""
    bench.main(["--quick", "--sections", "decode", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "benchmark_cpu.json").read_text())["decode"]
    compiled = [row for row in rows if row["matches_eager"] is not None]
    assert compiled and all(row["matches_eager"] for row in compiled)
