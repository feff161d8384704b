"""The model against itself: full forward == forward through the cache == token-by-token, in every setting."""

import pytest
import torch
from conftest import tiny_config, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM, check_input_values
from modeling_minrnn.cells import g, log_g, mingru_log_gates, mingru_step_gates, minlstm_log_gates, minlstm_step_gates

CELLS_AND_CONVS = [("mingru", 4), ("mingru", 0), ("minlstm", 4), ("minlstm", 0)]


def test_gates_follow_the_paper():
    x = torch.linspace(-6, 6, 101)
    g = torch.where(x >= 0, x + 0.5, torch.sigmoid(x))
    torch.testing.assert_close(log_g(x).exp(), g)

    k, h_tilde = torch.randn(2, 50)
    log_a, log_b = mingru_log_gates(k, h_tilde)
    z = torch.sigmoid(k)
    torch.testing.assert_close(log_a.exp(), 1 - z)
    torch.testing.assert_close(log_b.exp(), z * log_g(h_tilde).exp())

    f, i, h_tilde = torch.randn(3, 50)
    log_a, log_b = minlstm_log_gates(f, i, h_tilde)
    f_, i_ = torch.sigmoid(f), torch.sigmoid(i)
    torch.testing.assert_close(log_a.exp(), f_ / (f_ + i_))
    torch.testing.assert_close(log_b.exp(), i_ / (f_ + i_) * log_g(h_tilde).exp())


def test_one_token_gates_equal_the_log_space_ones():
    """The linear-space gates of a single step (no scan) are the log-space gates, exponentiated; `g` is the paper's
    at, below and above 0."""
    x = torch.cat([torch.linspace(-30, 30, 1001), torch.tensor([0.0, -0.0, 1e-7, -1e-7])]).double()
    torch.testing.assert_close(g(x), torch.where(x >= 0, x + 0.5, torch.sigmoid(x)), rtol=0, atol=1e-15)
    cells = ((mingru_step_gates, mingru_log_gates, 2), (minlstm_step_gates, minlstm_log_gates, 3))
    for step_gates, log_gates, n in cells:
        projections = (torch.randn(n, 4000, generator=torch.Generator().manual_seed(n)) * 8).double()
        a, b = step_gates(*projections)
        log_a, log_b = log_gates(*projections)
        torch.testing.assert_close(a, log_a.exp(), rtol=1e-7, atol=0)  # fp64; a wrong formula is off by O(1)
        torch.testing.assert_close(b, log_b.exp(), rtol=1e-7, atol=0)


# "chunked" decodes one token without a scan (`step_gates`); "auto" on CPU, with the native kernel.
@pytest.mark.parametrize("backend", ["auto", "chunked"])
@pytest.mark.parametrize("cell_type,conv_kernel", CELLS_AND_CONVS)
def test_full_forward_equals_cached_prefix_suffix_and_token_by_token(cell_type, conv_kernel, backend):
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel, scan_backend=backend)
    ids = torch.randint(3, 48, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits

        for split in (1, 2, 6):  # shorter and longer than the conv window
            first = model(ids[:, :split], use_cache=True)
            second = model(ids[:, split:], cache=first.cache, use_cache=True)
            torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-5, atol=1e-5)

        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["sequential", "log_space", "chunked", "auto"])
def test_every_scan_backend_gives_the_same_model(backend):
    reference = tiny_model(scan_backend="sequential")
    model = tiny_model(scan_backend=backend)
    ids = torch.randint(3, 48, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("old_name", ["past_key_values", "cache_params"])
@pytest.mark.parametrize("with_head", [False, True], ids=["MinRNNModel", "MinRNNForCausalLM"])
def test_deprecated_cache_names_carry_the_state_with_a_warning(old_name, with_head):
    """transformers' `test_bc_cache_name_forward`: the old names are the state, not silently dropped kwargs."""
    model = tiny_model()
    model = model if with_head else model.model
    output = (lambda out: out.logits) if with_head else (lambda out: out.last_hidden_state)
    ids = torch.randint(3, 48, (1, 8))
    with torch.no_grad():
        full = output(model(ids))
        first = model(ids[:, :5], use_cache=True)
        with pytest.warns(FutureWarning, match=f"`{old_name}` is deprecated.*Use `cache` instead"):
            second = model(ids[:, 5:], use_cache=True, **{old_name: first.cache})
    torch.testing.assert_close(output(second), full[:, 5:], rtol=1e-5, atol=1e-5)


def test_bf16_weights_stay_close_to_fp32():
    """Stated tolerance: bf16 weights and activations, fp32 scan: logits within 0.15 of fp32 (std ~1.5)."""
    model = tiny_model(initializer_range=0.1)
    ids = torch.randint(3, 48, (2, 64))
    with torch.no_grad():
        ref = model(ids).logits
        model_bf16 = tiny_model(initializer_range=0.1).to(torch.bfloat16)
        out = model_bf16(ids, use_cache=True)
        assert out.cache.get_recurrent_state(0).dtype == torch.float32
        assert (out.logits.float() - ref).abs().max().item() < 0.15


def test_left_padded_batch_equals_each_row_alone():
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 48, (n,), generator=gen) for n in (9, 4, 6)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for i, r in enumerate(rows):
            alone = model(r[None]).logits
            torch.testing.assert_close(batched[i, width - len(r) :], alone[0], rtol=1e-5, atol=1e-5)
            alone_gen = model.generate(r[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(generated[i, width:], alone_gen[0, len(r) :])


def test_padding_in_the_middle_leaves_the_state_untouched():
    model = tiny_model(conv_kernel=0)
    ids = torch.randint(3, 48, (1, 10))
    mask = torch.ones_like(ids)
    mask[:, 4:7] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        kept = torch.cat([ids[:, :4], ids[:, 7:]], 1)
        torch.testing.assert_close(padded[:, 7:], model(kept).logits[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell_type", ["mingru", "minlstm"])
def test_generate_with_cache_equals_without_greedy_and_beam(cell_type):
    model = tiny_model(seed=1, cell_type=cell_type)
    ids = torch.randint(3, 48, (2, 7), generator=torch.Generator().manual_seed(1))
    for kwargs in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        with_cache = model.generate(ids, max_new_tokens=10, **kwargs)
        without = model.generate(ids, max_new_tokens=10, use_cache=False, **kwargs)
        assert torch.equal(with_cache, without), kwargs
    assert len(set(with_cache[0, 7:].tolist())) > 1, "degenerate test: greedy output is constant"


def test_beam_search_returns_several_sequences_consistent_with_full_forward():
    model = tiny_model()
    ids = torch.randint(3, 48, (1, 5))
    out = model.generate(
        ids, max_new_tokens=5, num_beams=4, num_return_sequences=3, do_sample=False,
        output_scores=True, return_dict_in_generate=True,
    )
    assert out.sequences.shape == (3, 10)
    # Each returned beam's score is its log-probability under a plain full forward.
    with torch.no_grad():
        logp = model(out.sequences).logits.log_softmax(-1)
    token_logp = logp[:, 4:-1].gather(-1, out.sequences[:, 5:, None]).squeeze(-1).sum(-1)
    # length_penalty=1: the sum over the 5 generated tokens divided by 5.
    torch.testing.assert_close(out.sequences_scores, token_logp / 5, rtol=1e-4, atol=1e-4)


def test_sampling_with_num_return_sequences_is_reproducible():
    model = tiny_model()
    ids = torch.randint(3, 48, (2, 5))
    torch.manual_seed(7)
    first = model.generate(ids, max_new_tokens=8, do_sample=True, num_return_sequences=3, top_k=10)
    torch.manual_seed(7)
    second = model.generate(ids, max_new_tokens=8, do_sample=True, num_return_sequences=3, top_k=10, use_cache=False)
    assert first.shape == (6, 13) and torch.equal(first, second)


def test_continuing_from_a_returned_cache_equals_one_long_generate():
    model = tiny_model()
    ids = torch.randint(3, 48, (2, 6))
    long = model.generate(ids, max_new_tokens=12, do_sample=False)
    part = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    # The cache has consumed all but the last generated token: pass only that one.
    rest = model.generate(part.sequences[:, -1:], cache=part.cache, max_new_tokens=7, do_sample=False)
    assert torch.equal(torch.cat([part.sequences, rest[:, 1:]], 1), long)


def test_generate_from_inputs_embeds_matches_input_ids():
    model = tiny_model()
    ids = torch.randint(3, 48, (2, 6))
    from_ids = model.generate(ids, max_new_tokens=6, do_sample=False)
    from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(from_embeds, from_ids[:, 6:])


@pytest.mark.slow  # torch.compile of the decode step: ~15 s of 2 CPU cores
def test_static_cache_with_torch_compile_matches_eager():
    model = tiny_model()
    ids = torch.randint(3, 48, (2, 6))
    eager = model.generate(ids, max_new_tokens=6, do_sample=False)
    static = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(static, eager)
    model.forward = torch.compile(model.forward, dynamic=False, fullgraph=False)
    compiled = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(compiled, eager)


def test_outputs_hidden_states_tuple_and_loss_normalisation():
    model = tiny_model()
    ids = torch.randint(3, 48, (2, 9))
    out = model(ids, labels=ids, output_hidden_states=True)
    # Recorded by transformers' `capture_outputs`: each block's input, then the final (normed) output.
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    with torch.no_grad():
        stream = model.model.embeddings(ids)
        for i, block in enumerate(model.model.layers):
            torch.testing.assert_close(out.hidden_states[i], stream)
            stream = block(stream)
        torch.testing.assert_close(out.hidden_states[-1], model.model.norm_f(stream))
    only_last = model(ids, output_hidden_states=[-1]).hidden_states
    assert only_last[0] is None and torch.equal(only_last[-1], out.hidden_states[-1])
    # ModelTesterMixin's output equivalence: the tuple holds the dict's fields in order; the config's default holds.
    base_tuple = model.model(ids, use_cache=True, output_hidden_states=True, return_dict=False)
    assert len(base_tuple) == 3 and type(base_tuple[1]) is DynamicCache  # exactly transformers' own cache
    torch.testing.assert_close(base_tuple[2][-1], base_tuple[0])
    model.config.output_hidden_states = True
    assert len(model(ids).hidden_states) == model.config.num_hidden_layers + 1
    as_tuple = model(ids, labels=ids, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)
    # Gradient accumulation: a sum over tokens divided by the count across micro-batches.
    summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(100)).loss
    torch.testing.assert_close(summed, out.loss * (2 * 8) / 100)
    assert model(ids, logits_to_keep=1).logits.shape == (2, 1, 48)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = tiny_model(dropout=0.1).train()
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers 5.25 name
        ids = torch.randint(3, 48, (2, 12), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(3)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_weight_init_really_applies():
    config = tiny_config(hidden_size=256, intermediate_size=512, num_hidden_layers=4, initializer_range=0.02,
        tie_word_embeddings=True,
    )
    model = MinRNNForCausalLM(config)
    std = lambda t: t.float().std().item()  # noqa: E731
    assert abs(std(model.model.embeddings.weight) - 0.02) < 0.002
    assert abs(std(model.model.layers[0].mixer.in_proj.weight) - 0.02) < 0.002
    assert abs(std(model.model.layers[0].mixer.out_proj.weight) - 0.02 / 8**0.5) < 0.001
    assert abs(std(model.model.layers[0].mlp.down_proj.weight) - 0.02 / 8**0.5) < 0.001
    assert torch.equal(model.model.layers[0].norm.weight, torch.ones(256))
    conv = model.model.layers[0].mixer.conv1d.weight
    assert torch.equal(conv[..., -1], torch.ones(256, 1)) and not conv[..., :-1].any()  # starts as the identity
    assert model.lm_head.weight is model.model.embeddings.weight


def test_resize_token_embeddings_keeps_tying_and_runs():
    model = tiny_model(tie_word_embeddings=True)
    model.resize_token_embeddings(60)
    assert model.config.vocab_size == 60 and model.lm_head.weight.shape == (60, 32)
    assert model.lm_head.weight is model.model.embeddings.weight
    assert model(torch.tensor([[59, 3]])).logits.shape == (1, 2, 60)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cell_type": "mingrux"}, "cell_type"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"conv_kernel": -2}, "conv_kernel"),
        ({"intermediate_size": -1}, "intermediate_size"),
        ({"expansion_factor": 0.0}, "expansion_factor"),
        ({"dropout": 1.5}, "dropout"),
        ({"scan_backend": "fast"}, "scan_backend"),
    ],
)
def test_invalid_config_values_are_rejected(kwargs, message):
    with pytest.raises(Exception, match=message):
        MinRNNConfig(**kwargs)


def test_bad_inputs_get_clear_errors():
    model = tiny_model()
    ids = torch.randint(3, 48, (2, 5))
    for bad in (torch.tensor([[3, 48]]), torch.tensor([[-1, 3]])):
        with pytest.raises(ValueError, match="vocab_size=48"):
            model.generate(bad, max_new_tokens=1)  # once per call
        with check_input_values(), pytest.raises(ValueError, match="vocab_size=48"):
            model(bad)  # every forward, when asked
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="DynamicCache\\(config="):
        model(ids, cache=DynamicCache())
    with pytest.raises(ValueError, match="batch size 2"):
        model(ids[:1], cache=model(ids, use_cache=True).cache)


def test_empty_sequence_gets_one_clear_error():
    model = tiny_model()
    empty = torch.zeros(2, 0, dtype=torch.long)
    for call in (
        lambda: model(empty),
        lambda: model(inputs_embeds=torch.zeros(2, 0, 32)),
        lambda: model.generate(empty, max_new_tokens=3),
        lambda: model.prefill(empty),
    ):
        with pytest.raises(ValueError, match=r"no tokens|at least one token"):
            call()


@pytest.mark.parametrize(
    "values",
    [[0.5, 1.0, 1.0], [-1, 1, 1], [0.0, float("-inf"), 0.0], [2, 1, 1]],
    ids=["half", "minus_one", "additive", "two"],
)
def test_attention_mask_other_than_0_and_1_is_refused(values):
    model = tiny_model()
    ids = torch.randint(3, 48, (1, 3))
    with check_input_values(), pytest.raises(ValueError, match=r"`attention_mask` must hold only 0 \(padding\) and 1"):
        model(ids, attention_mask=torch.tensor([values]))
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(ids, attention_mask=torch.tensor([values]), max_new_tokens=2)


def test_attention_mask_as_bool_int_or_float_0_1_is_the_same():
    model = tiny_model()
    ids = torch.randint(3, 48, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        for as_type in (torch.bool, torch.float32, torch.int32):
            torch.testing.assert_close(model(ids, attention_mask=mask.to(as_type)).logits, expected, rtol=0, atol=0)


def test_layer_parity_at_65536_tokens():
    """A small layer over 65,536 tokens: the default scan equals the step-by-step definition."""
    model = tiny_model(hidden_size=8, intermediate_size=0, num_hidden_layers=1, expansion_factor=1.0, vocab_size=16)
    ids = torch.randint(0, 16, (1, 65536), generator=torch.Generator().manual_seed(0))
    reference = tiny_model(
        hidden_size=8, intermediate_size=0, num_hidden_layers=1, expansion_factor=1.0, vocab_size=16,
        scan_backend="sequential",
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell_type,n_gates", [("mingru", 2), ("minlstm", 3)])
def test_without_expansion_the_cell_is_the_papers_layer(cell_type, n_gates):
    """expansion_factor=1: Linear(hidden -> n_gates * hidden) then the scan; the state is the output."""
    mixer = tiny_model(cell_type=cell_type, expansion_factor=1).model.layers[0].mixer
    assert isinstance(mixer.out_proj, torch.nn.Identity)
    assert mixer.in_proj.weight.shape == (n_gates * 32, 32)


class _OpLog(TorchDispatchMode):
    """Every aten op a computation runs, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("conv_kernel", [4, 0])
def test_one_code_path_on_every_device(conv_kernel):
    """The same ops run on CPU as on `meta` tensors (which hold no values, so no branch can depend on one): with
    padding, every packing input and a cache, prefill and a decoding step. No op reads a value back to the host."""

    def run(device):
        model = tiny_model(conv_kernel=conv_kernel, scan_backend="chunked").to(device)
        ids = torch.randint(3, 48, (2, 8)).to(device)
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]).to(device)
        packing = dict(
            position_ids=torch.tensor([[0, 0, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]),
            cu_seq_lens_q=torch.tensor([0, 5, 8, 12, 14, 16]),
            seq_idx=torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 3, 3, 4, 4]]),
        )
        packing = {name: value.to(device) for name, value in packing.items()}
        with torch.no_grad(), _OpLog() as log:
            out = model(ids, attention_mask=mask, use_cache=True, **packing)
            step = model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=out.cache)
        return log.ops, step.logits

    cpu_ops, cpu_logits = run("cpu")
    meta_ops, meta_logits = run("meta")
    assert meta_logits.shape == cpu_logits.shape == (2, 1, 48)
    assert "aten._local_scalar_dense" not in cpu_ops  # what `.item()`, `int()` or `bool()` of a tensor runs
    # Conversions aside (transformers' cache moves its CPU token counter to the states' device: a copy on meta only).
    assert [op for op in cpu_ops if op != "aten._to_copy"] == [op for op in meta_ops if op != "aten._to_copy"]
