"""Training tokens/s of a minGRU LM, eager against `torch.compile`, beside GPT-2 (sdpa) at equal parameters.

    python benchmarks/compile_training.py [--quick] [--seqs 1024 4096] [--tokens-per-step 16384] [--out DIR]

One process, side by side, so the ratios hold for the machine of the run. Each model trains (forward + backward +
AdamW) on the same tokens per step at each length, eager and with `torch.compile(model)` (inductor), one untimed
warm-up step each (the compile), then rounds of one step of every candidate in turn. Rows:

- minrnn (auto): the default backend, the native CPU kernel where it builds (a `torch.library` operator, kept in the
  compiled graph).
- minrnn (chunked scan): `scan_backend="chunked"`, the PyTorch scan. Compiled (`--compile-chunked`: its unrolled
  loops take tens of minutes of inductor on 2 cores), it is what `torch.compile` ran before the kernel was an
  operator (it swapped the kernel for this scan while tracing).
- GPT-2 (sdpa): the same hidden size and layers as `benchmarks/benchmark.py` builds, within 5% of minrnn's
  parameters (GPT-2's position table left out of the count: it costs no compute).

Writes `compile_training_<device>.md` and `.json` under `--out` (default `benchmarks/results`).
"""

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import FULL, QUICK, build_gpt2, build_minrnn, count_params, machine_description, median_seconds  # noqa: E402

from modeling_minrnn import MinRNNForCausalLM  # noqa: E402
from modeling_minrnn.scan import resolve_backend  # noqa: E402


def candidates(sizes, device):
    """name -> a function building a fresh model."""
    def minrnn(backend):
        config = build_minrnn(sizes).config
        config.scan_backend = backend
        return MinRNNForCausalLM(config)

    native = resolve_backend("auto", torch.zeros(1, device=device))
    return {f"minrnn (auto: {native} scan)": functools.partial(minrnn, "auto"),
            "minrnn (chunked scan)": functools.partial(minrnn, "chunked"),
            "GPT-2 (sdpa)": functools.partial(build_gpt2, sizes)}


def bench(device, sizes, seqs, tokens_per_step, repeats, only=None, compile_chunked=False):
    """Per length: every candidate built (and compiled) and warmed up, then `repeats` rounds of one step each, in
    turn, so that load from other processes hits every candidate alike; the median step of each is reported."""
    rows = []
    for seq in seqs:
        batch = max(1, tokens_per_step // seq)
        ids = torch.randint(0, sizes.vocab_size, (batch, seq), device=device)
        steps = {}
        for name, build in candidates(sizes, device).items():
            if only and not any(word.lower() in name.lower() for word in only):
                continue
            for mode in ("eager", "compile"):
                if mode == "compile" and "chunked" in name and not compile_chunked:
                    continue
                torch.manual_seed(0)
                model = build().to(device).train()
                forward = torch.compile(model) if mode == "compile" else model
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

                def step(forward=forward, optimizer=optimizer, ids=ids):
                    forward(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                step()  # warm-up: the compile
                steps[(name, mode)] = (step, count_params(model, exclude=("wpe",)), [])
        for _ in range(repeats):
            for step, _, times in steps.values():
                times.append(median_seconds(step, device, repeats=1, warmup=0))
        for (name, mode), (_, params, times) in steps.items():
            rows.append({"model": name, "mode": mode, "seq": seq, "batch": batch, "params": params,
                         "tokens_per_s": batch * seq / statistics.median(times)})
            print(f"{name:28} {mode:8} T={seq:5}  {rows[-1]['tokens_per_s']:9,.0f} tok/s", flush=True)
        torch._dynamo.reset()
    return rows


def report(rows, seqs, machine, command):
    by = {(r["model"], r["mode"], r["seq"]): r["tokens_per_s"] for r in rows}
    models = list(dict.fromkeys(r["model"] for r in rows))
    native, chunked, gpt2 = models
    lines = [
        "# torch.compile and training speed",
        "",
        f"`{command}`",
        "",
        machine,
        "",
        "Training tokens/s (forward + backward + AdamW; median of the timed steps; higher is better).",
        "",
        "| model | params | " + " | ".join(f"T = {s:,} eager | T = {s:,} compiled" for s in seqs) + " |",
        "| --- | --- | " + " | ".join("--- | ---" for _ in seqs) + " |",
    ]
    params = {r["model"]: r["params"] for r in rows}
    for model in models:
        cells = " | ".join(f"{by[(model, 'eager', s)]:,.0f} | " + (f"{by[(model, 'compile', s)]:,.0f}"
                           if (model, "compile", s) in by else "not run") for s in seqs)
        lines.append(f"| {model} | {params[model]:,} | {cells} |")
    best = {s: max(by.get((m, mode, s), 0) for m in (native, chunked) for mode in ("eager", "compile")) for s in seqs}
    gpt2_best = {s: max(by[(gpt2, mode, s)] for mode in ("eager", "compile")) for s in seqs}
    lines += [
        "",
        "| ratio | " + " | ".join(f"T = {s:,}" for s in seqs) + " |",
        "| --- | " + " | ".join("---" for _ in seqs) + " |",
        f"| {native}: compiled / eager (target >= 1.1x) | "
        + " | ".join(f"{by[(native, 'compile', s)] / by[(native, 'eager', s)]:.2f}x" for s in seqs) + " |",
        "| best minrnn / best GPT-2 (target >= 3x at T = 4,096) | "
        + " | ".join(f"{best[s] / gpt2_best[s]:.2f}x" for s in seqs) + " |",
    ]
    if all((chunked, "compile", s) in by for s in seqs):
        lines.append(f"| before the kernel was an operator: {chunked} compiled / {native} eager | "
                     + " | ".join(f"{by[(chunked, 'compile', s)] / by[(native, 'eager', s)]:.2f}x" for s in seqs)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and lengths: a smoke test in seconds")
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="sequence lengths (default 1024 4096)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="tokens per step (default 16384)")
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
    tokens = args.tokens_per_step or (64 if args.quick else 16384)
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = sizes.__class__(**{**sizes.__dict__, "train_seqs": tuple(seqs)})  # GPT-2's position table covers them
    machine = machine_description(args.device)
    rows = bench(args.device, sizes, seqs, tokens, repeats, args.only, args.compile_chunked or args.quick)
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
