"""Speed of minrnn against its own scan backends, nn.GRU / nn.LSTM, GPT-2, Mamba and minGRU-pytorch, in one run.

    python benchmarks/benchmark.py [--quick] [--device cpu|cuda] [--out benchmarks/results] [--sections ...]

Every comparison runs side by side in the same process, so the ratios hold for the machine of the run:

1. scan: each backend of `linear_recurrence` at (8, 4096, 256) and (1, 65536, 256) (the sequential reference only at
   (8, 512, 256)), forward and forward+backward,
   against the elementwise floor (one `torch.addcmul` pass over tensors of the same size: what any scan must at
   least read and write) and against the paper's log-space scan.
2. layer: a training step (forward + backward) of one minGRU / minLSTM mixer (in_proj -> scan, hidden
   256, batch 8, no conv, expansion 1: no projection back, as in the paper) against `nn.GRU` / `nn.LSTM` of
   hidden 256, at T = 512 and 4096: the paper's headline.
3. train: training tokens/s (forward + backward + AdamW) at equal parameter counts (+-5%, ~6M, hidden 256) of
   `MinRNNForCausalLM` against GPT-2 (sdpa), Mamba and lucidrains' minGRU-pytorch LM, at T = 256, 1024, 4096 with
   8192 tokens per step.
4. decode: greedy `generate()` at batch 1, per-token latency after prompts of 128, 2048 and 8192 tokens (only the
   decode steps are timed), for minrnn and GPT-2, plus minrnn with a static cache and `torch.compile`, and a
   `torch.profiler` breakdown of minrnn's decode step.
5. memory: peak memory of one training forward + backward at T = 4096.

Writes `benchmark_<device>.md` (tables of absolute numbers and ratios, the CPU speed targets), `benchmark_<device>.png`,
`benchmark_<device>.json` and `decode_profile_<device>.txt` under `--out`. `--quick` runs every section at tiny
sizes in seconds (the smoke test). minGRU-pytorch is optional (`pip install minGRU-pytorch`); without it its rows
are skipped with a note.
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CompileConfig, GPT2Config, GPT2LMHeadModel, LogitsProcessor, MambaConfig, MambaForCausalLM
from transformers import __version__ as transformers_version
from transformers.utils import logging as hf_logging

from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM
from modeling_minrnn.cells import CELL_TYPES
from modeling_minrnn.modeling_minrnn import MinRNNMixer
from modeling_minrnn.scan import linear_recurrence, resolve_backend
from modeling_minrnn.scan_cpu import cpu_scan_available
from modeling_minrnn.scan_triton import triton_scan_available

try:  # lucidrains' minGRU-pytorch: an optional baseline, installed only for the benchmark
    from minGRU_pytorch import minGRU as LucidrainsMinGRU
    from minGRU_pytorch.minLM import minLM as LucidrainsMinLM
except ImportError:
    LucidrainsMinGRU = LucidrainsMinLM = None

SECTIONS = ("scan", "layer", "train", "decode", "memory")
MINGRU_PYTORCH_MISSING = "minGRU-pytorch is not installed (`pip install minGRU-pytorch`): its rows are skipped."


@dataclasses.dataclass(frozen=True)
class Sizes:
    scan_shapes: tuple  # (batch, seq, dim) per scan benchmark
    sequential_max_seq: int  # the Python-loop reference only runs up to this length
    layer_batch: int
    layer_hidden: int
    layer_seqs: tuple
    model_hidden: int
    model_layers: int
    vocab_size: int
    tokens_per_step: int  # batch = tokens_per_step // seq, so every length trains on the same tokens per step
    train_seqs: tuple
    mamba_cpu_seq: int  # Mamba's CPU path is ~100x slower: one length, one small batch
    mamba_cpu_batch: int
    decode_prompts: tuple
    new_tokens: int
    memory_seq: int
    repeats: int  # timed repeats per measurement (median reported), after one warm-up


FULL = Sizes(
    # The Python-loop reference's backward re-reads the whole input once per step (autograd through indexing), so
    # it only runs at the short third shape.
    scan_shapes=((8, 4096, 256), (1, 65536, 256), (8, 512, 256)), sequential_max_seq=512,
    layer_batch=8, layer_hidden=256, layer_seqs=(512, 4096),
    model_hidden=256, model_layers=4, vocab_size=8192, tokens_per_step=8192, train_seqs=(256, 1024, 4096),
    mamba_cpu_seq=256, mamba_cpu_batch=1,
    decode_prompts=(128, 2048, 8192), new_tokens=32, memory_seq=4096, repeats=3,
)
QUICK = Sizes(
    scan_shapes=((2, 64, 16), (1, 256, 16)), sequential_max_seq=64,
    layer_batch=2, layer_hidden=16, layer_seqs=(16, 64),
    model_hidden=32, model_layers=2, vocab_size=128, tokens_per_step=128, train_seqs=(16, 32, 64),
    mamba_cpu_seq=16, mamba_cpu_batch=1,
    decode_prompts=(8, 32), new_tokens=4, memory_seq=64, repeats=1,
)


# ----------------------------------------------------------------------------------------------------- measuring


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_bytes(fn, device: str) -> int:
    """Peak bytes allocated by torch during `fn()`, above what was live before it.

    CUDA: the caching allocator's peak counter. CPU: the allocation and free events that `torch.profiler` records
    (`profile_memory=True`), summed in time order; exact for tensors, blind to Python objects and allocator slack.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def machine_description(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [
        f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}, transformers {transformers_version}, python {platform.python_version()}",
    ]
    if device == "cuda":
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
    if hasattr(os, "getloadavg"):
        parts.append(f"load average at start {os.getloadavg()[0]:.1f} (other processes share the machine if > 0)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- 1. scan


def scan_backends(device: str, seq: int, sizes: Sizes) -> list:
    names = ["log_space", "chunked"]
    if seq <= sizes.sequential_max_seq:
        names.insert(0, "sequential")
    if device == "cpu" and cpu_scan_available():
        names.append("cpu")
    if device == "cuda" and triton_scan_available(torch.empty(1, device=device)):
        names.append("triton")
    return names


@torch.no_grad()
def _scan_forward(log_a, log_b, backend):
    linear_recurrence(log_a, log_b, backend=backend)


def _scan_forward_backward(log_a, log_b, grad_h, backend):
    # autograd.grad, not backward(): nothing accumulates into .grad between repeats
    torch.autograd.grad(linear_recurrence(log_a, log_b, backend=backend), (log_a, log_b), grad_h)


def bench_scan(device: str, sizes: Sizes) -> list:
    rows = []
    for shape in sizes.scan_shapes:
        log_a = (-F.softplus(torch.randn(shape, device=device))).requires_grad_()
        log_b = (torch.randn(shape, device=device) - 1.0).requires_grad_()
        grad_h = torch.randn(shape, device=device)
        a, b, h_prev, h = (torch.rand(shape, device=device) for _ in range(4))
        floor = median_seconds(functools.partial(torch.addcmul, b, a, h_prev, out=h), device, sizes.repeats * 3)
        rows.append({"shape": shape, "backend": "elementwise floor", "forward_s": floor, "forward_backward_s": None})
        for name in scan_backends(device, shape[1], sizes):
            forward = functools.partial(_scan_forward, log_a, log_b, name)
            forward_backward = functools.partial(_scan_forward_backward, log_a, log_b, grad_h, name)
            rows.append({
                "shape": shape, "backend": name,
                "forward_s": median_seconds(forward, device, sizes.repeats),
                "forward_backward_s": median_seconds(forward_backward, device, sizes.repeats),
            })
            print_progress("scan", rows[-1])
    return rows


# --------------------------------------------------------------------------------------------------- 2. layer


class _SequenceRNN(nn.Module):
    """`nn.GRU` / `nn.LSTM` as a `(batch, seq, hidden) -> (batch, seq, hidden)` layer."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


class _GRUCellLoop(nn.Module):
    """A GRU stepped one token at a time from Python: the sequential baseline of the paper's GPU comparison."""

    def __init__(self, hidden: int):
        super().__init__()
        self.cell = nn.GRUCell(hidden, hidden)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        states = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            states.append(h)
        return torch.stack(states, dim=1)


def layer_candidates(hidden: int, device: str) -> dict:
    """One layer of each kind, all `(batch, seq, hidden) -> (batch, seq, hidden)`."""
    layers = {}
    for cell in CELL_TYPES:
        config = MinRNNConfig(hidden_size=hidden, num_hidden_layers=1, cell_type=cell, expansion_factor=1.0,
                              conv_kernel=0)
        layers[f"{'minGRU' if cell == 'mingru' else 'minLSTM'} (minrnn)"] = MinRNNMixer(config, layer_idx=0)
    if LucidrainsMinGRU is not None:
        layers["minGRU (minGRU-pytorch)"] = LucidrainsMinGRU(hidden)
    layers["nn.GRU"] = _SequenceRNN(nn.GRU(hidden, hidden, batch_first=True))
    layers["nn.LSTM"] = _SequenceRNN(nn.LSTM(hidden, hidden, batch_first=True))
    if device == "cuda":
        layers["GRUCell loop (sequential)"] = _GRUCellLoop(hidden)
    return {name: layer.to(device) for name, layer in layers.items()}


def _layer_step(layer, x, grad_y):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(grad_y)


def bench_layer(device: str, sizes: Sizes) -> list:
    rows = []
    layers = layer_candidates(sizes.layer_hidden, device)
    for seq in sizes.layer_seqs:
        x = torch.randn(sizes.layer_batch, seq, sizes.layer_hidden, device=device, requires_grad=True)
        grad_y = torch.randn_like(x)
        for name, layer in layers.items():
            step = functools.partial(_layer_step, layer, x, grad_y)
            rows.append({"layer": name, "seq": seq, "params": count_params(layer),
                         "forward_backward_s": median_seconds(step, device, sizes.repeats)})
            print_progress("layer", rows[-1])
    return rows


# --------------------------------------------------------------------------------------------------- 3. train


def count_params(model: nn.Module, exclude: tuple = ()) -> int:
    """Distinct parameters (tied weights once), leaving out those whose name contains any of `exclude`."""
    return sum(p.numel() for name, p in model.named_parameters() if not any(key in name for key in exclude))


def build_minrnn(sizes: Sizes) -> MinRNNForCausalLM:
    # expansion 2 and an MLP of 3x hidden: the same parameters per block as GPT-2's (attention 4h^2 + MLP 8h^2).
    config = MinRNNConfig(
        vocab_size=sizes.vocab_size, hidden_size=sizes.model_hidden, num_hidden_layers=sizes.model_layers,
        cell_type="mingru", expansion_factor=2.0, conv_kernel=4, intermediate_size=3 * sizes.model_hidden,
    )
    return MinRNNForCausalLM(config)


def build_gpt2(sizes: Sizes) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=sizes.vocab_size, n_embd=sizes.model_hidden, n_layer=sizes.model_layers,
        n_head=max(1, sizes.model_hidden // 64), n_inner=4 * sizes.model_hidden,
        n_positions=max(max(sizes.train_seqs), sizes.memory_seq, max(sizes.decode_prompts) + sizes.new_tokens + 1),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def build_mamba(sizes: Sizes, target_params: int) -> MambaForCausalLM:
    """Mamba with the number of layers whose parameter count is closest to `target_params`."""
    def config(layers):
        return MambaConfig(vocab_size=sizes.vocab_size, hidden_size=sizes.model_hidden, num_hidden_layers=layers)

    one, two = (count_params(MambaForCausalLM(config(n))) for n in (1, 2))
    layers = max(1, round((target_params - one) / (two - one)) + 1)
    return MambaForCausalLM(config(layers))


def build_mingru_pytorch(sizes: Sizes):
    model = LucidrainsMinLM(num_tokens=sizes.vocab_size, dim=sizes.model_hidden, depth=sizes.model_layers,
                            ff_mult=3, expansion=2.0)
    model.to_logits.weight = model.token_emb.weight  # tie like the others, so the parameter counts compare
    return model


def language_models(sizes: Sizes) -> dict:
    """name -> (model, loss_fn(model, ids), params compared); params leave out GPT-2's position table.

    GPT-2's learned position embeddings must cover the longest decode (8k tokens, 2M parameters at hidden 256) but
    cost no compute, so they are left out of the count that is matched (+-5%); the table shows both.
    """
    def hf_loss(model, ids):
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    models = {"minrnn (minGRU)": (build_minrnn(sizes), hf_loss), "GPT-2 (sdpa)": (build_gpt2(sizes), hf_loss)}
    target = count_params(models["minrnn (minGRU)"][0])
    models["Mamba"] = (build_mamba(sizes, target), hf_loss)
    if LucidrainsMinLM is not None:
        models["minGRU-pytorch LM"] = (build_mingru_pytorch(sizes), lambda model, ids: model(ids, return_loss=True))
    return models


def bench_train(device: str, sizes: Sizes, models: dict) -> list:
    rows = []
    for name, (model, loss_fn) in models.items():
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(ids, model=model, loss_fn=loss_fn, optimizer=optimizer):
            loss_fn(model, ids).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for seq in sizes.train_seqs:
            batch, repeats, note = sizes.tokens_per_step // seq, sizes.repeats, ""
            if name == "Mamba" and device == "cpu":
                if seq != sizes.mamba_cpu_seq:
                    continue
                batch, repeats = sizes.mamba_cpu_batch, 1
                note = f"CPU slow path: batch {batch}, one timed step"
            # lucidrains' minLM predicts ids[1:] from ids[:-1]: one extra token so every model sees `seq` inputs.
            extra = 1 if name == "minGRU-pytorch LM" else 0
            ids = torch.randint(0, sizes.vocab_size, (batch, seq + extra), device=device)
            seconds = median_seconds(functools.partial(step, ids), device, repeats)
            rows.append({"model": name, "seq": seq, "batch": batch, "tokens_per_s": batch * seq / seconds,
                         "params": count_params(model, exclude=("wpe",)), "params_total": count_params(model),
                         "note": note})
            print_progress("train", rows[-1])
        del optimizer
        model.to("cpu")
    return rows


def _backward(loss_fn, model, ids):
    loss_fn(model, ids).backward()


def bench_memory(device: str, sizes: Sizes, models: dict) -> list:
    rows = []
    seq = sizes.memory_seq
    batch = max(1, sizes.tokens_per_step // seq)
    for name, (model, loss_fn) in models.items():
        if name == "Mamba" and device == "cpu":
            rows.append({"model": name, "seq": seq, "batch": batch, "peak_bytes": None,
                         "note": "skipped: the CPU slow path would take minutes at this length"})
            continue
        model.to(device).train()
        extra = 1 if name == "minGRU-pytorch LM" else 0
        ids = torch.randint(0, sizes.vocab_size, (batch, seq + extra), device=device)
        backward = functools.partial(_backward, loss_fn, model, ids)
        backward()  # warm-up: gradients exist already, as in any step after the first
        peak = peak_memory_bytes(backward, device)
        model.zero_grad(set_to_none=True)
        model.to("cpu")
        rows.append({"model": name, "seq": seq, "batch": batch, "peak_bytes": peak, "note": ""})
        print_progress("memory", rows[-1])
    return rows


# -------------------------------------------------------------------------------------------------- 4. decode


class _StepClock(LogitsProcessor):
    """Records the time at which `generate()` asks for each next token; differences are per-token latencies."""

    def __init__(self, device: str):
        self.device = device
        self.times = []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def decode_latencies(model, prompt: torch.Tensor, new_tokens: int, device: str, **generate_kwargs):
    """Greedy `generate()`; returns (per-token seconds of the `new_tokens` decode steps, generated ids).

    The first token comes from the prefill and is not timed: the clock starts when it is chosen.
    """
    clock = _StepClock(device)
    output = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens + 1, do_sample=False,
        logits_processor=[clock], pad_token_id=0, **generate_kwargs,
    )
    return [later - earlier for earlier, later in zip(clock.times, clock.times[1:])], output[:, prompt.shape[1]:]


def compile_config(device: str) -> CompileConfig:
    # "reduce-overhead" means CUDA graphs; on the CPU plain inductor. transformers compiles on CUDA only unless told.
    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device == "cuda" else "default")
    config._compile_all_devices = True
    return config


def bench_decode(device: str, sizes: Sizes, models: dict, compile_decode: bool) -> list:
    rows = []
    variants = [("minrnn (minGRU)", {}), ("GPT-2 (sdpa)", {})]
    if compile_decode:
        static_compiled = {"cache_implementation": "static", "compile_config": compile_config(device)}
        variants.append(("minrnn (minGRU)", static_compiled))
    for name, generate_kwargs in variants:
        model = models[name][0].to(device).eval()
        label = name + (", static cache + torch.compile" if generate_kwargs else "")
        eager_ids = {}
        for prompt_len in sizes.decode_prompts:
            prompt = torch.randint(0, sizes.vocab_size, (1, prompt_len), device=device)
            with torch.no_grad():
                if generate_kwargs:  # compile once (and let it settle) before timing
                    decode_latencies(model, prompt, sizes.new_tokens, device, **generate_kwargs)
                latencies, ids = decode_latencies(model, prompt, sizes.new_tokens, device, **generate_kwargs)
                if generate_kwargs:
                    _, eager_ids[prompt_len] = decode_latencies(model, prompt, sizes.new_tokens, device)
            rows.append({
                "model": label, "prompt": prompt_len, "ms_per_token": 1e3 * statistics.median(latencies),
                "tokens_per_s": len(latencies) / sum(latencies),
                "matches_eager": bool(torch.equal(ids, eager_ids[prompt_len])) if generate_kwargs else None,
            })
            print_progress("decode", rows[-1])
        model.to("cpu")
    return rows


def profile_decode(device: str, sizes: Sizes, models: dict, out_path: Path) -> dict:
    """`torch.profiler` over minrnn's per-token forward (no `generate()` around it): time in ops vs around them.

    Writes the top ops to `out_path`; returns per-token wall time unprofiled and profiled, the ops' share of it
    (the rest is Python and dispatch between ops) and the number of ops per token.
    """
    model = models["minrnn (minGRU)"][0].to(device).eval()
    prompt = torch.randint(0, sizes.vocab_size, (1, sizes.decode_prompts[0]), device=device)
    steps = 4 * sizes.new_tokens
    with torch.no_grad():
        output = model(prompt, use_cache=True, logits_to_keep=1)
        cache, token = output.cache, output.logits.argmax(-1)

        def step():
            nonlocal token
            token = model(token, cache=cache, use_cache=True).logits.argmax(-1)

        unprofiled = median_seconds(step, device, steps, warmup=3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            wall = time.perf_counter() - start
    model.to("cpu")
    averages = prof.key_averages()
    out_path.write_text(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    op_seconds = 1e-6 * sum(e.self_cpu_time_total for e in averages)
    return {
        "ms_per_step": 1e3 * unprofiled,
        "ms_per_step_profiled": 1e3 * wall / steps,
        "op_share": op_seconds / wall,
        "ops_per_step": sum(e.count for e in averages if e.key.startswith("aten::")) / steps,
        "table": out_path.name,
    }


# ------------------------------------------------------------------------------------------------- reporting


def print_progress(section: str, row: dict) -> None:
    print(f"[{section}] " + ", ".join(f"{k}={format_value(v)}" for k, v in row.items() if v not in (None, "")),
          flush=True)


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def ratio(numerator, denominator) -> str:
    if numerator is None or denominator in (None, 0):
        return "-"
    return f"{numerator / denominator:.2f}x"


def scan_report(rows: list) -> str:
    parts = []
    for shape in dict.fromkeys(row["shape"] for row in rows):
        at_shape = [row for row in rows if row["shape"] == shape]
        floor = next(row["forward_s"] for row in at_shape if row["backend"] == "elementwise floor")
        log_space = next(row for row in at_shape if row["backend"] == "log_space")
        table = [[
            row["backend"], ms(row["forward_s"]), ratio(row["forward_s"], floor), ms(row["forward_backward_s"]),
            ratio(row["forward_backward_s"], floor), ratio(log_space["forward_backward_s"], row["forward_backward_s"]),
        ] for row in at_shape]
        parts.append(f"Shape (batch, seq, dim) = {shape}\n\n" + markdown_table(
            ["backend", "forward ms", "forward / floor", "fwd+bwd ms", "fwd+bwd / floor", "log_space / this (fwd+bwd)"],
            table,
        ))
    return "\n\n".join(parts)


def layer_report(rows: list) -> str:
    seqs = list(dict.fromkeys(row["seq"] for row in rows))
    names = list(dict.fromkeys(row["layer"] for row in rows))
    time_of = {(row["layer"], row["seq"]): row["forward_backward_s"] for row in rows}
    params = {row["layer"]: row["params"] for row in rows}
    header = ["layer", "params"] + [f"T={s} ms" for s in seqs] + [f"T={s}: this / minGRU (minrnn)" for s in seqs]
    table = [
        [name, f"{params[name]:,}"] + [ms(time_of[name, s]) for s in seqs]
        + [ratio(time_of[name, s], time_of["minGRU (minrnn)", s]) for s in seqs]
        for name in names
    ]
    return markdown_table(header, table)


def train_report(rows: list) -> str:
    seqs = list(dict.fromkeys(row["seq"] for row in rows))
    names = list(dict.fromkeys(row["model"] for row in rows))
    speed = {(row["model"], row["seq"]): row["tokens_per_s"] for row in rows}
    info = {row["model"]: row for row in rows}
    header = ["model", "params (total)"] + [f"T={s} tok/s" for s in seqs] + [f"T={s}: minrnn / this" for s in seqs]
    table = []
    for name in names:
        counts = f"{info[name]['params']:,}" + (
            f" ({info[name]['params_total']:,})" if info[name]["params_total"] != info[name]["params"] else ""
        )
        table.append(
            [name + (f" ({info[name]['note']})" if info[name]["note"] else ""), counts]
            + [f"{speed[name, s]:,.0f}" if (name, s) in speed else "-" for s in seqs]
            + [ratio(speed.get(("minrnn (minGRU)", s)), speed.get((name, s))) for s in seqs]
        )
    return markdown_table(header, table)


def decode_report(rows: list, profile: dict | None) -> str:
    prompts = list(dict.fromkeys(row["prompt"] for row in rows))
    names = list(dict.fromkeys(row["model"] for row in rows))
    by = {(row["model"], row["prompt"]): row for row in rows}
    header = (["model"] + [f"prompt {p}: ms/token" for p in prompts] + [f"prompt {p}: tok/s" for p in prompts]
              + [f"latency {prompts[-1]} / {prompts[0]}"])
    table = [
        [name] + [f"{by[name, p]['ms_per_token']:.2f}" for p in prompts]
        + [f"{by[name, p]['tokens_per_s']:,.0f}" for p in prompts]
        + [ratio(by[name, prompts[-1]]["ms_per_token"], by[name, prompts[0]]["ms_per_token"])]
        for name in names
    ]
    text = markdown_table(header, table)
    compiled = [row for row in rows if row["matches_eager"] is not None]
    if compiled:
        same = all(row["matches_eager"] for row in compiled)
        text += (
            "\n\nStatic cache + torch.compile generates the same tokens as eager decoding:"
            f" {'yes' if same else 'NO'}."
        )
    if profile:
        text += (
            f"\n\nminrnn's per-token forward alone (no `generate()` around it): {profile['ms_per_step']:.2f} ms. "
            f"Profiled ({profile['table']}): {profile['ops_per_step']:.0f} aten calls per token, "
            f"{100 * profile['op_share']:.0f}% of the wall time inside ops, the rest Python and dispatch between them."
        )
    return text


def memory_report(rows: list, device: str) -> str:
    base = next((row["peak_bytes"] for row in rows if row["model"] == "minrnn (minGRU)"), None)
    method = ("torch.cuda.max_memory_allocated" if device == "cuda"
              else "torch.profiler allocation events (torch tensors only)")
    table = [[row["model"], f"{row['batch']} x {row['seq']}",
              "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:,.0f}",
              ratio(row["peak_bytes"], base), row["note"]] for row in rows]
    return f"Peak memory of one training forward + backward above the weights and gradients ({method}).\n\n" + (
        markdown_table(["model", "batch x seq", "peak MiB", "this / minrnn", "note"], table)
    )


def targets_report(results: dict, device: str) -> str:
    """The CPU speed targets, computed from this run (a target whose rows were not run is left out)."""
    checks = []  # (target, measured, threshold, higher_is_better)

    def add(target, measured, threshold, higher=True):
        if measured is not None:
            checks.append((target, measured, threshold, higher))

    def find(rows, **match):
        return next((row for row in rows if all(row[k] == v for k, v in match.items())), None)

    scan, layer, train, decode = (results.get(k, []) for k in ("scan", "layer", "train", "decode"))
    fast_backend = "triton" if device == "cuda" else "cpu"
    for shape in dict.fromkeys(row["shape"] for row in scan):
        floor = find(scan, shape=shape, backend="elementwise floor")
        fast = find(scan, shape=shape, backend=fast_backend)
        if floor and fast:
            add(f"{fast_backend} scan fwd+bwd / floor at {shape} <= 3", fast["forward_backward_s"] / floor["forward_s"],
                3.0, higher=False)
    if layer:
        seq = max(row["seq"] for row in layer)
        ours = find(layer, layer="minGRU (minrnn)", seq=seq)
        for other, threshold in (("nn.GRU", 5.0), ("nn.LSTM", 3.0)):
            theirs = find(layer, layer=other, seq=seq)
            if ours and theirs:
                add(f"layer step at T={seq}: {other} / minGRU >= {threshold:g}",
                    theirs["forward_backward_s"] / ours["forward_backward_s"], threshold)
    if train:
        seqs = sorted({row["seq"] for row in train})
        for other, seq, threshold in (("GPT-2 (sdpa)", seqs[len(seqs) // 2], 1.3), ("GPT-2 (sdpa)", seqs[-1], 3.0),
                                      ("minGRU-pytorch LM", seqs[len(seqs) // 2], 2.0)):
            ours, theirs = find(train, model="minrnn (minGRU)", seq=seq), find(train, model=other, seq=seq)
            if ours and theirs:
                add(f"train tok/s at T={seq}: minrnn / {other} >= {threshold:g}",
                    ours["tokens_per_s"] / theirs["tokens_per_s"], threshold)
    if decode:
        prompts = sorted({row["prompt"] for row in decode})
        short, long = find(decode, model="minrnn (minGRU)", prompt=prompts[0]), find(
            decode, model="minrnn (minGRU)", prompt=prompts[-1])
        gpt2 = find(decode, model="GPT-2 (sdpa)", prompt=prompts[-1])
        add(f"decode latency at {prompts[-1]} / at {prompts[0]} <= 1.1",
            long["ms_per_token"] / short["ms_per_token"], 1.1, higher=False)
        add(f"decode tok/s at {prompts[-1]}: minrnn / GPT-2 >= 3", long["tokens_per_s"] / gpt2["tokens_per_s"], 3.0)
    table = [[target, f"{measured:.2f}", "met" if (measured >= threshold if higher else measured <= threshold)
              else "NOT met"] for target, measured, threshold, higher in checks]
    return markdown_table(["target", "measured", ""], table)


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("scan", "layer", "train", "decode") if results.get(key)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        rows = results[key]
        if key in ("scan", "layer"):
            group_key, name_key, value_key = (
                ("shape", "backend", "forward_backward_s") if key == "scan" else ("seq", "layer", "forward_backward_s")
            )
            groups = list(dict.fromkeys(row[group_key] for row in rows))
            names = [n for n in dict.fromkeys(row[name_key] for row in rows)]
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                values = []
                for group in groups:
                    row = next((r for r in rows if r[group_key] == group and r[name_key] == name), None)
                    value = None if row is None else (row[value_key] or row["forward_s"])  # the floor: one pass
                    values.append(float("nan") if value is None else 1e3 * value)
                ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
            ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
            ax.set_xticklabels([str(g) if key == "scan" else f"T={g}" for g in groups])
            ax.set_yscale("log")
            ax.set_ylabel("forward + backward, ms (log)")
            ax.set_title("scan backends vs elementwise floor" if key == "scan" else "one layer, training step")
        else:
            x_key, y_key = ("seq", "tokens_per_s") if key == "train" else ("prompt", "ms_per_token")
            for name in dict.fromkeys(row["model"] for row in rows):
                points = sorted((row[x_key], row[y_key]) for row in rows if row["model"] == name)
                ax.plot(*zip(*points), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length" if key == "train" else "prompt length")
            ax.set_ylabel("training tokens/s" if key == "train" else "ms per generated token")
            ax.set_title("training throughput, ~equal params" if key == "train" else "decode latency, batch 1")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, notes: list, device: str, machine: str, out: Path, quick: bool) -> Path:
    sections = [f"# minrnn benchmark ({device}{', --quick sizes' if quick else ''})", "", f"Machine: {machine}", ""]
    for note in notes:
        sections += [f"- {note}"]
    sections += ["", "## Targets", "", targets_report(results, device)]
    if results.get("scan"):
        sections += ["", "## Scan backends vs the elementwise floor (fp32)", "",
                     ("The floor is one `torch.addcmul(b, a, h_prev, out=h)` pass over tensors of the scan's shape"
                      " (three read, one written into a preallocated output, so no page faults for fresh memory, which"
                      " a scan returning a new tensor pays); both ratio columns divide by this same one-pass floor."),
                     "",
                     scan_report(results["scan"])]
    if results.get("layer"):
        sections += ["", "## One layer, training step (forward + backward)", "",
                     ("minGRU/minLSTM (minrnn): `MinRNNMixer` (in_proj -> scan, expansion 1 so no projection back,"
                      " as in the paper; no conv)."), "",
                     layer_report(results["layer"])]
    if results.get("train"):
        sections += ["", "## Language models, training tokens/s (forward + backward + AdamW)", "",
                     "Parameters compared leave out GPT-2's position table (in brackets: the total).", "",
                     train_report(results["train"])]
    if results.get("decode"):
        sections += ["", "## Decoding (greedy, batch 1, decode steps only)", "",
                     decode_report(results["decode"], results.get("decode_profile"))]
    if results.get("memory"):
        sections += ["", "## Memory", "", memory_report(results["memory"], device)]
    path = out / f"benchmark_{device}.md"
    path.write_text("\n".join(sections) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: every section in seconds (smoke test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the static-cache + torch.compile decode (compiling takes ~1 minute on a CPU)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu.")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()  # Mamba's "fast path is not available" warning, generation hints
    torch.manual_seed(0)
    machine = machine_description(device)
    print(machine, flush=True)
    scan_backend = resolve_backend(None, torch.empty(1, 1, 1, device=device))
    notes = [f"minrnn's scan backend for {device} tensors: {scan_backend}."]
    if LucidrainsMinLM is None:
        notes.append(MINGRU_PYTORCH_MISSING)

    results = {}
    started = time.perf_counter()
    if "scan" in args.sections:
        results["scan"] = bench_scan(device, sizes)
    if "layer" in args.sections:
        results["layer"] = bench_layer(device, sizes)
    if {"train", "decode", "memory"} & set(args.sections):
        models = language_models(sizes)
        if "train" in args.sections:
            results["train"] = bench_train(device, sizes, models)
            if device == "cpu":
                notes.append("Mamba trains through transformers' sequential CPU path (no CUDA kernels): measured at "
                             f"T={sizes.mamba_cpu_seq} only, batch {sizes.mamba_cpu_batch}, one timed step.")
        if "decode" in args.sections:
            results["decode"] = bench_decode(device, sizes, models, compile_decode=not args.no_compile)
            results["decode_profile"] = profile_decode(device, sizes, models, args.out / f"decode_profile_{device}.txt")
        if "memory" in args.sections:
            results["memory"] = bench_memory(device, sizes, models)
    notes.append(f"Whole run: {time.perf_counter() - started:.0f} s.")

    report = write_report(results, notes, device, machine, args.out, args.quick)
    plot(results, args.out / f"benchmark_{device}.png", machine)
    (args.out / f"benchmark_{device}.json").write_text(json.dumps(
        {"machine": machine, "quick": args.quick, "notes": notes, **results}, indent=1, default=str))
    print("\n" + report.read_text(), flush=True)
    return report


if __name__ == "__main__":
    main()
