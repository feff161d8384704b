"""`packing.py`: the attention mask and the packed-sequence inputs, turned into the blocks' two bool masks."""

import pytest
import torch

from modeling_minrnn.packing import check_input_values, checks_values, padding_mask_from, sequence_starts


def starts(batch, seq, padding_mask=None, **inputs):
    return sequence_starts(batch, seq, padding_mask, torch.device("cpu"), inputs)


def test_padding_mask_keeps_the_current_columns_whatever_they_hold():
    assert padding_mask_from(None, 2, 5, has_state=False) is None
    # Kept even when every token is real: which branch runs never depends on a tensor's values.
    assert padding_mask_from(torch.ones(2, 5, dtype=torch.long), 2, 5, has_state=False).all()
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(padding_mask_from(mask, 2, 5, has_state=False), mask.bool())
    # With a cache, the mask may cover the consumed tokens too; only the last `seq` columns concern this call.
    torch.testing.assert_close(padding_mask_from(mask, 2, 4, has_state=True), mask[:, -4:].bool())


@pytest.mark.parametrize(
    "mask,seq,has_state,message",
    [
        (torch.ones(2, 6), 5, False, r"shape \(batch, seq\) = \(2, 5\)"),
        (torch.ones(3, 5), 5, False, r"shape \(batch, seq\) = \(2, 5\)"),
        (torch.tensor([[0.0, float("-inf"), 0, 0, 0]] * 2), 5, False, "only 0 .* and 1"),
        (torch.full((2, 5), 2), 5, True, r"got \[2\]"),
    ],
)
def test_bad_attention_masks_are_refused_in_one_line(mask, seq, has_state, message):
    with check_input_values(), pytest.raises(ValueError, match=message):
        padding_mask_from(mask, 2, seq, has_state)


def test_value_checks_run_only_when_asked():
    assert not checks_values()
    additive = torch.tensor([[0.0, float("-inf"), 0, 0, 0]] * 2)
    padding_mask_from(additive, 2, 5, has_state=False)  # values unread: no sync on an accelerator
    with check_input_values():
        assert checks_values()
        with check_input_values(False):
            assert not checks_values()
        with pytest.raises(ValueError, match="only 0"):
            padding_mask_from(additive, 2, 5, has_state=False)
    assert not checks_values()


def test_every_packing_input_marks_the_same_starts():
    # Two rows of 8 tokens: [3, 5] and [4, 2, 2].
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 1, 0, 1]])
    cu_seq_lens = torch.tensor([0, 3, 8, 12, 14, 16], dtype=torch.int32)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3, 4, 4]])
    expected = position_ids == 0
    expected[:, 0] = False  # a row's first token continues the state carried in: never a start
    for inputs in ({"position_ids": position_ids}, {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens},
                   {"seq_idx": seq_idx}, {"position_ids": position_ids, "seq_idx": seq_idx}):
        torch.testing.assert_close(starts(2, 8, **inputs), expected)


def test_ordinary_positions_start_nothing_and_padding_is_never_a_start():
    assert starts(1, 6) is None  # no packing input
    assert starts(2, 1, position_ids=torch.zeros(2, 1, dtype=torch.long)) is None  # a decoding step
    assert not starts(1, 6, position_ids=torch.arange(6)[None]).any()  # ordinary positions: nothing restarts
    padding = torch.tensor([[False, False, True, True, True, True]])
    # generate's positions for left padding: 0 at the padding and at the first real token.
    assert not starts(1, 6, padding, position_ids=torch.tensor([[0, 0, 0, 1, 2, 3]])).any()


@pytest.mark.parametrize(
    "inputs,message",
    [
        ({"cu_seq_lens_q": torch.tensor([0, 5, 9])}, "ending at batch \\* seq = 16"),
        ({"cu_seq_lens_q": torch.tensor([0, 3, 11, 16])}, "runs from one row into the next"),
        ({"cu_seq_lens_q": torch.tensor([0.0, 8.0, 16.0])}, "1-D integer tensor"),
        ({"cu_seq_lens_q": torch.tensor([0, 8, 16]), "max_length_q": 4}, "`max_length_q`=4 is shorter"),
        ({"position_ids": torch.zeros(2, 7, dtype=torch.long)}, "`position_ids` must be an integer tensor"),
        ({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2), "seq_idx": torch.zeros(2, 8, dtype=torch.long)},
         "mark different sequence starts"),
    ],
)
def test_bad_packing_inputs_are_refused_in_one_line(inputs, message):
    with check_input_values(), pytest.raises(ValueError, match=message):
        starts(2, 8, **inputs)
