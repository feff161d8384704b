"""What torch.compile, torch.export and accelerators see: a plain graph, no recompiles while decoding, no syncs.

Inside a traced graph the native CPU kernel (an eager-mode fast path, JIT-built behind a lock) is replaced by the
chunked PyTorch scan, so graphs hold only standard ops. The compile checks use the `aot_eager` backend: it traces
forward and backward exactly as inductor would receive them, without the minutes of code generation.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT, tiny_model
from transformers import DynamicCache


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
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a fresh process compiling a forward: ~15 s of 2 CPU cores
def test_a_first_forward_under_compile_has_no_graph_break():
    """In a fresh process (the kernel loader never ran), the first forward is traced whole."""
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
