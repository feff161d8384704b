"""One generation contract: continuing from a cache equals generating from the whole prompt.

Every state source a user has (the cache a forward or `generate` returned, `prefill`, a state file) times both ways
of passing the input (the whole sequence, transformers' convention; only the new tokens) times both cells, conv on
and off, against plain greedy decoding from the whole prompt.
"""

import functools

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

from modeling_minrnn import MinRNNCache

NEW_TOKENS = 32
SOURCES = ("forward", "generate", "prefill", "state_file")
TEXT = torch.randint(3, 48, (1, 96), generator=torch.Generator().manual_seed(3))


def prompt(n=12):
    return TEXT[:, :n]


@functools.cache
def model_of(cell_type="mingru", conv_kernel=4):
    """A tiny model that has memorised `TEXT`: its greedy continuation of a prefix is the rest of the text, varied
    tokens that depend on the whole context (a random model's greedy output soon loops on one or two tokens)."""
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel, initializer_range=0.02).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):
        optimizer.zero_grad()
        model(TEXT, labels=TEXT).loss.backward()
        optimizer.step()
    return model.eval()


def consumed_state(model, ids, source, tmp_path):
    """A cache that has consumed `ids[:, :-1]` (`generate`: fewer, returned with the tokens it produced), and the
    sequence it stands for so far."""
    with torch.no_grad():
        if source == "forward":
            return model(ids[:, :-1], use_cache=True).cache, ids
        if source == "prefill":
            return model.prefill(ids[:, :-1], chunk_size=5).cache, ids
        if source == "generate":
            part = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
            return part.cache, part.sequences
        path = tmp_path / "state.safetensors"
        MinRNNCache.from_cache(model(ids[:, :-1], use_cache=True).cache).save(path, model)
        return MinRNNCache.load(path, model), ids


@pytest.mark.parametrize("convention", ["whole_sequence", "new_tokens"])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("cell_type,conv_kernel", [("mingru", 4), ("mingru", 0), ("minlstm", 4), ("minlstm", 0)])
def test_continuing_from_a_cache_equals_greedy_from_the_prompt(cell_type, conv_kernel, source, convention, tmp_path):
    model = model_of(cell_type, conv_kernel)
    ids = prompt()
    cache, sequence = consumed_state(model, ids, source, tmp_path)
    expected = model.generate(sequence, max_new_tokens=NEW_TOKENS, do_sample=False)[:, -NEW_TOKENS:]
    assert len(set(expected[0].tolist())) > 10, "the model's output is near constant: nothing is tested"

    given = sequence if convention == "whole_sequence" else sequence[:, -1:]
    out = model.generate(given, cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape[1] == given.shape[1] + NEW_TOKENS  # generate returns what it was given, then the new tokens
    torch.testing.assert_close(out[:, -NEW_TOKENS:], expected)


def test_more_new_tokens_than_consumed_ones_are_told_apart_by_the_mask():
    """The one case the lengths cannot tell: 9 new tokens after 3 consumed ones. An attention mask over all 12 says
    the input holds only new tokens (transformers' convention), and generation equals greedy from all 12."""
    model = model_of()
    ids = prompt()
    expected = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[:, -NEW_TOKENS:]
    with torch.no_grad():
        cache = model(ids[:, :3], use_cache=True).cache
    out = model.generate(
        ids[:, 3:], cache=cache, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
    )
    torch.testing.assert_close(out[:, -NEW_TOKENS:], expected)


def test_a_mask_of_neither_length_is_refused_in_one_line():
    model = tiny_model()
    ids = prompt()
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).cache
    with pytest.raises(ValueError, match=r"pass a mask of 3 columns .* or of 8 \(the consumed tokens too\)"):
        model.generate(ids[:, 5:8], cache=cache, attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=2)


def test_a_plain_dynamic_cache_and_a_minrnn_cache_continue_alike():
    model = model_of("minlstm")
    ids = prompt()
    outs = []
    for cache in (DynamicCache(config=model.config), MinRNNCache(model.config)):
        with torch.no_grad():
            model(ids[:, :-1], cache=cache)
        assert int(cache.get_seq_length()) == ids.shape[1] - 1
        outs.append(model.generate(ids, cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False))
    torch.testing.assert_close(outs[0], outs[1])
