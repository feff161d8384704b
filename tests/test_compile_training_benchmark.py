"""The compile benchmark (`benchmarks/compile_training.py`): a `--quick` run writes its table and raw numbers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # six inductor compiles of tiny models: ~2 minutes on 2 idle cores
def test_quick_run_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("compile_training", BENCHMARKS / "compile_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]).read_text()
    rows = json.loads((tmp_path / "compile_training_cpu.json").read_text())["rows"]
    assert {(row["mode"], row["seq"]) for row in rows} == {(m, s) for m in ("eager", "compile") for s in (16, 32)}
    assert len(rows) == 12 and all(row["tokens_per_s"] > 0 for row in rows)
    for line in ("| minrnn (auto: ", "| minrnn (chunked scan) |", "| GPT-2 (sdpa) |", "compiled / eager"):
        assert line in report, line
    sys.modules.pop("benchmark", None)
