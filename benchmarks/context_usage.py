"""Does the model use the context? Held-out loss per token as a function of its position in the document.

Three models trained with the same recipe, data and token budget on blocks of `--block-size` tokens:

- `mingru-zero-state`: minGRU on random blocks, each from a zero state (what `scripts/pretrain.py` does by default);
- `mingru-carried`: the same minGRU, each batch row reading its own contiguous stream with the final state of one
  block carried (detached) into the next (`minrnn_training.carried_state`, as `pretrain.py --carry-state`);
- `llama`: a parameter-matched transformers `LlamaForCausalLM` on the same random blocks, its window = the block.

Evaluation on held-out text: `--windows` windows of `--doc-tokens` + 1 tokens evenly spaced over the held-out
stream (they overlap where it is shorter than windows x doc_tokens), each scored from its first token as if the
document started there. The minGRUs run the whole window through the recurrence in chunks
of `--eval-chunk` tokens with the cache (prefill-style, exactly one forward over the window). Llama cannot see
beyond its window: it is evaluated with a sliding window of `block_size` tokens moved by `block_size / 2`, each
token scored once with between `block_size / 2` and `block_size - 1` tokens of context (all earlier tokens in the
first window). Losses are averaged in log-spaced buckets of position `t` (the number of tokens before the scored
one): `[1, 2), [2, 4), ..., [doc_tokens / 2, doc_tokens]`.

Corpora:
- `shakespeare`: `--data` tinyshakespeare.txt, character level, last 10% held out (nanoGPT's split); one document.
- `pydoc`: the embedded corpus (`pydoc_data.topics`, via `minrnn_training.data`), byte-level BPE (1024) trained on
  the training part; the last 20% of characters held out (10% would give fewer than 16k tokens). No topic is 16k
  tokens long, so the held-out topics are concatenated, EOS between them, into one stream: here "position in the
  document" is the position in that stream, and the carried model is trained without resets at EOS to match.

    nice -n 5 python benchmarks/context_usage.py --corpus shakespeare --data data/tinyshakespeare.txt
    nice -n 5 python benchmarks/context_usage.py --corpus pydoc
    python benchmarks/context_usage.py --report      # tables and plot from the JSON only

Each trained model's numbers go into `--out`/context_usage.json as soon as it is done (a rerun of one corpus and
model replaces its entry); the Markdown table and the PNG are rewritten from the JSON after each.
"""

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minrnn_training.carried_state import CarriedState
from minrnn_training.data import PackedBlocks, TokenStreams, load_text_splits, tokenize_documents
from minrnn_training.schedule import lr_at
from minrnn_training.step import backward, make_optimizer, one_process_accelerator, optimizer_step
from minrnn_training.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]

MODELS = ("mingru-zero-state", "mingru-carried", "llama")
VAL_FRACTION = {"shakespeare": 0.1, "pydoc": 0.2}


def load_corpus(corpus: str, data: str | None):
    """`(train_tokens, heldout_tokens, tokenizer)`: int64 token streams (documents joined by EOS)."""
    if corpus == "shakespeare":
        if not data or not os.path.isfile(data):
            raise SystemExit(f"error: --corpus shakespeare needs --data pointing at tinyshakespeare.txt (got {data!r})")
        splits = load_text_splits(data, val_fraction=VAL_FRACTION[corpus])
    else:
        splits = load_text_splits(None, val_fraction=VAL_FRACTION[corpus])
    tokenizer = train_tokenizer(splits.train, char_level=corpus == "shakespeare", vocab_size=1024)
    eos = tokenizer.eos_token_id
    train, heldout = (tokenize_documents(texts, tokenizer, eos) for texts in (splits.train, splits.validation))
    return train, heldout, tokenizer


def build_model(kind: str, vocab_size: int, args):
    """The minGRU of both RNN runs, or a Llama whose MLP width makes its parameter count the minGRU's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM

    torch.manual_seed(args.seed)
    rnn_config = MinRNNConfig(
        vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers, cell_type="mingru",
        expansion_factor=2.0, conv_kernel=4, intermediate_size=4 * args.hidden_size, tie_word_embeddings=True,
    )
    if kind != "llama":
        return MinRNNForCausalLM(rnn_config)
    target = MinRNNForCausalLM(rnn_config).num_parameters()

    def llama(intermediate: int):
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
            num_attention_heads=4, num_key_value_heads=4, intermediate_size=intermediate,
            max_position_embeddings=args.block_size, tie_word_embeddings=True,
        )
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)

    # Parameters grow by 3 * hidden * layers per unit of MLP width: solve for the width, then build.
    base = llama(0).num_parameters()
    intermediate = max(1, round((target - base) / (3 * args.hidden_size * args.layers)))
    torch.manual_seed(args.seed)
    return llama(intermediate)


def train(model, kind: str, tokens: np.ndarray, args) -> dict:
    """`args.steps` AdamW steps of `batch_size` blocks of `block_size` inputs (and as many targets) each."""
    accelerator = one_process_accelerator(torch.device("cpu"))
    model, optimizer = accelerator.prepare(model, make_optimizer(model, lr=args.lr, weight_decay=0.1))
    if kind == "mingru-carried":
        streams = TokenStreams(tokens, args.batch_size, args.block_size)
        carried = CarriedState(args.batch_size, "none")
    else:
        blocks = PackedBlocks(tokens, args.block_size + 1, args.seed)  # + 1: the last input's target
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        def forward_backward(_, step=step):
            if kind == "mingru-carried":
                inputs, targets = (torch.from_numpy(part) for part in streams.block(step, range(args.batch_size)))
                out = carried.forward(model, inputs, targets, slice(None), step, fresh=streams.starts_epoch(step))
            else:
                rows = torch.from_numpy(blocks.batch(step, args.batch_size))
                inputs, targets = rows[:, :-1], rows[:, 1:].contiguous()
                out = model(input_ids=inputs, labels=inputs, shift_labels=targets, use_cache=False)
            return backward(accelerator, out.loss)

        # pretrain.py's schedule, cosine to a tenth of the peak.
        lr = lr_at(step, lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup_steps, max_steps=args.steps)
        losses.append(optimizer_step(accelerator, model, optimizer, forward_backward, lr=lr, grad_clip=1.0).loss)
        if (step + 1) % 100 == 0:
            print(f"  {kind} step {step + 1}/{args.steps}: loss {np.mean(losses[-100:]):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return {"train_seconds": time.perf_counter() - start, "final_train_loss": float(np.mean(losses[-50:])),
            "epochs": args.steps * args.batch_size * args.block_size / len(tokens)}


def eval_windows(heldout: np.ndarray, doc_tokens: int, count: int) -> torch.Tensor:
    """`count` evenly spaced windows of `doc_tokens + 1` held-out tokens (from the first to the last token),
    `(count, doc_tokens + 1)`."""
    if len(heldout) < doc_tokens + 1:
        raise SystemExit(f"error: the held-out text has {len(heldout)} tokens, fewer than --doc-tokens + 1")
    starts = np.linspace(0, len(heldout) - doc_tokens - 1, count).round().astype(int)
    return torch.from_numpy(np.stack([heldout[s : s + doc_tokens + 1] for s in starts]))


@torch.no_grad()
def recurrent_losses(model, windows: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token loss `(windows, doc_tokens)`: the whole window through the recurrence, chunk after chunk."""
    from modeling_minrnn import MinRNNCache

    model.eval()
    cache, losses = MinRNNCache(model.config), []
    inputs, targets = windows[:, :-1], windows[:, 1:]
    for begin in range(0, inputs.shape[1], chunk):
        logits = model(inputs[:, begin : begin + chunk], cache=cache, use_cache=True).logits
        scored = targets[:, begin : begin + chunk]
        losses.append(F.cross_entropy(logits.transpose(1, 2).float(), scored, reduction="none"))
    return torch.cat(losses, dim=1)


@torch.no_grad()
def sliding_window_losses(model, windows: torch.Tensor, window: int, batch: int = 256) -> torch.Tensor:
    """Per-token loss `(windows, doc_tokens)` of a model with a `window`-token context: windows moved by
    `window // 2`; each scores its last `window // 2` targets (the first window all of them)."""
    model.eval()
    inputs, targets = windows[:, :-1], windows[:, 1:]
    length, stride = inputs.shape[1], window // 2
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    # Each window scores the targets the previous one did not reach: at least `window - stride` tokens of context.
    scored_from = {start: 0 if i == 0 else starts[i - 1] + window - start for i, start in enumerate(starts)}
    losses = torch.full(targets.shape, float("nan"))
    pieces = [(row, start) for row in range(inputs.shape[0]) for start in starts]
    for first in range(0, len(pieces), batch):
        group = pieces[first : first + batch]
        x = torch.stack([inputs[row, start : start + window] for row, start in group])
        y = torch.stack([targets[row, start : start + window] for row, start in group])
        nll = F.cross_entropy(model(input_ids=x).logits.transpose(1, 2).float(), y, reduction="none")
        for (row, start), values in zip(group, nll):
            losses[row, start + scored_from[start] : start + window] = values[scored_from[start] :]
    return losses


def bucket_edges(doc_tokens: int) -> list[int]:
    """Log-spaced position buckets `[1, 2), [2, 4), ...`; the last one ends at `doc_tokens` (inclusive)."""
    edges = [1]
    while edges[-1] * 2 < doc_tokens:
        edges.append(edges[-1] * 2)
    return [*edges, doc_tokens + 1]


def bucket_means(losses: torch.Tensor, edges: list[int]) -> list[float]:
    """Mean loss per bucket; column `j` of `losses` is the target at position `t = j + 1`."""
    return [float(losses[:, lo - 1 : hi - 1].mean()) for lo, hi in itertools.pairwise(edges)]


# ------------------------------------------------------------------------------------------------- report


def write_report(results: dict, out: Path) -> None:
    """`context_usage.md` (one table per corpus) and `context_usage.png` (one panel per corpus) from the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = [name for name in ("shakespeare", "pydoc") if name in results]
    lines = ["# Held-out loss by position in the document", "",
             "Written by `benchmarks/context_usage.py` (commands and settings in each section). Loss in nats per",
             "token, averaged over every held-out window; position `t` = tokens before the scored one.", ""]
    fig, axes = plt.subplots(1, max(1, len(corpora)), figsize=(6.5 * max(1, len(corpora)), 4.5), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        entry = results[corpus]
        setup, edges = entry["setup"], entry["setup"]["bucket_edges"]
        names = [name for name in MODELS if name in entry["models"]]
        lines += [f"## {corpus}", "", f"`{setup['command']}`", "",
                  (f"{setup['corpus_note']}; {setup['train_tokens']:,} training tokens, held-out windows: "
                   f"{setup['windows']} x {setup['doc_tokens']:,} tokens from {setup['heldout_tokens']:,}; "
                   f"{setup['steps']} steps x "
                   f"{setup['batch_size']} x {setup['block_size']} tokens; lr {setup['lr']}; {setup['machine']}."), "",
                  "| model | parameters | train loss (last 50 steps) | training time | "
                  + " | ".join(f"t = {lo}" if hi - 1 == lo else f"{lo}-{hi - 1}"
                               for lo, hi in itertools.pairwise(edges))
                  + " |",
                  "| --- | --- | --- | --- | " + " | ".join("---" for _ in edges[:-1]) + " |"]
        centers = [math.sqrt(lo * (hi - 1)) if hi - 1 > lo else lo for lo, hi in itertools.pairwise(edges)]
        for name in names:
            model = entry["models"][name]
            lines.append(f"| {name} | {model['parameters']:,} | {model['final_train_loss']:.3f} | "
                         f"{model['train_seconds'] / 60:.1f} min | "
                         + " | ".join(f"{value:.3f}" for value in model["bucket_loss"]) + " |")
            ax.plot(centers, model["bucket_loss"], "o-", label=f"{name} ({model['parameters'] / 1e6:.2f}M)")
        lines += ["| scored tokens per bucket | | | | " + " | ".join(
            f"{setup['windows'] * (hi - lo):,}" for lo, hi in itertools.pairwise(edges)) + " |", ""]
        ax.axvline(setup["block_size"], color="gray", linestyle=":", label=f"training block ({setup['block_size']})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the document (tokens before)")
        ax.set_ylabel("held-out loss (nats / token)")
        ax.set_title(f"{corpus} ({setup['tokenizer']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "context_usage.png", dpi=120)
    plt.close(fig)
    (out / "context_usage.md").write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=("shakespeare", "pydoc"))
    parser.add_argument("--data", default=None, help="tinyshakespeare.txt (for --corpus shakespeare)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--report", action="store_true", help="only rewrite the table and plot from the JSON")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--doc-tokens", type=int, default=16384)
    parser.add_argument("--windows", type=int, default=32, help="held-out windows (documents) scored")
    parser.add_argument("--eval-chunk", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "context_usage.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if args.report:
        write_report(results, args.out)
        return
    if args.corpus is None:
        parser.error("give --corpus (or --report)")
    torch.set_num_threads(args.threads)

    train_tokens, heldout, tokenizer = load_corpus(args.corpus, args.data)
    windows = eval_windows(heldout, args.doc_tokens, args.windows)
    edges = bucket_edges(args.doc_tokens)
    note = ("tinyshakespeare, character level, last 10% held out" if args.corpus == "shakespeare" else
            "pydoc_data.topics, byte-level BPE 1024, last 20% of characters held out, topics concatenated with EOS")
    command = " ".join(["python", "benchmarks/context_usage.py", *sys.argv[1:]])
    entry = results.setdefault(args.corpus, {"models": {}})
    entry["setup"] = {
        "command": command, "corpus_note": note, "tokenizer": "characters" if args.corpus == "shakespeare" else "BPE",
        "train_tokens": len(train_tokens), "heldout_tokens": len(heldout), "windows": len(windows),
        "doc_tokens": args.doc_tokens, "bucket_edges": edges, "steps": args.steps, "batch_size": args.batch_size,
        "block_size": args.block_size, "lr": args.lr, "eval_chunk": args.eval_chunk,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch "
                   "thread(s), other jobs running",
    }
    for kind in args.models:
        model = build_model(kind, len(tokenizer), args)
        print(f"{args.corpus} / {kind}: {model.num_parameters():,} parameters", flush=True)
        stats = train(model, kind, train_tokens, args)
        start = time.perf_counter()
        if kind == "llama":
            losses = sliding_window_losses(model, windows, args.block_size)
        else:
            losses = recurrent_losses(model, windows, args.eval_chunk)
        entry["models"][kind] = {"parameters": model.num_parameters(), **stats,
                                 "eval_seconds": time.perf_counter() - start,
                                 "mean_loss": float(losses.mean()), "bucket_loss": bucket_means(losses, edges)}
        print(f"  {kind}: " + " ".join(f"{v:.3f}" for v in entry["models"][kind]["bucket_loss"]), flush=True)
        path.write_text(json.dumps(results, indent=2))
        write_report(results, args.out)


if __name__ == "__main__":
    main()
