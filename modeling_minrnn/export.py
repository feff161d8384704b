"""Export a minrnn model for inference runtimes: ONNX (onnxruntime) and ExecuTorch (XNNPACK), fp32 or int8.

A minGRU/minLSTM block's whole past is its conv window and its state `h`, a few kilobytes that do not grow with the
context. The exported graphs take and return them as explicit tensors with fixed names, so any runtime, and code that
never imports this package, can drive them:

    inputs   input_ids (int64, (batch, seq)), past_conv.{i} (float32, (batch, hidden, conv_kernel)),
             past_state.{i} (float32, (batch, recurrent)) for each block i; zeros for a fresh sequence
    outputs  logits (float32, (batch, seq, vocab)), present_conv.{i}, present_state.{i}

`past_conv.*`/`present_conv.*` exist only when the model has a conv (`conv_kernel > 0`). ExecuTorch methods take
and return positional tensors in the same order: input_ids, all convs, all states. Two entry points share the
weights: a one-token step (`seq = 1`) and a prefill of exactly `prefill_length` tokens (the scan's chunking depends
on the sequence length, so each length is its own graph); a prompt runs as whole prefill chunks, then single steps.

    python -m modeling_minrnn.export --checkpoint DIR --format onnx|executorch [--quantize int8] --out DIR
    python -m modeling_minrnn.export --checkpoint DIR --web --out DIR   # ONNX fp32/ and int8/ for web/'s page

writes the graphs, the tokenizer files (if the checkpoint has them) and `minrnn_export.json`, which describes the
files, the state tensors (names, shapes with a symbolic batch, dtypes) and the model. `ExportedModel` runs such a
folder. The runtimes are optional (`pip install -e ".[export]"`); the model code never imports this module.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .cache_minrnn import LayerState, MinRNNCache, layer_states
from .dependency_noise import quiet_export

METADATA_FILE = "minrnn_export.json"
FORMATS = ("onnx", "executorch")
QUANTIZATIONS = (None, "int8")
# The files each format writes; the one-token step comes first (ExecuTorch's default method name is "forward").
ONNX_FILES = {"decode": "model.onnx", "prefill": "prefill.onnx"}
ONNX_DATA_FILE = "model.onnx.data"
EXECUTORCH_FILE = "model.pte"
# The weights, outside the program (ExecuTorch's program-data separation): its store keeps each distinct blob once,
# so the tied embedding (read by the program) and head (packed by XNNPACK) share one copy.
EXECUTORCH_DATA_FILE = "model.ptd"
_EXECUTORCH_DATA_TAG = EXECUTORCH_DATA_FILE.removesuffix(".ptd")  # ExecuTorch names the file after the tag
EXECUTORCH_METHODS = {"decode": "forward", "prefill": "prefill"}
_RUNTIME_PACKAGES = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "executorch": ("executorch",),
}
# The web page's folders (`export_web`): name -> quantization; the files its tokenizer (tokenizers.js) reads.
WEB_VARIANTS = {"fp32": None, "int8": "int8"}
WEB_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files `save_pretrained` of a tokenizer may write; copied next to the graphs so the folder is self-contained.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json",
)


def require_runtime(fmt: str) -> None:
    """Raise one line naming what to install if the packages for `fmt` ("onnx" or "executorch") are missing."""
    missing = [name for name in _RUNTIME_PACKAGES[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"Exporting to {fmt} needs {', '.join(missing)}: install them with `pip install -e \".[export]\"`."
        )


def state_names(config) -> tuple[list[str], list[str]]:
    """The exported graph's input and output names, in positional order, for a `MinRNNConfig`."""
    layers = range(config.num_hidden_layers)
    convs = [f"past_conv.{i}" for i in layers] if config.conv_kernel > 0 else []
    inputs = ["input_ids", *convs, *(f"past_state.{i}" for i in layers)]
    outputs = ["logits", *(name.replace("past_", "present_") for name in inputs[1:])]
    return inputs, outputs


def fresh_state(config, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Zeros for every `past_*` input: the state before the first token."""
    state = {}
    for name in state_names(config)[0][1:]:
        shape = (config.hidden_size, config.conv_kernel) if name.startswith("past_conv") else (config.recurrent_size,)
        state[name] = torch.zeros(batch_size, *shape)
    return state


class ExplicitStateLM(nn.Module):
    """A `MinRNNForCausalLM` forward with its state as explicit tensors, for `torch.export`.

    `forward(input_ids, *past)` -> `(logits, *present)`: `input_ids` `(batch, seq)`, then the conv windows
    `(batch, hidden, conv_kernel)` of every block (if the model has a conv), then the states `(batch, recurrent)`;
    returns the logits `(batch, seq, vocab)` and the conv windows and states after these tokens, in the same order.
    The state is handed to the model as a cache holding it (`MinRNNCache.from_layer_states`), so the graph is
    exactly the model's own cached forward.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers
        self.conv_kernel = model.config.conv_kernel

    def forward(self, input_ids: torch.LongTensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        convs = past[: self.num_layers] if self.conv_kernel > 0 else [None] * self.num_layers
        states = past[-self.num_layers :]
        # A zero window and state are exactly a fresh sequence (the conv pads with zeros, the scan starts at 0).
        cache = MinRNNCache.from_layer_states([LayerState(h, conv) for conv, h in zip(convs, states)])
        logits = self.model(input_ids=input_ids, cache=cache, use_cache=True).logits
        present = layer_states(cache)
        return (logits, *(s.conv for s in present if s.conv is not None), *(s.h for s in present))


def _example_inputs(config, seq_len: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    return (ids, *fresh_state(config, batch_size).values())


def _dynamic_shapes(config, max_batch: int | None):
    if max_batch is None:
        return None
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    n_past = len(state_names(config)[0]) - 1
    return ({0: batch}, tuple({0: batch} for _ in range(n_past)))


def export_program(model, seq_len: int, max_batch: int | None = 64) -> torch.export.ExportedProgram:
    """`torch.export` the explicit-state forward for `seq_len` tokens and any batch up to `max_batch` (None: batch 1
    only)."""
    if model.dtype != torch.float32:
        raise ValueError(f"Export needs an fp32 model; got {model.dtype}. Load it with `dtype=torch.float32`.")
    wrapper = ExplicitStateLM(model.eval())
    # A dynamic batch is traced at batch 2: torch.export specialises dimensions whose example size is 0 or 1.
    example = _example_inputs(model.config, seq_len, 1 if max_batch is None else 2)
    with torch.no_grad():
        program = torch.export.export(wrapper, example, dynamic_shapes=_dynamic_shapes(model.config, max_batch))
    return program.run_decompositions({torch.ops.aten.cumprod.default: _cumprod_by_products})


def _cumprod_by_products(x: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    """`aten.cumprod` as a chain of multiplications (exact): neither ExecuTorch's kernels nor the ONNX exporter
    have a cumprod, and the chunked scan's chunks are short and of static length."""
    dim = dim % x.dim()
    products = [x.select(dim, 0)]
    for t in range(1, x.shape[dim]):
        products.append(products[-1] * x.select(dim, t))
    return torch.stack(products, dim).to(dtype or x.dtype)


def _transposes_to_nodes(graph) -> None:
    """Replace each 2-D initializer that is the transpose of another one by a Transpose node reading it.

    The exporter folds `x @ W.T` into a transposed copy of `W`; for a tied embedding/head that is a second copy of
    the largest matrix. The runtime folds the node back into a constant when it loads the graph."""
    from onnx import helper, numpy_helper

    matrices = {t.name: t for t in graph.initializer if len(t.dims) == 2 and len(t.raw_data) >= 1024}
    by_content = {hashlib.sha256(t.raw_data).digest(): name for name, t in matrices.items()}
    sources, replaced = set(), set()
    for name, tensor in matrices.items():
        transposed = numpy_helper.to_array(tensor).T.copy()
        source = by_content.get(hashlib.sha256(transposed.tobytes()).digest())
        if source is None or source == name or source in replaced or name in sources:
            continue  # a matrix and its transpose both present: keep one, never read each other (a cycle)
        sources.add(source)
        replaced.add(name)
        graph.initializer.remove(tensor)
        graph.node.insert(0, helper.make_node("Transpose", [source], [name], perm=[1, 0], name=f"{name}_transpose"))


def _save_onnx_sharing_weights(models: dict[str, "onnx.ModelProto"], out_dir: Path) -> None:  # noqa: F821
    """Save several graphs of one model with their weights in one external data file, each weight once.

    The step and prefill graphs hold the same weights: identical tensors are written once and every graph points at
    the same bytes."""
    from onnx import save_model
    from onnx.external_data_helper import set_external_data

    written = {}
    with open(out_dir / ONNX_DATA_FILE, "wb") as data:
        for file_name, proto in models.items():
            _transposes_to_nodes(proto.graph)
            for tensor in proto.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < 1024:  # small constants stay inside the graph
                    continue
                key = hashlib.sha256(raw).digest()
                if key not in written:
                    data.write(b"\0" * (-data.tell() % 64))  # aligned, so runtimes can map the file
                    written[key] = (data.tell(), len(raw))
                    data.write(raw)
                offset, length = written[key]
                set_external_data(tensor, location=ONNX_DATA_FILE, offset=offset, length=length)
                tensor.ClearField("raw_data")
            save_model(proto, out_dir / file_name)


def export_onnx(model, out_dir: Path, quantize: str | None = None, prefill_length: int = 64) -> list[str]:
    """Write `model.onnx` (one token) and `prefill.onnx` (`prefill_length` tokens) sharing `model.onnx.data`.

    `quantize="int8"`: onnxruntime's dynamic quantization (int8 weights per channel, activations quantized per call)
    of every MatMul/Gemm and of the embedding Gather. Returns the file names written."""
    require_runtime("onnx")
    import onnx

    input_names, output_names = state_names(model.config)
    protos = {}
    for kind, seq_len in (("decode", 1), ("prefill", prefill_length)):
        program = torch.onnx.export(
            export_program(model, seq_len), input_names=input_names, output_names=output_names, dynamo=True,
            verbose=False,
        )
        proto = program.model_proto
        for value in (*proto.graph.input, *proto.graph.output):
            # The exporter names the symbolic batch after its own symbol (`s0`, ...): use the documented name.
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with tempfile.TemporaryDirectory() as tmp:
                onnx.save_model(proto, f"{tmp}/fp32.onnx")
                quantize_dynamic(
                    f"{tmp}/fp32.onnx", f"{tmp}/int8.onnx", weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["MatMul", "Gemm", "Gather"],
                )
                proto = onnx.load_model(f"{tmp}/int8.onnx")
        protos[ONNX_FILES[kind]] = proto
    _save_onnx_sharing_weights(protos, out_dir)
    return [*ONNX_FILES.values(), ONNX_DATA_FILE]


def _quantize_pt2e_int8(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """XNNPACK's int8 scheme: per-channel symmetric int8 weights, int8 activations quantized per call (dynamic). A
    tied embedding reads the head's int8 matrix (`_embedding_from_int8_head`)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    example = tuple(program.example_inputs[0])
    prepared = prepare_pt2e(program.module(), quantizer)
    prepared(*example)  # dynamic activation scales: one pass only inserts the observers' shapes
    converted = _embedding_from_int8_head(convert_pt2e(prepared))
    with torch.no_grad():
        return torch.export.export(converted, example)


def _embedding_from_int8_head(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make a tied embedding gather rows of the head's int8 matrix (ExecuTorch's `embedding_byte`: int8 rows times
    their per-row scales) instead of the fp32 matrix, so the file holds the tied weights once, in int8.

    XNNPACK's per-channel scales of the head are per vocabulary row, exactly an embedding's per-row scales. The head is
    found by value: the int8 matrix whose dequantized values are the embedding's weights to within half a step."""
    from executorch.exir.passes import quant_fusion_pass  # noqa: F401  (defines quantized_decomposed.embedding_byte)

    ops = torch.ops.quantized_decomposed
    graph = module.graph
    heads = [n for n in graph.nodes if n.target == ops.dequantize_per_channel.default and n.args[3] == 0]
    for embedding in [n for n in graph.nodes if n.target == torch.ops.aten.embedding.default]:
        weight_node, indices = embedding.args[:2]
        weight = _attr(module, weight_node.target)
        for head in heads:
            q_node, scale_node = head.args[:2]
            q, scale = _attr(module, q_node.target), _attr(module, scale_node.target)
            if q.dtype != torch.int8 or q.shape != weight.shape:
                continue
            if not ((q.float() * scale[:, None] - weight).abs() <= 0.5001 * scale[:, None]).all():
                continue
            with graph.inserting_before(embedding):
                rows = graph.call_function(
                    ops.embedding_byte.default, (q_node, scale_node, None, head.args[4], head.args[5], indices)
                )
            embedding.replace_all_uses_with(rows)
            graph.erase_node(embedding)
            if not weight_node.users:
                graph.erase_node(weight_node)
            break
    graph.lint()
    module.recompile()
    return module


def _attr(module: nn.Module, target: str) -> torch.Tensor:
    for name in target.split("."):
        module = getattr(module, name)
    return module


def _weights_to_data_file(program: torch.export.ExportedProgram) -> None:
    """Send every weight XNNPACK takes to the external data file (the program's own weights go there through
    `ExecutorchBackendConfig(external_constants=...)`)."""
    signature = program.graph_signature
    weights = {
        *signature.inputs_to_parameters, *signature.inputs_to_buffers, *signature.inputs_to_lifted_tensor_constants
    }
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in weights:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = _EXECUTORCH_DATA_TAG



def export_executorch(model, out_dir: Path, quantize: str | None = None, prefill_length: int = 64) -> list[str]:
    """Write `model.pte` with two methods, `forward` (one token) and `prefill` (`prefill_length` tokens), lowered
    to XNNPACK, and their weights in `model.ptd`. `quantize="int8"`: XNNPACK's dynamic int8 quantization of the
    linear layers, and the tied embedding from the int8 head. Returns the file names."""
    require_runtime("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    programs = {}
    for kind, seq_len in (("decode", 1), ("prefill", prefill_length)):
        # Batch 1: ExecuTorch plans memory for fixed shapes, and a phone or a browser decodes one sequence at a time.
        program = export_program(model, seq_len, max_batch=None)
        if quantize == "int8":
            program = _quantize_pt2e_int8(program)
        _weights_to_data_file(program)
        programs[EXECUTORCH_METHODS[kind]] = program
    lowered = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()]).to_executorch(
        ExecutorchBackendConfig(external_constants=lambda node: _EXECUTORCH_DATA_TAG)
    )
    with open(out_dir / EXECUTORCH_FILE, "wb") as f:
        lowered.write_to_file(f)
    lowered.write_tensor_data_to_file(str(out_dir))
    if not (out_dir / EXECUTORCH_DATA_FILE).is_file():
        raise RuntimeError(f"ExecuTorch wrote no {EXECUTORCH_DATA_FILE} to {out_dir}: its data file naming changed.")
    return [EXECUTORCH_FILE, EXECUTORCH_DATA_FILE]


def metadata(model, fmt: str, quantize: str | None, prefill_length: int, files: list[str]) -> dict:
    """What `minrnn_export.json` holds: enough to drive the graphs without this package."""
    config = model.config
    input_names, output_names = state_names(config)
    batch = "batch" if fmt == "onnx" else 1

    def spec(name):
        if name in ("input_ids", "logits"):
            shape = [batch, "seq"] + ([config.vocab_size] if name == "logits" else [])
            return {"name": name, "dtype": "int64" if name == "input_ids" else "float32", "shape": shape}
        width = [config.hidden_size, config.conv_kernel] if "_conv." in name else [config.recurrent_size]
        return {"name": name, "dtype": "float32", "shape": [batch, *width]}

    return {
        "format": fmt,
        "quantization": quantize,
        "files": files,
        "methods": ONNX_FILES if fmt == "onnx" else EXECUTORCH_METHODS,
        "prefill_length": prefill_length,
        "model_type": config.model_type,
        "cell_type": config.cell_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "recurrent_size": config.recurrent_size,
        "conv_kernel": config.conv_kernel,
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "inputs": [spec(name) for name in input_names],
        "outputs": [spec(name) for name in output_names],
        # How a state saved by `MinRNNCache.save` (safetensors) maps onto the inputs.
        "state_file_names": {"layers.{i}.h": "past_state.{i}", "layers.{i}.conv": "past_conv.{i}"},
    }


def export(
    model,
    out_dir: str | os.PathLike,
    fmt: str = "onnx",
    quantize: str | None = None,
    prefill_length: int = 64,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Export `model` (an fp32 `MinRNNForCausalLM`) to `out_dir` in `fmt` ("onnx" or "executorch"), optionally
    `quantize="int8"`; copy the tokenizer files found in `tokenizer_dir` and write `minrnn_export.json`."""
    if fmt not in FORMATS:
        raise ValueError(f"`fmt` must be one of {FORMATS}; got {fmt!r}.")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"`quantize` must be one of {QUANTIZATIONS}; got {quantize!r}.")
    if prefill_length < 2:
        raise ValueError(f"`prefill_length` must be >= 2 (single tokens use the step graph); got {prefill_length}.")
    require_runtime(fmt)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = export_onnx if fmt == "onnx" else export_executorch
    files = writer(model, out_dir, quantize=quantize, prefill_length=prefill_length)
    if tokenizer_dir is not None:
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, out_dir / name)
                files.append(name)
    meta = metadata(model, fmt, quantize, prefill_length, files)
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def check_web_tokenizer(tokenizer_dir: str | os.PathLike) -> None:
    """Raise one line if `tokenizer_dir` lacks a file the web page's tokenizer reads."""
    missing = [name for name in WEB_TOKENIZER_FILES if not (Path(tokenizer_dir) / name).is_file()]
    if missing:
        raise ValueError(
            f"The web page tokenizes with {' and '.join(WEB_TOKENIZER_FILES)}; {tokenizer_dir} has no "
            f"{', '.join(missing)}: save the tokenizer with the checkpoint (`tokenizer.save_pretrained(DIR)`)."
        )


def export_web(
    model, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, prefill_length: int = 64
) -> dict[str, Path]:
    """What the web page (`web/` in the repository) loads: the ONNX export in fp32 and in int8, in `out_dir/fp32` and
    `out_dir/int8`, each a complete folder with the tokenizer the page tokenizes with. Returns the folders."""
    check_web_tokenizer(tokenizer_dir)
    return {
        name: export(model, Path(out_dir) / name, "onnx", quantize, prefill_length, tokenizer_dir)
        for name, quantize in WEB_VARIANTS.items()
    }


def _load_executorch_quantized_kernels() -> None:
    """Register ExecuTorch's quantized kernels (`embedding_byte` of an int8 program) with its Python runtime, which
    ships them as a library beside its own but does not load them; a device build links them (`quantized_ops_lib`)."""
    import ctypes

    from executorch.runtime import Runtime

    if "quantized_decomposed::embedding_byte.out" in Runtime.get().operator_registry.operator_names:
        return  # loaded already, or a runtime that ships them
    package = Path(next(iter(importlib.util.find_spec("executorch").submodule_search_locations)))
    library = package / "lib" / "libexecutorch_kernels_quantized.so"
    if not library.is_file():
        raise RuntimeError(f"int8 ExecuTorch programs need ExecuTorch's quantized kernels; {library} is missing.")
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


class ExportedModel:
    """Run an exported folder with its runtime (onnxruntime or ExecuTorch's), holding nothing but the graphs.

    Args:
        path: the folder `export` wrote.
        num_threads: intra-op threads of the runtime (None: its default).
    """

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        self.path = Path(path)
        self.meta = json.loads((self.path / METADATA_FILE).read_text())
        self.format = self.meta["format"]
        require_runtime(self.format)
        self.input_names = [spec["name"] for spec in self.meta["inputs"]]
        self.output_names = [spec["name"] for spec in self.meta["outputs"]]
        self.prefill_length = self.meta["prefill_length"]
        self._methods = {}
        self._num_threads = num_threads
        if self.format == "executorch":
            from executorch.runtime import Runtime

            if num_threads is not None:
                # The pybindings' one process-wide pool (XNNPACK's threads), resized between calls.
                from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

                _unsafe_reset_threadpool(num_threads)
            if self.meta["quantization"] == "int8":
                _load_executorch_quantized_kernels()
            self._program = Runtime.get().load_program(
                self.path / EXECUTORCH_FILE, data_path=self.path / EXECUTORCH_DATA_FILE
            )

    def _method(self, kind: str):
        if kind not in self._methods:
            if self.format == "onnx":
                import onnxruntime

                options = onnxruntime.SessionOptions()
                if self._num_threads is not None:
                    options.intra_op_num_threads = self._num_threads
                file = self.path / self.meta["methods"][kind]
                self._methods[kind] = onnxruntime.InferenceSession(file, options, providers=["CPUExecutionProvider"])
            else:
                self._methods[kind] = self._program.load_method(self.meta["methods"][kind])
        return self._methods[kind]

    def fresh_state(self, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """Zeros for every `past_*` input."""
        return {
            spec["name"]: torch.zeros(batch_size, *spec["shape"][1:]) for spec in self.meta["inputs"][1:]
        }

    def load_state(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """The `past_*` inputs from a state file written by `MinRNNCache.save` (read with safetensors only)."""
        from safetensors import safe_open

        state = {}
        with safe_open(os.fspath(path), framework="pt") as f:
            for name in self.input_names[1:]:
                kind, i = name.removeprefix("past_").split(".")
                key = f"layers.{i}.{'h' if kind == 'state' else 'conv'}"
                if key not in f.keys():
                    raise ValueError(f"{path} has no tensor {key!r}: it was not saved from this model.")
                state[name] = f.get_tensor(key).float()
        return state

    def _run(self, kind: str, input_ids: torch.Tensor, state: dict[str, torch.Tensor]):
        inputs = [input_ids, *(state[name] for name in self.input_names[1:])]
        if self.format == "onnx":
            feeds = {name: tensor.numpy() for name, tensor in zip(self.input_names, inputs)}
            outputs = [torch.from_numpy(array) for array in self._method(kind).run(None, feeds)]
        else:
            outputs = list(self._method(kind).execute(inputs))
        return outputs[0], dict(zip(self.input_names[1:], outputs[1:]))

    def forward(
        self, input_ids: torch.LongTensor, state: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Consume `input_ids` `(batch, seq)` from `state` (None: a fresh sequence): whole `prefill_length` chunks
        through the prefill graph, the rest one token at a time. Returns the last token's logits `(batch, vocab)` and
        the state after it."""
        state = self.fresh_state(input_ids.shape[0]) if state is None else state
        input_ids = input_ids.long()
        start = 0
        while input_ids.shape[1] - start >= self.prefill_length:
            logits, state = self._run("prefill", input_ids[:, start : start + self.prefill_length], state)
            start += self.prefill_length
        for t in range(start, input_ids.shape[1]):
            logits, state = self._run("decode", input_ids[:, t : t + 1], state)
        return logits[:, -1], state

    def generate(
        self, input_ids: torch.LongTensor, max_new_tokens: int, state: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Greedy decoding: the new tokens `(batch, max_new_tokens)` and the logits that chose them
        `(batch, max_new_tokens, vocab)`. `state`: continue from it (e.g. `load_state`) with `input_ids` as the
        tokens that follow it."""
        logits, state = self.forward(input_ids, state)
        tokens, all_logits = [], []
        for step in range(max_new_tokens):
            all_logits.append(logits)
            tokens.append(logits.argmax(-1, keepdim=True))
            if step + 1 < max_new_tokens:
                logits, state = self.forward(tokens[-1], state)
        return torch.cat(tokens, dim=1), torch.stack(all_logits, dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_minrnn.export",
        description="Export a minrnn checkpoint with its recurrent state as explicit, named tensors.",
    )
    parser.add_argument("--checkpoint", required=True, help="a folder written by save_pretrained, or a Hub id")
    parser.add_argument("--format", choices=FORMATS, help="required unless --web")
    parser.add_argument(
        "--web", action="store_true",
        help="write what the web page loads: ONNX in fp32 and int8 in OUT/fp32 and OUT/int8, with the tokenizer",
    )
    parser.add_argument("--quantize", choices=[q for q in QUANTIZATIONS if q], default=None)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--prefill-length", type=int, default=64, help="tokens per call of the prefill graph (default 64)"
    )
    args = parser.parse_args(argv)
    if args.web and (args.format not in (None, "onnx") or args.quantize):
        parser.error("--web writes ONNX in fp32 and int8 itself: leave out --format and --quantize")
    if not args.web and args.format is None:
        parser.error("--format is required (or --web)")
    if args.web and not Path(args.checkpoint).is_dir():
        parser.error(f"--web needs a local checkpoint folder with its tokenizer; got {args.checkpoint!r}")

    from transformers import AutoModelForCausalLM

    import modeling_minrnn  # noqa: F401  (registers the model type with the Auto classes)

    require_runtime(args.format or "onnx")
    if args.web:
        check_web_tokenizer(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    tokenizer_dir = args.checkpoint if Path(args.checkpoint).is_dir() else None
    with quiet_export():
        if args.web:
            for name, folder in export_web(model, args.out, tokenizer_dir, args.prefill_length).items():
                size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
                print(f"Wrote the {name} export for the web page to {folder} ({size:.1f} MB)")
            return
        out = export(model, args.out, args.format, args.quantize, args.prefill_length, tokenizer_dir)
    meta = json.loads((out / METADATA_FILE).read_text())
    print(f"Wrote {', '.join(meta['files'])} and {METADATA_FILE} to {out}")


if __name__ == "__main__":
    main()
