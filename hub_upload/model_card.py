"""The model card (README.md) of a published minrnn checkpoint, written only from recorded facts.

Inputs are plain data (no torch, no transformers): the checkpoint's ``config.json``, the facts the
verification subprocess measured (parameter count), and ``training_summary.json`` if the pretraining
script wrote one. Anything absent is printed as "not recorded"; nothing is guessed. huggingface_hub's
``ModelCardData`` writes the metadata block and ``ModelCard.from_template`` fills ``CARD_TEMPLATE`` (Jinja).
The output is deterministic, so re-publishing an unchanged checkpoint produces a byte-identical card (and
no commit).
"""

from __future__ import annotations

import json
import math
import re

from huggingface_hub import ModelCard, ModelCardData

from modeling_minrnn.cells import CELLS

NOT_RECORDED = "not recorded"
LOSS_CURVE_FILE = "loss_curve.png"
USAGE_PROMPT = "Once upon a time"

# Keys of training_summary.json and the Python types the card accepts for them.
SUMMARY_TYPES = {
    "dataset": str,
    "tokens_seen": int,
    "steps": int,
    "final_eval_loss": (int, float),
    "final_eval_perplexity": (int, float),
    "config": dict,
}

CITATION = """\
@article{feng2024were,
  title   = {Were {RNN}s All We Needed?},
  author  = {Feng, Leo and Tung, Frederick and Ahmed, Mohamed Osama and Bengio, Yoshua and Hajimirsadeghi, Hossein},
  journal = {arXiv preprint arXiv:2410.01201},
  year    = {2024}
}"""

CELL_NAMES = {cell_type: cell.name for cell_type, cell in CELLS.items()}
# A Hub dataset id: "namespace/name", or a legacy bare "name" (no dot there: "pydoc_data.topics" is a module).
# Anything else stays out of the YAML metadata, where the Hub expects ids, and is described in the card's body.
_HUB_DATASET_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*|[A-Za-z0-9][\w-]*)$")
# Local files as the pretraining script takes them (a path, a glob or a comma list) end in a data file suffix.
_DATA_FILE_SUFFIX = re.compile(r"\.(txt|text|jsonl|json|parquet|csv|arrow)(\.(gz|bz2|xz|zst))?$", re.IGNORECASE)
# Corpora that ship inside Python rather than on the Hub (`minrnn_training.data.DEFAULT_CORPUS`).
EMBEDDED_CORPORA = {
    "pydoc_data.topics": "CPython's documentation topics (`pydoc_data.topics`, ~465k characters shipped with every "
                         "Python; the pretraining script's embedded default corpus)",
}


def hub_dataset_id(dataset: str) -> str | None:
    """``dataset`` if it names a Hub dataset, None for an embedded corpus or local files."""
    if dataset in EMBEDDED_CORPORA or _DATA_FILE_SUFFIX.search(dataset) or not _HUB_DATASET_ID.match(dataset):
        return None
    return dataset


def _describe_dataset(dataset: str) -> str:
    """The training data for the card's body: a link for a Hub id, words for anything else."""
    if hub_dataset_id(dataset):
        return f"[`{dataset}`](https://huggingface.co/datasets/{dataset})"
    if dataset in EMBEDDED_CORPORA:
        return EMBEDDED_CORPORA[dataset]
    return f"local files `{dataset}` (not published)"


def check_training_summary(summary: dict) -> list[str]:
    """Problems with a ``training_summary.json`` (wrong types); an empty list if it can be used."""
    problems = []
    for key, expected in SUMMARY_TYPES.items():
        value = summary.get(key)
        # bool is an int subclass, but `tokens_seen: true` is not a count.
        if value is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            problems.append(f"training_summary.json: {key!r} must be {names}, got {type(value).__name__} {value!r}")
    return problems


def _card_data(config: dict, summary: dict, license: str) -> ModelCardData:
    cell = config.get("cell_type", "mingru")
    dataset = hub_dataset_id(summary.get("dataset") or "")
    return ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license=license,
        tags=["minrnn", CELL_NAMES.get(cell, cell), "rnn", "linear-recurrence", "custom_code"],
        datasets=None if dataset is None else [dataset],
    )


def _fmt_count(n: int | None) -> str:
    if n is None:
        return NOT_RECORDED
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.1f}{unit})"
    return f"{n:,}"


def _fmt_float(x: float | None) -> str:
    if x is None:
        return NOT_RECORDED
    return f"{x:.4f}" if math.isfinite(x) else str(x)


def _block_description(config: dict, cell: str) -> str:
    """One block as the paper's language model wires it; conv and MLP are off when their size is 0."""
    conv, mlp = config.get("conv_kernel"), config.get("intermediate_size")
    if conv is None or mlp is None:
        return f"Block layout: {NOT_RECORDED}."
    mixer = ["LayerNorm"] + ([f"causal depthwise conv (kernel {conv})"] if conv else []) + [
        f"{cell} (expanded, projected back)", "residual"]
    text = "Each block: " + " -> ".join(mixer)
    return text + ("; LayerNorm -> MLP -> residual." if mlp else "; no MLP.")


def _usage(repo_id: str, revision: str | None, config: dict, has_tokenizer: bool) -> str:
    rev = f', revision="{revision}"' if revision else ""
    if not has_tokenizer:
        bos = config.get("bos_token_id")
        start = bos if isinstance(bos, int) else 0
        return f"""\
This checkpoint ships **no tokenizer**: the model takes token ids (integers in `[0, {config.get("vocab_size")})`)
and generates token ids. Encode and decode them with the tokenizer the model was trained with.

```python
import torch
from transformers import AutoModelForCausalLM

# trust_remote_code: the minGRU/minLSTM code ships with the checkpoint (configuration_minrnn.py, modeling_minrnn.py).
model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev}, trust_remote_code=True)

input_ids = torch.tensor([[{start}]])  # your prompt's token ids, shape (batch, seq)
output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=40, do_sample=True,
                        top_k=50)
print(output[0].tolist())  # token ids: the prompt's, then the generated ones
```"""
    return f"""\
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

# trust_remote_code: the minGRU/minLSTM code ships with the checkpoint (configuration_minrnn.py, modeling_minrnn.py);
# AutoTokenizer reads config.json too, so it needs the flag as well.
tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev}, trust_remote_code=True)

inputs = tokenizer("{USAGE_PROMPT}", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=40, do_sample=True, top_k=50)
print(tokenizer.decode(output[0], skip_special_tokens=True))
```"""


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A {{ cell }} language model built with minrnn, from the paper
[*Were RNNs All We Needed?*](https://arxiv.org/abs/2410.01201) (Feng et al., 2024).
Each layer is a minimal recurrent cell whose gates depend only on the input, so training runs a
parallel scan over the sequence while generation keeps a fixed-size state per layer (memory does not
grow with the context).

## Architecture

| | |
| --- | --- |
{% for name, value in architecture %}| {{ name }} | {{ value }} |
{% endfor %}
{{ block }}

## Training

| | |
| --- | --- |
{% for name, value in training %}| {{ name }} | {{ value }} |
{% endfor %}
{% if settings is none %}Training settings: {{ not_recorded }}.{% else %}Training settings, as recorded by the \
pretraining script:

```json
{{ settings }}
```{% endif %}

{% if has_loss_curve %}![Training and evaluation loss]({{ loss_curve }}){% else %}Loss curve: {{ not_recorded }}.\
{% endif %}

## Usage

{{ usage }}

Generation carries one fixed-size recurrent state per layer from token to token, so each new
token costs the same at any context length.

## Limitations

- A research model trained on {{ data_note }} only: it imitates the style of that text and
  produces fluent-looking but made-up content. It is not instruction-tuned, not aligned, and not
  suitable for factual or safety-relevant use.
- {% if evaluated %}The evaluation numbers above are those the pretraining script recorded on its evaluation split \
of the training data; they say nothing about other domains.{% else %}No evaluation was recorded for this \
checkpoint.{% endif %}
- A fixed-size recurrent state must compress the whole context: exact recall of details far back
  in a long prompt is weaker than in a Transformer of similar size.
- Loading runs the model code shipped in this repository (`trust_remote_code=True`); review it first.

## Citation

```bibtex
{{ citation }}
```

"""  # Jinja drops the template's last newline: the card ends in one.


def render_model_card(
    repo_id: str,
    config: dict,
    facts: dict,
    summary: dict | None,
    *,
    license: str,
    revision: str | None = None,
    has_loss_curve: bool = False,
    has_tokenizer: bool = True,
) -> str:
    """The README.md text: YAML metadata block, then a body built from the checkpoint's facts.

    Args:
        repo_id: ``namespace/name`` on the Hub, used in the title and the usage snippet.
        config: the checkpoint's ``config.json`` as a dict.
        facts: measured by loading the checkpoint; ``num_parameters`` (int) is used.
        summary: ``training_summary.json`` as a dict (already checked), or None if absent.
        license: the license id for the metadata (e.g. ``"apache-2.0"``).
        revision: branch the snippet loads from; None for the default branch.
        has_loss_curve: whether ``loss_curve.png`` is published next to the card.
        has_tokenizer: whether a tokenizer is published; without one the usage shows token ids in and out.
    """
    summary = summary or {}
    cell = CELL_NAMES.get(config.get("cell_type"), str(config.get("cell_type", NOT_RECORDED)))
    dataset = summary.get("dataset")

    def cfg(key):
        value = config.get(key)
        return NOT_RECORDED if value is None else f"{value}"

    card = ModelCard.from_template(
        _card_data(config, summary, license),
        template_str=CARD_TEMPLATE,
        title=repo_id.split("/")[-1],
        cell=cell,
        architecture=[
            ("Cell", cell),
            ("Layers", cfg("num_hidden_layers")),
            ("Hidden size", cfg("hidden_size")),
            ("Expansion factor", cfg("expansion_factor")),
            ("Causal conv kernel", cfg("conv_kernel")),
            ("MLP intermediate size", cfg("intermediate_size")),
            ("Vocabulary size", cfg("vocab_size")),
            ("Tied embeddings", cfg("tie_word_embeddings")),
            ("Parameters", _fmt_count(facts.get("num_parameters"))),
        ],
        block=_block_description(config, cell),
        training=[
            ("Dataset", _describe_dataset(dataset) if dataset is not None else NOT_RECORDED),
            ("Tokens seen", _fmt_count(summary.get("tokens_seen"))),
            ("Optimizer steps", _fmt_count(summary.get("steps"))),
            ("Final eval loss (nats/token)", _fmt_float(summary.get("final_eval_loss"))),
            ("Final eval perplexity", _fmt_float(summary.get("final_eval_perplexity"))),
        ],
        settings=json.dumps(summary["config"], indent=2, sort_keys=True) if "config" in summary else None,
        has_loss_curve=has_loss_curve,
        loss_curve=LOSS_CURVE_FILE,
        not_recorded=NOT_RECORDED,
        usage=_usage(repo_id, revision, config, has_tokenizer),
        data_note=_describe_dataset(dataset) if dataset is not None else "its training data (not recorded)",
        evaluated=summary.get("final_eval_loss") is not None,
        citation=CITATION,
    )
    return str(card)
