"""scripts/state_streams.py and pretrain's carried state: contiguous streams, the state carried across blocks
(exactly one long forward), EOS resets (exactly each document alone), and the training runs that use them."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from state_streams import CarriedState, TokenStreams  # noqa: E402

EOS = 2


def test_streams_are_contiguous_parts_read_in_lockstep():
    tokens = np.arange(1000)
    streams = TokenStreams(tokens, num_streams=4, block_size=16)
    assert streams.part == 250 and streams.blocks_per_epoch == 15  # 15 * 16 + 1 <= 250
    inputs, targets = streams.block(0, range(4))
    assert (inputs[:, 0] == [0, 250, 500, 750]).all() and (targets == inputs + 1).all()
    following, _ = streams.block(1, range(1, 3))
    assert (following[:, 0] == inputs[1:3, -1] + 1).all()  # block 1 continues block 0, stream by stream
    assert streams.starts_epoch(0) and not streams.starts_epoch(14) and streams.starts_epoch(15)
    assert (streams.block(15, range(4))[0] == inputs).all()
    assert int(streams.block(14, range(4))[1].max()) <= 999
    with pytest.raises(ValueError, match=r"leave 10 tokens per stream, fewer than block_size \+ 1 = 17"):
        TokenStreams(np.arange(100), num_streams=10, block_size=16)


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
    for tensor in [*carried.h, *(c for c in carried.conv if c is not None)]:
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
    model(last[:, :-1], labels=last[:, :-1], shift_labels=last[:, 1:].contiguous(), cache=cache, use_cache=True).loss.backward()
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
