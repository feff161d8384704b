"""The model inside the transformers ecosystem: saving, remote code, Auto classes, pipeline, streamer, PEFT."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, TextStreamer, pipeline

from modeling_minrnn import MinRNNForCausalLM, MinRNNForSequenceClassification, MinRNNForTokenClassification

# Python run in a subprocess that cannot import the package: the only way to the model is the saved remote code.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_minrnn" or name.startswith("modeling_minrnn."):
                raise ImportError("modeling_minrnn is deliberately not importable here")
    sys.meta_path.insert(0, _Block())
    sys.path = [p for p in sys.path if p not in ("", ".")]
    """
)


def char_model(tokenizer, **overrides):
    return tiny_model(vocab_size=len(tokenizer), **overrides)


def test_save_and_load_with_auto_classes_keeps_logits(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "minrnn"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_minrnn.MinRNNForCausalLM"
    for name in ("cache_minrnn.py", "configuration_minrnn.py", "modeling_minrnn.py", "scan.py",
                 "scan_cpu.py", "scan_triton.py"):
        assert (tmp_path / name).exists(), name

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MinRNNForCausalLM)
    assert loaded.lm_head.weight is loaded.model.embeddings.weight
    ids = torch.randint(3, 48, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert AutoConfig.from_pretrained(tmp_path).cell_type == "mingru"


def test_torch_dtype_loading(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.embeddings.weight.dtype == torch.bfloat16
    out = loaded(torch.randint(3, 48, (1, 5)), use_cache=True)
    assert out.cache.get_recurrent_state(0).dtype == torch.float32  # the state stays fp32


def test_remote_code_loads_where_the_package_is_not_importable(tmp_path):
    """The causal LM and both classification heads, each from its own checkpoint, through the Auto class its
    `auto_map` names."""
    ids = torch.randint(3, 48, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = {"ids": ids}
    for cls in (MinRNNForCausalLM, MinRNNForSequenceClassification, MinRNNForTokenClassification):
        torch.manual_seed(0)
        model = cls(tiny_config(cell_type="minlstm", num_labels=3)).eval()
        model.save_pretrained(tmp_path / cls.__name__)
        with torch.no_grad():
            expected[cls.__name__] = model(ids).logits
    torch.save(expected, tmp_path / "expected.pt")

    script = BLOCK_PACKAGE + textwrap.dedent(
        f"""
        import torch
        try:
            import modeling_minrnn
            raise SystemExit("the package leaked into the subprocess")
        except ImportError:
            pass
        import transformers
        data = torch.load({str(tmp_path / "expected.pt")!r})
        for auto, name in (("AutoModelForCausalLM", "MinRNNForCausalLM"),
                           ("AutoModelForSequenceClassification", "MinRNNForSequenceClassification"),
                           ("AutoModelForTokenClassification", "MinRNNForTokenClassification")):
            model = getattr(transformers, auto).from_pretrained({str(tmp_path)!r} + "/" + name,
                                                                trust_remote_code=True).eval()
            with torch.no_grad():
                torch.testing.assert_close(model(data["ids"]).logits, data[name])
            print(type(model).__module__, type(model).__name__)
        lm = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/MinRNNForCausalLM",
                                                               trust_remote_code=True)
        print(lm.generate(data["ids"], max_new_tokens=4, do_sample=False).shape)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a fresh module cache
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = result.stdout.splitlines()
    for name in ("MinRNNForCausalLM", "MinRNNForSequenceClassification", "MinRNNForTokenClassification"):
        assert any(line.startswith("transformers_modules") and line.endswith(f" {name}") for line in loaded), loaded
    assert "(2, 11)" in result.stdout.replace("torch.Size([2, 11])", "(2, 11)")


def test_pipeline_and_streamer(char_tokenizer, capsys):
    model = char_model(char_tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=char_tokenizer)
    text = generator("To be, or not", max_new_tokens=12, do_sample=False)[0]["generated_text"]
    ids = char_tokenizer("To be, or not", return_tensors="pt").input_ids
    direct = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert text == char_tokenizer.decode(direct[0], skip_special_tokens=True)

    streamer = TextStreamer(char_tokenizer, skip_prompt=True)
    streamed = model.generate(ids, max_new_tokens=12, do_sample=False, streamer=streamer)
    assert torch.equal(streamed, direct)
    printed = capsys.readouterr().out
    assert printed.strip() == char_tokenizer.decode(direct[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_batched_pipeline_with_left_padding(char_tokenizer):
    model = char_model(char_tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=char_tokenizer)
    prompts = ["Hello", "A longer prompt here"]
    batched = generator(prompts, max_new_tokens=8, do_sample=False, batch_size=2)
    alone = [generator(p, max_new_tokens=8, do_sample=False)[0]["generated_text"] for p in prompts]
    assert [b[0]["generated_text"] for b in batched] == alone


def test_peft_lora_train_save_load_merge(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, lora)
    targeted = {n.split(".")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert targeted == {"in_proj", "out_proj", "up_proj", "down_proj"}  # lm_head is excluded by PEFT

    ids = torch.randint(3, 48, (4, 16), generator=torch.Generator().manual_seed(0))
    before = peft_model(ids, labels=ids).loss.item()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        peft_model(ids, labels=ids).loss.backward()
        optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        after = peft_model(ids, labels=ids).loss.item()
        tuned_logits = peft_model(ids).logits
    assert after < before - 0.1, (before, after)

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, MinRNNForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned_logits, rtol=1e-4, atol=1e-4)
