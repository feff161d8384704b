"""Export with the state as explicit tensors: each runtime's greedy tokens and logits equal `generate`'s, from a fresh
state and from a state saved with `MinRNNCache.save`; int8 exports agree with fp32; the folder describes itself."""

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from modeling_minrnn import MinRNNCache, MinRNNConfig, MinRNNForCausalLM
from modeling_minrnn import export as export_module
from modeling_minrnn.export import METADATA_FILE, ExportedModel, main, state_names

VOCAB = 97
PREFILL = 8
PROMPT = 20  # two prefill chunks, then four single steps
NEW_TOKENS = 64
# Every pair of (cell, conv, MLP) settings appears in one of these four models.
CONFIGS = {
    "mingru-conv-mlp": dict(cell_type="mingru", conv_kernel=4, intermediate_size=32),
    "mingru-noconv-nomlp": dict(cell_type="mingru", conv_kernel=0, intermediate_size=0),
    "minlstm-conv-nomlp": dict(cell_type="minlstm", conv_kernel=3, intermediate_size=0),
    "minlstm-noconv-mlp": dict(cell_type="minlstm", conv_kernel=0, intermediate_size=32),
}
# Each export takes seconds (ExecuTorch's lowering tens of seconds): the default run exports one model to ONNX (the
# suite's 5-minute budget), `-m slow` all four, which between them take every value of each setting, in both formats.
ONNX_DEFAULT = ("mingru-conv-mlp",)
EXECUTORCH_DEFAULT = ()


def configs(default):
    assert set(default) <= set(CONFIGS), f"unknown model names in {default}"
    return [name if name in default else pytest.param(name, marks=pytest.mark.slow) for name in CONFIGS]


def tiny_model(name: str) -> MinRNNForCausalLM:
    torch.manual_seed(0)
    config = MinRNNConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, **CONFIGS[name])
    return MinRNNForCausalLM(config).eval()


def save_checkpoint(model, path):
    """A checkpoint folder as training writes it: weights, config and a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(path)
    model.save_pretrained(path)


def exported(tmp_path_factory, name: str, fmt: str, quantize: str | None = None):
    """(model, output folder) of the command line run on a saved checkpoint of model `name`."""
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "executorch")
    model = tiny_model(name)
    root = tmp_path_factory.mktemp(f"{name}-{fmt}-{quantize}")
    save_checkpoint(model, root / "checkpoint")
    argv = ["--checkpoint", str(root / "checkpoint"), "--format", fmt, "--out", str(root / "out")]
    argv += ["--prefill-length", str(PREFILL)] + (["--quantize", quantize] if quantize else [])
    main(argv)
    return model, root / "out"


@pytest.fixture(scope="module", params=configs(ONNX_DEFAULT))
def onnx_export(request, tmp_path_factory):
    return exported(tmp_path_factory, request.param, "onnx")


@pytest.fixture(scope="module", params=configs(EXECUTORCH_DEFAULT))
def executorch_export(request, tmp_path_factory):
    return exported(tmp_path_factory, request.param, "executorch")


def reference(model, prompt):
    """`generate`'s greedy tokens and the logits that chose them, `(batch, NEW_TOKENS[, vocab])`."""
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, prompt.shape[1] :], torch.stack(out.logits, dim=1)


def check_against_generate(model, folder, tmp_path):
    runner = ExportedModel(folder)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    ref_tokens, ref_logits = reference(model, prompt)

    tokens, logits = runner.generate(prompt, NEW_TOKENS)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)

    # From a state file: the prompt but its last token through the model, saved, then read back by safetensors
    # only, as outside code would; the export continues with the last token.
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(prompt[:, :-1], cache=cache)
    cache.save(tmp_path / "state.safetensors", model)
    state = runner.load_state(tmp_path / "state.safetensors")
    tokens, logits = runner.generate(prompt[:, -1:], NEW_TOKENS, state=state)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)

    # `MinRNNCache.load` reads the same file into the same state.
    loaded = MinRNNCache.load(tmp_path / "state.safetensors", model)
    state = runner.load_state(tmp_path / "state.safetensors")
    for i in range(len(loaded)):
        torch.testing.assert_close(state[f"past_state.{i}"], loaded.get_recurrent_state(i))


def test_onnxruntime_matches_generate(onnx_export, tmp_path):
    check_against_generate(*onnx_export, tmp_path)


def test_executorch_runtime_matches_generate(executorch_export, tmp_path):
    check_against_generate(*executorch_export, tmp_path)


def test_onnx_batch_is_dynamic(onnx_export):
    model, folder = onnx_export
    runner = ExportedModel(folder)
    ids = torch.randint(0, VOCAB, (3, PREFILL + 2), generator=torch.Generator().manual_seed(2))
    logits, state = runner.forward(ids)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    torch.testing.assert_close(logits, out.logits[:, -1], atol=1e-4, rtol=0)
    torch.testing.assert_close(state["past_state.1"], out.cache.get_recurrent_state(1), atol=1e-5, rtol=0)


def test_folder_describes_the_graphs(onnx_export):
    """The JSON's names, dtypes and shapes are the graph's own; the tokenizer and each weight are stored once."""
    import onnxruntime

    model, folder = onnx_export
    meta = json.loads((folder / METADATA_FILE).read_text())
    config = model.config
    assert (meta["cell_type"], meta["num_hidden_layers"], meta["vocab_size"]) == (
        config.cell_type, config.num_hidden_layers, VOCAB
    )
    inputs, outputs = state_names(config)
    assert [spec["name"] for spec in meta["inputs"]] == inputs
    assert [spec["name"] for spec in meta["outputs"]] == outputs
    assert any(name.startswith("past_conv.") for name in inputs) == (config.conv_kernel > 0)
    onnx_type = {"int64": "tensor(int64)", "float32": "tensor(float)"}
    for file in meta["methods"].values():
        session = onnxruntime.InferenceSession(folder / file, providers=["CPUExecutionProvider"])
        for spec, arg in zip(meta["inputs"] + meta["outputs"], session.get_inputs() + session.get_outputs()):
            assert spec["name"] == arg.name and onnx_type[spec["dtype"]] == arg.type
            assert spec["shape"][0] == arg.shape[0] == "batch" and spec["shape"][2:] == arg.shape[2:]
    assert (folder / "tokenizer.json").is_file() and "tokenizer.json" in meta["files"]
    # The step and prefill graphs share one data file, which holds the (tied) weights once.
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert (folder / "model.onnx.data").stat().st_size < 1.05 * weight_bytes


def test_state_file_names(tmp_path):
    """The names outside code reads from a state file (`layers.{i}.h`, `layers.{i}.conv`) and their shapes."""
    model = tiny_model("mingru-conv-mlp")
    cache = MinRNNCache(model.config)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 5)), cache=cache)
    cache.save(tmp_path / "state.safetensors", model)
    with safe_open(tmp_path / "state.safetensors", framework="pt") as f:
        assert f.get_tensor("layers.1.h").shape == (2, model.config.recurrent_size)
        assert f.get_tensor("layers.1.conv").shape == (2, model.config.hidden_size, model.config.conv_kernel)


def teacher_forced_agreement(model, runner, text) -> float:
    """Share of positions of `text` `(1, seq)` where the export's next-token argmax equals the fp32 model's."""
    with torch.no_grad():
        expected = model(text).logits.argmax(-1)
    state, predicted = None, []
    for t in range(text.shape[1]):
        logits, state = runner.forward(text[:, t : t + 1], state)
        predicted.append(logits.argmax(-1))
    return (torch.stack(predicted, dim=1) == expected).float().mean().item()


# Measured on this random model over 256 tokens: 0.97 (onnxruntime) and 0.98 (ExecuTorch); a broken scale or a
# misplaced state gives chance level (~0.01).
INT8_MIN_AGREEMENT = 0.9


@pytest.mark.slow  # two exports and quantization: a minute on 2 cores
@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_int8_export_agrees_with_fp32(fmt, tmp_path_factory):
    model, folder = exported(tmp_path_factory, "minlstm-conv-nomlp", fmt, quantize="int8")
    runner = ExportedModel(folder)
    assert runner.meta["quantization"] == "int8"
    text = torch.randint(0, VOCAB, (1, 256), generator=torch.Generator().manual_seed(3))
    assert teacher_forced_agreement(model, runner, text) >= INT8_MIN_AGREEMENT
    if fmt == "onnx":
        # int8 weights: the data file is about a quarter of the fp32 weights.
        assert (folder / "model.onnx.data").stat().st_size < 0.5 * sum(p.numel() * 4 for p in model.parameters())


@pytest.mark.slow  # ExecuTorch's lowering, twice
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_executorch_stores_the_tied_matrix_once(quantize, tmp_path):
    """The tied embedding/head (here 98% of the weights) is in the files once: in fp32, and in int8 when quantized
    (the embedding gathers the head's int8 rows). Stored twice, it would add a whole copy to the bound."""
    pytest.importorskip("executorch")
    torch.manual_seed(0)
    config = MinRNNConfig(vocab_size=8192, hidden_size=32, num_hidden_layers=1, conv_kernel=4, intermediate_size=0)
    model = MinRNNForCausalLM(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    tied = model.lm_head.weight.numel() * (1 if quantize else 4)
    weights = sum(p.numel() for p in model.parameters()) * (1 if quantize else 4)
    export_module.export(model, tmp_path, "executorch", quantize=quantize, prefill_length=PREFILL)
    assert sum(f.stat().st_size for f in tmp_path.glob("model.pt*")) < weights + tied // 2

    ids = torch.randint(0, config.vocab_size, (1, PREFILL + 3), generator=torch.Generator().manual_seed(4))
    logits, _ = ExportedModel(tmp_path).forward(ids)
    with torch.no_grad():
        expected = model(ids).logits[:, -1]
    if quantize:
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    else:
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_torchao_int8_through_from_pretrained_agrees_with_fp32(tmp_path):
    """int8 weights the transformers way, with bf16 activations (with fp32 ones int8 is slower than fp32 on CPU)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model = tiny_model("minlstm-conv-nomlp")
    model.save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device_map="cpu",
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
    )
    for block in quantized.model.layers:
        assert type(block.mixer.in_proj.weight) not in (torch.Tensor, torch.nn.Parameter)  # a torchao int8 tensor
    text = torch.randint(0, VOCAB, (1, 256), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        share = (quantized(text).logits.argmax(-1) == model(text).logits.argmax(-1)).float().mean().item()
    assert share >= INT8_MIN_AGREEMENT


def test_missing_runtime_says_what_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        export_module.importlib.util, "find_spec", lambda name: None if name == "executorch" else real_find_spec(name)
    )
    with pytest.raises(ImportError, match=r'pip install -e "\.\[export\]"'):
        export_module.export(tiny_model("mingru-conv-mlp"), tmp_path, "executorch")


def test_rejects_bad_arguments(tmp_path):
    model = tiny_model("mingru-conv-mlp")
    with pytest.raises(ValueError, match="`fmt` must be one of"):
        export_module.export(model, tmp_path, "tflite")
    with pytest.raises(ValueError, match="`quantize` must be one of"):
        export_module.export(model, tmp_path, "onnx", quantize="int4")
    with pytest.raises(ValueError, match="fp32 model"):
        export_module.export_program(model.to(torch.bfloat16), 1)


@pytest.mark.slow  # two exports: ~30 s on a shared 2-core machine (tests/test_web.py runs the folders in a browser)
def test_web_writes_fp32_and_int8_folders(tmp_path):
    """`--web`: the ONNX export in fp32 and int8, each folder complete with the tokenizer files the page reads."""
    pytest.importorskip("onnxruntime")
    save_checkpoint(tiny_model("mingru-conv-mlp"), tmp_path / "checkpoint")
    main(["--checkpoint", str(tmp_path / "checkpoint"), "--web", "--prefill-length", str(PREFILL), "--out",
          str(tmp_path / "web")])
    for name, quantize in (("fp32", None), ("int8", "int8")):
        meta = json.loads((tmp_path / "web" / name / METADATA_FILE).read_text())
        assert (meta["format"], meta["quantization"]) == ("onnx", quantize)
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(meta["files"])
        assert all((tmp_path / "web" / name / file).is_file() for file in meta["files"])


def test_web_rejects_bad_arguments(tmp_path, capsys):
    """Each mistake is one line before any work: the page runs ONNX only, and tokenizes with the checkpoint's files."""
    model = tiny_model("mingru-conv-mlp")
    model.save_pretrained(tmp_path / "no-tokenizer")
    out = ["--out", str(tmp_path / "out")]
    for argv, message in (
        (["--checkpoint", str(tmp_path), "--web", "--format", "executorch"], "leave out --format and --quantize"),
        (["--checkpoint", str(tmp_path), "--web", "--quantize", "int8"], "leave out --format and --quantize"),
        (["--checkpoint", str(tmp_path)], "--format is required (or --web)"),
        (["--checkpoint", "some/hub-id", "--web"], "needs a local checkpoint folder"),
    ):
        with pytest.raises(SystemExit):
            main(argv + out)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no tokenizer.json, tokenizer_config.json"):
        main(["--checkpoint", str(tmp_path / "no-tokenizer"), "--web", *out])
    assert not (tmp_path / "out").exists()
