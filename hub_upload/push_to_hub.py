"""Publish a minrnn checkpoint folder to the Hugging Face Hub.

    python hub_upload/push_to_hub.py --checkpoint out/final --repo-id user/minrnn-shakespeare \
        [--private] [--revision main] [--commit-message "..."] [--license apache-2.0] [--dry-run]

Steps: check the folder -> stage exactly the files a Hub repo needs (safetensors weights, config.json
with ``auto_map``, the model code files, tokenizer, generation config, loss curve, training summary)
plus a generated model card -> load the staged folder in a fresh subprocess where the ``modeling_minrnn``
package cannot be imported, as a Hub user would, and refuse if it fails -> one commit with
huggingface_hub (LFS for large files; unchanged files are skipped, so re-publishing an unchanged
checkpoint makes no commit). ``--dry-run`` stops before the network and prints the files and the card.

The token comes from ``HF_TOKEN`` or the ``hf auth login`` store, the endpoint from ``HF_ENDPOINT``.
The checkpoint folder is only read; the token is never printed or written to a file.

Importable without heavy imports (``scripts/pretrain.py --push-to-hub`` calls :func:`push_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `hub_upload` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hub_upload.model_card import CELL_NAMES, LOSS_CURVE_FILE, check_training_summary, render_model_card

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SUMMARY_FILE = "training_summary.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")  # without either there is no tokenizer to load
OPTIONAL_FILES = ("generation_config.json", LOSS_CURVE_FILE, SUMMARY_FILE)
# Top-level packages the verification subprocess must not see: the checkpoint has to load from its own code.
BLOCKED_PACKAGES = ("modeling_minrnn", "hub_upload")
VERIFY_SCRIPT = Path(__file__).resolve().parent / "verify_checkpoint.py"
VERIFY_TIMEOUT_S = 600

# Runs before verify_checkpoint.py: a meta path finder placed first refuses the blocked names, whatever
# else would find them (an editable install's finder, a .pth file, the current directory).
_VERIFY_PRELUDE = f"""
import runpy, sys
class _BlockPackages:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED_PACKAGES!r}:
            raise ModuleNotFoundError(f"{{name!r}} is blocked: the checkpoint must load its own code", name=name)
        return None
sys.meta_path.insert(0, _BlockPackages())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class PublishError(Exception):
    """A reason to refuse or abort publishing, worded for the user."""


@dataclass
class PushResult:
    """What :func:`push_checkpoint` did; ``commit_sha``/``repo_url`` are None for a dry run."""

    repo_id: str
    files: dict[str, int]  # path in repo -> size in bytes
    card: str
    facts: dict
    dry_run: bool
    repo_url: str | None = None
    commit_sha: str | None = None
    commit_url: str | None = None
    new_commit: bool = False
    skipped: list[str] = field(default_factory=list)  # files in the checkpoint folder left out


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PublishError(f"cannot read {path}: {err}") from err
    if not isinstance(value, dict):
        raise PublishError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _code_files(checkpoint: Path, config: dict) -> list[str]:
    """The .py files ``auto_map`` names, plus every file they import relatively (as transformers resolves them)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or "AutoModelForCausalLM" not in auto_map:
        raise PublishError(
            f"{checkpoint / 'config.json'} has no auto_map entry for AutoModelForCausalLM, so the Hub copy could "
            "not load with trust_remote_code=True; save the model with save_pretrained after `import modeling_minrnn`"
        )
    modules = set()
    for reference in auto_map.values():
        for ref in reference if isinstance(reference, list) else [reference]:
            if ref:  # tokenizer entries may hold None for the slow/fast slot
                modules.add(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    files = set()
    for module in sorted(modules):
        path = checkpoint / module
        if not path.is_file():
            raise PublishError(f"config.json auto_map refers to {module}, which is missing from {checkpoint}")
        files.add(module)
        try:
            files.update(os.path.relpath(p, checkpoint) for p in get_relative_import_files(str(path)))
        except OSError as err:  # a relative import whose file is missing
            raise PublishError(f"{module} imports a file missing from {checkpoint}: {err}") from err
    return sorted(files)


def _weight_files(checkpoint: Path) -> list[str]:
    if (checkpoint / WEIGHTS_FILE).is_file():
        return [WEIGHTS_FILE]
    if (checkpoint / WEIGHTS_INDEX_FILE).is_file():
        weight_map = _read_json(checkpoint / WEIGHTS_INDEX_FILE).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (checkpoint / s).is_file()]
        if not shards or missing:
            raise PublishError(
                f"{WEIGHTS_INDEX_FILE} lists shards missing from {checkpoint}: {missing or 'none listed'}"
            )
        return [WEIGHTS_INDEX_FILE, *shards]
    raise PublishError(
        f"no safetensors weights in {checkpoint} (expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}); "
        "save with model.save_pretrained(...), which writes safetensors"
    )


def collect_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[list[str], dict, dict | None]:
    """Check a checkpoint folder and list what to publish.

    Returns ``(files, config, summary)``: paths relative to the folder, ``config.json`` as a dict,
    ``training_summary.json`` as a dict or None if absent. Raises :class:`PublishError` with the reason.
    """
    checkpoint = Path(checkpoint_dir)
    if not checkpoint.is_dir():
        raise PublishError(f"--checkpoint {checkpoint_dir}: no such directory")
    if not (checkpoint / "config.json").is_file():
        raise PublishError(f"--checkpoint {checkpoint_dir}: no config.json; is this a save_pretrained folder?")
    config = _read_json(checkpoint / "config.json")
    if config.get("model_type") != "minrnn":
        raise PublishError(
            f"{checkpoint / 'config.json'}: model_type is {config.get('model_type')!r}, expected 'minrnn'"
        )
    tokenizer = [name for name in TOKENIZER_FILES if (checkpoint / name).is_file()]
    if not set(TOKENIZER_MARKERS) & set(tokenizer):
        # As transformers' own push_to_hub: a model alone is publishable (its card says it takes token ids).
        logger.warning(
            f"no tokenizer in {checkpoint} (no {' or '.join(TOKENIZER_MARKERS)}): publishing the model alone, which "
            "takes and returns token ids; to include one, save it there with tokenizer.save_pretrained(...)"
        )
        tokenizer = []
    summary = None
    if (checkpoint / SUMMARY_FILE).is_file():
        summary = _read_json(checkpoint / SUMMARY_FILE)
        problems = check_training_summary(summary)
        if problems:
            raise PublishError("; ".join(problems))
    optional = [name for name in OPTIONAL_FILES if (checkpoint / name).is_file()]
    files = sorted({"config.json", *_weight_files(checkpoint), *_code_files(checkpoint, config), *tokenizer,
                    *optional})
    return files, config, summary


def verify_staged(staged: Path) -> dict:
    """Load ``staged`` in a fresh Python where ``modeling_minrnn`` is not importable; return measured facts.

    Raises :class:`PublishError` with the reason the checkpoint fails.
    """
    with tempfile.TemporaryDirectory(prefix="minrnn-verify-") as scratch:
        # No PYTHONPATH (it could reach the package); no token (verification never needs the network).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
        # Offline: verification reads only the staged folder. A scratch module cache: the remote code
        # copied by trust_remote_code must come from this folder, not from an earlier run.
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=os.path.join(scratch, "modules"),
                   TRANSFORMERS_VERBOSITY="error")
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _VERIFY_PRELUDE, str(VERIFY_SCRIPT), str(staged)],
                cwd=scratch, env=env, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S, check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise PublishError(f"checkpoint verification did not finish in {VERIFY_TIMEOUT_S} s") from err
    if proc.returncode != 0:
        reasons = [line for line in proc.stderr.splitlines() if line.startswith("VERIFY FAILED: ")]
        reason = reasons[-1].removeprefix("VERIFY FAILED: ") if reasons else proc.stderr.strip()[-2000:]
        raise PublishError(f"checkpoint verification failed, refusing to upload: {reason}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _connect(repo_id: str, token: str):
    """Check the token and endpoint before any slow work; returns (HfApi, full repo id)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with _hub_errors(api.endpoint, repo_id, token):
        user = api.whoami()["name"]
    return api, repo_id if "/" in repo_id else f"{user}/{repo_id}"


@contextmanager
def _hub_errors(endpoint: str, repo_id: str, token: str):
    """Re-raise huggingface_hub and transport errors as a PublishError naming the fault and the fix."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except httpx2.TransportError as err:
        raise PublishError(f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {_redact(str(err), token)}); "
                           "check your connection or HF_ENDPOINT") from None
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise PublishError(f"the Hub at {endpoint} rejected the access token (401 Unauthorized); set a valid "
                               "token in HF_TOKEN or run `hf auth login --force`") from None
        if status == 403:
            raise PublishError(f"the access token may not write to {repo_id} (403 Forbidden); use a token with "
                               "write access to that namespace") from None
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise PublishError(f"the Hub at {endpoint} answered {status} for {repo_id}: {_redact(first_line, token)}") \
            from None
    except ValueError as err:  # huggingface_hub's word for a rejected input: repo id, card metadata
        raise PublishError(f"the Hub at {endpoint} refused the upload to {repo_id}: {_redact(str(err), token)}") \
            from None


def _upload(api, staged: Path, files: list[str], repo_id: str, *, private: bool, revision: str | None,
            commit_message: str) -> tuple[str, str, str, bool]:
    """One commit of ``files`` from ``staged``; returns (repo url, commit sha, commit url, new commit?)."""
    from huggingface_hub import CommitOperationAdd

    with _hub_errors(api.endpoint, repo_id, api.token):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = api.repo_info(repo_id, revision=revision).sha
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(staged / name)) for name in files]
        # create_commit skips files whose content the Hub already has and makes no commit if none changed.
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
    repo_url = f"{api.endpoint}/{repo_id}" + (f"/tree/{revision}" if revision not in (None, "main") else "")
    return repo_url, info.oid, info.commit_url, info.oid != before


def push_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    license: str = "apache-2.0",
) -> PushResult:
    """Verify, stage and publish a checkpoint folder written by ``save_pretrained`` (+ tokenizer, if any).

    A folder without a tokenizer is published with a warning (logged), and its card shows use with token ids.

    Args:
        checkpoint_dir: the folder; only read, never changed.
        repo_id: ``namespace/name`` (or ``name`` for the token's own namespace).
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to, created from main if missing; None for main.
        commit_message: defaults to one naming the cell and tokens seen.
        dry_run: verify and build the card, but do not touch the network.
        token: access token; defaults to ``HF_TOKEN`` / the ``hf auth login`` store.
        license: license id for the card's metadata.

    Raises:
        PublishError: the checkpoint is invalid, or no/rejected token, or the Hub is unreachable or refuses.
    """
    files, config, summary = collect_checkpoint(checkpoint_dir)
    checkpoint = Path(checkpoint_dir)
    skipped = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")
                     if p.is_file() and str(p.relative_to(checkpoint)) not in files)
    api = None
    if not dry_run:
        from huggingface_hub import get_token

        token = token or get_token()
        if not token:
            raise PublishError("no Hugging Face access token: set HF_TOKEN or run `hf auth login` "
                               "(use --dry-run to check the checkpoint without uploading)")
        api, repo_id = _connect(repo_id, token)
    with tempfile.TemporaryDirectory(prefix="minrnn-stage-") as tmp:
        staged = Path(tmp)
        for name in files:
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoint / name, staged / name)
        facts = verify_staged(staged)
        card = render_model_card(repo_id, config, facts, summary, license=license, revision=revision,
                                 has_loss_curve=LOSS_CURVE_FILE in files,
                                 has_tokenizer=bool(set(TOKENIZER_MARKERS) & set(files)))
        (staged / "README.md").write_text(card)
        published = sorted([*files, "README.md"])
        sizes = {name: (staged / name).stat().st_size for name in published}
        result = PushResult(repo_id=repo_id, files=sizes, card=card, facts=facts, dry_run=dry_run, skipped=skipped)
        if dry_run:
            return result
        leaked = [name for name in published if token.encode() in (staged / name).read_bytes()]
        if leaked:
            raise PublishError(f"refusing to upload: {', '.join(leaked)} contain(s) your access token")
        cell = CELL_NAMES.get(config.get("cell_type"), "minRNN")
        tokens = (summary or {}).get("tokens_seen")
        default_message = f"Upload {cell} checkpoint" + (f" ({tokens:,} tokens seen)" if tokens is not None else "")
        result.repo_url, result.commit_sha, result.commit_url, result.new_commit = _upload(
            api, staged, published, repo_id, private=private, revision=revision,
            commit_message=commit_message or default_message,
        )
    return result


def _format_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="folder written by save_pretrained (model, and tokenizer if any)")
    parser.add_argument("--repo-id", required=True, help="namespace/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing); default main")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--license", default="apache-2.0", help="license id in the model card (default apache-2.0)")
    parser.add_argument("--dry-run", action="store_true", help="verify and print the files and card; no network")
    args = parser.parse_args(argv)
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    try:
        result = push_checkpoint(args.checkpoint, args.repo_id, private=args.private, revision=args.revision,
                                 commit_message=args.commit_message, dry_run=args.dry_run, license=args.license)
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        print(f"nothing was uploaded; {args.checkpoint} is unchanged", file=sys.stderr)
        return 1
    print(f"Verified {args.checkpoint}: {result.facts['num_parameters']:,} parameters; loads with "
          "trust_remote_code=True without minrnn installed, and generates.")
    print(f"Files for {result.repo_id}:")
    for name, size in result.files.items():
        print(f"  {name:40s} {_format_size(size):>10s}")
    if result.skipped:
        more = len(result.skipped) - 10
        shown = ", ".join(result.skipped[:10]) + (f" and {more} more" if more > 0 else "")
        print(f"Not published (not part of a Hub model repo): {shown}")
    if result.dry_run:
        print("\n----- README.md -----\n" + result.card + "----- end of README.md -----")
        print("Dry run: nothing was uploaded.")
        return 0
    print(f"Repo: {result.repo_url}")
    if result.new_commit:
        print(f"Commit: {result.commit_sha} ({result.commit_url})")
    else:
        print(f"No changes: the Hub already has this checkpoint at commit {result.commit_sha}; no new commit made.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
