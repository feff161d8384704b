"""What torch.compile, torch.export and accelerators see: one graph with the fast scan, no recompiles, no syncs.

Under torch.compile the native CPU kernel stays in the graph (it is a `torch.library` operator with a fake kernel and
autograd); under torch.export the scan is the chunked PyTorch one, so exported graphs hold only standard ops. The
compile checks use the `aot_eager` backend: it traces forward and backward exactly as inductor would receive them,
without the minutes of code generation.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, tiny_model
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from transformers import DynamicCache

from modeling_minrnn import scan_cpu


class RecordingBackend:
    """A torch.compile backend that keeps every forward and backward graph AOTAutograd hands it and runs them
    eagerly: each dynamo compile shows up as one forward graph."""

    def __init__(self):
        self.forward_graphs, self.backward_graphs = [], []
        self.backend = aot_autograd(fw_compiler=self._keep(self.forward_graphs),
                                    bw_compiler=self._keep(self.backward_graphs))

    @staticmethod
    def _keep(graphs):
        def compiler(graph, example_inputs):
            graphs.append(graph)
            return make_boxed_func(graph.forward)
        return compiler

    @staticmethod
    def ops(graph):
        return {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("cell_type,conv_kernel", [("mingru", 4), ("minlstm", 0)])
def test_fullgraph_compile_of_a_training_step_matches_eager(cell_type, conv_kernel):
    torch._dynamo.reset()
    model = tiny_model(cell_type=cell_type, conv_kernel=conv_kernel).train()
    ids = torch.randint(3, 48, (2, 24), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0).expand(2, -1)  # packed rows

    def loss_and_grads(forward):
        model.zero_grad()
        forward(input_ids=ids, labels=ids, position_ids=position_ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads(model)
    recorder = RecordingBackend()
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend=recorder.backend))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if scan_cpu.cpu_scan_available():  # the packed rows' resets go through the native kernel too
        assert f"{scan_cpu._NAMESPACE}.cell_scan.default" in recorder.ops(recorder.forward_graphs[0])


def test_the_causal_conv_of_a_training_step_is_elementwise():
    """Tap by tap in the (batch, time, hidden) layout (fused by inductor), not a depthwise convolution with
    transposed copies in and out, whose backward alone took ~7% of a bf16 step on a CPU."""
    torch._dynamo.reset()
    model = tiny_model(conv_kernel=4).train()
    recorder = RecordingBackend()
    ids = torch.randint(3, 48, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.compile(model, fullgraph=True, backend=recorder.backend)(input_ids=ids, labels=ids).loss.backward()
    for graph in (recorder.forward_graphs[0], recorder.backward_graphs[0]):
        assert not any("convolution" in op for op in recorder.ops(graph)), recorder.ops(graph)


@pytest.mark.slow  # a dynamic-shape compile of forward and backward: ~15 s on 2 idle cores
@pytest.mark.skipif(not scan_cpu.cpu_scan_available(), reason="the native CPU kernel cannot be built here")
def test_compiled_training_keeps_the_native_kernel_without_recompiling():
    """fullgraph + dynamic shapes: one graph for several batch sizes and lengths, holding the kernel's operators
    (forward and backward) and no chunked scan; gradients equal eager ones."""
    torch._dynamo.reset()
    model = tiny_model().train()
    recorder = RecordingBackend()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=recorder.backend)
    for batch, seq in [(2, 24), (3, 17)]:  # not 1: torch.compile specialises sizes 0 and 1
        ids = torch.randint(3, 48, (batch, seq), generator=torch.Generator().manual_seed(seq))
        grads = []
        for forward in (compiled, model):
            model.zero_grad()
            forward(input_ids=ids, labels=ids).loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(recorder.forward_graphs) == 1, "recompiled for a new batch size or length"
    namespace = scan_cpu._NAMESPACE
    assert f"{namespace}.cell_scan.default" in recorder.ops(recorder.forward_graphs[0])
    assert f"{namespace}.cell_scan_backward.default" in recorder.ops(recorder.backward_graphs[0])
    # The chunked scan's cumulative product would be there had compile swapped the kernel out.
    assert not any("cumprod" in op for op in recorder.ops(recorder.forward_graphs[0]))


@pytest.mark.slow  # a fresh process compiling a forward: ~15 s of 2 CPU cores
def test_a_first_forward_under_compile_has_no_graph_break():
    """In a fresh process (the kernel loader never ran), the first forward is traced whole: the availability check
    runs (and loads the kernel) outside the graph."""
    script = textwrap.dedent(
        """
        import torch
        from conftest import tiny_model
        model = tiny_model()
        ids = torch.randint(3, 48, (1, 16))
        explained = torch._dynamo.explain(model)(ids)
        print("breaks", explained.graph_break_count, "graphs", explained.graph_count)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=f"{ROOT}/tests", capture_output=True, text=True, timeout=300
    )
    assert "breaks 0 graphs 1" in out.stdout, out.stdout + out.stderr[-2000:]


def test_compiled_decoding_with_the_dynamic_cache_does_not_recompile_per_token():
    torch._dynamo.reset()
    model = tiny_model()
    step = torch.compile(model, backend="eager")
    ids = torch.randint(3, 48, (1, 8), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        expected = model(torch.cat([ids, ids[:, :1].repeat(1, 8)], 1)).logits[:, -8:]
        step(ids, cache=cache, use_cache=True)
        logits = [step(ids[:, :1], cache=cache, use_cache=True).logits for _ in range(2)]  # warm: prefill -> decode
        with torch._dynamo.config.patch(error_on_recompile=True):
            logits += [step(ids[:, :1], cache=cache, use_cache=True).logits for _ in range(6)]
    torch.testing.assert_close(torch.cat(logits, 1), expected, rtol=1e-5, atol=1e-5)


def test_exported_graph_holds_only_standard_ops():
    model = tiny_model()
    ids = torch.randint(3, 48, (1, 16))
    exported = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert all(t.startswith("aten.") or "operator." in t or "<built-in" in t for t in targets), targets
    torch.testing.assert_close(exported.module()(input_ids=ids, use_cache=False).logits, model(ids).logits)


def test_a_forward_reads_no_tensor_values():
    """A forward on meta tensors fails at the first read of a value (`.item()`, `bool()`, `int()`): on an accelerator
    each such read is a host-device sync, on every decoding step. Masks, packing inputs and a cache included."""
    model = tiny_model().to("meta")
    ids = torch.randint(3, 48, (2, 9)).to("meta")
    cache = DynamicCache(config=model.config)
    position_ids = torch.arange(9).repeat(2, 1).to("meta")
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids), position_ids=position_ids, cache=cache, use_cache=True)
        out = model(ids[:, :1], attention_mask=torch.ones(2, 10, dtype=torch.long, device="meta"), cache=cache)
    assert out.logits.shape == (2, 1, 48)
