"""Pretrain a minGRU / minLSTM language model with accelerate, from one CPU to many GPUs.

    accelerate launch scripts/pretrain.py                       # tiny recipe on the embedded corpus, offline
    accelerate launch scripts/pretrain.py --config configs/shakespeare_char.yaml \\
        --dataset ../shared/data/tinyshakespeare.txt --max-steps 2000
    accelerate launch --multi_gpu --num_processes 2 scripts/pretrain.py --batch-size 8   # 2 gloo processes on a CPU machine
    accelerate launch scripts/pretrain.py --output-dir out/tiny --resume   # continue after a crash
    accelerate launch scripts/pretrain.py --carry-state        # each row reads its own stream; state carried over

Settings come from a recipe (`--config`, default `configs/tiny.yaml`) overridden by
`--key value` options (`--max-steps 50 --lr 1e-3`); `--help` lists every key.

Reading order: settings -> data and tokenizer -> model and optimizer -> the loop
(learning rate, accumulation, logging, evaluation, checkpoints) -> the final folder.

The output folder holds a `save_pretrained` model (with its remote code), the tokenizer,
a generation config, `training_summary.json`, `train_log.jsonl` (one line per step, and
per evaluation), `loss_curve.png`, TensorBoard logs and `checkpoints/step-N/`.
"""

import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
import zlib
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
DEFAULT_RECIPE = REPO_ROOT / "configs" / "tiny.yaml"
sys.path.insert(0, str(SCRIPTS_DIR))
# The package imports from a checkout too, before (or without) `pip install -e .`.
sys.path.insert(1, str(REPO_ROOT))


@dataclass
class TrainConfig:
    """Every training setting; a recipe YAML and `--key value` options override these defaults."""

    # Data: None = the embedded default corpus; else a Hub id or local .txt/.jsonl/.parquet files.
    dataset: str | None = None
    dataset_config: str | None = None
    text_column: str = "text"
    streaming: bool = False
    val_fraction: float = 0.1  # held out from corpora without a validation split (last characters)
    val_documents: int = 1000  # held out from streams without a validation split (first documents)
    # Tokenizer: a saved tokenizer folder, or None to train one on the training split at start.
    tokenizer: str | None = None
    char_level: bool = False
    tokenizer_vocab_size: int = 1024
    tokenizer_max_chars: int = 100_000_000
    # Model (MinRNNConfig); vocab_size None = the tokenizer's size.
    cell_type: str = "mingru"
    hidden_size: int = 128
    num_hidden_layers: int = 3
    expansion_factor: float = 2.0
    conv_kernel: int = 4
    intermediate_size: int = 512
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    scan_backend: str = "auto"
    vocab_size: int | None = None
    # Optimisation. batch_size is per process and micro-step:
    # global batch = batch_size * processes * gradient_accumulation_steps blocks.
    block_size: int = 128
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # Carried state (truncated BPTT, scripts/state_streams.py): every row of every micro-step of every process reads
    # its own contiguous part of the corpus, and each block starts from the detached final state of the row's
    # previous block. state_reset: "eos" restarts the state at every EOS token (documents stay apart), "none"
    # carries it through them.
    carry_state: bool = False
    state_reset: str = "eos"
    mixed_precision: str | None = None  # None: what `accelerate launch` was given; else no/fp16/bf16
    seed: int = 0
    # Evaluation and samples.
    eval_every: int = 100
    eval_batches: int = 8
    sample_prompt: str = ""
    sample_tokens: int = 100
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    # Output.
    output_dir: str = "out/tiny"
    save_every: int = 100
    keep_last: int = 2
    log_with: str = "tensorboard"  # or "none"
    push_to_hub: str | None = None
    hub_private: bool = False


# Settings a resumed run may change: they do not touch the training trajectory.
RESUMABLE_CHANGES = {
    "eval_every", "eval_batches", "sample_prompt", "sample_tokens", "sample_temperature", "sample_top_k",
    "save_every", "keep_last", "log_with", "push_to_hub", "hub_private", "tokenizer_max_chars",
}
FIELD_TYPES = typing.get_type_hints(TrainConfig)


class ConfigError(ValueError):
    """A setting that does not exist or has an invalid value."""


def _coerce(key: str, value, source: str):
    """`value` as the type of setting `key` (YAML and the command line both give strings for `1e-3`)."""
    expected = FIELD_TYPES[key]
    optional = type(None) in typing.get_args(expected)
    base = next((t for t in typing.get_args(expected) if t is not type(None)), expected)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{source}: {key} cannot be empty; give a {base.__name__}")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except ValueError:
        raise ConfigError(f"{source}: {key}={value!r} is not a valid {base.__name__}") from None


def _unknown(key: str, source: str) -> ConfigError:
    valid = ", ".join(sorted(FIELD_TYPES))
    return ConfigError(f"{source}: unknown setting {key!r}. Valid settings: {valid} (and --config, --resume)")


def load_recipe(path: str | os.PathLike) -> dict:
    """The settings of a recipe YAML file, checked against `TrainConfig`."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of settings, got {type(raw).__name__}")
    settings = {}
    for key, value in raw.items():
        if key not in FIELD_TYPES:
            raise _unknown(key, str(path))
        settings[key] = _coerce(key, value, str(path))
    return settings


def parse_args(argv: list[str]) -> tuple[TrainConfig, bool]:
    """`(config, resume)` from `[--config FILE] [--resume] [--key value ...]`; `--key=value` works too."""
    recipe, resume, overrides = str(DEFAULT_RECIPE), False, {}
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not token.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {token!r}; settings are given as --key value")
        key, has_value, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if key in ("help", "h"):
            print(__doc__)
            print("Settings (defaults before the recipe; configs/tiny.yaml is the default recipe):")
            for name, default in dataclasses.asdict(TrainConfig()).items():
                kind = getattr(FIELD_TYPES[name], "__name__", str(FIELD_TYPES[name]))
                print(f"  --{name.replace('_', '-'):<28} {kind:<12} default {default!r}")
            raise SystemExit(0)
        if key == "resume":
            resume = True
            continue
        if key != "config" and key not in FIELD_TYPES:
            raise _unknown(key, "command line")
        if not has_value:
            # A bare boolean flag (`--streaming`) means true.
            flag = key != "config" and FIELD_TYPES[key] is bool
            if flag and (index == len(argv) or argv[index].startswith("--")):
                value = "true"
            elif index == len(argv):
                raise ConfigError(f"command line: --{key.replace('_', '-')} needs a value")
            else:
                value, index = argv[index], index + 1
        if key == "config":
            recipe = value
        else:
            overrides[key] = _coerce(key, value, "command line")
    config = TrainConfig(**{**load_recipe(recipe), **overrides})
    validate(config)
    return config, resume


def validate(config: TrainConfig) -> None:
    """Reject settings that would fail (or silently misbehave) later, before anything is loaded."""
    positive = ("block_size", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_every", "eval_batches",
                "save_every", "keep_last", "hidden_size", "num_hidden_layers", "tokenizer_vocab_size")
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}={getattr(config, key)} must be >= 1")
    if config.warmup_steps < 0:
        raise ConfigError(f"warmup_steps={config.warmup_steps} must be >= 0")
    if not 0 < config.min_lr <= config.lr:
        raise ConfigError(f"min_lr={config.min_lr} must be in (0, lr={config.lr}]")
    if config.mixed_precision not in (None, "no", "fp16", "bf16", "fp8"):
        raise ConfigError(f"mixed_precision={config.mixed_precision!r} must be one of no, fp16, bf16, fp8 (or none)")
    if config.log_with not in ("tensorboard", "none"):
        raise ConfigError(f"log_with={config.log_with!r} must be 'tensorboard' or 'none'")
    if config.streaming and not config.dataset:
        raise ConfigError("streaming=true needs --dataset (the embedded corpus is read in memory)")
    if config.state_reset not in ("eos", "none"):
        raise ConfigError(f"state_reset={config.state_reset!r} must be 'eos' or 'none'")
    if config.carry_state and config.streaming:
        raise ConfigError("carry_state=true needs an in-memory corpus (streaming=false): each row reads its own part of it")
    if config.sample_tokens < 0 or config.sample_temperature <= 0 or config.sample_top_k < 0:
        raise ConfigError("sample_tokens and sample_top_k must be >= 0 and sample_temperature > 0")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps` (a pure function of the step)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------- data, tokenizer


def prepare_tokenizer(config: TrainConfig, splits, accelerator, checkpoint: Path | None):
    """The run's tokenizer: the checkpoint's when resuming, a given one, or one trained on the training split."""
    from transformers import AutoTokenizer

    from text_data import iter_texts
    from train_tokenizer import train_tokenizer

    if checkpoint is not None:
        source = checkpoint / "pretrained"
    elif config.tokenizer:
        source = Path(config.tokenizer)
        if not source.is_dir():
            raise ConfigError(f"tokenizer={config.tokenizer!r}: no such folder (train one with scripts/train_tokenizer.py)")
    else:
        # Trained once, by the main process, then loaded by all: every process gets the same ids.
        source = Path(config.output_dir) / "tokenizer"
        if accelerator.is_main_process:
            texts = iter_texts(splits.train, config.tokenizer_max_chars)
            train_tokenizer(texts, char_level=config.char_level, vocab_size=config.tokenizer_vocab_size).save_pretrained(source)
        accelerator.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {source} has no EOS token; documents are separated by it")
    if config.vocab_size is not None and config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"vocab_size={config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens ({source}); "
            f"use vocab_size >= {len(tokenizer)} or none (= the tokenizer's size)"
        )
    return tokenizer


def prepare_data(config: TrainConfig, splits, tokenizer, accelerator, vocab_size: int):
    """Training batches for this process and its validation blocks."""
    from state_streams import TokenStreams
    from text_data import PackedBlocks, StreamedBlocks, tokenize_documents, validation_blocks

    eos = tokenizer.eos_token_id
    world, rank = accelerator.num_processes, accelerator.process_index
    # Each process evaluates its own share, the same count on all (FSDP forwards are collective).
    val_per_process = config.eval_batches * config.batch_size
    val = validation_blocks(splits.validation, tokenizer, config.block_size, eos, val_per_process * world)
    if len(val) < world:
        raise ConfigError(f"the validation split gives {len(val)} blocks of {config.block_size} tokens, fewer than the {world} processes")
    val = val[rank :: world][: len(val) // world]
    if splits.streaming:
        from datasets.distributed import split_dataset_by_node

        train = StreamedBlocks(split_dataset_by_node(splits.train, rank=rank, world_size=world), tokenizer, config.block_size, eos)
        train_tokens = None
    else:
        tokens = tokenize_documents(splits.train, tokenizer, eos)
        if config.carry_state:
            # One stream per row of the global batch; micro-step m of process p reads streams
            # [(m * processes + p) * batch_size, ... + batch_size), so the layout is that of one big batch.
            train = TokenStreams(tokens, config.batch_size * world * config.gradient_accumulation_steps, config.block_size)
        else:
            train = PackedBlocks(tokens, config.block_size, config.seed)
        train_tokens = len(tokens)
        if int(tokens.max()) >= vocab_size:
            raise ConfigError(f"the tokenizer produced id {int(tokens.max())}, outside the model's vocab_size={vocab_size}")
    return train, val, train_tokens


# ----------------------------------------------------------------------------------------- checkpoints

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "checkpoint_complete.json"


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str) -> Path | None:
    """The complete checkpoint with the highest step, or None. Incomplete ones lack the marker."""
    done = [
        path for path in checkpoint_dir(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if (path / COMPLETE_MARKER).is_file() and path.name[len(CHECKPOINT_PREFIX):].isdigit()
    ]
    return max(done, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX):]), default=None)


def _fsync(*paths: Path) -> None:
    """Flush files (or folders: their entries) to disk, so a rename after it never publishes lost data."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(accelerator, model, tokenizer, config: TrainConfig, state: dict, train_data, carried=None) -> Path:
    """Write `checkpoints/step-N` atomically: fill a temporary folder, fsync it, mark it complete, rename it.

    A crash at any point leaves either no `step-N` or a complete one; `--resume` ignores the rest.
    """
    root = checkpoint_dir(config.output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state['step']:07d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if hasattr(train_data, "state_dict"):
        (tmp / f"data_state_rank{accelerator.process_index}.json").write_text(json.dumps(train_data.state_dict()))
    if carried is not None:
        import torch

        torch.save(carried.state_dict(), tmp / f"carried_state_rank{accelerator.process_index}.pt")
    export_pretrained(accelerator, model, tokenizer, tmp / "pretrained")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "config": dataclasses.asdict(config)}, indent=2))
        _fsync(*sorted(tmp.rglob("*"), reverse=True), tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": state["step"]}))
        _fsync(tmp / COMPLETE_MARKER, tmp)
        if final.exists():  # only after a resume from an older step re-reaches this one; the new copy is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        complete = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / COMPLETE_MARKER).is_file())
        for old in complete[: -config.keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def check_resumable(config: TrainConfig, saved: dict, world_size: int, checkpoint: Path) -> None:
    """Refuse to resume with settings that would change the trajectory (say which)."""
    changed = {
        key: (saved["config"].get(key), value) for key, value in dataclasses.asdict(config).items()
        if key not in RESUMABLE_CHANGES and saved["config"].get(key) != value
    }
    if saved["world_size"] != world_size:
        changed["processes"] = (saved["world_size"], world_size)
    if changed:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise ConfigError(f"cannot resume from {checkpoint}: these settings differ from the checkpoint's ({details})")


def export_pretrained(accelerator, model, tokenizer, folder: Path) -> None:
    """`save_pretrained` model (+ remote code, generation config) and tokenizer into `folder` (collective call)."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(folder, state_dict=state_dict)
        tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------------------- evaluation, logs


def _isolated_rng(device):
    """Evaluation and sampling must not move the training RNG, or a resumed run would diverge."""
    import torch

    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def evaluate(accelerator, model, val_blocks, config: TrainConfig) -> float:
    """Mean next-token loss over this run's validation blocks (all processes together)."""
    import torch

    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad(), accelerator.autocast():
        for start in range(0, len(val_blocks), config.batch_size):
            batch = torch.from_numpy(val_blocks[start : start + config.batch_size]).to(accelerator.device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            total += torch.stack([loss.double() * predicted, torch.tensor(predicted, dtype=torch.float64, device=total.device)])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def sample(accelerator, model, tokenizer, config: TrainConfig, step: int) -> str:
    """`sample_prompt` and a sampled continuation (the prompt follows EOS, where every training document starts)."""
    import torch

    unwrapped = accelerator.unwrap_model(model)
    prompt = [tokenizer.eos_token_id] + tokenizer(config.sample_prompt, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([prompt], device=accelerator.device)
    unwrapped.eval()
    # Every process samples the same way (sharded models need all of them in each forward).
    with _isolated_rng(accelerator.device), torch.no_grad():
        torch.manual_seed(config.seed + step)
        output = unwrapped.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=config.sample_tokens,
            do_sample=True, temperature=config.sample_temperature, top_k=config.sample_top_k or None,
        )
    unwrapped.train()
    return tokenizer.decode(output[0, 1:], skip_special_tokens=False)


def write_loss_curve(log_path: Path, out_path: Path) -> None:
    """`loss_curve.png`: training loss per step and evaluation loss, from `train_log.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def _restart_log(log_path: Path, step: int) -> None:
    """Keep only the log lines up to the resumed step (a killed run may have logged further)."""
    if log_path.exists():
        kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        log_path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------- the run


def train(config: TrainConfig, resume: bool) -> dict:
    """Run (or continue) a training run; returns the training summary."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from huggingface_hub.errors import StrictDataclassError  # what MinRNNConfig's validators raise
    from tqdm.auto import tqdm
    from transformers import GenerationConfig
    from transformers.utils.logging import disable_progress_bar

    import modeling_minrnn  # noqa: F401  (registers "minrnn" with the Auto classes and for remote code)
    from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM
    from state_streams import CarriedState
    from text_data import load_text_splits

    disable_progress_bar()  # save_pretrained's own bars would break the training bar's line
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        # Without any accelerator, say so: accelerate then joins torchrun's processes over gloo
        # (`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine).
        cpu=not torch.accelerator.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if config.log_with == "none" else config.log_with,
        project_dir=str(output_dir),
    )
    world, main = accelerator.num_processes, accelerator.is_main_process
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        # DeepSpeed configs with their own value override ours; the step counting here would then be wrong.
        raise ConfigError(
            f"gradient_accumulation_steps={config.gradient_accumulation_steps} but the accelerate config sets "
            f"{accelerator.gradient_accumulation_steps}; remove it from the accelerate config or make them equal"
        )
    checkpoint, saved = None, None
    if resume:
        checkpoint = latest_checkpoint(config.output_dir)
        if checkpoint is None:
            raise ConfigError(f"--resume: no complete checkpoint in {checkpoint_dir(config.output_dir)}")
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
        check_resumable(config, saved, world, checkpoint)
    set_seed(config.seed)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_dir(config.output_dir).glob(".tmp-*"):
            shutil.rmtree(stale)  # left by a crash mid-save

    # Data, tokenizer, model settings: every check that can fail runs here, before the first step.
    try:
        with accelerator.main_process_first():
            splits = load_text_splits(
                config.dataset, dataset_config=config.dataset_config, text_column=config.text_column,
                streaming=config.streaming, val_fraction=config.val_fraction, val_documents=config.val_documents,
            )
        tokenizer = prepare_tokenizer(config, splits, accelerator, checkpoint)
        vocab_size = config.vocab_size or len(tokenizer)
        train_data, val_blocks, train_tokens = prepare_data(config, splits, tokenizer, accelerator, vocab_size)
        model_config = MinRNNConfig(
            vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            cell_type=config.cell_type, expansion_factor=config.expansion_factor, conv_kernel=config.conv_kernel,
            intermediate_size=config.intermediate_size, dropout=config.dropout, scan_backend=config.scan_backend,
            tie_word_embeddings=config.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        )
    except (ValueError, FileNotFoundError, StrictDataclassError) as error:
        raise ConfigError(str(error)) from error

    model = MinRNNForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=config.sample_temperature, top_k=config.sample_top_k or None,
        max_new_tokens=config.sample_tokens or None,  # sample_tokens=0 turns eval samples off, not generation
    )
    num_params = model.num_parameters()

    # No weight decay on norms, biases and embeddings (GPT-2 / nanoGPT practice): only matrices that mix features.
    embeddings = {id(model.get_input_embeddings().weight)}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.ndim < 2 or id(p) in embeddings]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2),
    )
    model, optimizer = accelerator.prepare(model, optimizer)

    # This process's rows of every micro-step, each with its own carried state.
    carried = (CarriedState(config.batch_size * config.gradient_accumulation_steps, config.state_reset,
                            tokenizer.eos_token_id) if config.carry_state else None)
    start_step, tokens_seen = 0, 0
    log_path = output_dir / "train_log.jsonl"
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        start_step, tokens_seen = saved["step"], saved["tokens_seen"]
        data_state = checkpoint / f"data_state_rank{accelerator.process_index}.json"
        if data_state.is_file():
            train_data.load_state_dict(json.loads(data_state.read_text()))
        if carried is not None:
            state_file = checkpoint / f"carried_state_rank{accelerator.process_index}.pt"
            carried.load_state_dict(torch.load(state_file, map_location=accelerator.device))
            if carried.next_index != start_step:
                raise ConfigError(f"{state_file} continues at block {carried.next_index}, not at step {start_step}")
        if main:
            _restart_log(log_path, start_step)
    elif main and log_path.exists():
        log_path.unlink()
    if accelerator.trackers == [] and config.log_with != "none":
        hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in dataclasses.asdict(config).items()}
        accelerator.init_trackers("tensorboard", config=hparams)

    micro_batch_tokens = config.batch_size * config.block_size
    step_tokens = micro_batch_tokens * world * config.gradient_accumulation_steps
    if main:
        data_note = f"{train_tokens:,} training tokens" if train_tokens is not None else "streamed"
        accelerator.print(
            f"dataset {splits.name} ({data_note}, {len(val_blocks) * world * config.block_size:,} validation tokens), "
            f"tokenizer {len(tokenizer)} tokens, model {config.cell_type} {num_params:,} parameters, "
            f"{world} process(es), {step_tokens:,} tokens per step"
            + (f", carried state over {train_data.num_streams} streams of {train_data.part:,} tokens (reset: "
               f"{config.state_reset})" if carried is not None else "")
            + (f", resuming at step {start_step} from {checkpoint}" if checkpoint is not None else "")
        )

    def log_line(record: dict) -> None:
        if main:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def run_eval(step: int) -> float:
        eval_loss = evaluate(accelerator, model, val_blocks, config)
        text = sample(accelerator, model, tokenizer, config, step) if config.sample_tokens else ""
        accelerator.log({"eval/loss": eval_loss, "eval/perplexity": math.exp(eval_loss)}, step=step)
        log_line({"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss)})
        if main:
            tqdm.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}")
            if text:
                tqdm.write(f"--- sample ---\n{text}\n--------------")
            write_loss_curve(log_path, output_dir / "loss_curve.png")
        return eval_loss

    model.train()
    eval_loss, last_eval_step = None, None
    progress = tqdm(total=config.max_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                    desc="training", unit="step", dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, config.max_steps):
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=accelerator.device)
        crc = 0
        for micro in range(config.gradient_accumulation_steps):
            index = step * config.gradient_accumulation_steps + micro
            if carried is not None:
                first = (micro * world + accelerator.process_index) * config.batch_size
                rows, targets = train_data.block(step, range(first, first + config.batch_size))
            elif splits.streaming:
                rows = train_data.batch(config.batch_size)
            else:
                rows = train_data.batch(index, config.batch_size, accelerator.process_index, world)
            crc = zlib.crc32(rows.tobytes(), crc)
            batch = torch.from_numpy(rows).to(accelerator.device)
            with accelerator.accumulate(model):
                if carried is not None:
                    loss = carried.forward(
                        model, batch, torch.from_numpy(targets).to(accelerator.device),
                        slice(micro * config.batch_size, (micro + 1) * config.batch_size), step,
                        fresh=train_data.starts_epoch(step),
                    ).loss
                else:
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.grad_clip) if accelerator.sync_gradients else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        # One collective per step: the mean loss and each process's batch fingerprint (to check sharding).
        stats = accelerator.gather(torch.tensor([[float(loss_sum) / config.gradient_accumulation_steps, crc]],
                                                dtype=torch.float64, device=accelerator.device))
        train_loss = float(stats[:, 0].mean())
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss became {train_loss} at step {step + 1}; lower lr (now {config.lr})")
        tokens_seen += step_tokens
        done = step + 1
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        log_line({"step": done, "loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": tokens_seen,
                  "batch_crc32": [int(value) for value in stats[:, 1].tolist()]})
        accelerator.log({"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm}, step=done)

        window_tokens += step_tokens
        elapsed = time.perf_counter() - window_start
        progress.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_per_s=f"{window_tokens / max(elapsed, 1e-9):,.0f}")
        progress.update(1)
        if elapsed > 10:  # a recent-throughput window, so the rate shows slowdowns
            window_start, window_tokens = time.perf_counter(), 0

        if done % config.eval_every == 0 or done == config.max_steps:
            eval_loss, last_eval_step = run_eval(done), done
        if done % config.save_every == 0 or done == config.max_steps:
            path = save_checkpoint(accelerator, model, tokenizer, config,
                                   {"step": done, "tokens_seen": tokens_seen, "world_size": world}, train_data, carried)
            if config.push_to_hub and main:
                push(path / "pretrained", config, revision=f"step-{done}")
    progress.close()
    if last_eval_step != config.max_steps:  # resumed at the end: evaluate the final weights once more
        eval_loss = run_eval(config.max_steps)

    export_pretrained(accelerator, model, tokenizer, output_dir)
    summary = {
        "dataset": splits.name,
        "tokens_seen": tokens_seen,
        "steps": config.max_steps,
        "final_eval_loss": eval_loss,
        "final_eval_perplexity": math.exp(eval_loss),
        "num_parameters": num_params,
        "config": dataclasses.asdict(config),
    }
    if main:
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
        write_loss_curve(log_path, output_dir / "loss_curve.png")
        accelerator.print(f"wrote {output_dir}: final eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}")
        if config.push_to_hub:
            push(output_dir, config, revision=None)
    accelerator.end_training()
    return summary


def push(folder: Path, config: TrainConfig, revision: str | None) -> None:
    """Upload a `save_pretrained` folder with the project's Hub uploader (imported only when asked for)."""
    sys.path.insert(0, str(REPO_ROOT))
    from hub_upload.push_to_hub import push_checkpoint

    push_checkpoint(folder, config.push_to_hub, private=config.hub_private, revision=revision,
                    commit_message=f"minrnn pretraining: {folder.name}")


def main(argv: list[str] | None = None) -> None:
    try:
        train(*parse_args(sys.argv[1:] if argv is None else argv))
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
