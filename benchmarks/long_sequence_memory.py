"""Peak memory and time of one training backward over a long sequence: `chunked_backward` against full backprop.

    nice -n 5 python benchmarks/long_sequence_memory.py            # T = 16k, 64k, 256k, 1M tokens
    python benchmarks/long_sequence_memory.py --lengths 4096 16384 --out /tmp/lsm   # quick

A small model (hidden 64, 2 minGRU layers, expansion 2, conv 4, MLP 256, vocab 256, batch 1, random tokens) computes
the next-token loss over T tokens and its gradients, either by full backprop (`model(ids, labels=ids).loss
.backward()`) or by `minrnn_training.chunked_backward.chunked_backward(accelerator, model, ids, chunk_size=...)`.
Every point runs in a fresh subprocess: a warm-up call at 512 tokens, a first call at T (RSS growth), 3 timed calls
(the best is reported), then one call under `torch.profiler` for the tensor peak. Two peaks are reported:

- tensor peak: torch.profiler's allocation and free events (`profile_memory=True`) summed in time order, above
  what was live before the call (`benchmark.peak_memory_bytes`): exact for tensors, blind to allocator slack;
- RSS growth: the process's peak resident size (`resource.getrusage` `ru_maxrss`, after the first call at T)
  minus its resident size just before that call: everything the OS had to provide, allocator slack included.

Full backprop is skipped where the tensor peak projected from its largest measured point (it grows linearly in T)
exceeds `--full-limit-gib` (default 8 GiB). Writes `long_sequence_memory.md` and
`.json` under `--out`.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

MODEL = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "expansion_factor": 2.0, "conv_kernel": 4,
         "intermediate_size": 256}
LENGTHS = (16_384, 65_536, 262_144, 1_048_576)
GIB = 2**30


def resident_bytes() -> int:
    """The process's current resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_point(method: str, seq: int, chunk_size: int, threads: int) -> dict:
    """One point, in this process: warm-up, a timed call (RSS growth), a profiled call (tensor peak)."""
    from accelerate import Accelerator
    from benchmark import peak_memory_bytes

    from minrnn_training.chunked_backward import chunked_backward
    from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM

    accelerator = Accelerator(cpu=True)  # one process: its backward is `loss.backward()`
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = MinRNNForCausalLM(MinRNNConfig(**MODEL)).train()

    def step(ids):
        model.zero_grad(set_to_none=True)
        if method == "full":
            loss = model(ids, labels=ids, use_cache=False).loss
            loss.backward()
            return float(loss)
        return float(chunked_backward(accelerator, model, ids, chunk_size=chunk_size).loss)

    generator = torch.Generator().manual_seed(1)
    step(torch.randint(0, MODEL["vocab_size"], (1, 512), generator=generator))  # kernels built, threads started
    ids = torch.randint(0, MODEL["vocab_size"], (1, seq), generator=generator)
    model.zero_grad(set_to_none=True)  # the gradients' own memory stays out of the step's peak
    before = resident_bytes()
    step(ids)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # ru_maxrss is in KiB on Linux
    # Timed after the first call at this length, which also pays one-off costs (~10x at 16k tokens here); the best
    # of 3, as other jobs may load the machine.
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = step(ids)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    model.zero_grad(set_to_none=True)
    tensor_peak = peak_memory_bytes(lambda: step(ids), "cpu")
    return {"method": method, "seq": seq, "chunk_size": chunk_size if method == "chunked" else None,
            "seconds": seconds, "tokens_per_s": seq / seconds, "tensor_peak_bytes": tensor_peak,
            "rss_growth_bytes": rss_growth, "loss": loss, "skipped": None}


def run_point(method: str, seq: int, chunk_size: int, threads: int) -> dict:
    """`measure_point` in a fresh subprocess, so that no earlier point's memory or peak counts."""
    command = [sys.executable, __file__, "--point", method, str(seq), "--chunk-size", str(chunk_size),
               "--threads", str(threads)]
    # This checkout's packages first, whichever copy is installed.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": path})
    if result.returncode != 0:
        raise RuntimeError(f"{method} at T={seq} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(rows: list, args) -> str:
    def mib(value):
        return "-" if value is None else f"{value / 2**20:,.0f}"

    table = ["| T (tokens) | method | tensor peak (MiB) | RSS growth (MiB) | time (s) | tokens/s | note |",
             "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        name = f"chunked ({row['chunk_size']:,})" if row["method"] == "chunked" else "full backprop"
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        rate = "-" if row["seconds"] is None else f"{row['tokens_per_s']:,.0f}"
        table.append(f"| {row['seq']:,} | {name} | {mib(row['tensor_peak_bytes'])} | {mib(row['rss_growth_bytes'])} "
                     f"| {seconds} | {rate} | {row['skipped'] or ''} |")
    params = sum(p.numel() for p in __import__("modeling_minrnn").MinRNNForCausalLM(
        __import__("modeling_minrnn").MinRNNConfig(**MODEL)).parameters())
    header = [
        "# Long-sequence training: peak memory of one backward, chunked against full backprop",
        "",
        (f"Model: minGRU, {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, expansion "
         f"{MODEL['expansion_factor']:g}, conv {MODEL['conv_kernel']}, MLP {MODEL['intermediate_size']}, vocab "
         f"{MODEL['vocab_size']} ({params:,} parameters); batch 1, fp32, training mode. Tensor peak: torch.profiler "
         "allocation events above what was live before the call. RSS growth: peak resident size of the process "
         "during the call minus its size before it. Each point in a fresh process."),
        "",
        (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch "
         f"threads, torch {torch.__version__}; other jobs running, so times are rough (compare within the run)."),
        "",
        "Command: `" + " ".join(["python benchmarks/long_sequence_memory.py", *sys.argv[1:]]) + "`",
        "",
    ]
    return "\n".join(header + table) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--full-limit-gib", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--point", nargs=2, metavar=("METHOD", "T"), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    if args.point:
        print(json.dumps(measure_point(args.point[0], int(args.point[1]), args.chunk_size, args.threads)))
        return None

    rows, full_per_token = [], None
    for seq in sorted(args.lengths):
        rows.append(run_point("chunked", seq, args.chunk_size, args.threads))
        print(rows[-1], flush=True)
        projected = None if full_per_token is None else full_per_token * seq
        if projected is not None and projected > args.full_limit_gib * GIB:
            rows.append({"method": "full", "seq": seq, "chunk_size": None, "seconds": None, "tokens_per_s": None,
                         "tensor_peak_bytes": None, "rss_growth_bytes": None, "loss": None,
                         "skipped": f"skipped: projected {projected / GIB:.1f} GiB > {args.full_limit_gib:g} GiB"})
        else:
            rows.append(run_point("full", seq, args.chunk_size, args.threads))
            full_per_token = rows[-1]["tensor_peak_bytes"] / seq
        print(rows[-1], flush=True)
    text = report(rows, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_sequence_memory.md").write_text(text)
    (out / "long_sequence_memory.json").write_text(json.dumps({"model": MODEL, "rows": rows}, indent=2) + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
