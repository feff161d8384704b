"""Serve the page and drive it in the system's headless Chromium, from Python (the tests and the benchmark).

    with serve("exported/web") as base:
        results = drive(f"{base}?model=model/fp32/", [{"generate": {"prompt": "The", "maxNewTokens": 32}}])

`drive` runs `drive.mjs` (playwright-core, pointed at the system browser: nothing is downloaded); its steps and
results are described there. `missing_requirements()` says what is missing to run it, or None.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PAGE = Path(__file__).resolve().parent
# The browser to drive: $MINRNN_CHROMIUM, else Debian's `chromium` (or `chromium-browser`) on the PATH.
CHROMIUM_ENV = "MINRNN_CHROMIUM"


def chromium_path() -> str | None:
    return os.environ.get(CHROMIUM_ENV) or shutil.which("chromium") or shutil.which("chromium-browser")


def missing_requirements() -> str | None:
    """One line naming what is missing to drive the page (and how to get it), or None."""
    if chromium_path() is None:
        return f"no Chromium: `apt-get install -y chromium`, or set ${CHROMIUM_ENV} to a Chromium binary"
    if shutil.which("node") is None:
        return "no node on the PATH (Node.js >= 18 runs the page's driver)"
    if not (PAGE / "node_modules" / "playwright-core").is_dir():
        return f"the page's packages are not installed: `npm ci` in {PAGE}"
    if not (PAGE / "vendor").is_dir():
        return f"the page's runtime is not vendored: `npm run build` in {PAGE}"
    return None


@contextlib.contextmanager
def serve(model_dir: str | os.PathLike):
    """Run `serve.py` for `model_dir` on a free port of 127.0.0.1; yields the page's URL."""
    process = subprocess.Popen(
        [sys.executable, str(PAGE / "serve.py"), "--model", str(model_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        if not line.startswith("Serving "):
            raise RuntimeError(f"serve.py did not start: {line}{process.stderr.read()}")
        yield line.split()[1]
    finally:
        process.terminate()
        process.wait(timeout=10)


def drive(url: str, steps: list[dict], timeout: float = 600) -> list[dict]:
    """Open `url` in headless Chromium, wait for the model to load, run `steps` (see drive.mjs); one result each."""
    plan = {"url": url, "chromium": chromium_path(), "timeoutMs": int(timeout * 1000), "steps": steps}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(plan, f)
    try:
        result = subprocess.run(
            ["node", str(PAGE / "drive.mjs"), f.name], capture_output=True, text=True, timeout=timeout + 60
        )
    finally:
        os.unlink(f.name)
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"drive.mjs failed ({result.returncode}):\n{result.stdout}\n{result.stderr}") from None
    if "error" in report:
        raise RuntimeError(f"the page failed: {report['error']}\nits console: {report['console']}")
    return report["results"]
