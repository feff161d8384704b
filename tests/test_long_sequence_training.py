"""Exact gradients over a long sequence in chunks (`minrnn_training.chunked_backward`): checkpointing over time.

Every check compares against full-sequence backprop (`model(ids, labels=...).loss.backward()`) at a length where
both fit: both cells, conv on and off, chunk sizes that do not divide the length, a chunk of one token and chunks
shorter than the conv window, padding and -100 labels, gradient accumulation, every CPU scan backend, dropout.
"""

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_model as identity_conv_model
from pretrain_runs import TINY, TWO_PROCESSES, env, run, step_losses
from transformers.cache_utils import DynamicCache

from minrnn_training.chunked_backward import chunked_backward

BENCHMARK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "long_sequence_memory.py"


def one_process(**kwargs):
    """An `Accelerator` on this process; without options `accelerator.backward` is `loss.backward()`. A new one per
    use: accelerate shares the accumulation settings between instances."""
    return Accelerator(cpu=True, **kwargs)


def tiny_model(seed=0, **overrides):
    """`conftest.tiny_model` in float64 with random conv taps (the init's identity conv reads only the current
    token, so a conv window lost at a chunk boundary would go unnoticed)."""
    model = identity_conv_model(seed, **overrides).double()
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for block in model.model.layers:
            if block.mixer.conv_kernel > 0:
                weight = block.mixer.conv1d.weight
                weight.copy_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype))
    return model


def batch(seq=23, seed=0):
    """Three rows: ignored labels in the middle of the first, the second right-padded and the third left-padded
    (whole chunks of padding at small chunk sizes); padding is masked and its labels are -100."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 48, (3, seq), generator=generator)
    labels = ids.clone()
    labels[0, 5:9] = -100
    mask = torch.ones_like(ids)
    mask[1, seq - 6 :] = 0
    mask[2, :9] = 0
    labels[mask == 0] = -100
    return ids, labels, mask


def full_backprop(model, ids, labels, mask):
    model.zero_grad()
    loss = model(ids, labels=labels, attention_mask=mask).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def chunked(model, ids, labels, mask, chunk_size, **kwargs):
    model.zero_grad()
    out = chunked_backward(one_process(), model, ids, labels=labels, attention_mask=mask, chunk_size=chunk_size,
                           **kwargs)
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_grads_close(got, expected, rtol=1e-5):
    # The scan runs in fp32 whatever the weights' dtype: tolerances relative to each gradient's scale.
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=rtol, atol=rtol * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("cell_type,conv_kernel", [("mingru", 4), ("mingru", 0), ("minlstm", 4), ("minlstm", 0)])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])  # one token; shorter than the conv window; not dividing; all
def test_gradients_equal_full_backprop(cell_type, conv_kernel, chunk_size):
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel)
    ids, labels, mask = batch()
    loss, expected = full_backprop(model, ids, labels, mask)
    out, got = chunked(model, ids, labels, mask, chunk_size)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6)  # the loss itself is computed in fp32
    assert out.num_items == int((labels[:, 1:] != -100).sum())
    assert_grads_close(got, expected)


def test_accumulation_and_fp16_loss_scale_pass_through_accelerate():
    """`accelerator.backward` divides by `gradient_accumulation_steps` and multiplies by the fp16 loss scale; the
    gradient each chunk hands back carries that factor, so it is divided out before the next chunk's backward: the
    result is full backprop's gradient times the factor, as `accelerator.backward(loss)` gives it."""
    model = tiny_model()
    ids, labels, mask = batch()
    _, expected = full_backprop(model, ids, labels, mask)
    accelerator = one_process(gradient_accumulation_steps=4)
    # accelerate makes no loss scaler on CPUs (fp16 there runs in fp32); this is the one it makes on GPUs.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model.zero_grad()
    chunked_backward(accelerator, model, ids, labels=labels, attention_mask=mask, chunk_size=5)
    got = {name: p.grad * 4 / 2.0**10 for name, p in model.named_parameters()}
    assert_grads_close(got, expected)


@pytest.mark.parametrize("backend", ["sequential", "log_space", "chunked", "cpu"])
def test_every_scan_backend(backend):
    model = tiny_model(cell_type="minlstm", scan_backend=backend)
    ids, labels, mask = batch(seq=30)
    _, expected = full_backprop(model, ids, labels, mask)
    _, got = chunked(model, ids, labels, mask, chunk_size=8)
    # The log-space scan's fp32 error grows with the running cumsum, which restarts at every chunk.
    assert_grads_close(got, expected, rtol=1e-3 if backend == "log_space" else 1e-5)


def test_gradient_accumulation_adds_into_grad():
    """One call per row, normalised by the whole batch's targets, gives the whole batch's gradient (the Trainer's
    `num_items_in_batch` convention)."""
    model = tiny_model()
    ids, labels, mask = batch(seq=19)
    loss, expected = full_backprop(model, ids, labels, mask)
    total = int((labels[:, 1:] != -100).sum())
    model.zero_grad()
    losses = [
        chunked_backward(one_process(), model, ids[i : i + 1], labels[i : i + 1], mask[i : i + 1], chunk_size=5,
                               num_items_in_batch=total).loss
        for i in range(len(ids))
    ]
    torch.testing.assert_close(sum(losses), loss, rtol=1e-6, atol=1e-6)
    assert_grads_close({name: p.grad for name, p in model.named_parameters()}, expected)


def test_default_labels_are_the_inputs():
    model = tiny_model()
    ids, _, _ = batch(seq=12)
    loss, expected = full_backprop(model, ids, ids, None)
    model.zero_grad()
    out = chunked_backward(one_process(), model, ids, chunk_size=5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6)
    assert_grads_close({name: p.grad for name, p in model.named_parameters()}, expected)


def test_dropout_one_chunk_replays_the_forward_masks():
    """In training mode each chunk is recomputed under the random state of its first pass: with one chunk, the
    result is the full forward's from the same seed, dropout masks included."""
    model = tiny_model(dropout=0.3).train()
    ids, labels, mask = batch(seq=16)
    torch.manual_seed(7)
    loss, expected = full_backprop(model, ids, labels, mask)
    torch.manual_seed(7)
    out, got = chunked(model, ids, labels, mask, chunk_size=64)
    torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=1e-6)
    assert_grads_close(got, expected)


def test_dropout_many_chunks_equal_one_graph_over_all_chunks():
    """The recomputed chunks use the dropout masks of the first pass, so the gradients equal those of one graph
    kept over all the chunks (the same forward, without recomputation)."""
    model = tiny_model(dropout=0.3).train()
    ids, labels, mask = batch(seq=20)
    chunk_size = 6
    torch.manual_seed(3)
    model.zero_grad()
    cache = DynamicCache(config=model.config)
    chunks = [slice(start, start + chunk_size) for start in range(0, ids.shape[1], chunk_size)]
    logits = [model(ids[:, c], attention_mask=mask[:, c], cache=cache, use_cache=True).logits for c in chunks]
    logits = torch.cat(logits, dim=1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.manual_seed(3)
    out, got = chunked(model, ids, labels, mask, chunk_size)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-6, atol=1e-6)
    assert_grads_close(got, expected)


@pytest.mark.parametrize("kwargs,message", [
    ({"chunk_size": 0}, "`chunk_size` must be an int >= 1"),
    ({"chunk_size": 2.5}, "`chunk_size` must be an int >= 1"),
    ({"input_ids": torch.tensor([3, 4, 5])}, "`input_ids` must be a tensor of shape (batch, seq) with seq >= 2"),
    ({"input_ids": torch.tensor([[3]])}, "`input_ids` must be a tensor of shape (batch, seq) with seq >= 2"),
    ({"labels": torch.ones(2, 5, dtype=torch.long)}, "`labels` must have the shape of `input_ids` (2, 8); got (2, 5)"),
    ({"attention_mask": torch.ones(1, 8)}, "`attention_mask` must have the shape of `input_ids` (2, 8)"),
    ({"labels": torch.full((2, 8), -100)}, "Every target in `labels` is -100"),
    ({"num_items_in_batch": 0}, "`num_items_in_batch` must be > 0"),
])
def test_bad_input_is_refused_in_one_line(kwargs, message):
    model = tiny_model()
    arguments = {"input_ids": torch.randint(3, 48, (2, 8)), "chunk_size": 4, **kwargs}
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        chunked_backward(one_process(), model, **arguments)
    assert all(p.grad is None for p in model.parameters())  # refused before any work


def test_gradient_checkpointing_is_refused():
    model = tiny_model().train()
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="activation_checkpointing_disable"):
        chunked_backward(one_process(), model, torch.randint(3, 48, (1, 8)), chunk_size=4)


@pytest.mark.slow
def test_benchmark_peak_memory_is_flat_in_length(tmp_path):
    """`benchmarks/long_sequence_memory.py` at 8k and 32k tokens: the chunked tensor peak stays put while full
    backprop's grows with the length."""
    spec = importlib.util.spec_from_file_location("long_sequence_memory", BENCHMARK_PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--lengths", "8192", "32768", "--chunk-size", "2048", "--out", str(tmp_path)])
    peak = {(row["method"], row["seq"]): row["tensor_peak_bytes"] for row in rows}
    assert peak["chunked", 32768] < 1.2 * peak["chunked", 8192]
    assert peak["full", 32768] > 3 * peak["full", 8192]
    assert peak["chunked", 32768] < peak["full", 32768] / 4
    assert "| 32,768 | chunked (2,048) |" in (tmp_path / "long_sequence_memory.md").read_text()


# ------------------------------------------------------------------------------------------------ scripts/pretrain.py


@pytest.mark.slow
def test_pretrain_backprop_chunk_size_trains_the_same_model(tmp_path):
    """`--backprop-chunk-size` (chunks of 7 tokens in blocks of 32) on 2 DDP processes with gradient accumulation
    follows the trajectory of full backprop on one process: same losses step by step, same final eval loss."""
    common = [*TINY, "--max-steps", "4", "--eval-every", "4", "--save-every", "4", "--gradient-accumulation-steps", "2"]
    run([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "full")])
    run([*common, "--batch-size", "2", "--backprop-chunk-size", "7", "--output-dir", str(tmp_path / "chunked")],
        launcher=TWO_PROCESSES)
    full, chunked = step_losses(tmp_path / "full"), step_losses(tmp_path / "chunked")
    assert sorted(full) == sorted(chunked) == [1, 2, 3, 4]
    for step in full:
        assert chunked[step] == pytest.approx(full[step], rel=1e-4, abs=1e-5), step
    summaries = [json.loads((tmp_path / name / "training_summary.json").read_text()) for name in ("full", "chunked")]
    assert summaries[1]["final_eval_loss"] == pytest.approx(summaries[0]["final_eval_loss"], rel=1e-4)
    assert summaries[1]["config"]["backprop_chunk_size"] == 7


@pytest.mark.slow
def test_ddp_all_reduces_once_per_step_and_gradients_equal(tmp_path):
    """2 gloo processes, 2 micro-steps per optimizer step: chunked backward (chunks of 7 tokens in rows of
    24) all-reduces the gradients as often as full backprop (DDP comm hook), and its losses and synced gradients
    equal full backprop's."""
    worker = Path(__file__).resolve().parent / "chunked_backward_ddp.py"
    result = subprocess.run([*TWO_PROCESSES, str(worker)], cwd=tmp_path, env=env(), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    for rank in range(2):
        runs = json.loads((tmp_path / f"rank{rank}.json").read_text())
        full, chunked = runs["full"], runs["chunked"]
        assert full["all_reduces"][0] > 0 and chunked["all_reduces"] == full["all_reduces"]
        assert chunked["losses"] == pytest.approx(full["losses"], rel=1e-5)
        for got, expected in zip(chunked["grads"], full["grads"], strict=True):
            assert_grads_close({i: torch.tensor(g) for i, g in enumerate(got)},
                               {i: torch.tensor(g) for i, g in enumerate(expected)}, rtol=1e-4)
