"""Running `scripts/pretrain.py` from the tests: real subprocesses (`python` or `accelerate launch`) on a tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from minrnn_training.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "pretrain.py"

# A model and data small enough that process start-up dominates each run.
TINY = [
    "--hidden-size", "32", "--num-hidden-layers", "1", "--intermediate-size", "64", "--block-size", "32",
    "--tokenizer-vocab-size", "300", "--eval-batches", "2", "--sample-tokens", "8", "--log-with", "none",
    "--warmup-steps", "2", "--lr", "3e-3",
]

# Every value the launcher would otherwise warn about ("values were not passed ... had defaults used instead").
ONE_CPU_PROCESS = ("--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                   "--dynamo_backend", "no")


def accelerate_launch(*flags):
    return (sys.executable, "-m", "accelerate.commands.launch", *flags)


# Two processes joined over gloo on a CPU-only machine (accelerate's `--cpu` launcher starts one; several need
# mpirun, so `--multi_gpu` starts them with torchrun and pretrain.py joins them over gloo).
TWO_PROCESSES = accelerate_launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                                  "no", "--dynamo_backend", "no", "--main_process_port", "0")


def env():
    """The subprocesses' environment: this checkout's packages, one thread each, the launcher's own precision."""
    variables = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    variables.pop("ACCELERATE_MIXED_PRECISION", None)
    return variables


def run(args, *, launcher=(sys.executable,), timeout=300, check=True, cwd=REPO, script=SCRIPT):
    """Run pretrain.py with `args`; returns the CompletedProcess (output captured)."""
    result = subprocess.run([*launcher, str(script), *args], cwd=cwd, env=env(), capture_output=True,
                            text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain.py {args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


def kill_after_first_checkpoint(args, output_dir: Path) -> None:
    """Start pretrain.py with `args` in `output_dir` and kill -9 it once its first checkpoint is complete (maybe in
    the middle of writing the next)."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--output-dir", str(output_dir)], cwd=REPO,
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while latest_checkpoint(str(output_dir)) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed after its first checkpoint"


def train_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def step_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_log(output_dir) if "loss" in r}
