"""Long inputs: a prompt prefilled in chunks with the state carried in the cache, in memory that does not grow with it.

The reference for a chunked prefill is one forward over the whole prompt (same weights, no cache): equal next-token
logits mean the conv window and the recurrent state cross every chunk boundary intact.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread():
    """These checks are about values and memory, not speed: with one thread, a loaded shared CPU cannot stall each
    small op on a descheduled worker (seen here: 16 ms per elementwise op instead of 0.1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(cell_type: str = "mingru") -> MinRNNForCausalLM:
    torch.manual_seed(0)
    config = MinRNNConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, cell_type=cell_type,
                          conv_kernel=4, intermediate_size=32)
    return MinRNNForCausalLM(config).eval()


def chunked_prefill(model, input_ids, chunk_size):
    """The library's chunked prefill: last position's logits `(batch, vocab)` and the cache."""
    out = model.prefill(input_ids, chunk_size=chunk_size)
    return out.logits[:, -1], out.cache


# 7777: uneven chunks, whose boundaries fall at every offset of the conv window.
@pytest.mark.parametrize("cell_type, chunk_size", [("mingru", 7777), ("minlstm", 8192)])
@torch.no_grad()
def test_chunked_prefill_matches_one_forward(cell_type, chunk_size):
    model = small_model(cell_type)
    input_ids = torch.randint(0, VOCAB, (1, 100_000), generator=torch.Generator().manual_seed(1))
    expected = model(input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    logits, cache = chunked_prefill(model, input_ids, chunk_size)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    # The carried state keeps decoding: one more token through the cache == a forward over the prompt plus it.
    next_token = logits.argmax(-1, keepdim=True)
    stepped = model(next_token, cache=cache, use_cache=True).logits[:, -1]
    full = model(torch.cat([input_ids, next_token], dim=1), use_cache=False, logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generate_continues_from_a_chunked_prefill():
    """Prefill all but the last prompt token in chunks, then `generate()` from the cache with only the last token."""
    model = small_model()
    input_ids = torch.randint(0, VOCAB, (1, 5000), generator=torch.Generator().manual_seed(2))
    expected = model.generate(input_ids, max_new_tokens=8, do_sample=False, pad_token_id=0)

    _, cache = chunked_prefill(model, input_ids[:, :-1], 1024)
    continued = model.generate(input_ids[:, -1:], cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(continued[:, 1:], expected[:, input_ids.shape[1]:])


@torch.no_grad()
def test_generate_prefill_chunk_size():
    """transformers' own chunked prefill: generate() builds a `MinRNNCache`, whose `get_seq_length` it needs."""
    model = small_model()
    input_ids = torch.randint(0, VOCAB, (1, 5000), generator=torch.Generator().manual_seed(3))
    expected = model.generate(input_ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    chunked = model.generate(input_ids, max_new_tokens=8, do_sample=False, pad_token_id=0, prefill_chunk_size=1024)
    assert torch.equal(chunked, expected)


# Runs in a fresh interpreter, so that nothing else in the process holds memory. Each phase's peak is read from the
# kernel's high-water mark (`VmHWM`), reset before the phase (`clear_refs` 5): a lifetime peak (`ru_maxrss`) would hide
# a phase under an earlier spike, such as the one of importing the libraries.
MILLION_TOKEN_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[2])
    from test_long_inputs import VOCAB, chunked_prefill, small_model

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak_mib():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024

    model = small_model()
    input_ids = torch.randint(0, VOCAB, (1, 1_000_000), generator=torch.Generator().manual_seed(4))
    chunk = 65_536
    with torch.no_grad():
        reset_peak()
        chunked_prefill(model, input_ids[:, : 4 * chunk], chunk)
        quarter = peak_mib()  # ~250k tokens: the working set of a chunk is in place
        reset_peak()
        logits, _ = chunked_prefill(model, input_ids, chunk)
        million = peak_mib()
        reset_peak()
        expected = model(input_ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        full = peak_mib()
    print(json.dumps({
        "quarter_peak_mib": quarter, "million_peak_mib": million, "full_forward_peak_mib": full,
        "max_abs_diff": (logits - expected).abs().max().item(),
    }))
    """
)


def peak_can_be_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.slow  # a million tokens in a fresh process: ~15 s of 2 CPU cores
@pytest.mark.skipif(not peak_can_be_reset(), reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
def test_million_token_prefill_in_bounded_memory():
    result = subprocess.run(
        [sys.executable, "-c", MILLION_TOKEN_SCRIPT, str(ROOT), str(Path(__file__).parent)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    # Same next-token logits as one forward over all 1M tokens.
    assert numbers["max_abs_diff"] < 1e-4, numbers
    # Prefilling 1M tokens peaks where 250k do: the state is constant-size.
    assert numbers["million_peak_mib"] - numbers["quarter_peak_mib"] < 32, numbers
    # The measurement sees activations: one forward over the whole prompt holds several (1M tokens x 16 floats = 61 MiB
    # each) and peaks far higher.
    assert numbers["full_forward_peak_mib"] - numbers["million_peak_mib"] > 256, numbers
