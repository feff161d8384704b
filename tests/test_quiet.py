"""What a user sees on stderr: importing the model, the README's main job, its pipeline example and an export print
only what minrnn means to say (progress bars and `minrnn:` lines), not what their dependencies print on import.

Run in the environment of the `dev` extra, which installs torchao: transformers imports it, and with it torch's and
torchao's import-time lines (`modeling_minrnn.dependency_noise`).
"""

import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, docs_env, own_stderr

# Progress bars (tqdm redraws a line with carriage returns) and the project's own notices.
OURS = re.compile(r"^(training: |minrnn: |warning: )")
# transformers' own progress bar while it loads weights.
LOADING = re.compile(r"^Loading weights: ")


def _lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def _run(args, cwd=ROOT, **env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**docs_env(), **env}, capture_output=True,
                          text=True, timeout=600, check=False)


def test_the_main_job_prints_only_its_own_lines(tiny_run_process):
    _, proc = tiny_run_process
    assert [line for line in _lines(proc.stderr) if not OURS.match(line)] == []
    assert [line.split(" ")[0] for line in _lines(proc.stdout)] == ["dataset", "step", "wrote"], proc.stdout


def test_the_pipeline_example_prints_only_its_text(tiny_run, tmp_path):
    """The README's example, where minrnn is not importable: its only foreign lines are those that transformers'
    own import prints before any minrnn code runs (conftest's `own_stderr`)."""
    shutil.copytree(tiny_run, tmp_path / "out" / "tiny", symlinks=True)
    code = ('from transformers import pipeline, set_seed; set_seed(0); '
            'generator = pipeline("text-generation", model="out/tiny", trust_remote_code=True); '
            'print(generator("The class", max_new_tokens=8)[0]["generated_text"])')
    proc = _run(["-c", code], cwd=tmp_path, PYTHONPATH="", HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in _lines(own_stderr(proc.stderr)) if not LOADING.match(line)] == []
    assert proc.stdout.startswith("The class"), proc.stdout


@pytest.mark.slow  # an ONNX export: ~20 s on 2 idle cores
def test_an_export_prints_only_what_it_wrote(tiny_run, tmp_path):
    proc = _run(["-m", "modeling_minrnn.export", "--checkpoint", str(tiny_run), "--format", "onnx", "--out",
                 str(tmp_path / "onnx")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line for line in _lines(proc.stderr) if not LOADING.match(line)] == []
    assert proc.stdout.startswith("Wrote model.onnx, prefill.onnx") and proc.stdout.count("\n") == 1, proc.stdout


def test_importing_the_model_prints_nothing_and_the_filters_drop_one_message_each():
    """`import modeling_minrnn` prints nothing; the filters drop their one message each, nothing else their loggers
    say, and the export's only within the export."""
    code = ("import logging, modeling_minrnn; from modeling_minrnn.dependency_noise import quiet_export\n"
            "torchao, onnx = logging.getLogger('torchao'), logging.getLogger('torch.onnx._internal.exporter')\n"
            "torchao.warning('Failed to load /x/torchao/_C.so: no')\n"
            "torchao.warning('torchao: something else')\n"
            "with quiet_export():\n"
            "    onnx.getChild('_registration').warning('torchvision is not installed')\n"
            "onnx.getChild('_registration').warning('torchvision is not installed')\n")
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""
    lines = _lines(proc.stderr)
    assert len(lines) == 2 and lines[0] == "torchao: something else", proc.stderr
    assert lines[1].endswith("] torchvision is not installed"), proc.stderr  # in torch's own log format

