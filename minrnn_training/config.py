"""The settings of a training run: dataclasses read by transformers' `HfArgumentParser`.

Settings come from a recipe (`--config`, YAML or JSON) overridden by `--key value` options (`--max-steps 50
--lr 1e-3`, or `--max_steps`); `--help` lists every key with the recipe's value. A new setting is one field of
`TrainConfig`. The same parser reads the experiment scripts' settings (`parse_settings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser  # light: no torch
from transformers.hf_argparser import HfArg

# Where the recipes live in a checkout of the project.
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "configs" / "tiny.yaml"
# How a carried state restarts (`carried_state.CarriedState`).
StateReset = Literal["eos", "none"]


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
    chat_template: str | None = HfArg(
        default=None, help="Jinja chat template saved with the tokenizer: the template, or a file holding it; "
        "none = minrnn_training.tokenizer.DEFAULT_CHAT_TEMPLATE")
    # Model (MinRNNConfig).
    init_from: str | None = HfArg(
        default=None, help="start from this trained model: a save_pretrained folder (a finished run's output_dir), "
        "a run's checkpoint (output_dir/checkpoints/step-N) or a Hub model id; its architecture, weights and "
        "tokenizer (unless --tokenizer) are kept, while data, schedule, optimizer, dropout, scan_backend and "
        "fused_linear_cross_entropy are this run's; none = a new model from the settings below")
    cell_type: str = HfArg(default="mingru", help="the recurrent cell (MinRNNConfig.cell_type: mingru, minlstm)")
    hidden_size: int = HfArg(default=128, help="model width")
    num_hidden_layers: int = HfArg(default=3, help="number of blocks")
    expansion_factor: float = HfArg(default=2.0, help="recurrent state width / hidden_size")
    conv_kernel: int = HfArg(default=4, help="causal depthwise conv width; 0 = none")
    intermediate_size: int = HfArg(default=512, help="MLP width; 0 = no MLP")
    dropout: float = HfArg(default=0.0, help="dropout probability")
    tie_word_embeddings: bool = HfArg(default=True, help="share the input embedding and the output head")
    scan_backend: str = HfArg(default="auto", help="how the recurrence is computed (MinRNNConfig.scan_backend)")
    fused_linear_cross_entropy: bool = HfArg(
        default=False, help="compute the training loss chunk by chunk from the hidden states, never the whole "
        "logits (MinRNNConfig.fused_linear_cross_entropy): the same loss, faster and lighter; saved in the model's "
        "config, where it leaves the output's logits None in training mode with labels")
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
    # Carried state (truncated BPTT, minrnn_training.carried_state).
    carry_state: bool = HfArg(default=False, help="each row of each micro-step of each process reads its own "
                              "contiguous part of the corpus, block after block, starting from the detached final "
                              "state of its previous block (in-memory corpora)")
    state_reset: StateReset = HfArg(default="eos", help="with carry_state: restart the carried state at "
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
    checkpoint_hashes: bool = HfArg(
        default=False, help="record sha256 hashes of each checkpoint's files (a thread of the main process, while "
        "training goes on) and verify them on --resume; file sizes are always recorded and verified")
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
    "chat_template", "checkpoint_hashes",
}


@dataclass
class RecipeFile:
    """The `--config` option of a settings dataclass that has no launch options of its own (the experiments')."""

    config: str | None = HfArg(default=None, help="recipe file (YAML or JSON) of settings")


class ConfigError(ValueError):
    """A setting that does not exist or has an invalid value (or data, a folder, a checkpoint that cannot serve)."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (the loss diverged); like `ConfigError`, shown as one line without a traceback."""


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, with its errors raised as one `ConfigError` line (not the usage text and exit 2)."""

    def error(self, message):
        raise ConfigError(f"command line: {message}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, then every option with its default (the recipe's value)."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction):  # `--no_x`: the default is shown once, on `--x`
            return action.help
        return super()._get_help_string(action)


class SettingsParser(_OneLineErrors, HfArgumentParser):
    """transformers' `HfArgumentParser` for `(settings, launch options)` dataclasses, with a recipe file under the
    command line.

    What it adds: the recipe's values become the parser's defaults (so options override the recipe, and `--help`
    shows the recipe's values), every recipe value is checked as strictly as an option, `none` clears an optional
    setting, a list takes several values or a comma list (`--models a b`, `--models a,b`), an unknown option names
    its nearest match, and every error is one line. Options are spelled `--max-steps` or `--max_steps`;
    abbreviations are refused. Only the first dataclass's fields may stand in a recipe.
    """

    def __init__(self, dataclass_types=(TrainConfig, LaunchOptions), description: str | None = None):
        super().__init__(dataclass_types, description=description, formatter_class=_HelpFormatter,
                         allow_abbrev=False)
        self.recipe_types = typing.get_type_hints(dataclass_types[0])
        self.default_recipe = next(
            (f.default for cls in dataclass_types for f in dataclasses.fields(cls) if f.name == "config"), None)
        self.element_types = {}  # a list setting's converter of one value
        for action in self._actions:
            if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser gives `--no_x` the help of `--x`
                action.help = f"set {action.dest} to False (the opposite of --{action.dest})"
            kind = self.recipe_types.get(action.dest)
            if kind is None:
                continue
            if action.nargs == "+":
                self.element_types[action.dest] = action.type
                if action.choices is None:
                    action.type = _comma_list(action.type)
            elif type(None) in typing.get_args(kind):
                action.type = _none_or(action.type)
                if action.choices is not None:
                    action.choices = (*action.choices, None)

    def parse(self, argv: list[str]) -> tuple:
        """The dataclasses, from the recipe named by `--config` overridden by `argv`."""
        recipe_flag = _OneLineErrors(add_help=False, allow_abbrev=False)
        recipe_flag.add_argument("--config", default=self.default_recipe)
        recipe = recipe_flag.parse_known_args(argv)[0].config
        if recipe is not None:
            self.set_defaults(**self.recipe_settings(recipe))
        *outputs, unknown = self.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False)
        if unknown:
            near = difflib.get_close_matches(unknown[0], self._option_string_actions, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"command line: unknown argument {unknown[0]!r}{hint}; --help lists the settings")
        settings = outputs[0]
        for key in self.element_types:
            value = getattr(settings, key)
            if isinstance(value, list) and value and isinstance(value[0], list):  # comma lists, flattened
                value = [item for items in value for item in items]
            if value in (["none"], ["null"]):  # a list option reads `--dataset none` as one value
                value = None
            setattr(settings, key, value)
        return tuple(outputs)

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
            if key not in self.recipe_types:
                near = difflib.get_close_matches(str(key), self.recipe_types, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{path}: unknown setting {key!r}{hint}; --help lists the settings")
            settings[key] = self._recipe_value(actions[key], key, value, path)
        return settings

    def _recipe_value(self, action, key: str, value, source: str):
        """A recipe's `value` for setting `key`: text is read as on the command line; anything else must match."""
        annotation = self.recipe_types[key]
        kind = _scalar_type(annotation)
        if value is None:
            if type(None) in typing.get_args(annotation):
                return None
            raise ConfigError(f"{source}: {key} cannot be empty; give a {kind.__name__}")
        many = action.nargs == "+"
        convert = self.element_types[key] if many else action.type
        items = value if many and isinstance(value, list) else [value]
        converted = []
        for item in items:
            if isinstance(item, str) and kind is not str:
                try:
                    item = convert(item)
                except (ValueError, TypeError, argparse.ArgumentTypeError):
                    raise ConfigError(f"{source}: {key}={value!r} is not a valid {kind.__name__}") from None
            elif kind is float and isinstance(item, int) and not isinstance(item, bool):
                item = float(item)
            elif not isinstance(item, kind) or (kind is int and isinstance(item, bool)):
                what = (f"a {type(item).__name__}" if isinstance(item, (list, dict))
                        else f"{type(item).__name__} {item!r}")
                quote = " (in quotes, for text)" if kind is str else ""
                raise ConfigError(f"{source}: {key}={value!r} is {what}; give one {kind.__name__}{quote}")
            if action.choices is not None and item not in action.choices:
                choices = ", ".join(str(choice) for choice in action.choices if choice is not None)
                raise ConfigError(f"{source}: {key}={item!r} is not one of {choices}")
            converted.append(item)
        return converted if many else converted[0]


def _none_or(convert):
    """An option's type that also reads `none` / `null` as None."""
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names it in "invalid <type> value"
    return parse


def _comma_list(convert):
    """A list option's type: one value, or a comma list of them (`1e-3,3e-3`)."""
    def parse(text: str):
        return [convert(part) for part in text.split(",") if part]

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _scalar_type(annotation) -> type:
    """The Python type of one value of a setting annotated `annotation` (a list's element; str for a choice)."""
    kind = annotation
    if type(None) in typing.get_args(kind):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
    return str if typing.get_origin(kind) is Literal else kind


def parse_settings(settings_cls, argv: list[str] | None, description: str | None = None):
    """An experiment's `settings_cls` from its defaults, a recipe (`--config FILE`) and `--key value` options, then
    its own `validate()`; a bad setting ends the program with one line."""
    try:
        settings, _ = SettingsParser((settings_cls, RecipeFile), description).parse(
            sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    settings.validate()
    return settings


def parse_args(argv: list[str], description: str | None = None) -> tuple[TrainConfig, LaunchOptions]:
    """`(settings, launch options)` from `[--config FILE] [--resume] [--key value ...]`; `--key=value` works too."""
    config, options = SettingsParser((TrainConfig, LaunchOptions), description).parse(argv)
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


def warn(message: str) -> None:
    """One warning line on stderr, from the first process only (every process runs the checks).

    Not accelerate's logger: most warnings come before the `Accelerator` (which that logger needs) exists.
    """
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


# The settings an `init_from` model fixes: its architecture (MinRNNConfig's fields of the same names).
ARCHITECTURE = ("cell_type", "hidden_size", "num_hidden_layers", "expansion_factor", "conv_kernel",
                "intermediate_size", "tie_word_embeddings", "vocab_size")


def adopt_architecture(config: TrainConfig) -> None:
    """Set `config`'s architecture to the `init_from` model's (its config file only, no weights), so that the run
    records and checks what it trains; one line when `init_from` is no minrnn model.

    `init_from` is a `save_pretrained` folder, a Hub model id, or a checkpoint of a run (`checkpoints/step-N`,
    whose `trainer_state.json` holds the run's settings)."""
    import json

    from transformers import AutoConfig

    import modeling_minrnn  # noqa: F401  (registers "minrnn" with AutoConfig)

    run_state = Path(config.init_from) / "trainer_state.json"
    if run_state.is_file():
        saved = json.loads(run_state.read_text())["config"]
        for key in ARCHITECTURE:
            setattr(config, key, saved[key])
        return
    try:
        pretrained = AutoConfig.from_pretrained(config.init_from)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"init_from={config.init_from!r}: not a save_pretrained folder, a run's checkpoint or a "
                          f"reachable Hub model ({reason})") from None
    if pretrained.model_type != "minrnn":
        raise ConfigError(f"init_from={config.init_from!r} is a {pretrained.model_type!r} model; give a minrnn one")
    for key in ARCHITECTURE:
        setattr(config, key, getattr(pretrained, key))


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
        fused_linear_cross_entropy=config.fused_linear_cross_entropy,
        tie_word_embeddings=config.tie_word_embeddings, use_cache=True, **special,
    )
