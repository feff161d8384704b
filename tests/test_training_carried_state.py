"""minrnn_training.carried_state: the state carried across blocks (exactly one long forward), EOS resets
(exactly each document alone), and the training runs that use it (`--carry-state`)."""

import json

import pytest
import torch
from conftest import tiny_model
from pretrain_runs import TINY, TWO_PROCESSES, kill_after_first_checkpoint, run, step_losses

from minrnn_training.carried_state import CarriedState
from minrnn_training.data import default_corpus

EOS = 2


def _run_blocks(model, stream: torch.Tensor, block: int, reset: str, rows: int = 1, train: bool = False):
    """Logits of `stream` `(rows, n * block + 1)` fed block by block through a `CarriedState`; with `train`, each
    block's loss is backpropagated and the model's gradient is returned per block too."""
    carried = CarriedState(rows, reset, EOS)
    logits, grads = [], []
    for index in range((stream.shape[1] - 1) // block):
        window = stream[:, index * block : (index + 1) * block + 1]
        with torch.set_grad_enabled(train):
            out = carried.forward(model, window[:, :-1], window[:, 1:], slice(0, rows), index, fresh=index == 0)
        if train:
            model.zero_grad()
            out.loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        logits.append(out.logits.detach())
    for tensor in [tensor for state in carried.states for tensor in state if tensor is not None]:
        assert tensor.grad_fn is None and not tensor.requires_grad  # nothing of a step's graph is carried on
    return torch.cat(logits, dim=1), grads


@pytest.mark.parametrize("cell_type", ["mingru", "minlstm"])
@pytest.mark.parametrize("conv_kernel", [4, 0])
def test_carried_blocks_equal_one_long_forward(cell_type, conv_kernel):
    """Blocks of 8 with the state carried == one forward over the 48 tokens; backward works block after block
    (it failed before the cache's in-place state update stopped overwriting the scan's saved initial state)."""
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel).train()
    torch.manual_seed(1)
    stream = torch.randint(3, 48, (2, 49))
    with torch.no_grad():
        full = model(stream[:, :-1]).logits
    carried, grads = _run_blocks(model, stream, block=8, reset="none", rows=2, train=True)
    torch.testing.assert_close(carried, full, rtol=1e-5, atol=1e-5)

    # Truncated BPTT: block k's gradient is that of block k alone from the prefix's state, held constant.
    prefix, last = stream[:, :41], stream[:, 40:]
    model.zero_grad()
    with torch.no_grad():
        cache = model(prefix[:, :-1], use_cache=True).cache
    out = model(last[:, :-1], labels=last[:, :-1], shift_labels=last[:, 1:].contiguous(), cache=cache, use_cache=True)
    out.loss.backward()
    reference = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[-1], reference, rtol=1e-4, atol=1e-6)


def test_eos_reset_runs_each_document_alone():
    """With reset='eos' each EOS starts its document from a zero state (also at a block's first token, and at the
    stream's first block); with 'none' the state runs through the documents."""
    model = tiny_model(cell_type="mingru", conv_kernel=4)
    torch.manual_seed(2)
    # EOS at positions 0, 5, 16 (a block start with block 8) and 29.
    stream = torch.randint(3, 48, (1, 41))
    starts = [0, 5, 16, 29]
    stream[0, starts] = EOS
    got, _ = _run_blocks(model, stream, block=8, reset="eos")
    with torch.no_grad():
        for begin, end in zip(starts, [*starts[1:], 40]):
            alone = model(stream[:, begin:end]).logits
            torch.testing.assert_close(got[:, begin:end], alone, rtol=1e-5, atol=1e-5)
        through, _ = _run_blocks(model, stream, block=8, reset="none")
        torch.testing.assert_close(through, model(stream[:, :-1]).logits, rtol=1e-5, atol=1e-5)
        assert (through[:, 16:29] - got[:, 16:29]).abs().max() > 1e-3


def test_state_round_trips_and_refuses_another_layout():
    model = tiny_model()
    stream = torch.randint(3, 48, (3, 17))
    first = CarriedState(3, "none")
    with torch.no_grad():
        first.forward(model, stream[:, :8], stream[:, 1:9], slice(0, 3), 0, fresh=True)
    second = CarriedState(3, "none")
    second.load_state_dict(first.state_dict())
    with torch.no_grad():
        a = first.forward(model, stream[:, 8:16], stream[:, 9:17], slice(0, 3), 1, fresh=False).logits
        b = second.forward(model, stream[:, 8:16], stream[:, 9:17], slice(0, 3), 1, fresh=False).logits
    assert torch.equal(a, b) and second.next_index == 2
    with pytest.raises(ValueError, match=r"state_reset='none' and 3 rows; this run has state_reset='eos' and 3 rows"):
        CarriedState(3, "eos", EOS).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match=r"state_reset='both' must be one of \('eos', 'none'\)"):
        CarriedState(3, "both")


# ------------------------------------------------------------------------------------------------ pretrain.py


@pytest.fixture
def small_corpus(tmp_path):
    """60 documents of 100 characters of the embedded corpus (.jsonl): 8 streams of 681 tokens wrap around (a new
    epoch) at step 21 of blocks of 32, and every stream meets an EOS within its first blocks."""
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": doc[:100]}) + "\n" for doc in default_corpus()[:60]))
    return ["--dataset", str(path), "--char-level", "true", "--carry-state", "true"]


@pytest.mark.slow
def test_carried_state_is_one_layout_across_processes_and_accumulation(tmp_path, small_corpus):
    """2 gloo processes x 1 row x 2 micro-steps == 1 process x 4 rows: each process and micro-step reads its own
    streams with its own carried states, laid out as one big batch, hence the same losses (resets at EOS here)."""
    common = [*TINY, *small_corpus, "--max-steps", "4", "--eval-every", "4", "--save-every", "4"]
    run([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")])
    run([*common, "--batch-size", "1", "--gradient-accumulation-steps", "2", "--output-dir", str(tmp_path / "two")],
        launcher=TWO_PROCESSES)
    # Which rows each process and micro-step reads: test_training_data.py (one global batch, shared out).
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    for step in range(1, 5):
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
    saved = torch.load(tmp_path / "two" / "checkpoints" / "step-0000004" / "carried_state_rank1.pt")
    assert saved["next_index"] == 4 and saved["states"][0][0].shape[0] == 2  # 1 row x 2 micro-steps


@pytest.mark.slow
def test_carried_state_resumes_exactly_after_sigkill(tmp_path, small_corpus):
    """Killed after a checkpoint, `--resume` continues bit for bit: the carried states and stream positions are in
    the checkpoint (with dropout, accumulation, no EOS resets, and an epoch boundary at step 21 where the streams
    start over)."""
    common = [*TINY, *small_corpus, "--state-reset", "none", "--batch-size", "4", "--gradient-accumulation-steps", "2",
              "--dropout", "0.1",
              "--max-steps", "22", "--eval-every", "11"]
    reference = tmp_path / "reference"
    run([*common, "--save-every", "22", "--output-dir", str(reference)])

    crashed = tmp_path / "crashed"
    kill_after_first_checkpoint([*common, "--save-every", "3"], crashed)

    resumed = run([*common, "--save-every", "3", "--output-dir", str(crashed), "--resume"])
    assert "carried state over 8 streams of 681 tokens (reset: none)" in resumed.stdout
    start = int(resumed.stdout.split("resuming at step ")[1].split()[0])
    assert 3 <= start < 21
    expected, got = step_losses(reference), step_losses(crashed)
    assert [got[s] for s in range(start + 1, 23)] == [expected[s] for s in range(start + 1, 23)]
    final = [json.loads((d / "training_summary.json").read_text())["final_eval_loss"] for d in (reference, crashed)]
    assert final[0] == final[1]
