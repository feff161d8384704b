"""Decode latency of a minrnn export in a web page (onnxruntime-web, WASM, headless Chromium) beside onnxruntime native.

    python benchmarks/web_decode.py [--models tiny 124m] [--threads 1 2] [--contexts 128 8192] [--out DIR]

Exports each model with `python -m modeling_minrnn.export --web` (ONNX, fp32 and int8), then times single greedy
decode steps at batch 1 after reading a context of each length from a fresh state, on 1 and 2 threads:
- in the page (web/), driven in the system's headless Chromium (`window.minrnn.benchmark`: the context through the
  prefill and step graphs, then the step graph alone, as the page generates), served cross-origin isolated so that
  WASM may use threads;
- in onnxruntime native (`ExportedModel`, the same files, the same prefill-then-step loop) in this process.
Median ms per token over `--steps` steps after untimed ones: 8, and in the browser at least a second of them (it
compiles hot WASM functions again, optimized, after they have run a while). The weights are random (speed does
not depend on them). Needs the page's packages (`npm ci && npm run build` in web/) and Chromium. Writes
`web_decode.{md,json}` under --out.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
from export_decode import exported_stepper, timed_steps  # noqa: E402

from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM  # noqa: E402
from modeling_minrnn.export import WEB_VARIANTS, ExportedModel  # noqa: E402
from modeling_minrnn.export import main as export_main  # noqa: E402
from web.page_driver import drive, missing_requirements, serve  # noqa: E402

MODELS = {
    # The tiny model of the browser test (tests/test_web.py), and the 124M minGRU of benchmarks/export_decode.py.
    "tiny": dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, intermediate_size=128, conv_kernel=4),
    "124m": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, intermediate_size=3072, conv_kernel=4),
}

WARMUP = 8


def save_checkpoint(name: str, path: Path) -> None:
    """A checkpoint of model `name` with random weights and a word-level tokenizer over its vocabulary (the page
    needs a tokenizer to load; the benchmark feeds token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = MinRNNConfig(**MODELS[name], bos_token_id=0, eos_token_id=None)
    MinRNNForCausalLM(config).save_pretrained(path)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(config.vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(path)


def native_ms(folder: Path, threads: int, context: int, steps: int) -> float:
    runner = ExportedModel(folder, num_threads=threads)
    ids = torch.randint(0, runner.meta["vocab_size"], (1, context), generator=torch.Generator().manual_seed(0))
    logits, state = runner.forward(ids)
    return timed_steps(exported_stepper(runner, state), logits.argmax(-1, keepdim=True), steps, warmup=WARMUP)


def folder_mb(folder: Path) -> float:
    return sum((folder / name).stat().st_size for name in ("model.onnx", "prefill.onnx", "model.onnx.data")) / 1e6


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "124m"], choices=list(MODELS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 8192])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per row")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--append", action="store_true", help="add the rows to --out's web_decode.json (one model "
                        "per run, e.g. where a machine is lent for short spells)")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    missing = missing_requirements()
    if missing:
        raise SystemExit(f"The browser benchmark needs {missing}.")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            root = Path(tmp) / name
            save_checkpoint(name, root / "checkpoint")
            start = time.perf_counter()
            export_main(["--checkpoint", str(root / "checkpoint"), "--web", "--out", str(root / "web")])
            print(f"{name}: exported fp32 and int8 in {time.perf_counter() - start:.0f} s", flush=True)
            with serve(root / "web") as base:
                for precision in WEB_VARIANTS:
                    folder = root / "web" / precision
                    for threads in args.threads:
                        (browser,) = drive(f"{base}?model=model/{precision}/&threads={threads}", [
                            {"benchmark": {"contexts": args.contexts, "steps": args.steps, "warmup": WARMUP}},
                        ], timeout=3600)
                        if browser["threads"] != threads or (threads > 1 and not browser["crossOriginIsolated"]):
                            raise RuntimeError(f"the page ran {browser['threads']} threads, not {threads}")
                        for row in browser["rows"]:
                            context = row["context"]
                            native = native_ms(folder, threads, context, args.steps)
                            rows.append(dict(model=name, precision=precision, threads=threads, context=context,
                                             browser_ms=row["msPerToken"], native_ms=native,
                                             browser_context_s=row["contextMs"] / 1000, size_mb=folder_mb(folder)))
                            print(json.dumps(rows[-1]), flush=True)
    command = "python benchmarks/web_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "commands": [], "rows": []}
    if args.append and (out / "web_decode.json").is_file():
        result = json.loads((out / "web_decode.json").read_text())
    result["commands"].append(command)
    result["rows"] += rows
    (out / "web_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    report = out / "web_decode.md"
    report.write_text(markdown(result))
    print(report.read_text())
    return report


def markdown(result) -> str:
    lines = [
        "# Decode in the browser (onnxruntime-web WASM) vs onnxruntime native",
        "",
        f"{' and '.join(f'`{c}`' for c in result['commands'])} on {result['machine']}; median ms per token, batch 1, "
        "greedy steps after reading a context from a fresh state; random weights.",
        "",
        "| model | weights | threads | context | browser WASM ms/token | onnxruntime native ms/token "
        "| browser / native | size MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['threads']} | {r['context']} | {r['browser_ms']:.2f} | "
            f"{r['native_ms']:.2f} | {r['browser_ms'] / r['native_ms']:.2f}x | {r['size_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
