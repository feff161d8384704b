"""Packed sequences stay apart: a row of several sequences gives each exactly what it gives alone.

Packing collators (transformers' `DataCollatorWithFlattening`, TRL's padding-free packing) mark the sequence starts
with `position_ids` (restarting at 0), `cu_seq_lens_q/k` or `seq_idx`; at each start the state and the conv window
restart. Checked against each sequence run alone (logits and loss gradients), then end to end through the Trainer.
"""

import pytest
import torch
from conftest import tiny_model as identity_conv_model

from modeling_minrnn import check_input_values


def tiny_model(seed=0, **overrides):
    """`conftest.tiny_model` with random conv taps: the init's identity conv reads only the current token, so a conv
    window reaching across a sequence start would go unnoticed."""
    model = identity_conv_model(seed, **overrides)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in model.model.layers:
            if block.mixer.conv_kernel > 0:
                block.mixer.conv1d.weight.copy_(torch.randn(block.mixer.conv1d.weight.shape, generator=generator) * 0.5)
    return model


CELLS_AND_CONVS = [("mingru", 4), ("mingru", 0), ("minlstm", 4), ("minlstm", 0)]
LENGTHS = [6, 1, 9, 3, 5]  # a one-token sequence, and sequences shorter and longer than the conv window


def packed_row(lengths=LENGTHS, seed=0, vocab=48):
    """The sequences, and one row of them with every packing input a collator would give."""
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(3, vocab, (n,), generator=generator) for n in lengths]
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    inputs = {
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seq_lens_q": offsets.to(torch.int32),
        "cu_seq_lens_k": offsets.to(torch.int32),
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        "seq_idx": torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))[None],
    }
    return sequences, torch.cat(sequences)[None], inputs


PACKING_INPUTS = {
    "position_ids": ["position_ids"],
    "cu_seq_lens": ["cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"],
    "seq_idx": ["seq_idx"],
    "all": ["position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"],
}


def labels_like_the_collator(sequences):
    """`DataCollatorWithFlattening`'s labels: -100 at each sequence's first token, so no target crosses a boundary."""
    return torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in sequences])[None]


def loss_sum_and_count(model, sequences):
    """Sum of next-token losses of each sequence run alone, and the number of targets."""
    total, count = 0.0, 0
    for s in sequences:
        if len(s) > 1:
            logits = model(s[None]).logits[0, :-1]
            total = total + torch.nn.functional.cross_entropy(logits, s[1:], reduction="sum")
            count += len(s) - 1
    return total, count


@pytest.mark.parametrize("cell_type,conv_kernel", CELLS_AND_CONVS)
@pytest.mark.parametrize("given", PACKING_INPUTS)
def test_packed_row_equals_each_sequence_alone(cell_type, conv_kernel, given):
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel)
    sequences, ids, inputs = packed_row()
    kwargs = {name: inputs[name] for name in PACKING_INPUTS[given]}
    with torch.no_grad():
        packed = model(ids, **kwargs).logits[0]
        alone = torch.cat([model(s[None]).logits[0] for s in sequences])
        leaky = model(ids).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # Without the packing inputs the later sequences read the earlier ones' state: the bug this guards against.
    assert (leaky - alone).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["auto", "chunked", "log_space", "sequential"])
@pytest.mark.parametrize("cell_type,conv_kernel", [("mingru", 4), ("minlstm", 4), ("minlstm", 0)])
def test_packed_loss_and_gradients_equal_each_sequence_alone(backend, cell_type, conv_kernel):
    """Every scan backend: the packed loss and its parameter gradients equal the per-sequence computation."""
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel, scan_backend=backend).train()
    sequences, ids, inputs = packed_row(seed=1)
    packed = model(ids, labels=labels_like_the_collator(sequences), position_ids=inputs["position_ids"]).loss
    packed_grads = torch.autograd.grad(packed, list(model.parameters()))
    total, count = loss_sum_and_count(model, sequences)
    alone = total / count
    alone_grads = torch.autograd.grad(alone, list(model.parameters()))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    for (name, _), got, expected in zip(model.named_parameters(), packed_grads, alone_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_batch_of_packed_rows_with_cu_seq_lens_over_the_flattened_batch():
    """Two rows, each packed; `cu_seq_lens` counts over the flattened (batch * seq) tokens as the varlen kernels do."""
    model = tiny_model()
    first, ids_a, inputs_a = packed_row([4, 6, 2], seed=2)
    second, ids_b, inputs_b = packed_row([7, 5], seed=3)
    ids = torch.cat([ids_a, ids_b])
    offsets = torch.tensor([0, 4, 10, 12, 19, 24], dtype=torch.int32)
    with torch.no_grad():
        by_offsets = model(ids, cu_seq_lens_q=offsets, cu_seq_lens_k=offsets).logits
        by_positions = model(ids, position_ids=torch.cat([inputs_a["position_ids"], inputs_b["position_ids"]])).logits
        alone = torch.stack([torch.cat([model(s[None]).logits[0] for s in row]) for row in (first, second)])
    torch.testing.assert_close(by_offsets, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_positions, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv_kernel", [4, 0])
@pytest.mark.parametrize("lengths", [[5, 7, 2], [5, 1, 1]], ids=["packed_prefill", "two_token_call"])
def test_continuing_the_last_packed_sequence_through_the_cache(conv_kernel, lengths):
    """After a packed call, the cache holds the last sequence's state and conv window only, also when that call is
    shorter than the conv window (the older cached inputs are dropped too)."""
    model = tiny_model(conv_kernel=conv_kernel)
    sequences, ids, inputs = packed_row(lengths, seed=4)  # the last sequence is shorter than the conv window
    more = torch.randint(3, 48, (1, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model(ids[:, : lengths[0]], use_cache=True).cache
        rest = slice(lengths[0], None)
        model(ids[:, rest], cache=cache, position_ids=inputs["position_ids"][:, rest],
              use_cache=True)
        continued = model(more, cache=cache, use_cache=True).logits
        alone = model(torch.cat([sequences[-1][None], more], 1)).logits[:, -3:]
    torch.testing.assert_close(continued, alone, rtol=1e-5, atol=1e-5)


def test_ordinary_position_ids_never_reset_the_state():
    """Positions as generation makes them: 0..T-1, continuing after a cache, left padding, 0 after a cache."""
    model = tiny_model()
    ids = torch.randint(3, 48, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(model(ids, position_ids=torch.arange(10)[None]).logits, full)
        first = model(ids[:, :4], position_ids=torch.arange(4).expand(2, 4), use_cache=True)
        for positions in (torch.arange(4, 10), torch.arange(6)):  # offsets, or restarting at 0 (`generate`)
            cache = model(ids[:, :4], use_cache=True).cache
            rest = model(ids[:, 4:], cache=cache, position_ids=positions[None], use_cache=True).logits
            torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=1e-5, atol=1e-5)

        # Left padding with `generate`'s positions (0 at the padding and at the first real token).
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :3] = 0
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        padded = model(ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(padded[1, 3:], model(ids[1:, 3:]).logits[0], rtol=1e-5, atol=1e-5)


def test_generate_with_packing_aware_forward_matches_plain_greedy():
    """`generate` now passes `position_ids` (the forward names them): with and without cache, as before."""
    model = tiny_model(seed=1)
    ids = torch.randint(3, 48, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with_cache = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    without = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    alone = model.generate(ids[:1, 2:], max_new_tokens=8, do_sample=False)
    assert torch.equal(with_cache[0, 6:], alone[0, 4:])


def test_torch_compile_traces_the_packed_forward_in_one_graph():
    from modeling_minrnn.scan import resolve_backend

    model = tiny_model().train()
    sequences, ids, inputs = packed_row(seed=9)
    resolve_backend(None, ids)  # builds the native kernel outside the trace
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(ids, labels=labels_like_the_collator(sequences), **inputs)
    expected = model(ids, labels=labels_like_the_collator(sequences), position_ids=inputs["position_ids"])
    torch.testing.assert_close(out.logits, expected.logits)
    for got, want in zip(torch.autograd.grad(out.loss, list(model.parameters())),
                         torch.autograd.grad(expected.loss, list(model.parameters()))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"position_ids": torch.zeros(2, 10, dtype=torch.long)}, r"position_ids.*\(1, seq\)"),
        ({"cu_seq_lens_q": torch.tensor([0, 4, 12])}, r"cu_seq_lens_q.*ending at batch \* seq = 10"),
        ({"cu_seq_lens_k": torch.tensor([1, 4, 10])}, "cu_seq_lens_k"),
        ({"cu_seq_lens_q": torch.tensor([0, 6, 4, 10])}, "non-decreasing"),
        ({"cu_seq_lens_q": torch.tensor([0.0, 4.0, 10.0])}, "integer"),
        ({"cu_seq_lens_q": torch.tensor([0, 4, 10]), "max_length_q": 3}, "max_length_q"),
        ({"seq_idx": torch.zeros(1, 9, dtype=torch.int32)}, "seq_idx"),
        ({"position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]), "cu_seq_lens_q": torch.tensor([0, 5, 10])},
         "`position_ids` and `cu_seq_lens_q` mark different sequence starts"),
    ],
)
def test_malformed_or_inconsistent_packing_inputs_are_refused(inputs, message):
    """Shapes and dtypes on every call; values (offsets, agreement) with the checks switched on."""
    model = tiny_model()
    with check_input_values(), pytest.raises(ValueError, match=message):
        model(torch.randint(3, 48, (1, 10)), **inputs)


def test_cu_seq_lens_may_not_run_across_rows():
    model = tiny_model()
    with check_input_values(), pytest.raises(ValueError, match="runs from one row into the next"):
        model(torch.randint(3, 48, (2, 5)), cu_seq_lens_q=torch.tensor([0, 3, 7, 10]))


@pytest.mark.parametrize("backend", ["auto", "chunked"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_at_padding_never_reaches_real_tokens(backend, bad):
    """Padding is selected away, not multiplied by 0: outputs and gradients as with clean padding."""
    model = tiny_model(scan_backend=backend).train()
    ids = torch.randint(3, 48, (2, 9), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, 4:6] = 0  # a hole: the conv window of the next tokens reaches over it
    labels = ids.masked_fill(mask == 0, -100)
    embeds = model.get_input_embeddings()(ids).detach()
    dirty = embeds.masked_fill((mask == 0).unsqueeze(-1), bad)

    parameters = [p for name, p in model.named_parameters() if "embeddings" not in name]  # unused: embeds given

    def run(inputs_embeds):
        out = model(inputs_embeds=inputs_embeds, attention_mask=mask, labels=labels)
        return out.logits, torch.autograd.grad(out.loss, parameters)

    clean_logits, clean_grads = run(embeds)
    dirty_logits, dirty_grads = run(dirty)
    real = mask.bool()
    assert torch.isfinite(dirty_logits[real]).all()
    torch.testing.assert_close(dirty_logits[real], clean_logits[real], rtol=0, atol=0)
    for got, expected in zip(dirty_grads, clean_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "chunked"])
def test_a_padded_decoding_step_leaves_the_state_unchanged(backend):
    """One token through the cache with its position masked leaves the recurrent state as it was, and decoding on
    gives what one forward over the whole masked sequence gives (each backend's one-token path against its scan)."""
    model = tiny_model(scan_backend=backend)
    ids = torch.randint(3, 48, (2, 7), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, 5] = 0  # row 0's sixth token is padding, row 1's is real
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits[:, 5:]
        cache = model(ids[:, :5], use_cache=True).cache
        before = [cache.get_recurrent_state(i).clone() for i in range(len(cache))]
        steps = [model(ids[:, t : t + 1], cache=cache, attention_mask=mask[:, : t + 1]).logits for t in (5, 6)]
    torch.testing.assert_close(torch.cat(steps, 1)[1], expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps[1][0], expected[0, 1:], rtol=1e-5, atol=1e-5)
    # After the padded step row 0's state was that of five tokens; row 1's moved on.
    with torch.no_grad():
        cache = model(ids[:, :5], use_cache=True).cache
        model(ids[:, 5:6], cache=cache, attention_mask=mask[:, :6])
    for i, old in enumerate(before):
        torch.testing.assert_close(cache.get_recurrent_state(i)[0], old[0], rtol=0, atol=0)
        assert not torch.equal(cache.get_recurrent_state(i)[1], old[1])


# ---- End to end: the Trainer with transformers' and TRL's packing collators. ----

TEXTS = ["To be, or not to be", "that is", "the question:", "Whether 'tis nobler", "in the mind", "to suffer"]


def sequences_of(batch):
    """The sequences of a flattened batch, split where `position_ids` restart at 0."""
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch  # one flattened row
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    bounds = [*starts, batch["input_ids"].shape[1]]
    return [batch["input_ids"][0, a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def assert_step_matches_each_sequence_alone(trainer, batch):
    """The trainer's one SGD step (lr 1, no clipping) on the packed batch == loss and gradients of each sequence
    alone: `(before - after) / lr` is the gradient the trainer applied."""
    sequences = sequences_of(batch)
    assert len(sequences) >= 3, "degenerate test: fewer than three sequences packed together"
    before = [p.detach().clone() for p in trainer.model.parameters()]
    total, count = loss_sum_and_count(trainer.model, sequences)
    expected = torch.autograd.grad(total / count, list(trainer.model.parameters()))
    result = trainer.train()
    assert result.training_loss == pytest.approx((total / count).item(), rel=1e-5)
    for (name, after), start, grad in zip(trainer.model.named_parameters(), before, expected):
        torch.testing.assert_close(start - after.detach(), grad, rtol=1e-3, atol=2e-6, msg=name)


ONE_SGD_STEP = dict(
    per_device_train_batch_size=8, report_to=[], use_cpu=True, max_steps=1, optim="sgd", learning_rate=1.0,
    lr_scheduler_type="constant", max_grad_norm=0.0, save_strategy="no",
)


def test_trainer_with_data_collator_with_flattening(tmp_path, char_tokenizer):
    from datasets import Dataset
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    dataset = Dataset.from_dict({"text": TEXTS}).map(
        lambda row: char_tokenizer(row["text"]), remove_columns=["text"]
    )
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    trainer = Trainer(
        model=tiny_model(vocab_size=100).train(), args=TrainingArguments(output_dir=str(tmp_path), **ONE_SGD_STEP),
        train_dataset=dataset, data_collator=collator,
    )
    batch = next(iter(trainer.get_train_dataloader()))  # all six texts: the batch the step will see, reordered
    assert {"cu_seq_lens_q", "seq_idx", "position_ids"} <= set(batch)
    assert_step_matches_each_sequence_alone(trainer, batch)


def test_trl_sft_trainer_padding_free_packing(tmp_path, char_tokenizer):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # TRL's defaults otherwise turn on bf16 autocast, which the exact comparison cannot take.
    args = SFTConfig(output_dir=str(tmp_path), packing=True, max_length=48, bf16=False, **ONE_SGD_STEP)
    trainer = SFTTrainer(
        model=tiny_model(vocab_size=100).train(), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=char_tokenizer,
    )
    assert trainer.padding_free  # TRL's default packing ("bfd") flattens each batch into one row
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"cu_seq_lens_q", "seq_idx", "position_ids"} <= set(batch)
    assert_step_matches_each_sequence_alone(trainer, batch)
