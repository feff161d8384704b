"""The compile benchmark (`benchmarks/compile_training.py`): a `--quick` run writes its table and raw numbers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow  # eight inductor compiles of tiny models: ~2 minutes on 2 idle cores
def test_quick_run_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("compile_training", BENCHMARKS / "compile_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--quick", "--seqs", "16", "--device", "cpu", "--out", str(tmp_path)]).read_text()
    rows = json.loads((tmp_path / "compile_training_cpu.json").read_text())["rows"]
    assert {(row["precision"], row["mode"]) for row in rows} == {(p, m) for p in ("fp32", "bf16")
                                                                  for m in ("eager", "compile")}
    assert len(rows) == 18 and all(row["tokens_per_s"] > 0 for row in rows)  # chunked scan: eager only
    for line in ("scan) | fp32 |", "scan, fused loss) | bf16 |", "| minrnn (chunked scan) | bf16 |",
                 "| GPT-2 (sdpa) | fp32 |", "| GPT-2 (sdpa, fused loss) | bf16 |", "bf16: compiled / eager",
                 "| best minrnn / best GPT-2 (target >= 3x at T = 4,096) |"):
        assert line in report, line
    sys.modules.pop("benchmark", None)
