"""Per-token log-probability error of packed sequences against each sequence run alone.

Packs documents into one row with transformers' `DataCollatorWithFlattening` and compares each token's
log-probability of its next token with the same document run alone: once with the collator's packing inputs
(`position_ids`, `cu_seq_lens_q/k`, `seq_idx`), once with `input_ids` only, which is what minrnn saw before it
honoured them (each document then starts from the previous one's state and conv window).

    python benchmarks/packed_sequences.py --model out/tiny            # a trained checkpoint (scripts/pretrain.py)
    python benchmarks/packed_sequences.py                             # a randomly initialised model

Documents are the topics of Python's own documentation (`pydoc_data.topics`, offline), `--tokens` tokens each.
"""

import argparse
import pydoc_data.topics

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening

import modeling_minrnn  # noqa: F401 (registers model_type "minrnn" with the Auto classes)


def per_token_log_probs(model, batch):
    """log p(next token) at every position but the last, `(seq - 1,)` for a one-row batch."""
    with torch.no_grad():
        logits = model(**batch).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, batch["input_ids"][0, 1:, None]).squeeze(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder; default: a random minGRU from the library")
    parser.add_argument("--documents", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    if args.model is None:
        from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM

        torch.manual_seed(0)
        model = MinRNNForCausalLM(MinRNNConfig(vocab_size=256, hidden_size=128, num_hidden_layers=3)).eval()
        encode = lambda text: list(text.encode("utf-8"))  # noqa: E731 (bytes as tokens)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    topics = sorted(pydoc_data.topics.topics)[: args.documents]
    documents = [encode(pydoc_data.topics.topics[name])[: args.tokens] for name in topics]

    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    packed = collator([{"input_ids": ids} for ids in documents])
    packed.pop("labels")
    with_inputs = per_token_log_probs(model, packed)
    ids_only = per_token_log_probs(model, {"input_ids": packed["input_ids"]})

    print(f"{len(documents)} documents of {args.tokens} tokens packed in one row: |log p - log p alone| per token")
    print("| document | packing inputs given: max | input_ids only (before): mean / max |")
    print("| --- | --- | --- |")
    start, worst, before = 0, 0.0, []
    for number, ids in enumerate(documents, 1):
        alone = per_token_log_probs(model, {"input_ids": torch.tensor([ids])})
        # Positions start .. start + len - 2 predict tokens inside the document (the last one predicts the next).
        span = slice(start, start + len(ids) - 1)
        after, leaked = (with_inputs[span] - alone).abs(), (ids_only[span] - alone).abs()
        worst, before = max(worst, after.max().item()), before + [leaked]
        print(f"| {number} | {after.max().item():.1e} | {leaked.mean().item():.3f} / {leaked.max().item():.3f} |")
        start += len(ids)
    leaked = torch.cat(before[1:])  # the first document has nothing before it
    print(f"| all but the first | {worst:.1e} | {leaked.mean().item():.3f} / {leaked.max().item():.3f} |")


if __name__ == "__main__":
    main()
