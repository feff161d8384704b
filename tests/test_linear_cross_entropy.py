"""The chunked linear cross-entropy against transformers' loss on the full logits: values and gradients, the
Trainer's `num_items_in_batch`, ignored positions, autocast, the model's switch, and torch.compile."""

import pytest
import torch
from conftest import tiny_model
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_minrnn.linear_cross_entropy import linear_cross_entropy


def _inputs(batch=2, seq=37, hidden=16, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 0.3
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :5] = -100  # e.g. a prompt not trained on
    labels[1, -3:] = -100  # e.g. padding
    return hidden_states, weight, labels


def _loss_and_grads(loss_fn, hidden_states, weight):
    hidden_states = hidden_states.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss = loss_fn(hidden_states, weight)
    (loss * 3.0).backward()  # a scale on the loss reaches both gradients
    return loss.detach(), hidden_states.grad, weight.grad


@pytest.mark.parametrize("chunk_size", [1, 8, 512])  # 8 does not divide the 74 positions
@pytest.mark.parametrize("num_items_in_batch", [None, 100])
def test_equals_transformers_loss_on_the_full_logits(chunk_size, num_items_in_batch):
    hidden_states, weight, labels = _inputs()
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    want = _loss_and_grads(
        lambda h, w: ForCausalLMLoss(h @ w.t(), labels, w.shape[0], **kwargs), hidden_states, weight
    )
    got = _loss_and_grads(
        lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=chunk_size, **kwargs), hidden_states, weight
    )
    for g, w in zip(got, want):  # fp64 here; transformers' loss upcasts its logits to fp32 only
        torch.testing.assert_close(g.to(w.dtype), w, rtol=1e-6, atol=1e-8)


def test_shift_labels_are_used_as_given():
    hidden_states, weight, labels = _inputs()
    shifted = torch.roll(labels, 3, dims=1)
    want = ForCausalLMLoss(hidden_states @ weight.t(), None, weight.shape[0], shift_labels=shifted)
    got = linear_cross_entropy(hidden_states, weight, None, shift_labels=shifted)
    torch.testing.assert_close(got.float(), want)


def test_under_bf16_autocast_it_is_as_accurate_as_the_unfused_loss():
    hidden_states, weight, labels = _inputs(vocab=300)
    exact = _loss_and_grads(lambda h, w: ForCausalLMLoss(h @ w.t(), labels, 300), hidden_states, weight)

    def under_autocast(fn):
        def run(h, w):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, w)
        return run

    fp32 = [t.float() for t in (hidden_states, weight)]
    unfused = _loss_and_grads(
        under_autocast(lambda h, w: ForCausalLMLoss(torch.nn.functional.linear(h, w), labels, 300)), *fp32
    )
    fused = _loss_and_grads(under_autocast(lambda h, w: linear_cross_entropy(h, w, labels, chunk_size=16)), *fp32)
    assert fused[1].dtype == fused[2].dtype == torch.float32  # the parameters' dtype, as autocast's linear gives
    def error(got, want):  # relative to the largest exact value
        return ((got.double() - want).abs().max() / want.abs().max()).item()

    for f, u, e in zip(fused, unfused, exact):
        assert error(f, e) <= 2 * error(u, e) + 1e-6, (error(f, e), error(u, e))


def test_mismatched_labels_are_refused_in_one_line():
    hidden_states, weight, labels = _inputs()
    with pytest.raises(ValueError, match="one target per position: 74 positions, 72 targets"):
        linear_cross_entropy(hidden_states, weight, labels[:, :-1])


def _model_loss_and_grads(model, ids, **kwargs):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids, **kwargs)
    out.loss.backward()
    return out, [p.grad.clone() for p in model.parameters()]


def test_the_model_switch_gives_the_same_training_loss_and_gradients_without_logits():
    ids = torch.randint(3, 48, (2, 30), generator=torch.Generator().manual_seed(1))
    plain = tiny_model().train()
    fused = tiny_model(fused_linear_cross_entropy=True).train()
    want, want_grads = _model_loss_and_grads(plain, ids, num_items_in_batch=torch.tensor(40))
    got, got_grads = _model_loss_and_grads(fused, ids, num_items_in_batch=torch.tensor(40))
    assert got.logits is None and want.logits is not None
    torch.testing.assert_close(got.loss, want.loss)
    for g, w in zip(got_grads, want_grads):  # the tied head/embedding included
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # Evaluation keeps the logits (metrics read them) and the same loss.
    with torch.no_grad():
        evaluated = fused.eval()(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(40))
    assert evaluated.logits is not None
    torch.testing.assert_close(evaluated.loss, want.loss)


def test_a_lora_head_keeps_the_unfused_loss():
    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 48, (2, 20), generator=torch.Generator().manual_seed(2))
    model = tiny_model(fused_linear_cross_entropy=True)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    lora.train()
    out = lora(input_ids=ids, labels=ids)
    assert out.logits is not None  # the adapter's contribution is in the loss: the head ran as a module
    torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, ids, model.config.vocab_size))


def test_fullgraph_compile_of_the_fused_loss_matches_eager():
    torch._dynamo.reset()
    model = tiny_model(fused_linear_cross_entropy=True).train()
    ids = torch.randint(3, 48, (2, 24), generator=torch.Generator().manual_seed(3))
    eager, eager_grads = _model_loss_and_grads(model, ids)
    compiled, compiled_grads = _model_loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), ids)
    torch.testing.assert_close(compiled.loss, eager.loss)
    for g, w in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
