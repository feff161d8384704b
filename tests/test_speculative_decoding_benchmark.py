"""The speculative-decoding benchmark (`benchmarks/speculative_decoding.py`): a `--smoke` run of the whole path."""

import importlib.util
import json
from pathlib import Path

import torch

BENCHMARK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "speculative_decoding.py"


def test_smoke_run_is_exact_and_counts_acceptance(tmp_path):
    spec = importlib.util.spec_from_file_location("speculative_decoding", BENCHMARK_PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert result["exact"]
    rows = {row["method"].split(" (")[0]: row for row in result["rows"]}
    assert set(rows) == {"greedy", "prompt lookup", "draft minGRU"}
    for row in rows.values():
        assert row["new_tokens"] == 2 * 24 and row["tokens_per_s"] > 0
        assert row["proposed"] >= row["accepted"] >= 0
    # The smoke prompt repeats a block, so prompt lookup's candidates are proposed and partly accepted.
    assert rows["prompt lookup"]["proposed"] > 0 and rows["prompt lookup"]["tokens_per_forward"] > 1
    assert json.loads((tmp_path / "speculative_decoding_smoke.json").read_text())["rows"]
    assert "| greedy |" in (tmp_path / "speculative_decoding_smoke.md").read_text()
