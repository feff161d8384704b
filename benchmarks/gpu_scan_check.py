"""One prepared GPU check of the Triton scan kernels (`modeling_minrnn/scan_triton.py`), sized to finish in minutes
on one H100/H200.

    python benchmarks/gpu_scan_check.py            # ~2-3 minutes, tables on stdout and, with OUT=DIR set,
                                                   # in DIR/gpu_scan_check.md

1. Correctness on the GPU: fused and chunked kernels, values and gradients, against a sequential float64 reference
   (odd shapes, T = 1, initial state, fp16/bf16 inputs, -inf padding, and the states at T = 65,536).
2. Speed: forward and forward+backward of both variants at (8, 4096, 256), (1, 65536, 256), (64, 4096, 1024) with
   bf16 and fp32 inputs, as achieved GB/s (the minimum bytes read + written over the time) against the card's peak
   and a measured device-to-device copy, and against the PyTorch log-space scan (cumsum + logcumsumexp).
3. A minGRU layer's training step (forward + backward) against `nn.GRU` (cuDNN), B = 64, T = 512 / 4096,
   hidden 256, as in the paper's comparison.
4. A short sweep of tile sizes for the fused and chunked kernels, to choose the defaults.

The kernel module is loaded from its file, not through the package, so that this runs under whatever transformers
version the GPU machine has. Exits non-zero if a correctness check fails.
"""

import functools
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

START = time.perf_counter()
SWEEP_DEADLINE_S = 170  # the whole script must stay under 4 minutes; the sweep is the part to drop
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scan_triton", ROOT / "modeling_minrnn" / "scan_triton.py")
scan_triton = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scan_triton)
triton_scan = scan_triton.triton_scan

DEVICE = "cuda"
CORRECTNESS_CASES = [  # batch, seq, dim, input dtype, chunk_size (None: fused), with h0, fraction of padded steps
    (3, 1, 100, torch.float32, None, True, 0.0),
    (2, 1000, 300, torch.float32, None, True, 0.0),
    (2, 1000, 300, torch.float32, 96, True, 0.0),
    (4, 777, 65, torch.float32, 100, False, 0.2),
    (1, 4097, 64, torch.float32, None, True, 0.0),
    (1, 4097, 64, torch.float32, 256, True, 0.0),
    (2, 1000, 300, torch.bfloat16, None, True, 0.1),
    (2, 1000, 300, torch.bfloat16, 128, True, 0.1),
    (2, 1000, 300, torch.float16, 64, False, 0.0),
]
LONG_SHAPE = (1, 65536, 256)
SCAN_SHAPES = [(8, 4096, 256), (1, 65536, 256), (64, 4096, 1024)]
GRU_BATCH, GRU_SIZE, GRU_LENGTHS = 64, 256, (512, 4096)
SWEEP_SHAPES = [((64, 4096, 1024), False), ((8, 4096, 256), True), ((1, 65536, 256), True)]
REPORT = []


def emit(text=""):
    print(text, flush=True)
    REPORT.append(text)


def table(header, rows):
    emit("| " + " | ".join(header) + " |")
    emit("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        emit("| " + " | ".join(str(cell) for cell in row) + " |")
    emit()


# ---------------------------------------------------------------- references


def reference_scan(log_a, log_b, initial_state=None, grad_h=None):
    """Sequential float64 states, and (given `grad_h`) the gradients by the reverse recurrence, one step at a time."""
    a, b = log_a.double().exp(), log_b.double().exp()
    h0 = a.new_zeros(a.shape[0], a.shape[2]) if initial_state is None else initial_state.double()
    h = torch.empty_like(a)
    state = h0
    for t in range(a.shape[1]):
        state = a[:, t] * state + b[:, t]
        h[:, t] = state
    if grad_h is None:
        return h, None
    g = grad_h.double()
    d_log_a, d_log_b = torch.empty_like(a), torch.empty_like(b)
    dh = torch.zeros_like(h0)
    for t in reversed(range(a.shape[1])):
        dh = g[:, t] + (a[:, t + 1] * dh if t + 1 < a.shape[1] else 0)
        d_log_a[:, t] = dh * a[:, t] * (h[:, t - 1] if t > 0 else h0)
        d_log_b[:, t] = dh * b[:, t]
    return h, (d_log_a, d_log_b, a[:, 0] * dh)


def log_space_scan(log_a, log_b):
    """The paper's PyTorch scan (Heinsen): h = exp(a* + logcumsumexp(log_b - a*)), a* = cumsum(log_a)."""
    a_star = log_a.float().cumsum(dim=1)
    return (a_star + torch.logcumsumexp(log_b.float() - a_star, dim=1)).exp()


def make_inputs(batch, seq, dim, dtype, with_h0=False, pad_fraction=0.0, seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    log_a = F.logsigmoid(torch.randn(batch, seq, dim, device=DEVICE, generator=generator) + 2.0)
    log_b = torch.randn(batch, seq, dim, device=DEVICE, generator=generator) - 1.0
    if pad_fraction:
        pad = torch.rand(batch, seq, 1, device=DEVICE, generator=generator) < pad_fraction
        log_a = log_a.masked_fill(pad, 0.0)
        log_b = log_b.masked_fill(pad, float("-inf"))
    h0 = torch.randn(batch, dim, device=DEVICE, generator=generator) if with_h0 else None
    return log_a.to(dtype), log_b.to(dtype), h0


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- 1. correctness


def check_correctness():
    emit("## Correctness against a sequential float64 reference")
    emit()
    emit("Max |error| / max |reference|, states and gradients (log_a, log_b, h0). Limit: 1e-5 for fp32 states and")
    emit("gradients (both are fp32 inside), 1e-2 for gradients returned in fp16/bf16.")
    emit()
    rows, ok = [], True
    for batch, seq, dim, dtype, chunk_size, with_h0, pad_fraction in CORRECTNESS_CASES:
        log_a, log_b, h0 = make_inputs(batch, seq, dim, dtype, with_h0, pad_fraction)
        leaves = [t.requires_grad_() for t in (log_a, log_b, h0) if t is not None]
        h = triton_scan(log_a, log_b, h0, chunk_size=chunk_size)
        grad_h = torch.randn_like(h)
        grads = torch.autograd.grad(h, leaves, grad_h)
        expected, expected_grads = reference_scan(log_a.detach(), log_b.detach(), h0, grad_h)
        errors = [relative_error(h, expected)] + [relative_error(g, e) for g, e in zip(grads, expected_grads)]
        limits = [1e-5] + [1e-5 if g.dtype == torch.float32 else 1e-2 for g in grads]
        padded_grad_ok = True
        if pad_fraction:
            padded = torch.isinf(log_b.detach())
            padded_grad_ok = bool((grads[1][padded] == 0).all())
        case_ok = all(e <= limit for e, limit in zip(errors, limits)) and padded_grad_ok
        ok &= case_ok
        variant = "fused" if chunk_size is None else f"chunked ({chunk_size})"
        rows.append([f"({batch}, {seq}, {dim})", str(dtype).removeprefix("torch."), variant,
                     "yes" if with_h0 else "no", f"{pad_fraction:.0%}"] + [f"{e:.1e}" for e in errors]
                    + ["-"] * (4 - len(errors)) + ["PASS" if case_ok else "FAIL"])
    table(["shape", "inputs", "variant", "h0", "padding", "states", "d log_a", "d log_b", "d h0", ""], rows)

    emit(f"Long sequence {LONG_SHAPE}, fp32 inputs, states only:")
    emit()
    log_a, log_b, _ = make_inputs(*LONG_SHAPE, torch.float32)
    expected, _ = reference_scan(log_a, log_b)
    rows = []
    for name, h in [("triton fused", triton_scan(log_a, log_b, chunked=False)),
                    ("triton chunked", triton_scan(log_a, log_b, chunked=True)),
                    ("PyTorch log-space", log_space_scan(log_a, log_b))]:
        error = relative_error(h, expected)
        passed = error <= 1e-5 or name.startswith("PyTorch")  # the log-space scan is shown, not required
        ok &= passed
        rows.append([name, f"{error:.1e}", "PASS" if passed else "FAIL"])
    table(["scan", "max rel. error", ""], rows)
    return ok


# ---------------------------------------------------------------- 2. speed


def bench_ms(fn, *args, min_reps=10, budget_s=0.25):
    """Median time of `fn(*args)` in ms (CUDA events on the GPU), after a warm-up call."""
    fn(*args)
    times, stop = [], time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < stop and len(times) < 200):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            tic = time.perf_counter()
            fn(*args)
            times.append(1e3 * (time.perf_counter() - tic))
    return statistics.median(times)


def forward_only(scan, inputs):
    with torch.no_grad():
        return scan(*inputs)


def forward_and_backward(scan, inputs, grad_h):
    return torch.autograd.grad(scan(*inputs), inputs, grad_h)


def peak_bandwidth():
    """The device's name, its datasheet peak in GB/s (None if unknown) and a measured device-to-device copy."""
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    peaks = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0}  # first match wins
    peak = next((value for key, value in peaks.items() if key in name), None)
    x = torch.empty(2 ** 30 if DEVICE == "cuda" else 2 ** 24, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    copy = 2 * x.numel() / bench_ms(y.copy_, x) / 1e6
    return name, peak, copy


def scan_bytes(numel, dtype, backward):
    """Least traffic: forward reads log_a, log_b and writes fp32 h; backward also reads fp32 grad and h, log_a and
    log_b, and writes both gradients in the input dtype."""
    size = torch.tensor([], dtype=dtype).element_size()
    forward = numel * (2 * size + 4)
    return forward + (numel * (4 + 4 + 2 * size + 2 * size) if backward else 0)


def time_scans(peak, copy):
    emit("## Speed of the scan")
    emit()
    emit("GB/s = least bytes read + written / median time; the chunked kernels read the inputs twice, so their real")
    emit(f"traffic is higher. Peak: {peak or 'unknown'} GB/s (datasheet); measured copy: {copy:.0f} GB/s.")
    emit()
    rows = []
    for batch, seq, dim in SCAN_SHAPES:
        default = "chunked" if scan_triton._default_chunk_size(batch, seq, dim, torch.device(DEVICE)) else "fused"
        for dtype in (torch.bfloat16, torch.float32):
            log_a, log_b, _ = make_inputs(batch, seq, dim, dtype)
            log_a.requires_grad_()
            log_b.requires_grad_()
            grad_h = torch.randn(batch, seq, dim, device=DEVICE)
            scans = {
                "PyTorch log-space": log_space_scan,
                "triton fused": functools.partial(triton_scan, chunked=False),
                "triton chunked": functools.partial(triton_scan, chunked=True),
            }
            forward_bytes = scan_bytes(log_a.numel(), dtype, backward=False)
            both_bytes = scan_bytes(log_a.numel(), dtype, backward=True)
            baseline = None
            for name, scan in scans.items():
                forward = bench_ms(forward_only, scan, (log_a, log_b))
                both = bench_ms(forward_and_backward, scan, (log_a, log_b), grad_h)
                baseline = baseline or (forward, both)
                achieved = both_bytes / both / 1e6
                rows.append([
                    f"({batch}, {seq}, {dim})", str(dtype).removeprefix("torch."),
                    name + (" (default)" if name == f"triton {default}" else ""),
                    f"{forward:.3f}", f"{forward_bytes / forward / 1e6:.0f}", f"{both:.3f}", f"{achieved:.0f}",
                    f"{achieved / peak:.0%}" if peak else "-",
                    f"{baseline[0] / forward:.1f}x / {baseline[1] / both:.1f}x",
                ])
    table(["shape", "inputs", "scan", "fwd ms", "fwd GB/s", "fwd+bwd ms", "fwd+bwd GB/s", "fwd+bwd of peak",
           "speed-up vs log-space (fwd / fwd+bwd)"], rows)


# ---------------------------------------------------------------- 3. minGRU vs nn.GRU


class MinGRU(torch.nn.Module):
    """The paper's minGRU layer in log space: z = sigmoid(k), h~ = g(x W_h), h_t = (1 - z) h_{t-1} + z h~."""

    def __init__(self, size, scan):
        super().__init__()
        self.to_gates = torch.nn.Linear(size, 2 * size)
        self.scan = scan

    def forward(self, x):
        k, hidden = self.to_gates(x).chunk(2, dim=-1)
        log_tilde_h = torch.where(hidden >= 0, (F.relu(hidden) + 0.5).log(), -F.softplus(-hidden))  # log g(h~)
        return self.scan(-F.softplus(k), -F.softplus(-k) + log_tilde_h)  # log(1 - z), log z + log h~


def training_step(forward, x, weight, params):
    return torch.autograd.grad((forward(x) * weight).sum(), params)


def time_gru():
    emit("## Training step (forward + backward): minGRU layer vs nn.GRU (cuDNN)")
    emit()
    emit(f"B = {GRU_BATCH}, input = hidden = {GRU_SIZE}, fp32 weights and activations; loss = sum(outputs x a fixed")
    emit("random tensor); the step is the forward and the gradients of all weights.")
    emit()
    gru = torch.nn.GRU(GRU_SIZE, GRU_SIZE, batch_first=True).to(DEVICE)
    min_gru_triton = MinGRU(GRU_SIZE, triton_scan).to(DEVICE)
    min_gru_log_space = MinGRU(GRU_SIZE, log_space_scan).to(DEVICE)
    layers = {  # name: (module holding the weights, forward)
        "nn.GRU (cuDNN)": (gru, lambda x: gru(x)[0]),
        "minGRU, triton scan": (min_gru_triton, min_gru_triton),
        "minGRU, PyTorch log-space scan": (min_gru_log_space, min_gru_log_space),
    }
    rows = []
    for seq in GRU_LENGTHS:
        x = torch.randn(GRU_BATCH, seq, GRU_SIZE, device=DEVICE)
        weight = torch.randn(GRU_BATCH, seq, GRU_SIZE, device=DEVICE)
        times = {}
        for name, (module, forward) in layers.items():
            times[name] = bench_ms(training_step, forward, x, weight, list(module.parameters()), min_reps=5)
        for name, ms in times.items():
            rows.append([seq, name, f"{ms:.2f}", f"{times['nn.GRU (cuDNN)'] / ms:.1f}x"])
    table(["T", "layer", "ms / step", "speed-up vs nn.GRU"], rows)


# ---------------------------------------------------------------- 4. tile sweep


def sweep_tiles():
    emit("## Tile sweep (forward + backward, bf16 inputs)")
    emit()
    defaults = (scan_triton._MAX_BLOCK_T, scan_triton._MAX_BLOCK_D, scan_triton._NUM_WARPS)
    rows = []
    configs = [defaults, (32, 64, 4), (16, 32, 4), (32, 32, 4), (32, 64, 8), (16, 128, 8)]
    for (batch, seq, dim), chunked in SWEEP_SHAPES:
        log_a, log_b, _ = make_inputs(batch, seq, dim, torch.bfloat16)
        log_a.requires_grad_()
        log_b.requires_grad_()
        grad_h = torch.randn(batch, seq, dim, device=DEVICE)
        for config in configs:
            if time.perf_counter() - START > SWEEP_DEADLINE_S:
                emit(f"(sweep stopped at {SWEEP_DEADLINE_S} s to keep the script under 4 minutes)")
                table(["shape", "variant", "BLOCK_T", "BLOCK_D", "warps", "fwd+bwd ms", "GB/s"], rows)
                return
            scan_triton._MAX_BLOCK_T, scan_triton._MAX_BLOCK_D, scan_triton._NUM_WARPS = config
            scan = functools.partial(triton_scan, chunked=chunked)
            ms = bench_ms(forward_and_backward, scan, (log_a, log_b), grad_h, min_reps=5, budget_s=0.1)
            rows.append([f"({batch}, {seq}, {dim})", "chunked" if chunked else "fused", *config, f"{ms:.3f}",
                         f"{scan_bytes(log_a.numel(), torch.bfloat16, True) / ms / 1e6:.0f}"])
        scan_triton._MAX_BLOCK_T, scan_triton._MAX_BLOCK_D, scan_triton._NUM_WARPS = defaults
    table(["shape", "variant", "BLOCK_T", "BLOCK_D", "warps", "fwd+bwd ms", "GB/s"], rows)


def main():
    if (DEVICE == "cuda" and not torch.cuda.is_available()) or not scan_triton.triton_scan_available(
            torch.zeros(1, device=DEVICE)):
        sys.exit("This check needs a CUDA GPU and Triton.")
    torch.backends.cudnn.benchmark = True
    name, peak, copy = peak_bandwidth()
    import triton

    emit(f"# Triton scan check on {name} (torch {torch.__version__}, triton {triton.__version__})")
    emit()
    ok = check_correctness()
    emit(f"(correctness done at {time.perf_counter() - START:.0f} s)")
    emit()
    time_scans(peak, copy)
    time_gru()
    emit(f"(timings done at {time.perf_counter() - START:.0f} s)")
    emit()
    sweep_tiles()
    emit(f"Total {time.perf_counter() - START:.0f} s. Correctness: {'PASS' if ok else 'FAIL'}.")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_scan_check.md").write_text("\n".join(REPORT) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
