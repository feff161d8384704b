"""The web page (web/) in a real headless Chromium: a tiny model trained on the embedded corpus, exported with `--web`,
generates in the page exactly what `model.generate` generates, greedy; sampling stays in the top-k and repeats with
its seed; the Stop button stops; int8 and two WASM threads run. Skipped, with what to install, without Chromium,
node or the page's packages (`.ci/run` installs them)."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from modeling_minrnn.export import METADATA_FILE, ExportedModel, main
from web.page_driver import drive, missing_requirements, serve

pytestmark = pytest.mark.slow
if missing_requirements():
    pytestmark = [pytestmark, pytest.mark.skip(reason=f"the browser test needs {missing_requirements()}")]

PREFILL = 8
NEW_TOKENS = 32
# Longer than the prefill graph's length, so the page runs both graphs.
PROMPT = "The built-in function"
# Where the screenshot of the greedy run goes (an artifact of CI); default: the test's temporary folder.
SCREENSHOT_ENV = "MINRNN_WEB_SCREENSHOT"


@pytest.fixture(scope="module")
def web_export(tmp_path_factory):
    """(model, tokenizer, folder written by `--web`) for a small minGRU trained on the embedded corpus (~20 s)."""
    from pretrain_runs import run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("web")
    run([
        "--hidden-size", "64", "--num-hidden-layers", "2", "--intermediate-size", "128", "--block-size", "128",
        "--tokenizer-vocab-size", "300", "--batch-size", "16", "--max-steps", "400", "--lr", "5e-3",
        "--warmup-steps", "10", "--eval-every", "400", "--eval-batches", "2", "--save-every", "400",
        "--sample-tokens", "8", "--log-with", "none", "--output-dir", str(root / "checkpoint"),
    ])
    main(["--checkpoint", str(root / "checkpoint"), "--web", "--prefill-length", str(PREFILL), "--out",
          str(root / "web")])
    model = AutoModelForCausalLM.from_pretrained(root / "checkpoint", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(root / "checkpoint"), root / "web"


def greedy(model, prompt_ids, max_new_tokens=NEW_TOKENS):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def folder_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in ("model.onnx", "prefill.onnx", "model.onnx.data"))


def test_page_generates_what_generate_does(web_export, tmp_path):
    model, tokenizer, folder = web_export
    screenshot = Path(os.environ.get(SCREENSHOT_ENV, tmp_path / "web_page.png"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    sampling = {"doSample": True, "temperature": 0.8, "topK": 5, "seed": 3}
    with serve(folder) as base:
        greedy_run, top1_run, sampled, sampled_again, _, stopped = drive(f"{base}?model=model/fp32/&threads=1", [
            {"generate": {"prompt": PROMPT, "maxNewTokens": NEW_TOKENS}},
            {"generate": {"prompt": PROMPT, "maxNewTokens": NEW_TOKENS, "doSample": True, "topK": 1, "seed": 7}},
            {"generate": {"prompt": PROMPT, "maxNewTokens": NEW_TOKENS, **sampling}},
            {"generate": {"prompt": PROMPT, "maxNewTokens": NEW_TOKENS, **sampling}},
            {"screenshot": str(screenshot)},
            {"generate": {"prompt": PROMPT, "maxNewTokens": 100_000, "doSample": False, "stopAfter": 5}},
        ])

    # Greedy: the page's tokenizer (tokenizers.js) reads the prompt as the Python tokenizer does, and the page's
    # tokens are generate's, through the prefill graph and the step graph.
    prompt_ids = tokenizer(PROMPT).input_ids
    assert len(prompt_ids) > PREFILL
    run = greedy_run["run"]
    assert run["promptIds"] == prompt_ids
    expected = greedy(model, prompt_ids)
    assert run["ids"] == expected
    assert len(set(expected)) > 3, f"a degenerate reference tests little: {expected}"
    assert run["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert greedy_run["status"] == "done" and greedy_run["tokenCountShown"] == f"{len(expected)} tokens"
    assert re.fullmatch(r"\d+\.\d\d ms/token", greedy_run["msPerTokenShown"])
    assert run["msPerToken"] > 0 and len(run["stepMs"]) == len(expected) - 1
    # The page states the size it loaded: the graphs and the weights on disk.
    assert f"model {folder_bytes(folder / 'fp32') / 1e3:.1f} kB loaded" in greedy_run["modelInfo"]
    assert screenshot.stat().st_size > 10_000

    # Sampling from the top 1 is greedy; from the top 5 every token is among the 5 largest logits of the PyTorch
    # model, teacher-forced on what the page sampled, and the seed repeats the sample.
    assert top1_run["run"]["ids"] == expected
    ids = sampled["run"]["ids"]
    assert sampled_again["run"]["ids"] == ids and ids != expected
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
    top5 = logits.topk(5, dim=-1).indices
    assert all(token in top5[i].tolist() for i, token in enumerate(ids))

    # Stop: the button ends a run of 100,000 tokens after a few, and what came until then is greedy's beginning.
    assert stopped["status"] == "stopped" and stopped["run"]["reason"] == "stopped"
    count = len(stopped["run"]["ids"])
    assert 5 <= count < 1000
    assert stopped["run"]["ids"] == greedy(model, prompt_ids, count)


def test_page_runs_int8_on_two_threads(web_export):
    """The int8 folder in the page, on two WASM threads (the server sends the cross-origin isolation headers), gives
    onnxruntime's native greedy tokens on the same folder."""
    model, tokenizer, folder = web_export
    with serve(folder) as base:
        (result,) = drive(f"{base}?model=model/int8/&threads=2", [
            {"generate": {"prompt": PROMPT, "maxNewTokens": NEW_TOKENS}},
        ])
    assert "int8" in result["modelInfo"] and "2 threads (cross-origin isolated)" in result["modelInfo"]
    assert f"model {folder_bytes(folder / 'int8') / 1e3:.1f} kB loaded" in result["modelInfo"]
    assert folder_bytes(folder / "int8") < folder_bytes(folder / "fp32")
    native, _ = ExportedModel(folder / "int8").generate(torch.tensor([tokenizer(PROMPT).input_ids]), NEW_TOKENS)
    ids = result["run"]["ids"]
    assert ids == native[0, : len(ids)].tolist()


def test_served_folder_is_self_contained(web_export, tmp_path):
    """The page needs only the folder `--web` writes and the vendored runtime: a copy elsewhere serves the same."""
    _, _, folder = web_export
    copy = shutil.copytree(folder / "fp32", tmp_path / "copy")
    assert (copy / METADATA_FILE).is_file() and (copy / "tokenizer.json").is_file()
    with serve(copy) as base:
        (result,) = drive(base, [{"generate": {"prompt": "The", "maxNewTokens": 4}}])
    assert result["status"] == "done"


def test_benchmark_writes_its_table(tmp_path):
    """`benchmarks/web_decode.py` on the tiny model, short: a row per weights, threads and context, browser and
    native, the two runs appended into one table."""
    import web_decode

    quick = ["--models", "tiny", "--contexts", "8", "72", "--steps", "4", "--out", str(tmp_path)]
    web_decode.main([*quick, "--threads", "1"])
    report = web_decode.main([*quick, "--threads", "2", "--append"])
    rows = json.loads((tmp_path / "web_decode.json").read_text())["rows"]
    assert [(r["precision"], r["threads"], r["context"]) for r in rows] == [
        (p, t, c) for t in (1, 2) for p in ("fp32", "int8") for c in (8, 72)
    ]
    assert all(r["browser_ms"] > 0 and r["native_ms"] > 0 for r in rows)
    assert report.read_text().count("| tiny |") == 8
