"""Triton scan kernels (`modeling_minrnn/scan_triton.py`) against a sequential float64 reference, values and gradients.

Without a GPU the kernels run in Triton's CPU interpreter, which has to be switched on (`TRITON_INTERPRET=1`) before
the kernels are defined: `test_kernels_in_interpreter` re-runs this file in a subprocess with it set, and the kernel
tests run there. On a CUDA machine they run directly on the GPU.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_scan

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
RUNS_KERNELS = HAS_TRITON and (INTERPRET or DEVICE == "cuda")
MODULE_PATH = Path(__file__).resolve().parents[1] / "modeling_minrnn" / "scan_triton.py"

kernels = pytest.mark.skipif(
    not RUNS_KERNELS,
    reason="needs Triton and CUDA; without a GPU these run in test_kernels_in_interpreter's subprocess",
)


def make_inputs(batch, seq, dim, with_h0, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    log_a = F.logsigmoid(torch.randn(batch, seq, dim, generator=generator) + 2.0)  # a in (0, 1), mostly near 1
    log_b = torch.randn(batch, seq, dim, generator=generator) - 1.0
    h0 = torch.randn(batch, dim, generator=generator) if with_h0 else None
    leaves = [t.to(DEVICE, dtype).requires_grad_() for t in (log_a, log_b)]
    if with_h0:
        leaves.append(h0.to(DEVICE).requires_grad_())
    return leaves


def run_both(leaves, seed=1, **kwargs):
    """States and gradients (for a random upstream gradient) of the kernel and of the reference."""
    from modeling_minrnn.scan_triton import triton_scan

    h = triton_scan(*leaves, **kwargs)
    reference_leaves = [leaf.detach().double().requires_grad_() for leaf in leaves]
    expected = reference_scan(*reference_leaves)
    upstream = torch.randn(h.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    grads = torch.autograd.grad(h, leaves, upstream)
    expected_grads = torch.autograd.grad(expected, reference_leaves, upstream.double())
    return h, expected, grads, expected_grads


# (batch, seq, dim, chunk_size, with initial state): channel counts off the 64-wide block and off powers of two, T = 1,
# T off the 16-step tile, chunks off the tile size, one-step chunks, several tiles per chunk, a short last chunk.
SHAPES = [
    pytest.param(2, 5, 20, None, True, id="fused-small"),
    pytest.param(1, 40, 8, None, False, id="fused-two-tiles"),
    pytest.param(1, 3, 70, None, True, id="fused-two-channel-blocks"),
    pytest.param(3, 1, 8, None, True, id="fused-one-step"),
    pytest.param(1, 70, 8, 16, True, id="chunked-short-last-chunk"),
    pytest.param(2, 23, 5, 7, False, id="chunked-odd-chunk"),
    pytest.param(1, 6, 3, 1, True, id="chunked-one-step-chunks"),
    pytest.param(1, 100, 4, 40, True, id="chunked-two-tiles-per-chunk"),
]


@kernels
class TestKernels:
    """Run by test_kernels_in_interpreter in a TRITON_INTERPRET=1 subprocess when there is no GPU."""

    @pytest.mark.parametrize("batch, seq, dim, chunk_size, with_h0", SHAPES)
    def test_matches_reference(self, batch, seq, dim, chunk_size, with_h0):
        leaves = make_inputs(batch, seq, dim, with_h0)
        h, expected, grads, expected_grads = run_both(leaves, chunk_size=chunk_size)
        assert h.dtype == torch.float32 and h.shape == (batch, seq, dim)
        torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5)
        for name, grad, expected_grad in zip(("log_a", "log_b", "initial_state"), grads, expected_grads):
            assert grad.dtype == torch.float32, name
            torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("chunk_size", [None, 8], ids=["fused", "chunked"])
    def test_half_precision_inputs_accumulate_in_fp32(self, chunk_size):
        leaves = make_inputs(2, 30, 12, with_h0=True, dtype=torch.bfloat16)
        h, expected, grads, expected_grads = run_both(leaves, chunk_size=chunk_size)
        # The reference sees the same bf16 values upcast, so the states agree to fp32 accuracy.
        assert h.dtype == torch.float32
        torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5)
        for leaf, grad, expected_grad in zip(leaves, grads, expected_grads):
            assert grad.dtype == leaf.dtype
            # Gradients are fp32 inside and rounded once to the input's dtype.
            torch.testing.assert_close(grad, expected_grad.to(leaf.dtype), rtol=1e-2, atol=1e-2)

    @pytest.mark.parametrize("chunk_size", [None, 8], ids=["fused", "chunked"])
    def test_padding_leaves_state_and_gradient_untouched(self, chunk_size):
        from modeling_minrnn.scan_triton import triton_scan

        log_a, log_b, h0 = make_inputs(2, 24, 12, with_h0=True)
        pad = torch.zeros(2, 24, dtype=torch.bool, device=DEVICE)
        pad[0, :9] = True  # left padding
        pad[1, 10:15] = True  # a hole inside the sequence
        with torch.no_grad():
            log_a[pad] = 0.0
            log_b[pad] = float("-inf")
        h, expected, grads, expected_grads = run_both([log_a, log_b, h0], chunk_size=chunk_size)
        torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(h).all()
        assert torch.equal(h[0, :9], h0[0].detach().expand(9, -1)), "left padding must carry h0 unchanged"
        assert torch.equal(h[1, 10:15], h[1, 9].expand(5, -1)), "a padded hole must carry the state unchanged"
        d_log_b = grads[1]
        assert torch.isfinite(d_log_b).all()
        assert (d_log_b[pad] == 0).all(), "padding must get exactly zero gradient"
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)

        # A left-padded row gives what the unpadded sequence gives alone.
        alone = triton_scan(log_a[:1, 9:].detach(), log_b[:1, 9:].detach(), h0[:1].detach(), chunk_size=chunk_size)
        torch.testing.assert_close(h[:1, 9:], alone, rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("batch, seq, dim, chunk_size, with_h0", [SHAPES[0], SHAPES[1], SHAPES[4], SHAPES[5],
                                                                       SHAPES[6]])
    def test_resets_match_reference(self, batch, seq, dim, chunk_size, with_h0):
        from modeling_minrnn.scan_triton import triton_scan

        leaves = make_inputs(batch, seq, dim, with_h0)
        reset = torch.rand(batch, seq, generator=torch.Generator().manual_seed(3)) < 0.2
        reset[0, 0] = True  # drops h0 in row 0
        reset[-1, seq // 2:] = True  # a run of one-token sequences, across chunk boundaries
        reset = reset.to(DEVICE)
        h = triton_scan(*leaves, chunk_size=chunk_size, reset=reset)
        reference_leaves = [leaf.detach().double().requires_grad_() for leaf in leaves]
        expected = reference_scan(*reference_leaves, reset=reset)
        upstream = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        grads = torch.autograd.grad(h, leaves, upstream)
        expected_grads = torch.autograd.grad(expected, reference_leaves, upstream.double())
        torch.testing.assert_close(h.double(), expected, rtol=1e-5, atol=1e-5)
        for grad, expected_grad in zip(grads, expected_grads):
            assert torch.isfinite(grad).all()
            torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-5)
        assert (grads[0][reset] == 0).all(), "log_a at a sequence start must get exactly zero gradient"
        if with_h0:
            assert (grads[2][0] == 0).all(), "a start at t = 0 drops the initial state"

    def test_chunked_flag_and_default_choice_agree(self):
        from modeling_minrnn.scan_triton import triton_scan

        leaves = [t.detach() for t in make_inputs(2, 33, 8, with_h0=True)]
        expected = reference_scan(*leaves)
        for chunked in (None, True, False):
            torch.testing.assert_close(triton_scan(*leaves, chunked=chunked).double(), expected, rtol=1e-5, atol=1e-5)

    def test_linear_recurrence_dispatches_to_triton(self):
        from modeling_minrnn.scan import linear_recurrence

        leaves = [t.detach() for t in make_inputs(2, 9, 8, with_h0=True)]
        torch.testing.assert_close(
            linear_recurrence(*leaves, backend="triton"), linear_recurrence(*leaves, backend="sequential"),
            rtol=1e-5, atol=1e-5,
        )

    def test_invalid_arguments_name_the_problem(self):
        from modeling_minrnn.scan_triton import triton_scan

        x = torch.zeros(2, 4, 8, device=DEVICE)
        with pytest.raises(ValueError, match="log_b"):
            triton_scan(x, x[:, :3])
        with pytest.raises(TypeError, match="log_a"):
            triton_scan(x.double(), x.double())
        with pytest.raises(ValueError, match="initial_state"):
            triton_scan(x, x, torch.zeros(2, 7, device=DEVICE))
        with pytest.raises(ValueError, match="chunk_size"):
            triton_scan(x, x, chunk_size=0)
        with pytest.raises(ValueError, match="chunked=False"):
            triton_scan(x, x, chunked=False, chunk_size=2)
        with pytest.raises(ValueError, match="reset"):
            triton_scan(x, x, reset=torch.zeros(2, 4, device=DEVICE))


def test_default_chunk_size_splits_only_narrow_long_inputs():
    pytest.importorskip("triton")
    from modeling_minrnn import scan_triton

    cpu = torch.device("cpu")
    assert scan_triton._default_chunk_size(64, 4096, 1024, cpu) is None  # batch x channel blocks fill the GPU
    assert scan_triton._default_chunk_size(1, 100, 256, cpu) is None  # too short to split
    for batch, seq, dim in [(1, 65536, 256), (8, 4096, 256)]:
        chunk = scan_triton._default_chunk_size(batch, seq, dim, cpu)
        assert chunk % scan_triton._MAX_BLOCK_T == 0 and chunk >= scan_triton._MIN_CHUNK
        assert 2 <= -(-seq // chunk) <= seq // scan_triton._MIN_CHUNK


@pytest.mark.skipif(RUNS_KERNELS, reason="the kernels can run here")
def test_unavailable_backend_raises_clear_error():
    from modeling_minrnn.scan_triton import triton_scan, triton_scan_available

    x = torch.zeros(1, 2, 3)
    assert not triton_scan_available(x)
    with pytest.raises(RuntimeError, match="needs Triton and CUDA"):
        triton_scan(x, x)


def test_module_imports_without_triton():
    code = f"""
import importlib.abc, importlib.util, sys, torch

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")

sys.meta_path.insert(0, NoTriton())
spec = importlib.util.spec_from_file_location("scan_triton", {str(MODULE_PATH)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
x = torch.zeros(1, 2, 3)
assert not module.triton_scan_available(x)
try:
    module.triton_scan(x, x)
except RuntimeError as error:
    assert "is not installed" in str(error), error
else:
    raise AssertionError("triton_scan ran without triton")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# What torch.compile sees of the CUDA scan, checked without a GPU: the operators' fake kernels (the kernels' own launch
# code, run on fake tensors) traced with make_fx. The interpreter launches kernels eagerly, so not under it.
operators = pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs Triton, outside the interpreter")


@operators
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, 16], ids=["fused", "chunked"])
def test_operators_fake_kernels_give_shapes_and_dtypes(dtype, chunk_size):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from modeling_minrnn import scan_triton

    with FakeTensorMode():
        log_a = torch.empty(3, 50, 70, dtype=dtype, device="cuda")
        initial = torch.empty(3, 70, device="cuda")
        reset = torch.zeros(3, 50, dtype=torch.uint8, device="cuda")
        h = scan_triton._scan_op(log_a, log_a, initial, reset, chunk_size)
        grads = scan_triton._scan_backward_op(h, log_a, log_a, initial, reset, h, chunk_size)
        no_initial = scan_triton._scan_backward_op(h, log_a, log_a, None, None, h, chunk_size)[2]
    assert (h.shape, h.dtype, h.device.type) == ((3, 50, 70), torch.float32, "cuda")
    assert [(g.shape, g.dtype) for g in grads] == [((3, 50, 70), dtype), ((3, 50, 70), dtype), ((3, 70), torch.float32)]
    assert no_initial.numel() == 0


@operators
def test_cuda_tensors_trace_to_the_triton_operator():
    """`cell_recurrence` on CUDA tensors (as torch.compile traces a training step) calls the registered operator, not
    the chunked PyTorch scan; its autograd calls the backward operator."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from modeling_minrnn import scan_triton
    from modeling_minrnn.scan import cell_recurrence

    with FakeTensorMode():
        projections = torch.empty(2, 40, 2 * 24, dtype=torch.bfloat16, device="cuda")
        reset = torch.zeros(2, 40, dtype=torch.bool, device="cuda")
    graph = make_fx(lambda p, r: cell_recurrence("mingru", p, reset=r))(projections, reset).graph
    targets = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert f"{scan_triton._NAMESPACE}.triton_scan.default" in targets and "aten.cumprod.default" not in targets

    # Autograd on CPU fake tensors: a CPU-only torch cannot run the autograd engine on (fake) CUDA ones.
    def loss_grads(log_a, log_b):
        return torch.autograd.grad(scan_triton._scan_op(log_a, log_b, None, None, None).sum(), (log_a, log_b))

    leaves = [torch.zeros(2, 9, 4, requires_grad=True) for _ in range(2)]
    graph = make_fx(loss_grads, tracing_mode="fake")(*leaves).graph
    targets = {str(node.target) for node in graph.nodes if node.op == "call_function"}
    assert f"{scan_triton._NAMESPACE}.triton_scan_backward.default" in targets, targets


@pytest.mark.slow  # every kernel in Triton's Python interpreter, in a second process: ~20 s of 2 CPU cores
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
@pytest.mark.skipif(INTERPRET or DEVICE == "cuda", reason="the kernel tests run directly in this process")
def test_kernels_in_interpreter():
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", f"{__file__}::TestKernels", "-q", "-x", "-p", "no:cacheprovider"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "passed" in summary and "skipped" not in summary, result.stdout[-3000:]


# Every kernel variant `_forward` and `_backward` launch: the interpreter runs Python, so only a real build shows
# that the code generator and ptxas accept the kernels.
FORWARD_VARIANTS = [  # LOG_SPACE, REVERSE, HAS_H0, HAS_CHUNK_STATE, HAS_RESET, STORE_STATES, STORE_SUMMARY
    (True, False, True, False, False, True, False),  # fused
    (True, False, True, False, True, True, False),  # fused, packed sequences
    (True, False, False, False, True, False, True),  # chunked pass 1
    (False, False, True, False, False, True, False),  # chunked pass 2
    (True, False, True, True, True, True, False),  # chunked pass 3
    (False, True, False, False, False, True, False),  # backward pass 2
]
BACKWARD_VARIANTS = [  # HAS_H0, HAS_CHUNK_STATE, HAS_RESET, STORE_GRADS, STORE_SUMMARY
    (True, False, False, True, False),  # fused
    (True, False, True, True, False),  # fused, packed sequences
    (False, False, True, False, True),  # chunked pass 1
    (True, True, True, True, False),  # chunked pass 3
]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs Triton outside the interpreter")
def test_kernels_build_for_hopper(tmp_path):
    """Compile for sm_90 without a GPU (Triton bundles ptxas and cuobjdump); nothing may spill to local memory."""
    import triton
    from triton.backends.compiler import GPUTarget

    from modeling_minrnn import scan_triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip(f"this Triton build has no {cuobjdump}")

    def build(kernel, flag_names, flags, pointer_types):
        signature, constants = {}, {}
        for name in kernel.arg_names:
            if name in pointer_types:
                signature[name] = f"*{pointer_types[name]}"
            elif name in ("seq", "dim", "chunk_size"):
                signature[name] = "i32"
            else:
                signature[name] = "constexpr"
                constants[name] = dict(zip(flag_names, flags), BLOCK_T=scan_triton._MAX_BLOCK_T,
                                       BLOCK_D=scan_triton._MAX_BLOCK_D)[name]
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": scan_triton._NUM_WARPS})
        cubin = tmp_path / f"{kernel.__name__}{len(list(tmp_path.iterdir()))}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        assert "STACK:0 " in usage and "LOCAL:0 " in usage, f"{kernel.__name__}{flags} spills registers: {usage}"

    forward_pointers = {"x_ptr": "bf16", "y_ptr": "bf16", "h0_ptr": "fp32", "chunk_state_ptr": "fp32",
                        "reset_ptr": "u8", "out_ptr": "fp32", "decay_ptr": "fp32", "end_ptr": "fp32"}
    for flags in FORWARD_VARIANTS:
        build(scan_triton._forward_kernel, ("LOG_SPACE", "REVERSE", "HAS_H0", "HAS_CHUNK_STATE", "HAS_RESET",
                                            "STORE_STATES", "STORE_SUMMARY"), flags, forward_pointers)
    backward_pointers = {"log_a_ptr": "bf16", "log_b_ptr": "bf16", "h_ptr": "fp32", "h0_ptr": "fp32",
                         "grad_ptr": "fp32", "chunk_state_ptr": "fp32", "reset_ptr": "u8", "d_log_a_ptr": "bf16",
                         "d_log_b_ptr": "bf16", "d_h0_ptr": "fp32", "decay_ptr": "fp32", "end_ptr": "fp32"}
    for flags in BACKWARD_VARIANTS:
        build(scan_triton._backward_kernel, ("HAS_H0", "HAS_CHUNK_STATE", "HAS_RESET", "STORE_GRADS",
                                             "STORE_SUMMARY"), flags, backward_pointers)
