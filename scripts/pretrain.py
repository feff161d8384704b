"""Pretrain a minGRU / minLSTM language model with accelerate, from one CPU to many GPUs.

    accelerate launch scripts/pretrain.py                       # tiny recipe on the embedded corpus, offline
    python scripts/download_tinyshakespeare.py && \\
        accelerate launch scripts/pretrain.py --config configs/shakespeare_char.yaml --max-steps 2000
    accelerate launch --multi_gpu --num_processes 2 scripts/pretrain.py --batch-size 8   # 2 gloo processes on a CPU machine
    accelerate launch scripts/pretrain.py --output-dir out/tiny --resume   # continue after a crash
    accelerate launch scripts/pretrain.py --carry-state        # each row reads its own stream; state carried over

Settings come from a recipe (`--config`, YAML or JSON, default `configs/tiny.yaml`) overridden by
`--key value` options (`--max-steps 50 --lr 1e-3`, or `--max_steps`); `--help` lists every key
with the recipe's value. Parsed by transformers' `HfArgumentParser` from the dataclasses below.

Reading order: settings -> data and tokenizer -> model and optimizer -> the loop
(learning rate, accumulation, logging, evaluation, checkpoints) -> the final folder.

One output folder holds one run: a new run refuses a folder holding another (`--resume` continues it,
`--overwrite_output_dir` deletes it). Bad settings, data and checkpoints stop the run with one line
before any work (`accelerate launch -q` leaves out the launcher's traceback after it).

The output folder holds a `save_pretrained` model (with its remote code), the tokenizer,
a generation config, `training_summary.json`, `train_log.jsonl` (one line per step, and
per evaluation), `loss_curve.png`, TensorBoard logs and `checkpoints/step-0000200/`.
"""

import argparse
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import typing
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SCRIPTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
DEFAULT_RECIPE = REPO_ROOT / "configs" / "tiny.yaml"
sys.path.insert(0, str(SCRIPTS_DIR))
# The package imports from a checkout too, before (or without) `pip install -e .`.
sys.path.insert(1, str(REPO_ROOT))

from transformers import HfArgumentParser  # noqa: E402  (light: no torch until the run starts)
from transformers.hf_argparser import HfArg  # noqa: E402

# The model's own choices (modeling_minrnn: CELL_TYPES, SCAN_BACKENDS), repeated here so that a typo fails in a
# second, before torch is imported; a test keeps the two equal.
CellType = Literal["mingru", "minlstm"]
ScanBackend = Literal["auto", "sequential", "log_space", "chunked", "cpu", "triton"]


@dataclass
class TrainConfig:
    """Every setting of the training trajectory; a recipe file and command-line options override these defaults.

    Settings are saved in each checkpoint; `--resume` refuses to change those that steer the trajectory.
    A new setting is one field here (`HfArg` with its help; `X | None` accepts `none`, `Literal` gives choices,
    `list[X]` several values); list it in RESUMABLE_CHANGES when it does not steer the trajectory.
    """

    # Data.
    dataset: list[str] | None = HfArg(
        default=None, help="local .txt/.jsonl/.parquet files (paths, globs) or one Hub dataset id; "
        "none = the embedded corpus (pydoc_data.topics)")
    dataset_config: str | None = HfArg(default=None, help="Hub dataset configuration name")
    text_column: str = HfArg(default="text", help="column holding the text (.jsonl, .parquet, Hub)")
    streaming: bool = HfArg(default=False, help="stream the dataset instead of loading it whole")
    val_fraction: float = HfArg(default=0.1, help="held out from corpora without a validation split (last characters)")
    val_documents: int = HfArg(default=1000, help="held out from streams without a validation split (first documents)")
    # Tokenizer.
    tokenizer: str | None = HfArg(
        default=None, help="a saved tokenizer folder; none = train one on the training split at start")
    char_level: bool = HfArg(default=False, help="train a character-level tokenizer instead of byte-level BPE")
    tokenizer_vocab_size: int = HfArg(default=1024, help="size of the BPE tokenizer trained at start")
    tokenizer_max_chars: int = HfArg(default=100_000_000, help="characters the tokenizer is trained on, at most")
    # Model (MinRNNConfig).
    cell_type: CellType = HfArg(default="mingru", help="the recurrent cell")
    hidden_size: int = HfArg(default=128, help="model width")
    num_hidden_layers: int = HfArg(default=3, help="number of blocks")
    expansion_factor: float = HfArg(default=2.0, help="recurrent state width / hidden_size")
    conv_kernel: int = HfArg(default=4, help="causal depthwise conv width; 0 = none")
    intermediate_size: int = HfArg(default=512, help="MLP width; 0 = no MLP")
    dropout: float = HfArg(default=0.0, help="dropout probability")
    tie_word_embeddings: bool = HfArg(default=True, help="share the input embedding and the output head")
    scan_backend: ScanBackend = HfArg(default="auto", help="how the recurrence is computed")
    vocab_size: int | None = HfArg(default=None, help="model vocabulary; none = the tokenizer's size")
    # Optimisation: global batch = batch_size * processes * gradient_accumulation_steps blocks.
    block_size: int = HfArg(default=128, help="tokens per training block")
    batch_size: int = HfArg(default=16, help="blocks per process and micro-step")
    gradient_accumulation_steps: int = HfArg(default=1, help="micro-steps per optimizer step")
    backprop_chunk_size: int | None = HfArg(
        default=None, help="backprop through each block in chunks of this many tokens, each recomputed from the "
        "state at its start: the exact gradients in the memory of one chunk, so block_size can exceed memory; "
        "none = one backward over the whole block")
    max_steps: int = HfArg(default=300, help="optimizer steps")
    lr: float = HfArg(default=3e-3, help="peak learning rate (after linear warmup, then cosine decay)")
    min_lr: float = HfArg(default=3e-4, help="learning rate at max_steps")
    warmup_steps: int = HfArg(default=30, help="linear warmup steps")
    weight_decay: float = HfArg(default=0.1, help="AdamW weight decay (matrices only)")
    beta1: float = HfArg(default=0.9, help="AdamW beta1")
    beta2: float = HfArg(default=0.95, help="AdamW beta2")
    grad_clip: float = HfArg(default=1.0, help="gradient norm clipping")
    # Carried state (truncated BPTT, scripts/state_streams.py).
    carry_state: bool = HfArg(default=False, help="each row of each micro-step of each process reads its own "
                              "contiguous part of the corpus, block after block, starting from the detached final "
                              "state of its previous block (in-memory corpora)")
    state_reset: Literal["eos", "none"] = HfArg(default="eos", help="with carry_state: restart the carried state at "
                                                "every EOS token (documents stay apart), or carry it through them")
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] | None = HfArg(
        default=None, help="none = what `accelerate launch` was given")
    seed: int = HfArg(default=0, help="seeds initialisation, data order and dropout")
    # Evaluation and samples.
    eval_every: int = HfArg(default=100, help="steps between evaluations")
    eval_batches: int = HfArg(default=8, help="validation batches per evaluation")
    sample_prompt: str = HfArg(default="", help="prompt of the sample shown at each evaluation")
    sample_tokens: int = HfArg(default=100, help="tokens sampled at each evaluation; 0 = no sample")
    sample_temperature: float = HfArg(default=0.8, help="sampling temperature")
    sample_top_k: int = HfArg(default=50, help="top-k sampling; 0 = off")
    # Output.
    output_dir: str = HfArg(default="out/tiny", help="folder of the run: checkpoints, logs, the final model")
    save_every: int = HfArg(default=100, help="steps between checkpoints")
    keep_last: int = HfArg(default=2, help="checkpoints kept (older ones are deleted)")
    log_with: Literal["tensorboard", "none"] = HfArg(default="tensorboard", help="experiment tracker")
    push_to_hub: str | None = HfArg(default=None, help="Hub repo id to publish checkpoints and the final model to")
    hub_private: bool = HfArg(default=False, help="create the Hub repo as private")


@dataclass
class LaunchOptions:
    """How this invocation starts: not part of the run, never saved with it."""

    config: str = HfArg(default=str(DEFAULT_RECIPE), help="recipe file (YAML or JSON) of settings")
    resume: bool = HfArg(default=False, help="continue the run in output_dir from its latest intact checkpoint")
    overwrite_output_dir: bool = HfArg(default=False, help="start a new run in an output_dir that holds another one, "
                                       "deleting that run's checkpoints, logs and model")


# Settings a resumed run may change: they do not touch the training trajectory.
RESUMABLE_CHANGES = {
    "eval_every", "eval_batches", "sample_prompt", "sample_tokens", "sample_temperature", "sample_top_k",
    "save_every", "keep_last", "log_with", "push_to_hub", "hub_private", "tokenizer_max_chars", "output_dir",
}
FIELD_TYPES = typing.get_type_hints(TrainConfig)


class ConfigError(ValueError):
    """A setting that does not exist or has an invalid value (or data, a folder, a checkpoint that cannot serve)."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (the loss diverged); like `ConfigError`, shown as one line without a traceback."""


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, with its errors raised as one `ConfigError` line (not the usage text and exit 2)."""

    def error(self, message):
        raise ConfigError(f"command line: {message}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, then every option with its default (the recipe's value)."""


class SettingsParser(_OneLineErrors, HfArgumentParser):
    """transformers' `HfArgumentParser` for `(TrainConfig, LaunchOptions)`, with a recipe file under the command line.

    What it adds: the recipe's values become the parser's defaults (so options override the recipe, and `--help`
    shows the recipe's values), every recipe value is checked as strictly as an option, `none` clears an optional
    setting, an unknown option names its nearest match, and every error is one line.
    Options are spelled `--max-steps` or `--max_steps`; abbreviations are refused.
    """

    def __init__(self):
        super().__init__((TrainConfig, LaunchOptions), description=__doc__, formatter_class=_HelpFormatter,
                         allow_abbrev=False)
        for action in self._actions:
            optional = action.dest in FIELD_TYPES and type(None) in typing.get_args(FIELD_TYPES[action.dest])
            if optional and action.nargs != "+":
                action.type = _none_or(action.type)
                if action.choices is not None:
                    action.choices = (*action.choices, None)

    def parse(self, argv: list[str]) -> tuple[TrainConfig, LaunchOptions]:
        """Settings from the recipe named by `--config` (default configs/tiny.yaml), overridden by `argv`."""
        recipe_flag = _OneLineErrors(add_help=False, allow_abbrev=False)
        recipe_flag.add_argument("--config", default=str(DEFAULT_RECIPE))
        self.set_defaults(**self.recipe_settings(recipe_flag.parse_known_args(argv)[0].config))
        config, options, unknown = self.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False)
        if unknown:
            near = difflib.get_close_matches(unknown[0], self._option_string_actions, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"command line: unknown argument {unknown[0]!r}{hint}; --help lists the settings")
        if config.dataset in (["none"], ["null"]):  # a list option reads `--dataset none` as one file name
            config.dataset = None
        return config, options

    def recipe_settings(self, path: str) -> dict:
        """The settings of a YAML (or JSON) recipe, each converted and checked as its option would be."""
        import yaml

        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file")
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark
            raise ConfigError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: "
                              f"{error.problem}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not a YAML or JSON recipe ({error})") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of settings, got {type(raw).__name__}")
        actions = {action.dest: action for action in self._actions}
        settings = {}
        for key, value in raw.items():
            if key not in FIELD_TYPES:
                near = difflib.get_close_matches(str(key), FIELD_TYPES, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{path}: unknown setting {key!r}{hint}; --help lists the settings")
            settings[key] = _recipe_value(actions[key], key, value, path)
        return settings


def _none_or(convert):
    """An option's type that also reads `none` / `null` as None."""
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in "invalid <type> value"
    return parse


def _scalar_type(key: str) -> type:
    """The Python type of one value of setting `key` (a list's element; str for a choice)."""
    kind = FIELD_TYPES[key]
    if type(None) in typing.get_args(kind):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
    return str if typing.get_origin(kind) is Literal else kind


def _recipe_value(action, key: str, value, source: str):
    """A recipe's `value` for setting `key`: text is read as on the command line; anything else must match."""
    kind = _scalar_type(key)
    if value is None:
        if type(None) in typing.get_args(FIELD_TYPES[key]):
            return None
        raise ConfigError(f"{source}: {key} cannot be empty; give a {kind.__name__}")
    many = action.nargs == "+"
    items = value if many and isinstance(value, list) else [value]
    converted = []
    for item in items:
        if isinstance(item, str) and kind is not str:
            try:
                item = action.type(item)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                raise ConfigError(f"{source}: {key}={value!r} is not a valid {kind.__name__}") from None
        elif kind is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        elif not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
            what = f"a {type(item).__name__}" if isinstance(item, (list, dict)) else f"{type(item).__name__} {item!r}"
            quote = " (in quotes, for text)" if kind is str else ""
            raise ConfigError(f"{source}: {key}={value!r} is {what}; give one {kind.__name__}{quote}")
        if action.choices is not None and item not in action.choices:
            choices = ", ".join(str(choice) for choice in action.choices if choice is not None)
            raise ConfigError(f"{source}: {key}={item!r} is not one of {choices}")
        converted.append(item)
    return converted if many else converted[0]


def parse_args(argv: list[str]) -> tuple[TrainConfig, LaunchOptions]:
    """`(settings, launch options)` from `[--config FILE] [--resume] [--key value ...]`; `--key=value` works too."""
    config, options = SettingsParser().parse(argv)
    validate(config)
    return config, options


def validate(config: TrainConfig) -> None:
    """Reject settings that would fail (or silently misbehave) later, before anything is loaded."""
    positive = ("block_size", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_every", "eval_batches",
                "save_every", "keep_last", "hidden_size", "num_hidden_layers", "tokenizer_vocab_size")
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}={getattr(config, key)} must be >= 1")
    if config.warmup_steps < 0:
        raise ConfigError(f"warmup_steps={config.warmup_steps} must be >= 0")
    if config.backprop_chunk_size is not None and config.backprop_chunk_size < 1:
        raise ConfigError(f"backprop_chunk_size={config.backprop_chunk_size} must be >= 1 (or none: no chunking)")
    if not 0 < config.min_lr <= config.lr:
        raise ConfigError(f"min_lr={config.min_lr} must be in (0, lr={config.lr}]")
    if config.streaming and not config.dataset:
        raise ConfigError("streaming=true needs --dataset (the embedded corpus is read in memory)")
    if config.carry_state and config.streaming:
        raise ConfigError("carry_state=true needs an in-memory corpus (streaming=false): each row reads its own "
                          "part of it")
    if config.carry_state and config.backprop_chunk_size:
        raise ConfigError(f"carry_state=true and backprop_chunk_size={config.backprop_chunk_size} cannot be combined "
                          "(chunked backprop starts each block from a zero state); give one of them")
    if config.sample_tokens < 0 or config.sample_temperature <= 0 or config.sample_top_k < 0:
        raise ConfigError("sample_tokens and sample_top_k must be >= 0 and sample_temperature > 0")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps` (a pure function of the step)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------- before the run


def warn(message: str) -> None:
    """One warning line on stderr, from the first process only (every process runs the checks)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class Preflight:
    """What the checks before the run found."""

    checkpoint: Path | None  # the checkpoint to resume from
    log_with: str  # the tracker, "none" when its package is missing
    plot_loss_curve: bool  # False when matplotlib is missing


def preflight(config: TrainConfig, options: LaunchOptions) -> Preflight:
    """Every check that needs neither data loading nor training, in about a second: one line per problem.

    Data files, the tokenizer folder, the output folder, the checkpoint to resume (its recorded sizes and hashes),
    the packages of side outputs (skipped with a warning), then the model settings (the first import of torch).
    """
    from huggingface_hub.errors import StrictDataclassError  # what MinRNNConfig's validators raise

    from text_data import check_local_files

    try:
        check_local_files(config.dataset)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    if options.resume and options.overwrite_output_dir:
        raise ConfigError("--resume continues the run in output_dir and --overwrite_output_dir deletes it; give one")
    if options.resume:
        checkpoint = resumable_checkpoint(config.output_dir)
    else:
        checkpoint = None
        check_output_dir(config.output_dir, options.overwrite_output_dir)
        if config.tokenizer and not Path(config.tokenizer).is_dir():
            raise ConfigError(
                f"tokenizer={config.tokenizer!r}: no such folder (train one with scripts/train_tokenizer.py)")
    log_with = config.log_with
    if log_with == "tensorboard" and not _installed("tensorboard", "tensorboardX", skipped="TensorBoard logs"):
        log_with = "none"
    plot = _installed("matplotlib", skipped="loss_curve.png")
    if config.push_to_hub:
        try:
            import hub_upload.push_to_hub  # noqa: F401  (its dependencies, before the first checkpoint needs them)
        except ImportError as error:
            raise ConfigError(f"push_to_hub={config.push_to_hub!r} needs the uploader's packages: {error}") from None
    try:
        model_config(config, config.vocab_size or config.tokenizer_vocab_size)
    except (ValueError, StrictDataclassError) as error:
        raise ConfigError(str(error)) from None
    return Preflight(checkpoint, log_with, plot)


def _installed(*modules: str, skipped: str) -> bool:
    """Whether one of `modules` can be imported; if not, warn that the side output `skipped` is left out."""
    if any(importlib.util.find_spec(module) is not None for module in modules):
        return True
    warn(f"{skipped} skipped: {modules[0]} is not installed (pip install {modules[0]})")
    return False


def model_config(config: TrainConfig, vocab_size: int, tokenizer=None):
    """The `MinRNNConfig` of the run (its validators reject bad model settings); special ids from `tokenizer`."""
    from modeling_minrnn import MinRNNConfig

    special = {} if tokenizer is None else {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id}
    return MinRNNConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        cell_type=config.cell_type, expansion_factor=config.expansion_factor, conv_kernel=config.conv_kernel,
        intermediate_size=config.intermediate_size, dropout=config.dropout, scan_backend=config.scan_backend,
        tie_word_embeddings=config.tie_word_embeddings, use_cache=True, **special,
    )


# Files and folders a run writes into output_dir besides its final model.
RUN_RECORDS = ("checkpoints", "train_log.jsonl", "training_summary.json", "loss_curve.png", "tensorboard", "tokenizer")


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that holds another one (unless told to replace it)."""
    found = [name for name in RUN_RECORDS if (Path(output_dir) / name).exists()]
    if found and not overwrite:
        raise ConfigError(
            f"output_dir {output_dir} holds another run ({', '.join(found)}); continue it with --resume, "
            "choose a new --output-dir, or pass --overwrite_output_dir to delete it and start over")


def remove_run(output_dir: str) -> None:
    """Delete a previous run's records and final model (`--overwrite_output_dir`), nothing else in the folder."""
    # The final model's files are those its checkpoints' model folders hold (save_pretrained's names).
    model_files = {path.name for path in checkpoint_dir(output_dir).glob(f"{CHECKPOINT_PREFIX}*/pretrained/*")}
    for name in (*RUN_RECORDS, *sorted(model_files)):
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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


def complete_checkpoints(output_dir: str) -> list[Path]:
    """The complete checkpoints, lowest step first. Incomplete ones lack the marker."""
    done = [
        path for path in checkpoint_dir(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if (path / COMPLETE_MARKER).is_file() and path.name[len(CHECKPOINT_PREFIX):].isdigit()
    ]
    return sorted(done, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: str) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checkpoint_manifest(folder: Path) -> dict:
    """`{relative path: [size, sha256]}` of every file in a checkpoint, recorded when it is completed."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != COMPLETE_MARKER)
    return {path.relative_to(folder).as_posix(): [path.stat().st_size, _sha256(path)] for path in files}


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a complete checkpoint's files (missing, truncated, changed), or None if intact."""
    try:
        recorded = json.loads((checkpoint / COMPLETE_MARKER).read_text()).get("files", {})
    except (ValueError, OSError) as error:
        return f"{checkpoint / COMPLETE_MARKER} is unreadable ({error})"
    for name, (size, _) in recorded.items():  # sizes first: a truncated file is found without reading the rest
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size:,} bytes, {size:,} when saved"
    for name, (_, digest) in recorded.items():
        if _sha256(checkpoint / name) != digest:
            return f"{checkpoint / name} differs from the file saved (sha256)"
    return None


def resumable_checkpoint(output_dir: str) -> Path:
    """The newest intact checkpoint; each damaged newer one is named in a warning (or, if none is intact, an error)."""
    candidates = complete_checkpoints(output_dir)
    if not candidates:
        raise ConfigError(f"--resume: no complete checkpoint in {checkpoint_dir(output_dir)}")
    damage = []
    for checkpoint in reversed(candidates):
        problem = checkpoint_damage(checkpoint)
        if problem is None:
            for text in damage:
                warn(f"damaged checkpoint skipped: {text}; resuming from {checkpoint.name}")
            return checkpoint
        damage.append(problem)
    raise ConfigError(f"--resume: no intact checkpoint in {checkpoint_dir(output_dir)} ({'; '.join(damage)}); "
                      "start over with --overwrite_output_dir")


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
        # Sizes and hashes of what was written: --resume skips a checkpoint damaged since (truncated, changed).
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": state["step"], "files": checkpoint_manifest(tmp)}))
        _fsync(tmp / COMPLETE_MARKER, tmp)
        if final.exists():  # only after a resume from an older step re-reaches this one; the new copy is complete
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        for old in complete_checkpoints(config.output_dir)[: -config.keep_last]:
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


def train(config: TrainConfig, options: LaunchOptions, checked: Preflight) -> dict:
    """Run (or continue) a training run after `preflight`; returns the training summary."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed, str_to_bool
    from tqdm.auto import tqdm
    from transformers import GenerationConfig
    from transformers.utils.logging import disable_progress_bar

    import modeling_minrnn  # noqa: F401  (registers "minrnn" with the Auto classes and for remote code)
    from modeling_minrnn import MinRNNForCausalLM
    from modeling_minrnn.long_sequence import chunked_backward
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
        log_with=None if checked.log_with == "none" else checked.log_with,
        project_dir=str(output_dir),
    )
    world, main = accelerator.num_processes, accelerator.is_main_process
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        # DeepSpeed configs with their own value override ours; the step counting here would then be wrong.
        raise ConfigError(
            f"gradient_accumulation_steps={config.gradient_accumulation_steps} but the accelerate config sets "
            f"{accelerator.gradient_accumulation_steps}; remove it from the accelerate config or make them equal"
        )
    mode = accelerator.distributed_type.value
    if config.backprop_chunk_size and (accelerator.mixed_precision == "fp16" or mode == "DEEPSPEED"):
        # Both need their own backward (fp16's loss scaler, DeepSpeed's engine); chunks are backpropagated directly.
        raise ConfigError(
            f"backprop_chunk_size={config.backprop_chunk_size} does not work with fp16 loss scaling or DeepSpeed; "
            "use bf16 or no mixed precision, and DDP or FSDP"
        )
    for variable, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        # accelerate falls back to plain data parallelism without a word where it cannot apply them (e.g. on CPUs).
        if str_to_bool(os.environ.get(variable, "false")) and mode != kind:
            reason = "no GPU" if accelerator.device.type == "cpu" else "not applied"
            warn(f"the accelerate config asks for {kind}, but accelerate runs {mode} here ({reason}): "
                 "every process holds the whole model")
    checkpoint, saved = checked.checkpoint, None
    if checkpoint is not None:
        saved = json.loads((checkpoint / "trainer_state.json").read_text())
        check_resumable(config, saved, world, checkpoint)
    set_seed(config.seed)
    if main:
        if options.overwrite_output_dir:
            remove_run(config.output_dir)
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
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error

    model = MinRNNForCausalLM(model_config(config, vocab_size, tokenizer))
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

    def leave_out_tied_copies(models, weights, folder):
        # accelerate's safetensors save drops an alias of a tied weight itself, with a warning at every checkpoint;
        # leave the tied copies (the output head) out first, as save_pretrained does. Loading re-ties them.
        for wrapped, state in zip(models, weights):
            tied = accelerator.unwrap_model(wrapped).all_tied_weights_keys
            for key in [key for key in state if key.removeprefix("module.") in tied]:
                del state[key]

    accelerator.register_save_state_pre_hook(leave_out_tied_copies)

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
    if accelerator.trackers == [] and checked.log_with != "none":
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
            f"{world} process(es), distributed mode {mode}, {step_tokens:,} tokens per step"
            + (f", carried state over {train_data.num_streams} streams of {train_data.part:,} tokens (reset: "
               f"{config.state_reset})" if carried is not None else "")
            + (f", resuming at step {start_step} from {checkpoint}" if checkpoint is not None else "")
        )

    def log_line(record: dict) -> None:
        if main:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def plot_loss_curve() -> None:
        # A side output: whatever goes wrong here (a broken plotting install, a full disk) is a warning, never the
        # end of the run.
        if main and checked.plot_loss_curve:
            try:
                write_loss_curve(log_path, output_dir / "loss_curve.png")
            except Exception as error:  # noqa: BLE001
                warn(f"loss_curve.png not written: {type(error).__name__}: {error}")

    def run_eval(step: int) -> float:
        eval_loss = evaluate(accelerator, model, val_blocks, config)
        text = sample(accelerator, model, tokenizer, config, step) if config.sample_tokens else ""
        accelerator.log({"eval/loss": eval_loss, "eval/perplexity": math.exp(eval_loss)}, step=step)
        log_line({"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss)})
        if main:
            tqdm.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}")
            if text:
                tqdm.write(f"--- sample ---\n{text}\n--------------")
        plot_loss_curve()
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
                    accelerator.backward(loss)
                elif config.backprop_chunk_size:
                    # Normalised as `accelerator.backward` scales the mean loss: over the step's micro-batches.
                    predicted = batch.shape[0] * (batch.shape[1] - 1) * config.gradient_accumulation_steps
                    loss = chunked_backward(model, batch, chunk_size=config.backprop_chunk_size,
                                            num_items_in_batch=predicted).loss * config.gradient_accumulation_steps
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
            raise TrainingStopped(f"training loss became {train_loss} at step {step + 1}; lower lr (now {config.lr}) "
                                  "or grad_clip, or resume from an earlier checkpoint with other settings")
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
    plot_loss_curve()
    if main:
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.print(f"wrote {output_dir}: final eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}")
        if config.push_to_hub:
            push(output_dir, config, revision=None)
    accelerator.end_training()
    return summary


def push(folder: Path, config: TrainConfig, revision: str | None) -> None:
    """Upload a `save_pretrained` folder with the project's Hub uploader (imported only when asked for).

    A failed upload is a warning saying how to retry: the run and its files go on without it.
    """
    from hub_upload.push_to_hub import PublishError, push_checkpoint

    try:
        push_checkpoint(folder, config.push_to_hub, private=config.hub_private, revision=revision,
                        commit_message=f"minrnn pretraining: {folder.name}")
    except PublishError as error:
        retry = f"python hub_upload/push_to_hub.py --checkpoint {folder} --repo-id {config.push_to_hub}"
        warn(f"{folder} not published ({error}); retry with {retry}" + (f" --revision {revision}" if revision else ""))


def main(argv: list[str] | None = None) -> None:
    """Settings, then every check that can fail early, then the run; a problem the user can fix is one line
    (`accelerate launch -q` also leaves out the launcher's own traceback after it)."""
    try:
        config, options = parse_args(sys.argv[1:] if argv is None else argv)
        train(config, options, preflight(config, options))
    except (ConfigError, TrainingStopped) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
