"""The first minute on a new machine: the native CPU kernel's compile is announced, cached, and can be done ahead.

Real processes with their own torch extension cache (``TORCH_EXTENSIONS_DIR``) and remote-code cache
(``HF_MODULES_CACHE``), loading a saved checkpoint the way a Hub user does (``trust_remote_code=True``, with
the ``modeling_minrnn`` package made unimportable).
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import BLOCK_PACKAGE, own_stderr, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILING = "minrnn: compiling the native CPU scan kernel"
COMPILED = "minrnn: native CPU scan kernel compiled in"

# Loads a checkpoint through its own code files only and times the load and the first forward.
FIRST_FORWARD = BLOCK_PACKAGE + """
import json, time
start = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
loaded = time.perf_counter()
with torch.no_grad():
    model(torch.tensor([[3, 1, 4, 1, 5]]))
done = time.perf_counter()
print(json.dumps({"module": type(model).__module__, "load_s": loaded - start, "first_forward_s": done - loaded}))
"""


# Loads a checkpoint's config through its own code files only and lists the kernel modules that came with it.
CONFIG_ONLY = BLOCK_PACKAGE + """
from transformers import AutoConfig
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
kernels = sorted(m for m in sys.modules if m.partition(".")[0] == "triton" or m.endswith((".scan_cpu", ".scan_triton")))
print(type(config).__module__, kernels)
"""


def _run(args, **env):
    full_env = {k: v for k, v in os.environ.items() if k != "MINRNN_DISABLE_CPU_EXT"}
    full_env.update(env)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=900, check=False)


def _build_ahead(**env):
    return _run(["-m", "modeling_minrnn.build_kernel"], PYTHONPATH=ROOT, **env)


def test_cached_kernel_loads_silently():
    """A second build on the same cache (what every forward after the first meets) prints nothing about it."""
    first = _build_ahead()  # builds into the default cache if this machine has not yet
    if first.returncode != 0:
        pytest.skip(f"the native kernel cannot be built here: {first.stderr.strip()}")
    second = _build_ahead()
    assert second.returncode == 0, second.stderr
    assert own_stderr(second.stderr) == "", second.stderr
    assert second.stdout.startswith("native CPU scan kernel ready: ") and second.stdout.strip().endswith(".so")


def test_failed_build_is_announced_and_exits_non_zero(tmp_path):
    """A fresh cache without a working compiler: the compile is announced, then one line says why it failed."""
    proc = _build_ahead(CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert proc.returncode == 1
    lines = own_stderr(proc.stderr).strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(COMPILING) and str(tmp_path) in lines[0]
    assert lines[1].startswith("minrnn: native CPU scan unavailable (") and "/bin/false" in lines[1]
    assert proc.stdout == ""


@pytest.mark.slow  # a fresh process for one line: ~6 s of 2 CPU cores
def test_build_ahead_refuses_when_disabled():
    proc = _build_ahead(MINRNN_DISABLE_CPU_EXT="1")
    assert proc.returncode == 1
    assert own_stderr(proc.stderr).strip() == (
        "error: MINRNN_DISABLE_CPU_EXT=1 disables the native CPU scan; unset it to build the kernel"
    )


@pytest.mark.slow  # two real compiles
def test_alternating_virtualenvs_and_caches_build_once_each(tmp_path):
    """Two extension caches, and torch seen through two installation paths (a second virtualenv that links the same
    torch), used in turn: each cache builds once, announced; every other load is silent. (Keyed by torch's version
    alone, torch's JIT rebuilt on every switch of installation: its include paths changed.)"""
    import torch

    linked = tmp_path / "venv_site"
    linked.mkdir()
    (linked / "torch").symlink_to(os.path.dirname(torch.__file__), target_is_directory=True)
    envs = {"real": {"PYTHONPATH": ROOT}, "linked": {"PYTHONPATH": f"{linked}{os.pathsep}{ROOT}"}}
    caches = {name: str(tmp_path / name) for name in ("cache_1", "cache_2")}
    libraries = {}
    for cache, torch_path, builds in [("cache_1", "real", True), ("cache_1", "linked", False),
                                      ("cache_2", "linked", True), ("cache_2", "real", False),
                                      ("cache_1", "real", False), ("cache_2", "linked", False)]:
        proc = _run(["-c", "import torch, sys\nfrom modeling_minrnn import build_kernel\nprint(torch.__file__)\n"
                     "sys.exit(build_kernel.main([]))"], TORCH_EXTENSIONS_DIR=caches[cache], **envs[torch_path])
        assert proc.returncode == 0, proc.stderr[-3000:]
        torch_file, ready = proc.stdout.strip().splitlines()[-2:]
        assert torch_file.startswith(str(linked)) == (torch_path == "linked")
        announced = own_stderr(proc.stderr)
        if builds:
            assert announced.count(COMPILING) == 1 and announced.count(COMPILED) == 1, announced
        else:
            assert announced == "", f"{cache} with the {torch_path} torch: {announced}"
        libraries.setdefault(cache, ready)
        assert ready == libraries[cache] and ready.startswith(f"native CPU scan kernel ready: {caches[cache]}")


def test_loading_a_config_imports_no_kernel(tmp_path):
    """`AutoConfig` on a checkpoint (remote code) imports neither Triton nor the kernel loader, and `import
    modeling_minrnn` not the kernel modules: they come with the first forward that needs them. (The package imports
    transformers' modeling code, which imports Triton itself where torchao is installed.)"""
    tiny_model().save_pretrained(tmp_path / "ckpt")
    proc = _run(["-c", CONFIG_ONLY, str(tmp_path / "ckpt")], HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
                PYTHONPATH="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    module, kernels = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert module.startswith("transformers_modules") and kernels == "[]", proc.stdout
    proc = _run(["-c", "import sys, modeling_minrnn\nprint(sorted(m for m in sys.modules if m.endswith(('.scan_cpu', "
                 "'.scan_triton'))))"], PYTHONPATH=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-3000:]


@pytest.mark.slow  # one real compile: ~25 s on 2 idle cores, a minute or more under load
def test_first_forward_from_a_checkpoint_announces_the_compile_once(tmp_path):
    """Fresh caches: the first forward says it compiles (and how long it took); a second process says nothing."""
    checkpoint = tmp_path / "ckpt"
    tiny_model().save_pretrained(checkpoint)
    caches = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
              "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": ""}
    runs = [_run(["-c", FIRST_FORWARD, str(checkpoint)], **caches) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    cold, warm = (json.loads(proc.stdout.strip().splitlines()[-1]) for proc in runs)
    assert cold["module"].startswith("transformers_modules") and warm["module"] == cold["module"]
    assert runs[0].stderr.count(COMPILING) == 1 and runs[0].stderr.count(COMPILED) == 1, runs[0].stderr
    assert COMPILING not in runs[1].stderr and COMPILED not in runs[1].stderr, runs[1].stderr
    print(f"\nfirst process: load {cold['load_s']:.1f} s, first forward {cold['first_forward_s']:.1f} s; "
          f"second process: load {warm['load_s']:.1f} s, first forward {warm['first_forward_s']:.1f} s")
