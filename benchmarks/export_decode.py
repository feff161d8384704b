"""Decode latency of the 124M minGRU in PyTorch, torchao, onnxruntime and ExecuTorch, beside a parameter-matched Llama.

    nice -n 5 python benchmarks/export_decode.py [--quick] [--threads 1 2] [--contexts 128 8192] [--out DIR]

Batch 1, greedy, per-token latency of single decode steps after a prompt of each context length, on 1 and 2 threads,
all in one process so the ratios hold for the machine of the run. Rows:

- PyTorch eager fp32 and bf16 (`model(token, cache=...)`), and torchao int8 weights loaded the transformers way
  (`from_pretrained(..., quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))`, bf16 activations; the tied
  embedding/head stays bf16: transformers' torchao integration leaves a tied matrix unquantized, even with
  `include_input_output_embeddings=True`);
- the exported step graph (`modeling_minrnn.export`) in onnxruntime and ExecuTorch (XNNPACK), fp32 and int8, started
  from the state PyTorch computed for the prompt (a state handed over, as `MinRNNCache.save` files are);
- `torch.compile` of the step with the state as fixed-shape tensors (`ExplicitStateLM`: a minrnn cache is static by
  construction), fp32 and torchao int8; compiled once per thread count (Inductor builds its thread count in);
- a transformers Llama with the same width, depth, vocabulary and parameter count (MLP 2560), whose KV cache grows
  with the prompt: eager fp32, and in ExecuTorch (XNNPACK, fp32) through transformers' own
  `TorchExportableModuleForDecoderOnlyLM` with a static KV cache sized for each context (prompt + 64 positions), as a
  device deployment sizes it; its steps are timed at the positions after the context (the cost of a step does not
  depend on the cache's contents);
- the weight-read floor: the bytes of weights a decode step must read (every matrix once; the embedding one row)
  divided by the memory bandwidth measured here (a sum over a 1 GiB tensor) at the same thread count.

Also the size on disk of each format and, for each int8 path, its next-token argmax agreement with fp32 (teacher
forced over a held-out token sequence). The weights are random (speed does not depend on them), so the agreement is a
measure of numerical fidelity, not of text quality. Writes `export_decode.{md,json,png}` under `--out`.
Not covered: the Llama in onnxruntime (transformers' exportable module targets `torch.export`/ExecuTorch; its ONNX
export with a growing KV cache needs optimum, which pins older transformers). `--quick`: a tiny model, a minute.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TorchAoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from modeling_minrnn import MinRNNCache, MinRNNConfig, MinRNNForCausalLM
from modeling_minrnn.cache_minrnn import LayerState, layer_states
from modeling_minrnn.export import ExplicitStateLM, ExportedModel, export

MINGRU_124M = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, intermediate_size=3072, conv_kernel=4)
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128, conv_kernel=4)


def timed_steps(step, first_token, n_steps: int, warmup: int = 2) -> float:
    """Median ms of `step(token) -> next token` over `n_steps` greedy steps after `warmup` untimed ones."""
    token, times = first_token, []
    for i in range(warmup + n_steps):
        start = time.perf_counter()
        token = step(token)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def torch_stepper(model, cache):
    def step(token):
        with torch.no_grad():
            logits = model(token, cache=cache, use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    return step


def exported_stepper(runner: ExportedModel, state):
    holder = {"state": state}

    def step(token):
        logits, holder["state"] = runner.forward(token, holder["state"])
        return logits.argmax(-1, keepdim=True)

    return step


def compiled_stepper(compiled, state_file, model, conv_dtype=torch.float32):
    """Steps of `compiled` (a `torch.compile`d `ExplicitStateLM`) from the saved state."""
    states = layer_states(MinRNNCache.load(state_file, model))
    holder = {"past": [*(s.conv.to(conv_dtype) for s in states if s.conv is not None), *(s.h for s in states)]}

    def step(token):
        with torch.no_grad():
            logits, *holder["past"] = compiled(token, *holder["past"])
        return logits[:, -1:].argmax(-1)

    return step


def export_llama_executorch(llama, max_cache_len: int, path: Path) -> None:
    """The Llama's one-token step with a static KV cache of `max_cache_len`, through transformers' exportable module,
    lowered to XNNPACK (fp32). Inputs: `input_ids` `(1, 1)`, `cache_position` `(1,)`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    llama.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static", max_length=max_cache_len,
        cache_config={"batch_size": 1, "max_cache_len": max_cache_len},
    )
    program = TorchExportableModuleForDecoderOnlyLM(llama).export(
        input_ids=torch.tensor([[1]]), cache_position=torch.tensor([0])
    )
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(lowered.buffer)


def llama_executorch_stepper(path: Path, context: int):
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(torch.get_num_threads())  # ExecuTorch's one process-wide pool
    method = Runtime.get().load_program(path).load_method("forward")
    holder = {"position": context}

    def step(token):
        logits = method.execute([token, torch.tensor([holder["position"]])])[0]
        holder["position"] += 1
        return logits[:, -1:].argmax(-1)

    return step


def memory_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth: the best of 5 sums over a 1 GiB fp32 tensor."""
    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    best = min(_time(lambda: x.sum()) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_weight_bytes(model, bytes_per_weight: float) -> float:
    """Weights a decode step reads: every matrix once, of the embedding only the looked-up row (a tied head reads
    the whole matrix once as the head)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is embedding
    return bytes_per_weight * (total - (0 if tied else embedding.numel() - embedding.shape[1]))


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def agreement(model, runner_or_model, text) -> float:
    """Teacher-forced next-token argmax agreement with the fp32 `model` over `text` `(1, seq)`."""
    with torch.no_grad():
        expected = model(text).logits.argmax(-1)
        if isinstance(runner_or_model, ExportedModel):
            state, predicted = None, []
            for t in range(text.shape[1]):
                logits, state = runner_or_model.forward(text[:, t : t + 1], state)
                predicted.append(logits.argmax(-1))
            predicted = torch.stack(predicted, dim=1)
        else:
            predicted = runner_or_model(text).logits.argmax(-1)
    return (predicted == expected).float().mean().item()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and short prompts: seconds")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 8192])
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per row")
    parser.add_argument("--agreement-tokens", type=int, default=256)
    parser.add_argument("--formats", nargs="+", default=["onnx", "executorch"], choices=["onnx", "executorch"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.contexts, args.steps, args.agreement_tokens = [16, 64], 3, 32
    started = time.time()
    torch.manual_seed(0)
    config = MinRNNConfig(**(TINY if args.quick else MINGRU_124M))
    model = MinRNNForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=max(1, config.hidden_size // 64), num_key_value_heads=max(1, config.hidden_size // 64),
            intermediate_size=(2560 if not args.quick else 160), tie_word_embeddings=True,
            max_position_embeddings=max(args.contexts) + 64,
        )
    ).eval()
    work = Path(tempfile.mkdtemp(prefix="export_decode_"))
    rows, sizes, agreements, notes, bandwidths = [], {}, {}, [], {}
    try:
        model.save_pretrained(work / "checkpoint")
        sizes["PyTorch fp32 (safetensors)"] = folder_mb(work / "checkpoint")
        text = torch.randint(
            0, config.vocab_size, (1, args.agreement_tokens), generator=torch.Generator().manual_seed(1)
        )

        # torchao through from_pretrained, as transformers users load it.
        from torchao.quantization import Int8WeightOnlyConfig

        quantized = AutoModelForCausalLM.from_pretrained(
            work / "checkpoint", dtype=torch.bfloat16, device_map="cpu",
            quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        ).eval()
        agreements["torchao int8 (bf16 act.)"] = agreement(model, quantized, text)

        runners = {}
        for fmt in args.formats:
            for quantize in (None, "int8"):
                name = f"{'onnxruntime' if fmt == 'onnx' else 'ExecuTorch'} {quantize or 'fp32'}"
                folder = work / f"{fmt}-{quantize}"
                start = time.time()
                # The prefill graph is not timed here: a short one keeps the export quick.
                export(model, folder, fmt, quantize=quantize, prefill_length=4)
                notes.append(f"{name}: exported in {time.time() - start:.0f} s")
                sizes[name] = folder_mb(folder)
                runners[name] = folder
                if quantize:
                    agreements[name] = agreement(model, ExportedModel(folder), text)

        bf16 = MinRNNForCausalLM(config).eval()
        bf16.load_state_dict(model.state_dict())
        bf16 = bf16.to(torch.bfloat16)
        sizes["PyTorch bf16"] = sizes["PyTorch fp32 (safetensors)"] / 2

        # Each context's prompt state (a file, as a saved prompt is) and the Llama's KV cache, computed once.
        prompts = {}
        torch.set_num_threads(max(args.threads))
        for context in args.contexts:
            prompt = torch.randint(0, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                prefilled = model.prefill(prompt, chunk_size=4096)
                llama_out = llama(prompt, use_cache=True)
            state_file = work / f"state-{context}.safetensors"
            MinRNNCache.from_cache(prefilled.cache).save(state_file, model)
            prompts[context] = (state_file, prefilled.logits[:, -1:].argmax(-1), llama_out)
        llama_programs = {}
        if "executorch" in args.formats:
            for context in args.contexts:
                start = time.time()
                llama_programs[context] = work / f"llama-{context}.pte"
                export_llama_executorch(llama, context + 64, llama_programs[context])
                notes.append(f"Llama ExecuTorch (cache {context + 64}): exported in {time.time() - start:.0f} s")
        if llama_programs:
            sizes["Llama ExecuTorch fp32"] = min(p.stat().st_size for p in llama_programs.values()) / 1e6

        print(f"exports and prompts done ({time.time() - started:.0f} s); timing", flush=True)
        for threads in args.threads:
            torch.set_num_threads(threads)
            bandwidth = memory_bandwidth_gbs(threads)
            bandwidths[threads] = bandwidth
            torch._dynamo.reset()  # Inductor's kernels keep the thread count they were compiled with
            compiled = {
                name: torch.compile(ExplicitStateLM(m), fullgraph=True, dynamic=False)
                for name, m in (("fp32", model), ("int8", quantized))
            }
            for context in args.contexts:
                state_file, first, llama_out = prompts[context]

                def add(method, ms, kind="minGRU", threads=threads, context=context):
                    rows.append(dict(method=method, kind=kind, threads=threads, context=context, ms=ms))

                fp32_stepper = torch_stepper(model, MinRNNCache.load(state_file, model))
                add("PyTorch eager fp32", timed_steps(fp32_stepper, first, args.steps))
                bf16_stepper = torch_stepper(bf16, bf16_cache(state_file, model))
                add("PyTorch eager bf16", timed_steps(bf16_stepper, first, args.steps))
                int8_stepper = torch_stepper(quantized, bf16_cache(state_file, model))
                add("torchao int8 (bf16 act.)", timed_steps(int8_stepper, first, args.steps))
                start = time.time()
                add("torch.compile fp32", timed_steps(compiled_stepper(compiled["fp32"], state_file, model), first,
                                                      args.steps))
                add("torch.compile torchao int8 (bf16 act.)", timed_steps(
                    compiled_stepper(compiled["int8"], state_file, model, torch.bfloat16), first, args.steps))
                notes.append(f"torch.compile rows, {threads} thr, ctx {context}: {time.time() - start:.0f} s")
                for name, folder in runners.items():
                    runner = ExportedModel(folder, num_threads=threads)
                    state = runner.load_state(state_file)
                    add(name, timed_steps(exported_stepper(runner, state), first, args.steps))
                llama_first = llama_out.logits[:, -1:].argmax(-1)
                add("Llama eager fp32", timed_steps(torch_stepper(llama, _copy_cache(llama_out.past_key_values)),
                                                    llama_first, args.steps), kind="Llama")
                if context in llama_programs:
                    add("Llama ExecuTorch fp32", timed_steps(
                        llama_executorch_stepper(llama_programs[context], context), llama_first, args.steps),
                        kind="Llama")
                for label, bytes_per_weight in (("weight-read floor fp32", 4), ("weight-read floor int8", 1)):
                    add(label, 1000 * decode_weight_bytes(model, bytes_per_weight) / (bandwidth * 1e9), kind="floor")
                print(f"{threads} thread(s), context {context}: done ({time.time() - started:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = dict(
        cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), torch=torch.__version__,
        load_average=os.getloadavg(), seconds=round(time.time() - started), params=n_params,
        llama_params=sum(p.numel() for p in llama.parameters()),
    )
    result = dict(
        machine=machine, rows=rows, sizes_mb=sizes, int8_agreement=agreements, bandwidth_gbs=bandwidths, notes=notes
    )
    stem = "export_decode_quick" if args.quick else "export_decode"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(report(result, args))
    plot(result, out / f"{stem}.png")
    print((out / f"{stem}.md").read_text())


def bf16_cache(state_file, model):
    """The saved state for a bf16 copy of `model` (or its torchao one): the conv window in bf16, `h` in fp32."""
    cache = MinRNNCache.load(state_file, model)
    states = [LayerState(h, None if conv is None else conv.to(torch.bfloat16)) for h, conv in layer_states(cache)]
    return MinRNNCache.from_layer_states(states, int(cache.get_seq_length()))


def _copy_cache(cache):
    import copy

    return copy.deepcopy(cache)


def report(result, args) -> str:
    rows, machine = result["rows"], result["machine"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    columns = [(t, c) for t in args.threads for c in args.contexts]
    ms = {(r["method"], r["threads"], r["context"]): r["ms"] for r in rows}
    lines = [
        f"# Decode latency, batch 1: {machine['params'] / 1e6:.0f}M minGRU (hidden {MINGRU_124M['hidden_size']}, "
        f"{MINGRU_124M['num_hidden_layers']} layers, vocab {MINGRU_124M['vocab_size']}) vs a "
        f"{machine['llama_params'] / 1e6:.0f}M Llama" if not args.quick else "# Decode latency (quick: tiny model)",
        "",
        f"`{' '.join(['nice -n 5 python benchmarks/export_decode.py'] + (['--quick'] if args.quick else []))}`; "
        f"{machine['cores']} cores ({machine['cpu']}), torch {machine['torch']}, load average "
        f"{', '.join(f'{x:.1f}' for x in machine['load_average'])}, {machine['seconds']} s. Median ms per token over "
        f"{args.steps} greedy steps after the prompt; ratio = PyTorch eager fp32 / row at the same threads and "
        "context (higher is faster).",
        "",
        "| method | " + " | ".join(f"{t} thr, ctx {c}" for t, c in columns) + " | " + " | ".join(
            f"ratio {t} thr, ctx {c}" for t, c in columns) + " |",
        "|---|" + "---:|" * (2 * len(columns)),
    ]
    for method in methods:
        cells = [f"{ms[(method, t, c)]:.1f}" for t, c in columns]
        ratios = [f"{ms[('PyTorch eager fp32', t, c)] / ms[(method, t, c)]:.2f}x" for t, c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    bandwidths = result["bandwidth_gbs"]
    lines += [
        "",
        "Memory bandwidth measured (read, GB/s): " + ", ".join(f"{t} thr {b:.1f}" for t, b in bandwidths.items()) + ".",
        "",
        "| format | size on disk (MB) |",
        "|---|---:|",
        *(f"| {name} | {mb:.0f} |" for name, mb in result["sizes_mb"].items()),
        "",
        f"int8 next-token agreement with fp32, teacher forced over {args.agreement_tokens} held-out tokens (random "
        "weights: numerical fidelity, not text quality):",
        "",
        "| int8 path | agreement |",
        "|---|---:|",
        *(f"| {name} | {share:.1%} |" for name, share in result["int8_agreement"].items()),
        "",
        "Notes: " + "; ".join(result["notes"]) + ". Not measured: the Llama in onnxruntime (its ONNX export with a "
        "growing KV cache needs optimum, which pins older transformers).",
        "",
    ]
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    threads = sorted({r["threads"] for r in rows})
    contexts = sorted({r["context"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(threads), figsize=(7 * len(threads), 5), sharey=True, squeeze=False)
    ms = {(r["method"], r["threads"], r["context"]): r["ms"] for r in rows}
    width = 0.8 / len(contexts)
    for ax, t in zip(axes[0], threads):
        for j, c in enumerate(contexts):
            ax.barh([i + j * width for i in range(len(methods))], [ms[(m, t, c)] for m in methods], height=width,
                    label=f"after {c} tokens")
        ax.set_yticks([i + width * (len(contexts) - 1) / 2 for i in range(len(methods))], methods)
        ax.invert_yaxis()
        ax.set_xlabel("ms per token (batch 1, lower is faster)")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
