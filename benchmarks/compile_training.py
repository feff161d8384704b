"""Training tokens/s of a minGRU LM, eager against `torch.compile`, fp32 and bf16, beside GPT-2 (sdpa) at equal
parameters.

    python benchmarks/compile_training.py [--quick] [--seqs 1024 4096] [--tokens-per-step 8192]
                                          [--precisions fp32 bf16] [--out DIR]

One process, side by side, so the ratios hold for the machine of the run. Each model trains (forward + backward +
AdamW) on the same tokens per step at each length, eager and with `torch.compile(model)` (inductor), in fp32 and in
bf16 mixed precision (`torch.autocast`, fp32 weights: what accelerate's `mixed_precision="bf16"` runs), one untimed
warm-up step each (the compile), then rounds of one step of every candidate in turn. Rows:

- minrnn (auto): the default backend, the native CPU kernel where it builds (a `torch.library` operator, kept in the
  compiled graph), with transformers' loss on the full logits.
- minrnn (auto, fused loss): the same with `fused_linear_cross_entropy=True` (the loss from the hidden states, chunk
  by chunk, never the `(tokens, vocab)` logits: `modeling_minrnn/linear_cross_entropy.py`).
- minrnn (chunked scan): `scan_backend="chunked"`, the PyTorch scan, eager (compiled, `--compile-chunked`: its
  unrolled loops take tens of minutes of inductor on 2 cores); what `torch.compile` ran before the kernel was an
  operator.
- GPT-2 (sdpa): the same hidden size and layers as `benchmarks/benchmark.py` builds, within 5% of minrnn's
  parameters (GPT-2's position table left out of the count: it costs no compute), as transformers ships it.
- GPT-2 (sdpa, fused loss): GPT-2's hidden states through the same fused loss, to show how much of minrnn's lead is
  the loss rather than the recurrence (the head and vocabulary are the same).

Writes `compile_training_<device>.md` and `.json` under `--out` (default `benchmarks/results`).
"""

import argparse
import contextlib
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
from transformers.modeling_outputs import CausalLMOutput

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import FULL, QUICK, build_gpt2, build_minrnn, count_params, machine_description, median_seconds  # noqa: E402

from modeling_minrnn import MinRNNForCausalLM  # noqa: E402
from modeling_minrnn.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from modeling_minrnn.scan import resolve_backend  # noqa: E402

PRECISIONS = ("fp32", "bf16")


class GPT2FusedLoss(torch.nn.Module):
    """GPT-2's transformer and head, the loss computed by minrnn's fused linear cross-entropy."""

    def __init__(self, gpt2):
        super().__init__()
        self.gpt2 = gpt2

    def forward(self, input_ids, labels, **kwargs):
        hidden = self.gpt2.transformer(input_ids=input_ids, use_cache=False).last_hidden_state
        return CausalLMOutput(loss=linear_cross_entropy(hidden, self.gpt2.lm_head.weight, labels))


def candidates(sizes, device):
    """name -> (a function building a fresh model, whether to compile it by default)."""
    def minrnn(backend, fused=False):
        config = build_minrnn(sizes).config
        config.scan_backend = backend
        config.fused_linear_cross_entropy = fused
        return MinRNNForCausalLM(config)

    native = resolve_backend("auto", torch.zeros(1, device=device))
    return {f"minrnn (auto: {native} scan)": (functools.partial(minrnn, "auto"), True),
            f"minrnn (auto: {native} scan, fused loss)": (functools.partial(minrnn, "auto", True), True),
            "minrnn (chunked scan)": (functools.partial(minrnn, "chunked"), False),
            "GPT-2 (sdpa)": (functools.partial(build_gpt2, sizes), True),
            "GPT-2 (sdpa, fused loss)": (lambda: GPT2FusedLoss(build_gpt2(sizes)), True)}


def autocast(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def bench(device, sizes, seqs, tokens_per_step, repeats, precisions, only=None, compile_chunked=False):
    """Per length: every candidate built (and compiled) and warmed up, then `repeats` rounds of one step each, in
    turn, so that load from other processes hits every candidate alike; the median step of each is reported."""
    rows = []
    for seq in seqs:
        batch = max(1, tokens_per_step // seq)
        ids = torch.randint(0, sizes.vocab_size, (batch, seq), device=device)
        steps = {}
        for name, (build, compile_it) in candidates(sizes, device).items():
            if only and not any(word.lower() in name.lower() for word in only):
                continue
            for precision in precisions:
                for mode in ("eager", "compile"):
                    if mode == "compile" and not (compile_it or compile_chunked):
                        continue
                    torch.manual_seed(0)
                    model = build().to(device).train()
                    forward = torch.compile(model) if mode == "compile" else model
                    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

                    def step(forward=forward, optimizer=optimizer, ids=ids, precision=precision):
                        with autocast(device, precision):
                            loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)

                    step()  # warm-up: the compile
                    steps[(name, precision, mode)] = (step, count_params(model, exclude=("wpe",)), [])
        for _ in range(repeats):
            for step, _, times in steps.values():
                times.append(median_seconds(step, device, repeats=1, warmup=0))
        for (name, precision, mode), (_, params, times) in steps.items():
            rows.append({"model": name, "precision": precision, "mode": mode, "seq": seq, "batch": batch,
                         "params": params, "tokens_per_s": batch * seq / statistics.median(times)})
            print(f"{name:38} {precision} {mode:8} T={seq:5}  {rows[-1]['tokens_per_s']:9,.0f} tok/s", flush=True)
        torch._dynamo.reset()
    return rows


def report(rows, seqs, machine, command):
    by = {(r["model"], r["precision"], r["mode"], r["seq"]): r["tokens_per_s"] for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    native, fused, _, gpt2, gpt2_fused = models
    lines = [
        "# torch.compile and training speed",
        "",
        f"`{command}`",
        "",
        machine,
        "",
        "Training tokens/s (forward + backward + AdamW; median of the timed steps; higher is better). bf16: autocast "
        "with fp32 weights.",
        "",
        "| model | precision | params | " + " | ".join(f"T = {s:,} eager | T = {s:,} compiled" for s in seqs) + " |",
        "| --- | --- | --- | " + " | ".join("--- | ---" for _ in seqs) + " |",
    ]
    params = {r["model"]: r["params"] for r in rows}
    for model in models:
        for precision in precisions:
            cells = " | ".join(
                f"{by[(model, precision, 'eager', s)]:,.0f} | "
                + (f"{by[(model, precision, 'compile', s)]:,.0f}" if (model, precision, "compile", s) in by
                   else "not run")
                for s in seqs)
            lines.append(f"| {model} | {precision} | {params[model]:,} | {cells} |")

    def best(names, s):
        return max((by[key], key) for key in by if key[0] in names and key[3] == s)

    lines += ["", "| ratio | " + " | ".join(f"T = {s:,}" for s in seqs) + " |",
              "| --- | " + " | ".join("---" for _ in seqs) + " |"]
    for model in (native, fused):
        for precision in precisions:
            lines.append(f"| {model}, {precision}: compiled / eager (target >= 1.1x) | " + " | ".join(
                f"{by[(model, precision, 'compile', s)] / by[(model, precision, 'eager', s)]:.2f}x" for s in seqs)
                + " |")

    def label(key):
        return f"{key[0]}, {key[1]}, {'compiled' if key[2] == 'compile' else 'eager'}"

    for name, minrnn_models in (("best minrnn", (native, fused)), ("best minrnn without the fused loss", (native,))):
        for against, gpt2_models in (("best GPT-2", (gpt2,)), ("best GPT-2 with the fused loss", (gpt2, gpt2_fused))):
            target = " (target >= 3x at T = 4,096)" if name == "best minrnn" and against == "best GPT-2" else ""
            cells = []
            for s in seqs:
                (mine, mine_key), (theirs, their_key) = best(minrnn_models, s), best(gpt2_models, s)
                cells.append(f"{mine / theirs:.2f}x ({label(mine_key)} / {label(their_key)})")
            lines.append(f"| {name} / {against}{target} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and lengths: a smoke test in seconds")
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default 1024 4096)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="tokens per step (default 8192)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="fp32 and/or bf16 (autocast) (default both)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 3)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the rows whose name contains one of these words (e.g. GPT-2); no report")
    parser.add_argument("--compile-chunked", action="store_true",
                        help="also compile the chunked scan (its unrolled loops compile for tens of minutes here)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    seqs = args.seqs or ([16, 32] if args.quick else [1024, 4096])
    tokens = args.tokens_per_step or (64 if args.quick else 8192)
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = sizes.__class__(**{**sizes.__dict__, "train_seqs": tuple(seqs)})  # GPT-2's position table covers them
    machine = machine_description(args.device)
    rows = bench(args.device, sizes, seqs, tokens, repeats, args.precisions, args.only,
                 args.compile_chunked)
    if args.only:
        print(json.dumps({"machine": machine, "rows": rows}))
        return None
    command = "python benchmarks/compile_training.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile_training_{args.device}.md"
    path.write_text(report(rows, seqs, machine, command.strip()))
    (args.out / f"compile_training_{args.device}.json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                                              indent=1))
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
