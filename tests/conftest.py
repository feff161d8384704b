import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The packages of this checkout come first on the path whether or not it is installed: pyproject's pytest
# `pythonpath` (with scripts/, for the scripts' own tests).
ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tinyshakespeare() -> Path:
    """tinyshakespeare.txt: `$TINYSHAKESPEARE`, or where `scripts/download_tinyshakespeare.py` puts it
    (data/tinyshakespeare.txt); the test is skipped without it."""
    path = Path(os.environ.get("TINYSHAKESPEARE", ROOT / "data" / "tinyshakespeare.txt"))
    if not path.is_file():
        pytest.skip(f"needs tinyshakespeare.txt at {path} (python scripts/download_tinyshakespeare.py, or set "
                    "TINYSHAKESPEARE)")
    return path


# Never ask the network: a docs block that needs it must say so with a skip marker; the toy run needs none.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def docs_env() -> dict:
    """The environment of a docs block or the toy run: this checkout's packages, one thread, offline."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **OFFLINE)


@pytest.fixture(scope="session")
def tiny_run_process(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(`out/tiny`, the process) of the README's main job, `scripts/pretrain.py` with no recipe, at a toy size."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    toy = ["--hidden-size", "32", "--num-hidden-layers", "1", "--intermediate-size", "64", "--block-size", "32",
           "--tokenizer-vocab-size", "300", "--eval-batches", "1", "--sample-tokens", "0", "--log-with", "none",
           "--max-steps", "2"]
    process = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), *toy], cwd=cwd, check=True,
                             capture_output=True, text=True, timeout=600, env=docs_env())
    return cwd / "out" / "tiny", process


@pytest.fixture(scope="session")
def tiny_run(tiny_run_process) -> Path:
    """`out/tiny` as `python scripts/pretrain.py` writes it, from the same script at a toy size."""
    return tiny_run_process[0]


# What a dependency prints to stderr on import, not minrnn: torchao (the `export` extra; transformers imports it
# whenever it is installed) warns about its kernels built for other Pythons and GPUs, and torch about torchao's enums.
_FOREIGN_STDERR = re.compile(r"Failed to load \S*/torchao/\S*: |W\d{4} [\d:.]+ \d+ \S*_pytree\.py:\d+\] ")


def own_stderr(text: str) -> str:
    """`text` without the lines that dependencies print on import (see `_FOREIGN_STDERR`)."""
    return "".join(line for line in text.splitlines(keepends=True) if not _FOREIGN_STDERR.match(line))


# The start of a client script that must load minrnn through a checkpoint's own code files: `import modeling_minrnn`
# fails in it, even with the package installed editable.
BLOCK_PACKAGE = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "modeling_minrnn":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, _Block())
"""


def reference_scan(log_a, log_b, initial_state=None, reset=None):
    """`h_t = exp(log_a_t) h_{t-1} + exp(log_b_t)` one step at a time in float64; autograd gives the gradients.

    Where `reset` `(batch, seq)` is True a new sequence starts: `h_t = exp(log_b_t)`, nothing before it counts.
    The independent definition every scan backend is tested against.
    """
    a, b = log_a.double().exp(), log_b.double().exp()
    h = a.new_zeros(a.shape[0], a.shape[2]) if initial_state is None else initial_state.double()
    states = []
    for t in range(a.shape[1]):
        carried = a[:, t] * h
        if reset is not None:
            carried = torch.where(reset[:, t, None], 0.0, carried)
        h = carried + b[:, t]
        states.append(h)
    return torch.stack(states, dim=1)


def tiny_config(**overrides):
    """A model small enough for exhaustive checks; a wide init so that greedy outputs vary from token to token."""
    from modeling_minrnn import MinRNNConfig

    values = {
        "vocab_size": 48,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "expansion_factor": 1.5,
        "conv_kernel": 4,
        "intermediate_size": 64,
        "initializer_range": 0.4,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        # Untied: a random tied model's greedy choice is mostly the input token itself, which tests nothing.
        "tie_word_embeddings": False,
    }
    values.update(overrides)
    return MinRNNConfig(**values)


def tiny_model(seed=0, **overrides):
    from modeling_minrnn import MinRNNForCausalLM

    torch.manual_seed(seed)
    return MinRNNForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture
def char_tokenizer():
    """A character-level `PreTrainedTokenizerFast` over printable ASCII, built offline with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
