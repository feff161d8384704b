"""The recurrent state as an object: exact speculative decoding (crop), saved / loaded / forked prompt states.

References: plain greedy decoding for speculative decoding, and a forward over the whole prompt for every state
that was rolled back, saved, loaded, forked, selected or concatenated.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

from modeling_minrnn import MinRNNCache

CELLS_AND_CONVS = [("mingru", 4), ("mingru", 0), ("minlstm", 4), ("minlstm", 0)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CountingCache(MinRNNCache):
    """Counts the rollbacks generate() asks for: proof that candidates were rejected and the state restored."""

    def __init__(self, config):
        super().__init__(config)
        self.rolled_back_tokens = 0
        self.rollbacks = 0

    def crop(self, tokens_to_remove):
        if tokens_to_remove < 0:
            self.rollbacks += 1
            self.rolled_back_tokens -= tokens_to_remove
        super().crop(tokens_to_remove)


def prompt(n=7, seed=1):
    return torch.randint(3, 48, (1, n), generator=torch.Generator().manual_seed(seed))


def repetitive_prompt():
    """A prompt whose n-grams recur, so that prompt lookup proposes candidates (some right, some wrong)."""
    return torch.tensor([[5, 9, 13, 17, 21, 5, 9, 13, 30, 5, 9, 40, 17, 21, 5, 9]])


# --- speculative decoding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell_type,conv_kernel", CELLS_AND_CONVS)
def test_assisted_decoding_equals_greedy_token_for_token(cell_type, conv_kernel):
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel)
    # A draft that shares the target's first block only: it agrees sometimes, and is rejected often.
    draft = tiny_model(seed=1, cell_type=cell_type, conv_kernel=conv_kernel)
    draft.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    # 6 candidates a round, never cut short by the draft's confidence: rollbacks of several tokens.
    draft.generation_config.num_assistant_tokens = 6
    draft.generation_config.assistant_confidence_threshold = 0.0
    ids = prompt()
    greedy = model.generate(ids, max_new_tokens=64, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=64, do_sample=False, assistant_model=draft)
    assert torch.equal(assisted, greedy)

    counting = CountingCache(model.config)
    counted = model.generate(ids, max_new_tokens=64, do_sample=False, assistant_model=draft, cache=counting)
    assert torch.equal(counted, greedy)
    assert counting.rollbacks > 0, "no candidate was rejected: nothing tested"
    assert counting.rolled_back_tokens > counting.rollbacks  # some rollbacks went back several tokens
    assert counting.get_seq_length() == greedy.shape[1] - 1  # all but the last token consumed, as in plain decoding


@pytest.mark.parametrize("cell_type,conv_kernel", CELLS_AND_CONVS)
def test_prompt_lookup_decoding_equals_greedy_token_for_token(cell_type, conv_kernel):
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel)
    ids = repetitive_prompt()
    greedy = model.generate(ids, max_new_tokens=64, do_sample=False)
    counting = CountingCache(model.config)
    looked_up = model.generate(ids, max_new_tokens=64, do_sample=False, prompt_lookup_num_tokens=4, cache=counting)
    assert torch.equal(looked_up, greedy)
    assert counting.rollbacks > 0, "no candidate was rejected: nothing tested"
    assert torch.equal(model.generate(ids, max_new_tokens=64, do_sample=False, prompt_lookup_num_tokens=4), greedy)


def test_an_assistant_continues_from_its_rolled_back_cache():
    """The draft's side of assisted decoding: each round transformers crops the draft's cache and calls its
    generate() with the whole sequence again. Its logits must equal a fresh generate over that sequence (a draft
    fed the consumed tokens twice would still pass the token test above, only with fewer accepted candidates)."""
    draft = tiny_model(seed=1)
    ids = prompt(9)
    common = dict(
        do_sample=False, output_logits=True, return_dict_in_generate=True, is_assistant=True,
        assistant_confidence_threshold=0.0,
    )
    first = draft.generate(ids, max_new_tokens=5, **common)
    cache = first.cache
    # Built by generate() (transformers' own DynamicCache) and switched to recording, as for any assistant's cache.
    assert type(cache) is DynamicCache and cache.is_recording_past(0)
    cache.crop(-3)  # the target accepted 1 of the 4 fed candidates: keep the prompt and 1 token, re-feed 1
    sequence = first.sequences[:, : ids.shape[1] + 2]
    again = draft.generate(sequence, max_new_tokens=4, cache=cache, **common)
    fresh = draft.generate(
        sequence, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    torch.testing.assert_close(torch.cat(again.logits), torch.cat(fresh.logits), rtol=1e-5, atol=1e-5)


def test_speculative_sampling_scores_are_the_targets_own_logits():
    """With sampling, transformers guarantees the target's distribution (speculative sampling), not plain
    sampling's tokens. What the cache must guarantee is that every accepted position is scored from the exact
    state: the target logits it returns equal a plain forward over the sampled sequence."""
    model = tiny_model(cell_type="minlstm")
    draft = tiny_model(seed=1, cell_type="minlstm")
    ids = prompt()
    torch.manual_seed(0)
    out = model.generate(
        ids, max_new_tokens=40, do_sample=True, assistant_model=draft, output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        reference = model(out.sequences).logits[0, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.cat(out.logits), reference, rtol=1e-4, atol=1e-4)


def test_rollback_restores_the_state_of_any_accepted_length():
    """Directly: after a recorded forward over 6 tokens, `crop(-n)` gives the state of the first 6 - n tokens."""
    model = tiny_model()
    ids = prompt(12)
    with torch.no_grad():
        for n in range(7):
            cache = MinRNNCache(model.config)
            model(ids[:, :6], cache=cache)
            cache.activate_past_recording()
            model(ids[:, 6:], cache=cache)
            cache.crop(-n)
            assert cache.get_seq_length() == 12 - n
            continued = model(ids[:, 12 - n :] if n else ids[:, -1:], cache=cache).logits[:, -1]
            expected = model(ids if n else torch.cat([ids, ids[:, -1:]], 1)).logits[:, -1]
            torch.testing.assert_close(continued, expected, rtol=1e-5, atol=1e-5)


def test_rollback_errors_are_clear():
    model = tiny_model()
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(prompt(5), cache=cache)
        with pytest.raises(ValueError, match="activate_past_recording"):
            cache.crop(-1)  # not recording: the earlier states were never kept
        cache.activate_past_recording()
        model(prompt(5), cache=cache)
        with pytest.raises(ValueError, match="recorded only the last 5"):
            cache.crop(-6)
        with pytest.raises(ValueError, match="negative"):
            cache.crop(3)


def test_plain_dynamic_cache_rolls_back_for_assisted_decoding():
    """transformers' own cache records and crops the recurrent states itself: assisted decoding through a plain
    `DynamicCache(config=...)` gives greedy's tokens."""
    model, draft = tiny_model(), tiny_model(seed=1)
    ids = prompt()
    greedy = model.generate(ids, max_new_tokens=24, do_sample=False)
    assisted = model.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=draft,
                              cache=DynamicCache(config=model.config))
    torch.testing.assert_close(assisted, greedy)


def test_states_are_recorded_only_while_transformers_asks_for_it():
    model = tiny_model()
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(prompt(200), cache=cache)
        assert not cache.is_recording_past(0)  # plain forward: nothing kept
        cache.activate_past_recording()
        model(prompt(30), cache=cache)
    # The inputs and states of each of the 30 tokens, kept until the next crop; crop(0) drops them.
    assert cache.get_conv_state(0).shape[-1] == model.config.conv_kernel + 30
    with pytest.raises(ValueError, match="recorded only the last 30"):
        cache.crop(-31)
    cache.crop(0)
    assert cache.get_conv_state(0).shape[-1] == model.config.conv_kernel
    with pytest.raises(ValueError, match="recorded only the last 0"):
        cache.crop(-1)


# --- chunked prefill ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell_type,conv_kernel", [("mingru", 4), ("minlstm", 0)])
def test_generate_prefill_chunk_size_equals_unchunked(cell_type, conv_kernel):
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel)
    ids = torch.randint(3, 48, (2, 50), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, max_new_tokens=10, do_sample=False)
    for chunk in (7, 16):  # uneven chunks, shorter and longer than the conv window
        assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False, prefill_chunk_size=chunk), expected)


# --- saved, loaded and forked prompt states -------------------------------------------------------------------------


def prefilled(model, ids):
    """The state after all but the last token of `ids` (so that generate() continues with that last token)."""
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(ids[:, :-1], cache=cache)
    return cache


@pytest.mark.parametrize("cell_type,conv_kernel", CELLS_AND_CONVS)
def test_saved_state_loads_to_the_same_logits_and_generation(tmp_path, cell_type, conv_kernel):
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel)
    ids = prompt(20)
    prefilled(model, ids).save(tmp_path / "state.safetensors", model)
    loaded = MinRNNCache.load(tmp_path / "state.safetensors", model)
    assert loaded.get_seq_length() == 19
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
        torch.testing.assert_close(model(ids[:, -1:], cache=loaded).logits[:, -1], expected, rtol=1e-5, atol=1e-5)
    loaded = MinRNNCache.load(tmp_path / "state.safetensors", model)
    continued = model.generate(ids[:, -1:], cache=loaded, max_new_tokens=12, do_sample=False)
    assert torch.equal(continued[:, 1:], model.generate(ids, max_new_tokens=12, do_sample=False)[:, 20:])


def test_state_file_size_does_not_grow_with_the_prompt(tmp_path):
    model = tiny_model()
    prefilled(model, prompt(10)).save(tmp_path / "short.safetensors", model)
    prefilled(model, prompt(3000)).save(tmp_path / "long.safetensors", model)
    short, long = (os.path.getsize(tmp_path / f"{n}.safetensors") for n in ("short", "long"))
    assert short == long
    # h (fp32, 48 channels) + conv window (32 channels x 4) per layer, 2 layers: the data, plus a small header.
    assert 2 * (48 * 4 + 32 * 4 * 4) < long < 2 * (48 * 4 + 32 * 4 * 4) + 2048


STATE_IN_ANOTHER_PROCESS = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from modeling_minrnn import MinRNNCache, MinRNNForCausalLM
    model = MinRNNForCausalLM.from_pretrained(sys.argv[2]).eval()
    data = torch.load(sys.argv[4])
    cache = MinRNNCache.load(sys.argv[3], model)
    with torch.no_grad():
        logits = model(data["last"], cache=cache).logits[:, -1]
    torch.testing.assert_close(logits, data["logits"], rtol=1e-5, atol=1e-5)
    generated = model.generate(data["last"], cache=MinRNNCache.load(sys.argv[3], model), max_new_tokens=10,
                               do_sample=False)
    assert torch.equal(generated, data["generated"]), (generated, data["generated"])
    print("state ok")
    """
)


def test_saved_state_continues_exactly_in_another_process(tmp_path):
    model = tiny_model(cell_type="minlstm")
    model.save_pretrained(tmp_path / "model")
    ids = prompt(30)
    prefilled(model, ids).save(tmp_path / "state.safetensors", model)
    with torch.no_grad():
        logits = model(ids).logits[:, -1]
    generated = model.generate(ids, max_new_tokens=10, do_sample=False)[:, 29:]
    torch.save({"last": ids[:, -1:], "logits": logits, "generated": generated}, tmp_path / "expected.pt")
    result = subprocess.run(
        [sys.executable, "-c", STATE_IN_ANOTHER_PROCESS, ROOT, str(tmp_path / "model"),
         str(tmp_path / "state.safetensors"), str(tmp_path / "expected.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "state ok" in result.stdout


@pytest.mark.parametrize(
    "other,field",
    [
        (dict(cell_type="minlstm"), "cell_type"),
        (dict(num_hidden_layers=3), "num_hidden_layers"),
        (dict(hidden_size=48, intermediate_size=96), "hidden_size"),
        (dict(expansion_factor=2.0), "recurrent_size"),
        (dict(conv_kernel=3), "conv_kernel"),
        (dict(seed=5), "weights_fingerprint"),
    ],
)
def test_a_state_from_another_model_is_refused_naming_the_field(tmp_path, other, field):
    model = tiny_model()
    prefilled(model, prompt()).save(tmp_path / "state.safetensors", model)
    with pytest.raises(ValueError, match=f"state.safetensors.*{field}="):
        MinRNNCache.load(tmp_path / "state.safetensors", tiny_model(**other))


def test_a_state_for_other_weights_dtype_or_a_bad_file_is_refused(tmp_path):
    model = tiny_model()
    path = tmp_path / "state.safetensors"
    prefilled(model, prompt()).save(path, model)
    with pytest.raises(ValueError, match="dtype=float32.*dtype=bfloat16"):
        MinRNNCache.load(path, tiny_model().to(torch.bfloat16))
    tuned = tiny_model()
    with torch.no_grad():
        tuned.model.layers[1].mixer.in_proj.weight[0, 0] += 1.0  # one changed weight
    with pytest.raises(ValueError, match="weights_fingerprint"):
        MinRNNCache.load(path, tuned)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    foreign = tmp_path / "model"
    model.save_pretrained(foreign)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a state")
    for bad in (truncated, foreign / "model.safetensors", text):
        with pytest.raises(ValueError, match=bad.name):
            MinRNNCache.load(bad, model)


def test_one_state_forked_to_many_rows_equals_each_prompt_alone():
    """One long shared prompt prefilled once, forked to 3 rows that continue with different suffixes."""
    model = tiny_model()
    shared = prompt(25)
    suffixes = torch.randint(3, 48, (3, 4), generator=torch.Generator().manual_seed(9))
    cache = prefilled(model, torch.cat([shared, suffixes[:1, :1]], 1))  # the state after `shared` alone
    cache.batch_repeat_interleave(3)
    with torch.no_grad():
        forked = model(suffixes, cache=cache).logits[:, -1]
        alone = model(torch.cat([shared.expand(3, -1), suffixes], 1)).logits[:, -1]
    torch.testing.assert_close(forked, alone, rtol=1e-5, atol=1e-5)


def test_num_return_sequences_from_a_forked_state():
    model = tiny_model()
    ids = prompt(15)
    torch.manual_seed(3)
    plain = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=10, num_return_sequences=4)
    cache = prefilled(model, ids)
    cache.batch_repeat_interleave(4)
    torch.manual_seed(3)
    forked = model.generate(ids[:, -1:], cache=cache, max_new_tokens=8, do_sample=True, top_k=10,
                            num_return_sequences=4)
    assert torch.equal(forked[:, 1:], plain[:, 15:])
    assert len({tuple(row) for row in plain[:, 15:].tolist()}) > 1, "degenerate test: all samples equal"
    with pytest.raises(ValueError, match="batch_repeat_interleave"):  # an unforked state: a clear error
        model.generate(ids[:, -1:], cache=prefilled(model, ids), max_new_tokens=2, do_sample=True,
                       num_return_sequences=4)


def test_select_reorder_and_concatenate_states_of_different_prompts():
    model = tiny_model()
    prompts = [prompt(n, seed=n) for n in (5, 12, 8)]
    states = [prefilled(model, p) for p in prompts]
    with torch.no_grad():
        alone = torch.cat([model(p).logits[:, -1] for p in prompts])
        last = torch.cat([p[:, -1:] for p in prompts])

        batch = MinRNNCache.concatenate(states)
        assert batch.get_seq_length() == 11  # the longest, as if the others were left-padded
        torch.testing.assert_close(model(last, cache=batch).logits[:, -1], alone, rtol=1e-5, atol=1e-5)

        batch = MinRNNCache.concatenate(states)
        batch.reorder_cache(torch.tensor([2, 0, 1]))
        torch.testing.assert_close(model(last[[2, 0, 1]], cache=batch).logits[:, -1], alone[[2, 0, 1]],
                                   rtol=1e-5, atol=1e-5)

        batch = MinRNNCache.concatenate(states)
        batch.batch_select_indices(torch.tensor([1]))
        torch.testing.assert_close(model(last[1:2], cache=batch).logits[:, -1], alone[1:2], rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="holds no state"):
        MinRNNCache.concatenate([states[0], MinRNNCache(model.config)])


def test_speculative_decoding_of_a_batch_is_refused_by_transformers():
    """transformers' assisted decoding supports batch size 1 only; a batch gets its clear error, not wrong tokens."""
    model = tiny_model()
    ids = torch.randint(3, 48, (2, 6))
    with pytest.raises(ValueError, match="batch_size = 1"):
        model.generate(ids, max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="batch_size = 1"):
        model.generate(ids, max_new_tokens=4, do_sample=False, assistant_model=tiny_model(seed=1))
