"""Every code block of README.md and docs/*.md runs as written, each in a fresh process of its own.

Fenced ```python and ```bash blocks run; other fences (text, yaml, output) never do. An HTML comment on the line
right before a fence (invisible on a rendered page) changes that, and must give its reason:

    <!-- skip: reason -->   never run by the tests (installs packages, needs the network or a GPU, ...)
    <!-- slow: reason -->   run only by `pytest -m slow` (minutes of CPU)
    <!-- xfail: reason -->  run, and expected to fail until the reason is fixed; a block that then passes fails the
                            test, so that its marker goes

Each block starts in a working directory of its own that holds links to the repository's top-level folders, so
`scripts/pretrain.py` or `configs/tiny.yaml` resolve as in a checkout, and imports `modeling_minrnn` from this
checkout. A block that names `out/tiny`, the default pretraining run's output, finds there a run of that same
command at a toy size (conftest's `tiny_run`). Python blocks are forked from a server process that has imported
torch and transformers (minrnn only when a block imports it): a block still sees nothing it did not import or build
itself, and the import is paid once instead of several seconds a block.
"""

import multiprocessing
import multiprocessing.forkserver
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from conftest import OFFLINE, docs_env

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = ("python", "bash")
MARKERS = ("skip", "slow", "xfail")
BLOCK = re.compile(r"^(?:<!-- (?P<marker>\w+): (?P<reason>[^\n]*?) -->\n)?```(?P<lang>[\w-]*)\n(?P<code>.*?)^```$",
                   re.DOTALL | re.MULTILINE)
# Top-level entries a block may name by a relative path, as it would in a checkout.
CHECKOUT_ENTRIES = ("benchmarks", "configs", "docs", "hub_upload", "modeling_minrnn", "scripts", "pyproject.toml",
                    "README.md", "RESULTS.md")
# Never ask the network: a block that needs it must say so with a skip marker.
TIMEOUT_S = 600


def _blocks():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        matches = list(BLOCK.finditer(text))
        placed = sum(match["marker"] is not None for match in matches)
        if len(re.findall(rf"<!-- (?:{'|'.join(MARKERS)}):", text)) != placed:
            raise ValueError(f"{page.name}: a skip/slow/xfail marker that is not on the line right before a ```fence")
        for match in matches:
            line = text.count("\n", 0, match.start("code")) + 1
            name = f"{page.relative_to(REPO)}:{line}"
            marker, lang = match["marker"], match["lang"]
            if marker is not None and marker not in MARKERS:
                raise ValueError(f"{name}: unknown marker {marker!r} before the block; use one of {MARKERS}")
            if lang not in RUNNABLE:
                if marker is not None:
                    raise ValueError(f"{name}: a {marker} marker before a ```{lang} block, which never runs")
                continue
            marks = {"skip": [pytest.mark.skip(reason=match["reason"])], "slow": [pytest.mark.slow],
                     "xfail": [pytest.mark.xfail(reason=match["reason"], strict=True)]}.get(marker, [])
            yield pytest.param(name, lang, match["code"], id=name, marks=marks)


BLOCKS = list(_blocks())


def test_every_page_has_blocks_that_run():
    """The parsing above found the pages' blocks (a broken pattern would make every other test vanish)."""
    pages = {param.values[0].split(":")[0] for param in BLOCKS}
    assert pages == {str(page.relative_to(REPO)) for page in PAGES}
    assert any("out/tiny" in param.values[2] for param in BLOCKS), "the README no longer generates from out/tiny"


@pytest.fixture(scope="session")
def forkserver():
    """A multiprocessing context whose processes fork from a server that has imported torch and transformers."""
    context = multiprocessing.get_context("forkserver")
    # The server reads the environment when it starts: it starts here with the offline switches set, and the
    # switches are taken back at once, so that no later test of the session runs offline.
    saved = {key: os.environ.get(key) for key in OFFLINE}
    os.environ.update(OFFLINE)
    context.set_forkserver_preload(["torch", "transformers", "transformers.modeling_utils",
                                    "transformers.generation"])
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return context


def _env():
    return docs_env()


def _run_python(name, code, cwd, log):
    """The child: the block as `__main__` of a fresh namespace, in `cwd`, its output in `log`."""
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    os.chdir(cwd)
    sys.path.insert(0, str(REPO))
    sys.argv = [name]
    import torch

    torch.set_num_threads(1)
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})  # noqa: S102 (the documented example)
    except BaseException:  # noqa: BLE001 (the log is the report)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("name,lang,code", BLOCKS)
def test_block_runs(name, lang, code, tmp_path, request):
    cwd = tmp_path / "work"
    cwd.mkdir()
    for entry in CHECKOUT_ENTRIES:
        if (REPO / entry).exists():
            (cwd / entry).symlink_to(REPO / entry)
    if "out/tiny" in code:
        shutil.copytree(request.getfixturevalue("tiny_run"), cwd / "out" / "tiny", symlinks=True)
    log = tmp_path / "output.log"
    start = time.perf_counter()
    if lang == "bash":
        with open(log, "w") as out:
            exitcode = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=_env(), stdout=out,
                                      stderr=subprocess.STDOUT, timeout=TIMEOUT_S, check=False).returncode
    else:
        process = request.getfixturevalue("forkserver").Process(target=_run_python, args=(name, code, cwd, log))
        process.start()
        process.join(TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
            pytest.fail(f"{name}: still running after {TIMEOUT_S} s; mark it slow or make it smaller")
        exitcode = process.exitcode
    output = log.read_text(errors="replace")
    elapsed = time.perf_counter() - start
    assert exitcode == 0, f"{name} ({lang}) exited with {exitcode} after {elapsed:.1f} s:\n{output[-4000:]}"


def _commands(text: str) -> list[str]:
    """The command lines of a shell text: comments and blank lines dropped, spaces normalised."""
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in text.splitlines())
    return [" ".join(line.split()) for line in lines if line]


def test_ci_runs_the_readme_install_and_test_commands():
    """`.ci/run` sets up and tests with the README's own commands, in the README's order: what CI proves is what a
    new user types (the Install block's first recipe, then the Test block)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    sections = {heading: body for heading, body in re.findall(r"^## (\w[^\n]*)\n(.*?)(?=^## |\Z)", readme,
                                                                re.DOTALL | re.MULTILINE)}
    steps = [next(BLOCK.finditer(sections[name]))["code"] for name in ("Install", "Test")]
    expected = [command for step in steps for command in _commands(step)]
    assert expected[-1] == "python -m pytest -q"
    ci = [command for command in _commands((REPO / ".ci" / "run").read_text(encoding="utf-8")) if command in expected]
    assert ci[:len(expected)] == expected, f".ci/run must run the README's commands in order: {expected}"


def test_files_the_pages_cite_exist():
    """Every `tests/...`, `scripts/...`, `configs/...` or `benchmarks/...` path the pages name is a file of the
    checkout (a renamed test file once left the docs pointing at nothing)."""
    cited = {path for page in PAGES for path in re.findall(
        r"`((?:tests|scripts|configs|benchmarks)/[\w./-]+\.(?:py|yaml|md|json))`", page.read_text(encoding="utf-8"))}
    assert cited, "the pattern no longer finds the cited files"
    assert sorted(path for path in cited if not (REPO / path).is_file()) == []
