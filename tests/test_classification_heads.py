"""The sequence and token classification heads: what they compute (against the base model's hidden states), and
that they work where transformers users reach for them: Auto classes, Trainer, pipelines, PEFT (remote code: in
test_integration.py, with the causal LM)."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    pipeline,
)

from modeling_minrnn import MinRNNForSequenceClassification, MinRNNForTokenClassification

HEADS = [MinRNNForSequenceClassification, MinRNNForTokenClassification]


def head(cls, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**{"num_labels": 3, **overrides})).eval()


def rows(lengths, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 48, (n,), generator=gen) for n in lengths]


def padded(rows, side, pad_token_id=0):
    """`(input_ids, attention_mask)` of `rows` padded on `side` with `pad_token_id`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        where = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, where], mask[i, where] = r, 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_classification_scores_each_rows_last_real_token(side):
    model = head(MinRNNForSequenceClassification)
    batch = rows((9, 4, 6))
    ids, mask = padded(batch, side)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for i, r in enumerate(batch):
            last_hidden = model.model(r[None]).last_hidden_state[0, -1]  # the row alone, unpadded
            torch.testing.assert_close(logits[i], last_hidden @ model.score.weight.T, rtol=1e-5, atol=1e-5)
        if side == "right":  # without a mask, transformers' rule: the last token that is not `pad_token_id`
            torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert logits.shape == (3, 3)


def test_sequence_classification_needs_a_way_to_tell_padding_apart():
    model = head(MinRNNForSequenceClassification, pad_token_id=None)
    ids = torch.randint(3, 48, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids)
    with torch.no_grad():  # one row, or a mask: fine
        torch.testing.assert_close(model(ids[:1]).logits, model(ids, attention_mask=torch.ones_like(ids)).logits[:1])


def test_token_classification_scores_every_token_and_ignores_minus_100():
    model = head(MinRNNForTokenClassification)
    ids, mask = padded(rows((7, 4)), "right")
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels)
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out.logits, model.score(hidden))
    real = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[real], labels[real]))


def test_sequence_classification_losses_follow_the_problem_type():
    ids = torch.randint(3, 48, (4, 6))
    model = head(MinRNNForSequenceClassification)
    labels = torch.tensor([0, 2, 1, 2])
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    assert model.config.problem_type == "single_label_classification"
    regression = head(MinRNNForSequenceClassification, num_labels=1)
    targets = torch.randn(4)
    out = regression(ids, labels=targets)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), targets))
    multi = head(MinRNNForSequenceClassification, problem_type="multi_label_classification")
    targets = torch.randint(0, 2, (4, 3)).float()
    out = multi(ids, labels=targets)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, targets))


@pytest.mark.parametrize("cls", HEADS)
def test_outputs_as_dict_and_tuple_with_hidden_states(cls):
    """What transformers' `ModelTesterMixin` checks of every head: the tuple holds the dict's fields in order, hidden
    states are each block's input and the final output, and gradients reach every parameter."""
    model = head(cls)
    ids = torch.randint(3, 48, (2, 6))
    labels = torch.zeros(2, dtype=torch.long) if cls is MinRNNForSequenceClassification else torch.zeros_like(ids)
    out = model(ids, labels=labels, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    as_tuple = model(ids, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)
    out.loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters()), "a parameter got no gradient"
    assert model.get_input_embeddings() is model.model.embeddings


def test_auto_classes_and_auto_map_load_every_head_from_any_checkpoint(tmp_path):
    lm = tiny_model(num_labels=3)
    lm.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_minrnn.MinRNNForSequenceClassification"
    assert auto_map["AutoModelForTokenClassification"] == "modeling_minrnn.MinRNNForTokenClassification"
    # A causal LM checkpoint starts a classifier: the backbone loads, the new score layer is initialised.
    for auto, cls in ((AutoModelForSequenceClassification, MinRNNForSequenceClassification),
                      (AutoModelForTokenClassification, MinRNNForTokenClassification)):
        model = auto.from_pretrained(tmp_path)
        assert type(model) is cls and model.score.out_features == 3
        torch.testing.assert_close(model.model.embeddings.weight, lm.model.embeddings.weight)


def labelled_texts(n=48, seed=0):
    """A small labelled set: the label is the class of the text's last letter (a-h, i-p, q-z)."""
    gen = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = ["".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=gen))
             for n in torch.randint(3, 12, (n,), generator=gen)]
    return texts, [min(2, letters.index(t[-1]) // 9) for t in texts]


def test_trainer_lowers_the_loss(tmp_path, char_tokenizer):
    texts, labels = labelled_texts()
    dataset = [{**char_tokenizer(t), "labels": y} for t, y in zip(texts, labels)]
    model = head(MinRNNForSequenceClassification, vocab_size=len(char_tokenizer), initializer_range=0.02).train()
    collator = DataCollatorWithPadding(char_tokenizer)
    batch = collator(dataset)

    def loss():
        with torch.no_grad():
            return model.eval()(**batch).loss.item()

    before = loss()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=40, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=100, disable_tqdm=True,
    )
    Trainer(model=model.train(), args=args, train_dataset=dataset, data_collator=collator).train()
    after = loss()
    assert after < before - 0.2, (before, after)


def test_text_classification_pipeline_batched_and_alone(char_tokenizer):
    model = head(MinRNNForSequenceClassification, vocab_size=len(char_tokenizer))
    classify = pipeline("text-classification", model=model, tokenizer=char_tokenizer)
    texts = ["a short one", "and a rather longer text"]
    batched = classify(texts, batch_size=2)  # left padded (the tokenizer's side)
    for text, result in zip(texts, batched):
        with torch.no_grad():
            probs = model(**char_tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
        assert result["label"] == model.config.id2label[int(probs.argmax())]
        assert abs(result["score"] - probs.max().item()) < 1e-5
        alone = classify(text)[0]
        assert alone["label"] == result["label"] and abs(alone["score"] - result["score"]) < 1e-5


def test_token_classification_pipeline(char_tokenizer):
    model = head(MinRNNForTokenClassification, vocab_size=len(char_tokenizer), num_labels=2,
                 id2label={0: "O", 1: "X"}, label2id={"O": 0, "X": 1}, initializer_range=0.4)
    tag = pipeline("token-classification", model=model, tokenizer=char_tokenizer)
    text = "tag some of these letters"
    entities = tag(text)
    with torch.no_grad():
        predicted = model(**char_tokenizer(text, return_tensors="pt")).logits[0].argmax(-1)
    expected = [i for i, p in enumerate(predicted.tolist()) if p == 1]
    assert expected, "degenerate test: no token tagged"
    assert [e["index"] for e in entities] == expected
    assert all(e["entity"] == "X" and text[e["start"] : e["end"]] == e["word"] for e in entities)


def test_peft_lora_sequence_classification_trains_and_reloads(tmp_path):
    peft = pytest.importorskip("peft")
    model = head(MinRNNForSequenceClassification)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["in_proj", "out_proj"],
                           lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, lora)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(".score." in n for n in trainable)  # the head is trained
    assert not any("embeddings" in n or "up_proj" in n for n in trainable)  # the backbone is frozen

    ids, mask = padded(rows((6, 9, 4, 8), seed=5), "right")
    labels = torch.tensor([0, 1, 2, 1])
    before = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        after = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        tuned = peft_model(input_ids=ids, attention_mask=mask).logits
    assert after < before - 0.1, (before, after)

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(head(MinRNNForSequenceClassification), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, tuned, rtol=1e-5, atol=1e-5)

