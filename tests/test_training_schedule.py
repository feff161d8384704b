"""minrnn_training.schedule: the one learning-rate schedule and weight-decay policy of every training script."""

import pytest
import torch
from conftest import tiny_model

from minrnn_training.schedule import decay_groups, lr_at, set_lr


def test_learning_rate_schedule():
    schedule = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "max_steps": 110}
    assert lr_at(0, **schedule) == pytest.approx(0.1)
    assert lr_at(9, **schedule) == pytest.approx(1.0)
    assert lr_at(60, **schedule) == pytest.approx(0.55)
    assert lr_at(110, **schedule) == pytest.approx(0.1)
    assert lr_at(500, **schedule) == pytest.approx(0.1)  # held after max_steps (a time budget may overrun)
    assert lr_at(60.5, **schedule) < lr_at(60, **schedule)  # fractional steps: schedules over a time budget
    assert lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10) == pytest.approx(1.0)


def test_weight_decay_on_matrices_and_embeddings_only():
    model = tiny_model(tie_word_embeddings=True)
    decayed, plain = decay_groups(model, 0.1)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)
    decayed_ids, plain_ids = ({id(p) for p in group["params"]} for group in (decayed, plain))
    assert id(model.get_input_embeddings().weight) in decayed_ids  # tied to the output head: listed once
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm))]
    assert norms and all(id(p) in plain_ids for norm in norms for p in norm.parameters())
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW([decayed, plain])
    set_lr(optimizer, 0.25)
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.25]
