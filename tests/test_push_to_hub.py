"""hub_upload/push_to_hub.py against a loopback Hub (tests/hub_server.py): publish, reload, faults.

Every client runs in a subprocess with its own environment: huggingface_hub reads HF_ENDPOINT when
imported, and transformers caches an HfApi, so nothing about the Hub may leak between tests through
this process. HF_HUB_DISABLE_XET=1 keeps uploads on the LFS protocol the loopback Hub speaks, and an
empty HF_HOME per run means nothing comes from a cache.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BLOCK_PACKAGE
from hub_server import LoopbackHub  # tests/ is on sys.path (pytest), the repo root too (conftest.py)

from hub_upload.model_card import check_training_summary, render_model_card

REPO_ROOT = Path(__file__).resolve().parent.parent

PUSH_SCRIPT = REPO_ROOT / "hub_upload" / "push_to_hub.py"
TOKEN = "hf_loopbackSecretToken1234567890"
USER = "alice"
REPO_ID = f"{USER}/minrnn-tiny"
PROMPT_IDS = [[5, 17, 42, 8, 99, 3]]
TEXT = "To be, or not to be, that is the question: whether tis nobler in the mind to suffer. " * 8

# `import modeling_minrnn` fails in the client subprocess, and the script checks that it does.
REMOTE_CODE_ONLY = BLOCK_PACKAGE + """
try:
    import modeling_minrnn
    raise SystemExit("modeling_minrnn is importable: the test would not check remote code")
except ModuleNotFoundError:
    pass
"""


def build_checkpoint(folder: Path) -> dict:
    """A trained tiny minGRU + byte-level BPE tokenizer saved as pretrain.py does; returns reference facts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import modeling_minrnn

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<pad>")
    torch.manual_seed(0)
    config = modeling_minrnn.MinRNNConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, intermediate_size=64, conv_kernel=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = modeling_minrnn.MinRNNForCausalLM(config)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot(losses)
    fig.savefig(folder / "loss_curve.png")
    plt.close(fig)
    summary = {"dataset": "tiny_shakespeare", "tokens_seen": 5 * 64, "steps": 5, "final_eval_loss": losses[-1],
               "final_eval_perplexity": float(torch.tensor(losses[-1]).exp()), "config": {"lr": 1e-2, "batch_size": 1}}
    (folder / "training_summary.json").write_text(json.dumps(summary))
    (folder / "optimizer.pt").write_bytes(b"not for the Hub")  # training leftovers must not be published
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT_IDS)).logits
    return {"logits": logits.tolist(), "num_parameters": model.num_parameters(), "summary": summary}


def folder_digest(folder: Path) -> str:
    """Hash of every file's path and bytes: equal before and after means the folder is untouched."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def client_env(endpoint: str, home: Path, token: str | None = TOKEN) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PYTHONPATH"}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_push(*args: str, endpoint: str, home: Path, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PUSH_SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=client_env(endpoint, home, token), timeout=300, check=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out") / "final"
    reference = build_checkpoint(folder)
    return folder, reference


@pytest.fixture(scope="module")
def hub():
    with LoopbackHub(tokens={TOKEN: USER}) as server:
        yield server


@pytest.fixture(scope="module")
def published(checkpoint, hub, tmp_path_factory):
    """The checkpoint pushed once through the CLI; (CompletedProcess, folder digest before the push)."""
    folder, _ = checkpoint
    before = folder_digest(folder)
    proc = run_push("--checkpoint", str(folder), "--repo-id", REPO_ID, endpoint=hub.endpoint,
                    home=tmp_path_factory.mktemp("hf_home"))
    return proc, before


def test_push_makes_one_commit_with_the_hub_files(published, checkpoint, hub):
    proc, before = published
    assert proc.returncode == 0, proc.stderr
    assert f"Repo: {hub.endpoint}/{REPO_ID}" in proc.stdout
    sha = hub.repos[REPO_ID].branches["main"]
    assert f"Commit: {sha}" in proc.stdout
    assert hub.commit_count(REPO_ID) == 2  # the repo's initial commit + ours
    assert hub.repos[REPO_ID].messages[sha] == "Upload minGRU checkpoint (320 tokens seen)"
    files = hub.files(REPO_ID)
    code = {p.name for p in checkpoint[0].glob("*.py")}  # what save_pretrained wrote: auto_map + relative imports
    assert {"configuration_minrnn.py", "modeling_minrnn.py"} <= code
    assert set(files) == code | {
        ".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json", "loss_curve.png", "training_summary.json",
    }
    assert files["model.safetensors"].lfs and files["loss_curve.png"].lfs and not files["config.json"].lfs
    local = checkpoint[0] / "model.safetensors"
    assert files["model.safetensors"].content == local.read_bytes()
    assert "optimizer.pt" not in files
    assert folder_digest(checkpoint[0]) == before
    assert TOKEN not in proc.stdout + proc.stderr
    assert all(TOKEN.encode() not in f.content for f in files.values())


def test_model_card_metadata_and_facts(published, checkpoint, hub):
    _, reference = checkpoint
    card = hub.files(REPO_ID)["README.md"].content.decode()
    match = re.match(r"\A---\n(.*?)\n---\n", card, re.DOTALL)
    metadata = yaml.safe_load(match.group(1))
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "apache-2.0"
    assert metadata["datasets"] == ["tiny_shakespeare"]
    assert {"minGRU", "minrnn", "custom_code"} <= set(metadata["tags"])
    summary = reference["summary"]
    assert f"{reference['num_parameters']:,}" in card
    assert f"| Tokens seen | {summary['tokens_seen']:,} |" in card
    assert f"{summary['final_eval_loss']:.4f}" in card and f"{summary['final_eval_perplexity']:.4f}" in card
    assert "![Training and evaluation loss](loss_curve.png)" in card
    assert "arXiv:2410.01201" in card and "Hajimirsadeghi" in card
    assert "## Limitations" in card and "not recorded" not in card


def test_hub_copy_loads_without_the_package_and_matches(published, checkpoint, hub, tmp_path):
    """Fresh process, package blocked, empty cache: from_pretrained(repo_id) reproduces logits; card snippet runs."""
    _, reference = checkpoint
    card = hub.files(REPO_ID)["README.md"].content.decode()
    snippet = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    script = REMOTE_CODE_ONLY + f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({REPO_ID!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tokenizer = AutoTokenizer.from_pretrained({REPO_ID!r}, trust_remote_code=True)
with torch.no_grad():
    logits = model(torch.tensor({PROMPT_IDS})).logits
out = model.generate(torch.tensor({PROMPT_IDS}), max_new_tokens=5, min_new_tokens=5, do_sample=False)
print("RESULT", json.dumps({{"logits": logits.tolist(), "generated": out.tolist(), "vocab": len(tokenizer)}}))
print("SNIPPET")
""" + snippet
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=client_env(hub.endpoint, tmp_path / "hf_home", token=None), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()  # transformers may print notes about remote code first
    result = json.loads(next(line for line in lines if line.startswith("RESULT ")).removeprefix("RESULT "))
    torch.testing.assert_close(torch.tensor(result["logits"]), torch.tensor(reference["logits"]), rtol=0, atol=1e-5)
    assert len(result["generated"][0]) == len(PROMPT_IDS[0]) + 5
    assert lines[lines.index("SNIPPET") + 1].startswith("Once upon a time")  # the snippet's decoded sample


@pytest.mark.slow  # a second full verification run in a fresh process
def test_reupload_of_unchanged_checkpoint_makes_no_commit(published, checkpoint, hub, tmp_path):
    folder, _ = checkpoint
    commits, head = hub.commit_count(REPO_ID), hub.repos[REPO_ID].branches["main"]
    proc = run_push("--checkpoint", str(folder), "--repo-id", REPO_ID, endpoint=hub.endpoint, home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no new commit made" in proc.stdout and head in proc.stdout
    assert hub.commit_count(REPO_ID) == commits and hub.repos[REPO_ID].branches["main"] == head
    assert ("PUT", f"/lfs-upload/{hub.files(REPO_ID)['model.safetensors'].sha256}") in hub.requests  # once, first push
    assert sum(method == "PUT" for method, _ in hub.requests) == 2  # weights + loss curve, never again


def test_dry_run_prints_files_and_card_without_network(checkpoint, hub, tmp_path):
    folder, _ = checkpoint
    seen = len(hub.requests)
    proc = run_push("--checkpoint", str(folder), "--repo-id", "bob/dry", "--dry-run", endpoint=hub.endpoint,
                    home=tmp_path, token=None)
    assert proc.returncode == 0, proc.stderr
    assert len(hub.requests) == seen
    for name in ("model.safetensors", "modeling_minrnn.py", "tokenizer.json", "README.md", "----- README.md -----",
                 "pipeline_tag: text-generation", "Dry run: nothing was uploaded."):
        assert name in proc.stdout
    assert "Not published (not part of a Hub model repo): optimizer.pt" in proc.stdout


def _assert_refused(proc, message: str, folder: Path, before: str):
    assert proc.returncode == 1
    assert message in proc.stderr, proc.stderr
    assert "nothing was uploaded" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert folder_digest(folder) == before


@pytest.mark.slow  # a fresh process for one refusal: ~6 s of 2 CPU cores; the token refusals stay in the default run
def test_missing_checkpoint_is_refused(hub, tmp_path):
    proc = run_push("--checkpoint", str(tmp_path / "nope"), "--repo-id", REPO_ID, endpoint=hub.endpoint,
                    home=tmp_path)
    assert proc.returncode == 1 and "no such directory" in proc.stderr


@pytest.mark.slow  # a fresh process for one refusal: ~6 s of 2 CPU cores; the token refusals stay in the default run
def test_checkpoint_without_weights_is_refused(checkpoint, hub, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint[0], folder)
    (folder / "model.safetensors").unlink()
    before = folder_digest(folder)
    proc = run_push("--checkpoint", str(folder), "--repo-id", REPO_ID, endpoint=hub.endpoint, home=tmp_path)
    _assert_refused(proc, "no safetensors weights", folder, before)


@pytest.mark.slow  # a full verification run in a fresh process
def test_checkpoint_whose_tokenizer_disagrees_is_refused(checkpoint, hub, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = 7  # the tokenizer's EOS is 0
    (folder / "config.json").write_text(json.dumps(config))
    before, seen = folder_digest(folder), len(hub.requests)
    proc = run_push("--checkpoint", str(folder), "--repo-id", "alice/bad", endpoint=hub.endpoint, home=tmp_path)
    _assert_refused(proc, "checkpoint verification failed, refusing to upload: config.json eos_token_id=[7] "
                          "disagrees with the tokenizer's eos_token_id=0", folder, before)
    assert "alice/bad" not in hub.repos
    assert not any(method in ("PUT", "POST") and "commit" in path for method, path in hub.requests[seen:])


@pytest.mark.slow  # one more full verification run; the error path is the same as for other Hub refusals
def test_card_metadata_rejected_by_the_hub_is_reported(checkpoint, hub, tmp_path):
    folder, _ = checkpoint
    before = folder_digest(folder)
    proc = run_push("--checkpoint", str(folder), "--repo-id", "alice/licensed", "--license", "my-own-license",
                    endpoint=hub.endpoint, home=tmp_path)
    _assert_refused(proc, "refused the upload to alice/licensed: Invalid metadata in README.md", folder, before)
    assert "'my-own-license'" in proc.stderr
    assert hub.commit_count("alice/licensed") == 1  # created, but nothing committed


def test_no_token_is_refused(checkpoint, hub, tmp_path):
    folder, _ = checkpoint
    before = folder_digest(folder)
    proc = run_push("--checkpoint", str(folder), "--repo-id", REPO_ID, endpoint=hub.endpoint, home=tmp_path,
                    token=None)
    _assert_refused(proc, "no Hugging Face access token: set HF_TOKEN or run `hf auth login`", folder, before)


def test_rejected_token_is_refused_without_printing_it(checkpoint, hub, tmp_path):
    folder, _ = checkpoint
    before, wrong = folder_digest(folder), "hf_wrongTokenNeverPrinted987654321"
    proc = run_push("--checkpoint", str(folder), "--repo-id", REPO_ID, endpoint=hub.endpoint, home=tmp_path,
                    token=wrong)
    _assert_refused(proc, "rejected the access token (401 Unauthorized)", folder, before)
    assert wrong not in proc.stdout + proc.stderr


@pytest.mark.slow  # a fresh process for one refusal: ~6 s of 2 CPU cores; the token refusals stay in the default run
def test_unreachable_endpoint_is_refused(checkpoint, tmp_path):
    folder, _ = checkpoint
    before = folder_digest(folder)
    with LoopbackHub(tokens={}) as closed:  # a port that was just free: nothing listens there afterwards
        endpoint = closed.endpoint
    proc = run_push("--checkpoint", str(folder), "--repo-id", REPO_ID, endpoint=endpoint, home=tmp_path)
    _assert_refused(proc, f"cannot reach the Hub at {endpoint}", folder, before)


def test_card_says_not_recorded_for_absent_facts():
    config = {"model_type": "minrnn", "cell_type": "minlstm", "hidden_size": 64, "num_hidden_layers": 3,
              "conv_kernel": 0, "intermediate_size": 0, "vocab_size": 500}
    card = render_model_card("bob/x", config, {"num_parameters": 1234}, None, license="mit", revision="dev")
    metadata = yaml.safe_load(re.match(r"\A---\n(.*?)\n---\n", card, re.DOTALL).group(1))
    assert metadata["license"] == "mit" and "minLSTM" in metadata["tags"] and "datasets" not in metadata
    for line in ("| Dataset | not recorded |", "| Tokens seen | not recorded |",
                 "| Final eval loss (nats/token) | not recorded |", "Loss curve: not recorded.",
                 "No evaluation was recorded", "| Parameters | 1,234 (1.2K) |",
                 "Each block: LayerNorm -> minLSTM (expanded, projected back) -> residual; no MLP.",
                 'AutoModelForCausalLM.from_pretrained("bob/x", revision="dev", trust_remote_code=True)'):
        assert line in card
    assert "loss_curve.png" not in card


def test_training_summary_with_wrong_types_is_named():
    problems = check_training_summary({"tokens_seen": "1M", "final_eval_loss": 2.5, "steps": True})
    assert problems == ["training_summary.json: 'tokens_seen' must be int, got str '1M'",
                        "training_summary.json: 'steps' must be int, got bool True"]


@pytest.mark.parametrize("dataset, described", [
    ("pydoc_data.topics", "CPython's documentation topics (`pydoc_data.topics`"),
    ("data/train.txt", "local files `data/train.txt` (not published)"),
    ("../corpora/tinyshakespeare.txt", "local files `../corpora/tinyshakespeare.txt` (not published)"),
])
def test_card_metadata_holds_only_hub_dataset_ids(dataset, described):
    config = {"model_type": "minrnn", "cell_type": "mingru", "vocab_size": 50}
    card = render_model_card("bob/x", config, {"num_parameters": 1}, {"dataset": dataset}, license="mit")
    metadata = yaml.safe_load(re.match(r"\A---\n(.*?)\n---\n", card, re.DOTALL).group(1))
    assert "datasets" not in metadata
    assert f"| Dataset | {described}" in card


@pytest.mark.slow  # a full verification run in a fresh process
def test_tokenizerless_checkpoint_is_published_with_a_warning(checkpoint, hub, tmp_path):
    """As transformers' push_to_hub: the model alone is published; the card shows token ids in and out."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint[0], folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    proc = run_push("--checkpoint", str(folder), "--repo-id", "bob/no-tok", "--dry-run", endpoint=hub.endpoint,
                    home=tmp_path, token=None)
    assert proc.returncode == 0, proc.stderr
    assert "warning: no tokenizer in" in proc.stderr and "publishing the model alone" in proc.stderr
    assert "tokenizer.json" not in proc.stdout and "no tokenizer" in proc.stdout
    snippet = re.search(r"```python\n(.*?)```", proc.stdout, re.DOTALL).group(1)
    assert "AutoTokenizer" not in snippet and "print(output[0].tolist())" in snippet
