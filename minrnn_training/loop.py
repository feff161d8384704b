"""The training run: settings, checks before any work, then the loop from data to checkpoint.

Reading order: `main` (settings, `preflight`, `train`) -> `train`: the accelerator, data and tokenizer, model and
optimizer, resume, then the loop (learning rate, micro-steps, logging, evaluation, checkpoints) -> the final folder.
"""

from __future__ import annotations

import dataclasses
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
    checkpoint_dir,
    export_pretrained,
    load_checkpoint,
    remove_run,
    resumable_checkpoint,
    save_checkpoint,
    trainer_state,
)
from .config import ConfigError, LaunchOptions, TrainConfig, TrainingStopped, model_config, parse_args, warn
from .data import Shard, check_local_files, load_text_splits, training_data
from .evaluation import evaluate, restart_log, sample, write_loss_curve
from .schedule import decay_groups, lr_at, set_lr
from .tokenizer import chat_template, run_tokenizer


@dataclass
class Preflight:
    """What the checks before the run found."""

    checkpoint: Path | None  # the checkpoint to resume from
    log_with: str  # the tracker, "none" when its package is missing
    plot_loss_curve: bool  # False when matplotlib is missing


def preflight(config: TrainConfig, options: LaunchOptions) -> Preflight:
    """Every check that needs neither data loading nor training, in about a second: one line per problem.

    Data files, the tokenizer folder and chat template, the output folder, the checkpoint to resume (its recorded
    sizes and hashes), the packages of side outputs (skipped with a warning), then the model settings (the first
    import of torch).
    """
    from huggingface_hub.errors import StrictDataclassError  # what MinRNNConfig's validators raise

    try:
        check_local_files(config.dataset)
        chat_template(config.chat_template)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None
    if options.resume and options.overwrite_output_dir:
        raise ConfigError("--resume continues the run in output_dir and --overwrite_output_dir deletes it; give one")
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
    return accelerator


def train(config: TrainConfig, options: LaunchOptions, checked: Preflight) -> dict:
    """Run (or continue) a training run after `preflight`; returns the training summary."""
    import torch
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import GenerationConfig
    from transformers.utils.logging import disable_progress_bar

    import modeling_minrnn  # noqa: F401  (registers "minrnn" with the Auto classes and for remote code)
    from modeling_minrnn import MinRNNForCausalLM
    from modeling_minrnn.long_sequence import chunked_backward

    from .carried_state import CarriedState

    disable_progress_bar()  # save_pretrained's own bars would break the training bar's line
    accelerator = make_accelerator(config, checked)
    world, main, device = accelerator.num_processes, accelerator.is_main_process, accelerator.device
    output_dir, checkpoint = Path(config.output_dir), checked.checkpoint
    if checkpoint is not None:
        check_resumable(config, trainer_state(checkpoint), world, checkpoint)
    set_seed(config.seed)
    if main:
        if options.overwrite_output_dir:
            remove_run(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_dir(config.output_dir).glob(".tmp-*"):
            shutil.rmtree(stale)  # left by a crash mid-save

    # Data, tokenizer, model settings: every check that can fail runs here, before the first step.
    shard = Shard(config.batch_size, config.gradient_accumulation_steps, accelerator.process_index, world)
    try:
        with accelerator.main_process_first():
            splits = load_text_splits(
                config.dataset, dataset_config=config.dataset_config, text_column=config.text_column,
                streaming=config.streaming, val_fraction=config.val_fraction, val_documents=config.val_documents,
            )
        tokenizer = run_tokenizer(config, splits, accelerator, checkpoint)
        vocab_size = config.vocab_size or len(tokenizer)
        train_data, val_blocks, train_tokens = training_data(config, splits, tokenizer, vocab_size, shard)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error

    model = MinRNNForCausalLM(model_config(config, vocab_size, tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=config.sample_temperature, top_k=config.sample_top_k or None,
        max_new_tokens=config.sample_tokens or None,  # sample_tokens=0 turns eval samples off, not generation
    )
    num_params = model.num_parameters()
    optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(config.beta1, config.beta2))
    model, optimizer = accelerator.prepare(model, optimizer)

    def leave_out_tied_copies(models, weights, folder):
        # accelerate's safetensors save drops an alias of a tied weight itself, with a warning at every checkpoint;
        # leave the tied copies (the output head) out first, as save_pretrained does. Loading re-ties them.
        for wrapped, state in zip(models, weights, strict=True):
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
        load_checkpoint(accelerator, checkpoint, train_data, carried)
        saved = trainer_state(checkpoint)
        start_step, tokens_seen = saved["step"], saved["tokens_seen"]
        if main:
            restart_log(log_path, start_step)
    elif main and log_path.exists():
        log_path.unlink()
    if accelerator.trackers == [] and checked.log_with != "none":
        hparams = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                   for key, value in dataclasses.asdict(config).items()}
        accelerator.init_trackers("tensorboard", config=hparams)

    step_tokens = config.batch_size * config.block_size * world * config.gradient_accumulation_steps
    if main:
        data_note = f"{train_tokens:,} training tokens" if train_tokens is not None else "streamed"
        accelerator.print(
            f"dataset {splits.name} ({data_note}, {len(val_blocks) * world * config.block_size:,} validation tokens), "
            f"tokenizer {len(tokenizer)} tokens, model {config.cell_type} {num_params:,} parameters, "
            f"{world} process(es), distributed mode {accelerator.distributed_type.value}, {step_tokens:,} tokens "
            "per step"
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

    def micro_step_loss(step: int, micro: int):
        """Forward and backward of this process's rows of one micro-step; returns the (detached) loss."""
        batch = train_data.take(step, micro, shard)
        inputs = torch.from_numpy(batch.inputs).to(device)
        if carried is not None:
            rows = slice(micro * config.batch_size, (micro + 1) * config.batch_size)
            targets = torch.from_numpy(batch.targets).to(device)
            loss = carried.forward(model, inputs, targets, rows, step, fresh=batch.fresh).loss
        elif config.backprop_chunk_size:
            # Normalised as `accelerator.backward` scales the mean loss: over the step's micro-batches.
            predicted = inputs.shape[0] * (inputs.shape[1] - 1) * config.gradient_accumulation_steps
            return chunked_backward(model, inputs, chunk_size=config.backprop_chunk_size,
                                    num_items_in_batch=predicted).loss * config.gradient_accumulation_steps
        else:
            loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss
        accelerator.backward(loss)
        return loss.detach()

    model.train()
    eval_loss, last_eval_step = None, None
    progress = tqdm(total=config.max_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                    desc="training", unit="step", dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, config.max_steps):
        lr = lr_at(step, lr=config.lr, min_lr=config.min_lr, warmup_steps=config.warmup_steps,
                   max_steps=config.max_steps)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                loss_sum += micro_step_loss(step, micro)
                grad_norm = (accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                             if accelerator.sync_gradients else None)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        # One collective per step: the mean loss over every process.
        train_loss = float(accelerator.reduce(loss_sum, reduction="mean")) / config.gradient_accumulation_steps
        if not math.isfinite(train_loss):
            raise TrainingStopped(f"training loss became {train_loss} at step {step + 1}; lower lr (now {config.lr}) "
                                  "or grad_clip, or resume from an earlier checkpoint with other settings")
        tokens_seen += step_tokens
        done = step + 1
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        log_line({"step": done, "loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": tokens_seen})
        accelerator.log({"train/loss": train_loss, "train/lr": lr, "train/grad_norm": grad_norm}, step=done)

        window_tokens += step_tokens
        elapsed = time.perf_counter() - window_start
        progress.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}",
                             tok_per_s=f"{window_tokens / max(elapsed, 1e-9):,.0f}")
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
        "dataset": splits.name, "tokens_seen": tokens_seen, "steps": config.max_steps, "final_eval_loss": eval_loss,
        "final_eval_perplexity": math.exp(eval_loss), "num_parameters": num_params,
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


def main(argv: list[str] | None = None, description: str | None = __doc__) -> None:
    """Settings, then every check that can fail early, then the run; a problem the user can fix is one line
    (`accelerate launch -q` also leaves out the launcher's own traceback after it)."""
    try:
        config, options = parse_args(sys.argv[1:] if argv is None else argv, description)
        train(config, options, preflight(config, options))
    except (ConfigError, TrainingStopped) as error:
        raise SystemExit(f"error: {error}") from None
