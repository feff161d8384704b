"""The README's Python examples run as written."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", open(README, encoding="utf-8").read(), re.S)
    assert blocks and any('pipeline("text-generation", model="out/tiny"' in block for block in blocks)
    # The pipeline example loads what the README's pretraining command writes: a much smaller run of it.
    small = ["--hidden-size", "32", "--num-hidden-layers", "1", "--intermediate-size", "64", "--block-size", "32",
             "--tokenizer-vocab-size", "300", "--eval-batches", "1", "--sample-tokens", "0", "--log-with", "none"]
    subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "pretrain.py"), *small, "--max-steps", "2",
         "--output-dir", "out/tiny"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"), check=True, capture_output=True,
        timeout=600,
    )
    monkeypatch.chdir(tmp_path)  # the examples write "ckpt" and read "out/tiny" in the working directory
    namespace = {}
    for block in blocks:
        exec(compile(block, README, "exec"), namespace)  # noqa: S102
