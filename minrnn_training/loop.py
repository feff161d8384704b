"""The training run: settings, checks before any work, then the loop from data to checkpoint in named steps.

Reading order: `main` (settings, `preflight`, `train`) -> `train`, the loop on one screen -> `Trainer`: set-up
(`__init__`: the accelerator, data and tokenizer, model and optimizer, resume), `train_step` (the learning rate, then
`step.optimizer_step` over `forward_backward` micro-steps), `evaluate`, `save` (a checkpoint), `finish` (the final
folder).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import (
    check_output_dir,
    check_resumable,
    check_unfinished,
    checkpoint_dir,
    export_pretrained,
    hash_in_background,
    is_checkpoint,
    load_checkpoint,
    load_checkpoint_weights,
    remove_run,
    resumable_checkpoint,
    save_checkpoint,
    save_tied_weights_once,
    trainer_state,
)
from .config import (
    ConfigError,
    LaunchOptions,
    TrainConfig,
    TrainingStopped,
    adopt_architecture,
    model_config,
    parse_args,
    warn,
)
from .data import Shard, check_local_files, load_text_splits, training_data
from .evaluation import evaluate, restart_log, sample, write_loss_curve
from .schedule import lr_at
from .step import backward, make_optimizer, optimizer_step
from .tokenizer import chat_template, run_tokenizer


@dataclass
class Preflight:
    """What the checks before the run found."""

    checkpoint: Path | None  # the checkpoint to resume from
    log_with: str  # the tracker, "none" when its package is missing
    plot_loss_curve: bool  # False when matplotlib is missing


def preflight(config: TrainConfig, options: LaunchOptions) -> Preflight:
    """Every check that needs neither data loading nor training, in about a second: one line per problem.

    Data files, the tokenizer folder and chat template, the output folder, the checkpoint to resume (not a finished
    run's; its recorded sizes and hashes), the packages of side outputs (skipped with a warning), then the model
    settings (the first import of torch), with the architecture of the `init_from` model.
    """
    from huggingface_hub.errors import StrictDataclassError  # what MinRNNConfig's validators raise

    try:
        check_local_files(config.dataset)
        chat_template(config.chat_template)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    if options.resume and options.overwrite_output_dir:
        raise ConfigError("--resume continues the run in output_dir and --overwrite_output_dir deletes it; give one")
    if options.resume:
        check_unfinished(config.output_dir)
    checkpoint = resumable_checkpoint(config.output_dir) if options.resume else None
    if not options.resume:
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
    if config.init_from:
        adopt_architecture(config)
    try:
        model_config(config, config.vocab_size or config.tokenizer_vocab_size)
    except (ValueError, StrictDataclassError) as error:
        # The validator's own message, without the dataclass machinery's line above it.
        raise ConfigError(str(error.__cause__ or error)) from None
    return Preflight(checkpoint, log_with, plot)


def _installed(*modules: str, skipped: str) -> bool:
    """Whether one of `modules` can be imported; if not, warn that the side output `skipped` is left out."""
    if any(importlib.util.find_spec(module) is not None for module in modules):
        return True
    warn(f"{skipped} skipped: {modules[0]} is not installed (pip install {modules[0]})")
    return False


def make_accelerator(config: TrainConfig, checked: Preflight):
    """The run's `Accelerator`, refusing (or naming) accelerate settings that would break or change the run."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import str_to_bool

    accelerator = Accelerator(
        # Without any accelerator, say so: accelerate then joins torchrun's processes over gloo
        # (`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine).
        cpu=not torch.accelerator.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=None if checked.log_with == "none" else checked.log_with,
        project_dir=config.output_dir,
    )
    if accelerator.gradient_accumulation_steps != config.gradient_accumulation_steps:
        # DeepSpeed configs with their own value override ours; the step counting here would then be wrong.
        raise ConfigError(
            f"gradient_accumulation_steps={config.gradient_accumulation_steps} but the accelerate config sets "
            f"{accelerator.gradient_accumulation_steps}; remove it from the accelerate config or make them equal"
        )
    mode = accelerator.distributed_type.value
    if config.backprop_chunk_size and mode == "DEEPSPEED":
        # accelerate's DeepSpeed backward also steps the optimizer on the syncing micro-step: once per chunk here.
        raise ConfigError(
            f"backprop_chunk_size={config.backprop_chunk_size} does not work with DeepSpeed, whose engine steps the "
            "optimizer inside every backward of the last micro-step (one per chunk); use DDP or FSDP"
        )
    for variable, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        # accelerate falls back to plain data parallelism without a word where it cannot apply them (e.g. on CPUs).
        if str_to_bool(os.environ.get(variable, "false")) and mode != kind:
            reason = "no GPU" if accelerator.device.type == "cpu" else "not applied"
            warn(f"the accelerate config asks for {kind}, but accelerate runs {mode} here ({reason}): "
                 "every process holds the whole model")
    return accelerator


class Trainer:
    """A training run in named steps (torchtitan's split): `__init__` sets it up (the accelerator, data and
    tokenizer, model and optimizer, the checkpoint to resume), `train_step` runs one optimizer step of
    `forward_backward` micro-steps, `evaluate` and `save` run when due, `finish` writes the final folder."""

    def __init__(self, config: TrainConfig, options: LaunchOptions, checked: Preflight):
        from accelerate.utils import set_seed
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bar()  # save_pretrained's own bars would break the training bar's line
        self.config, self.checked = config, checked
        self.accelerator = accelerator = make_accelerator(config, checked)
        self.main = accelerator.is_main_process
        self.output_dir, self.checkpoint = Path(config.output_dir), checked.checkpoint
        if self.checkpoint is not None:
            check_resumable(config, trainer_state(self.checkpoint), accelerator.num_processes, self.checkpoint)
        set_seed(config.seed)
        created = not self.output_dir.exists()
        if self.main:
            if options.overwrite_output_dir:
                remove_run(config.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for stale in checkpoint_dir(config.output_dir).glob(".tmp-*"):
                shutil.rmtree(stale)  # left by a crash mid-save
        try:
            self._load_data()
        except (ValueError, FileNotFoundError) as error:
            # Nothing of this run may stay behind (a trained tokenizer would make the folder refuse the next try).
            if self.main and self.checkpoint is None:
                remove_run(config.output_dir)
                if created and not any(self.output_dir.iterdir()):
                    self.output_dir.rmdir()
            raise ConfigError(str(error)) from error
        self._build_model()
        self.log_path = self.output_dir / "train_log.jsonl"
        self.start_step, self.tokens_seen, self.hashing = 0, 0, None
        if self.checkpoint is not None:
            load_checkpoint(accelerator, self.checkpoint, self.train_data, self.carried)
            saved = trainer_state(self.checkpoint)
            self.start_step, self.tokens_seen = saved["step"], saved["tokens_seen"]
            if self.main:
                restart_log(self.log_path, self.start_step)
        elif self.main and self.log_path.exists():
            self.log_path.unlink()
        if accelerator.trackers == [] and checked.log_with != "none":
            hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                       for key, value in dataclasses.asdict(config).items()}
            accelerator.init_trackers("tensorboard", config=hparams)
        self.step_tokens = (config.batch_size * config.block_size * accelerator.num_processes
                            * config.gradient_accumulation_steps)
        self._describe()

    def _load_data(self) -> None:
        """Data, tokenizer, batches: every check that can fail runs here, before the first step."""
        config, accelerator = self.config, self.accelerator
        self.shard = Shard(config.batch_size, config.gradient_accumulation_steps, accelerator.process_index,
                           accelerator.num_processes)
        with accelerator.main_process_first():
            self.splits = load_text_splits(
                config.dataset, dataset_config=config.dataset_config, text_column=config.text_column,
                streaming=config.streaming, val_fraction=config.val_fraction, val_documents=config.val_documents,
            )
        self.tokenizer = run_tokenizer(config, self.splits, accelerator, self.checkpoint)
        self.vocab_size = config.vocab_size or len(self.tokenizer)
        self.train_data, self.val_blocks, self.train_tokens = training_data(
            config, self.splits, self.tokenizer, self.vocab_size, self.shard)

    def _build_model(self) -> None:
        """A new model, or the `init_from` one (its weights); AdamW; both prepared; the carried state."""
        from transformers import GenerationConfig

        import modeling_minrnn  # noqa: F401  (registers "minrnn" with the Auto classes and for remote code)
        from modeling_minrnn import MinRNNForCausalLM

        from .carried_state import CarriedState

        config, accelerator, tokenizer = self.config, self.accelerator, self.tokenizer
        # With `init_from` the architecture is its model's (preflight copied it into `config`); run settings
        # (dropout, scan_backend, fused_linear_cross_entropy) are this run's.
        if config.init_from and not is_checkpoint(config.init_from):
            model = MinRNNForCausalLM.from_pretrained(
                config.init_from, dropout=config.dropout, scan_backend=config.scan_backend,
                fused_linear_cross_entropy=config.fused_linear_cross_entropy)
        else:
            model = MinRNNForCausalLM(model_config(config, self.vocab_size, tokenizer))
            if config.init_from:
                load_checkpoint_weights(model, Path(config.init_from))
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=config.sample_temperature,
            top_k=config.sample_top_k or None,
            max_new_tokens=config.sample_tokens or None,  # sample_tokens=0 turns eval samples off, not generation
        )
        self.num_params = model.num_parameters()
        optimizer = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay,
                                   betas=(config.beta1, config.beta2))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        save_tied_weights_once(accelerator)
        # This process's rows of every micro-step, each with its own carried state.
        self.carried = (CarriedState(config.batch_size * config.gradient_accumulation_steps, config.state_reset,
                                     tokenizer.eos_token_id) if config.carry_state else None)

    def _describe(self) -> None:
        config, world = self.config, self.accelerator.num_processes
        if not self.main:
            return
        data_note = f"{self.train_tokens:,} training tokens" if self.train_tokens is not None else "streamed"
        self.accelerator.print(
            f"dataset {self.splits.name} ({data_note}, {len(self.val_blocks) * world * config.block_size:,} "
            f"validation tokens), tokenizer {len(self.tokenizer)} tokens, model {config.cell_type} "
            f"{self.num_params:,} parameters" + (f" from {config.init_from}" if config.init_from else "")
            + f", {world} process(es), distributed mode {self.accelerator.distributed_type.value}, "
            f"{self.step_tokens:,} tokens per step"
            + (f", carried state over {self.train_data.num_streams} streams of {self.train_data.part:,} tokens "
               f"(reset: {config.state_reset})" if self.carried is not None else "")
            + (f", resuming at step {self.start_step} from {self.checkpoint}" if self.checkpoint is not None else "")
        )

    def forward_backward(self, step: int, micro: int):
        """Forward and backward of this process's rows of one micro-step; returns the (detached) mean loss."""
        import torch

        config, accelerator = self.config, self.accelerator
        batch = self.train_data.take(step, micro, self.shard)
        inputs = torch.from_numpy(batch.inputs).to(accelerator.device)
        if config.backprop_chunk_size:
            from .chunked_backward import chunked_backward

            return chunked_backward(accelerator, self.model, inputs, chunk_size=config.backprop_chunk_size).loss
        if self.carried is not None:
            rows = slice(micro * config.batch_size, (micro + 1) * config.batch_size)
            targets = torch.from_numpy(batch.targets).to(accelerator.device)
            loss = self.carried.forward(self.model, inputs, targets, rows, step, fresh=batch.fresh).loss
        else:
            loss = self.model(input_ids=inputs, labels=inputs, use_cache=False).loss
        return backward(accelerator, loss)

    def train_step(self, step: int) -> dict:
        """Optimizer step `step` (from 0): its learning rate, micro-steps, clipping; the log record of it."""
        config = self.config
        lr = lr_at(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                   max_steps=config.max_steps)
        result = optimizer_step(self.accelerator, self.model, self.optimizer,
                                functools.partial(self.forward_backward, step), lr=lr, grad_clip=config.grad_clip)
        if not math.isfinite(result.loss):
            raise TrainingStopped(f"training loss became {result.loss} at step {step + 1}; lower lr (now "
                                  f"{config.lr}) or grad_clip, or resume from an earlier checkpoint with other "
                                  "settings")
        self.tokens_seen += self.step_tokens
        record = {"step": step + 1, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                  "tokens_seen": self.tokens_seen}
        self.log(record)
        self.accelerator.log({"train/loss": result.loss, "train/lr": lr, "train/grad_norm": result.grad_norm},
                             step=step + 1)
        return record

    def evaluate(self, step: int) -> float:
        """Validation loss (and a sample) after `step` steps, logged and plotted."""
        from tqdm.auto import tqdm

        config = self.config
        eval_loss = evaluate(self.accelerator, self.model, self.val_blocks, config)
        text = sample(self.accelerator, self.model, self.tokenizer, config, step) if config.sample_tokens else ""
        self.accelerator.log({"eval/loss": eval_loss, "eval/perplexity": math.exp(eval_loss)}, step=step)
        self.log({"step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss)})
        if self.main:
            tqdm.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.2f}")
            if text:
                tqdm.write(f"--- sample ---\n{text}\n--------------")
        self.plot_loss_curve()
        return eval_loss

    def save(self, step: int) -> None:
        """Checkpoint `step` (and its model on the Hub, with `push_to_hub`)."""
        config = self.config
        state = {"step": step, "tokens_seen": self.tokens_seen, "world_size": self.accelerator.num_processes}
        self.wait_for_hashes()  # the previous checkpoint's, before the rotation may delete it
        path = save_checkpoint(self.accelerator, self.model, self.tokenizer, config, state, self.train_data,
                               self.carried)
        if config.checkpoint_hashes and self.main:
            self.hashing = hash_in_background(path)
        if config.push_to_hub:
            folder = path / "pretrained"  # the weights once more, only for the upload
            export_pretrained(self.accelerator, self.model, self.tokenizer, folder)
            if self.main:
                push(folder, config, revision=f"step-{step}")

    def finish(self, eval_loss: float) -> dict:
        """The final `save_pretrained` folder and `training_summary.json`; returns the summary."""
        config, accelerator = self.config, self.accelerator
        self.wait_for_hashes()
        model_files = export_pretrained(accelerator, self.model, self.tokenizer, self.output_dir)
        summary = {
            "dataset": self.splits.name, "tokens_seen": self.tokens_seen, "steps": config.max_steps,
            "final_eval_loss": eval_loss, "final_eval_perplexity": math.exp(eval_loss),
            "num_parameters": self.num_params, "config": dataclasses.asdict(config),
            "model_files": model_files,  # what --overwrite_output_dir deletes
        }
        self.plot_loss_curve()
        if self.main:
            (self.output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
            accelerator.print(f"wrote {self.output_dir}: final eval loss {eval_loss:.4f}, perplexity "
                              f"{math.exp(eval_loss):.2f}")
            if config.push_to_hub:
                push(self.output_dir, config, revision=None)
        accelerator.end_training()
        return summary

    def wait_for_hashes(self) -> None:
        if self.hashing is not None:
            self.hashing.join()
            self.hashing = None

    def log(self, record: dict) -> None:
        if self.main:
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def plot_loss_curve(self) -> None:
        # A side output: whatever goes wrong here (a broken plotting install, a full disk) is a warning, never the
        # end of the run.
        if self.main and self.checked.plot_loss_curve:
            try:
                write_loss_curve(self.log_path, self.output_dir / "loss_curve.png")
            except Exception as error:  # noqa: BLE001
                warn(f"loss_curve.png not written: {type(error).__name__}: {error}")


def train(config: TrainConfig, options: LaunchOptions, checked: Preflight) -> dict:
    """Run (or continue) a training run after `preflight`; returns the training summary."""
    from tqdm.auto import tqdm

    trainer = Trainer(config, options, checked)
    progress = tqdm(total=config.max_steps, initial=trainer.start_step, desc="training", unit="step",
                    disable=not trainer.accelerator.is_local_main_process, dynamic_ncols=True)
    throughput = Throughput()
    eval_loss, last_eval_step = None, None
    for step in range(trainer.start_step, config.max_steps):
        record = trainer.train_step(step)
        progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                             tok_per_s=f"{throughput.add(trainer.step_tokens):,.0f}")
        progress.update(1)
        done = step + 1
        if done % config.eval_every == 0 or done == config.max_steps:
            eval_loss, last_eval_step = trainer.evaluate(done), done
        if done % config.save_every == 0 or done == config.max_steps:
            trainer.save(done)
    progress.close()
    if last_eval_step != config.max_steps:  # resumed at the end: evaluate the final weights once more
        eval_loss = trainer.evaluate(config.max_steps)
    return trainer.finish(eval_loss)


class Throughput:
    """Tokens per second over a recent window (restarted every 10 s), so the rate shows slowdowns."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> float:
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / max(elapsed, 1e-9)
        if elapsed > 10:
            self.start, self.tokens = time.perf_counter(), 0
        return rate


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


def main(argv: list[str] | None = None, description: str | None = __doc__) -> None:
    """Settings, then every check that can fail early, then the run; a problem the user can fix is one line
    (`accelerate launch -q` also leaves out the launcher's own traceback after it)."""
    try:
        config, options = parse_args(sys.argv[1:] if argv is None else argv, description)
        train(config, options, preflight(config, options))
    except (ConfigError, TrainingStopped) as error:
        raise SystemExit(f"error: {error}") from None
