"""Character-level Shakespeare: minGRU and minLSTM against a GPT-2 Transformer (and Mamba), side by side.

    python scripts/shakespeare_compare.py --config configs/experiments/shakespeare_cpu.yaml
    python scripts/shakespeare_compare.py --config configs/experiments/shakespeare_nanogpt.yaml   # GPU
    python scripts/shakespeare_compare.py --config ... --data path/to/tinyshakespeare.txt --models mingru,gpt2

The data and split are nanoGPT's `shakespeare_char`: every distinct character is a token, the first 90% of the
characters train and the last 10% test. All models see the same batches in the same order (random windows of
`context` characters, drawn from one seed) under the same schedule (AdamW, linear warmup, cosine decay from `lr`
to `min_lr`).

Baselines come from transformers: `GPT2LMHeadModel` (sdpa attention) at `hidden_size` x `num_hidden_layers`, and
`MambaForCausalLM` with as many layers as match its parameters. The minRNNs use the paper's language-model
block (norm -> causal conv -> minRNN -> residual; norm -> MLP -> residual); unless `intermediate_size` is given,
their MLP width is solved so that each has the Transformer's parameter count.

Two budgets, one after the other in the same run:
- `steps`: every model trains `max_steps` steps (the paper's comparison);
- `time`: every model trains for the same wall-clock, `time_budget_s` (default: what the Transformer took for
  `max_steps` in the steps budget); the schedule runs over that time instead of over steps.

Reported per model: test loss on the whole test split (non-overlapping `context`-character windows), parameters,
training tokens, training wall-clock and tokens/s. Writes `results.md`, `history.json`, `curves_steps.png` and
`curves_time.png` to `output_dir`.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

from experiment_common import (
    REPO_ROOT,
    device_name,
    markdown_table,
    parse_settings,
    plot_curves,
    setup_torch,
    write_results,
)
from pretrain import lr_at

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL_KINDS = ("mingru", "minlstm", "gpt2", "mamba")
BUDGETS = ("steps", "time")
# Test loss reported in the paper (Shakespeare, character level); the paper gives minLSTM and the Transformer
# only as "about 1.55" in its figure.
PAPER_TEST_LOSS = {"mingru": "1.548", "minlstm": "~1.55", "gpt2": "~1.55", "mamba": "1.575"}


@dataclass
class Settings:
    """Every setting of the comparison; YAML (`--config`) and `--key value` options override these."""

    data: str | None = None  # None: ../shared/data/tinyshakespeare.txt beside the repository
    models: list[str] = field(default_factory=lambda: ["mingru", "minlstm", "gpt2"])
    budgets: list[str] = field(default_factory=lambda: list(BUDGETS))
    # Shared shape (nanoGPT shakespeare_char).
    hidden_size: int = 384
    num_hidden_layers: int = 6
    context: int = 256
    dropout: float = 0.2
    # minRNN block; intermediate_size None = solved to match the Transformer's parameter count.
    expansion_factor: float = 2.0
    conv_kernel: int = 4
    intermediate_size: int | None = None
    scan_backend: str = "auto"
    # Transformer heads.
    num_heads: int = 6
    # Optimisation (nanoGPT shakespeare_char).
    batch_size: int = 64
    max_steps: int = 5000
    warmup_steps: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 1337
    time_budget_s: float | None = None  # None: the Transformer's wall-clock for max_steps (steps budget)
    # Evaluation: a fixed sample of test windows during training; the whole test split at the end.
    eval_every: int = 250
    eval_batches: int = 20
    # Machine and output.
    device: str = "auto"
    num_threads: int = 0  # 0 = torch's default
    output_dir: str = "results/shakespeare"

    def validate(self):
        for name in ("hidden_size", "num_hidden_layers", "context", "batch_size", "max_steps", "eval_every",
                     "eval_batches", "num_heads"):
            if getattr(self, name) <= 0:
                raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(self, name)}.")
        for name, values, valid in (("models", self.models, MODEL_KINDS), ("budgets", self.budgets, BUDGETS)):
            bad = [v for v in values if v not in valid]
            if bad or not values:
                raise SystemExit(f"--{name} {','.join(values)}: each must be one of {', '.join(valid)}.")
        if self.hidden_size % self.num_heads:
            raise SystemExit(f"--hidden-size {self.hidden_size} must be divisible by --num-heads {self.num_heads}.")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise SystemExit(f"--warmup-steps {self.warmup_steps} must be in [0, --max-steps {self.max_steps}).")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise SystemExit(f"--time-budget-s must be > 0 seconds (or none); got {self.time_budget_s}.")
        if "time" in self.budgets and self.time_budget_s is None and "steps" not in self.budgets:
            raise SystemExit("--budgets time alone needs --time-budget-s (the default is measured by the steps run).")


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class CharData:
    """nanoGPT's character-level split: `train` and `test` are int64 token tensors, `chars` the vocabulary."""

    train: "torch.Tensor"  # noqa: F821
    test: "torch.Tensor"  # noqa: F821
    chars: list[str]


def load_chars(path: Path) -> CharData:
    import torch

    if not path.is_file():
        raise SystemExit(f"--data {path}: no such file (tinyshakespeare.txt, 1,115,394 characters).")
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {ch: i for i, ch in enumerate(chars)}
    tokens = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    cut = int(0.9 * len(tokens))
    return CharData(train=tokens[:cut], test=tokens[cut:], chars=chars)


def random_windows(tokens, batch_size: int, context: int, generator):
    """`(inputs, targets)` `(batch, context)`: windows at uniform random offsets, targets shifted by one."""
    import torch

    offsets = torch.randint(len(tokens) - context, (batch_size,), generator=generator)
    rows = offsets.unsqueeze(1) + torch.arange(context + 1)
    windows = tokens[rows]
    return windows[:, :-1], windows[:, 1:]


def test_windows(tokens, context: int):
    """The whole split as non-overlapping `(inputs, targets)` windows `(n, context)`."""
    count = (len(tokens) - 1) // context
    inputs = tokens[: count * context].view(count, context)
    targets = tokens[1 : count * context + 1].view(count, context)
    return inputs, targets


# -------------------------------------------------------------------------------------------------------- models


def build_model(kind: str, settings: Settings, vocab_size: int, intermediate_size: int | None = None,
                mamba_layers: int | None = None):
    """One of `MODEL_KINDS` at the settings' shape; all tie the input embedding and the output head."""
    if kind in ("mingru", "minlstm"):
        from modeling_minrnn import MinRNNConfig, MinRNNForCausalLM

        return MinRNNForCausalLM(MinRNNConfig(
            vocab_size=vocab_size, hidden_size=settings.hidden_size, num_hidden_layers=settings.num_hidden_layers,
            cell_type=kind, expansion_factor=float(settings.expansion_factor), conv_kernel=settings.conv_kernel,
            intermediate_size=intermediate_size, dropout=settings.dropout, scan_backend=settings.scan_backend,
            tie_word_embeddings=True, use_cache=False,
        ))
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_positions=settings.context, n_embd=settings.hidden_size,
            n_layer=settings.num_hidden_layers, n_head=settings.num_heads, resid_pdrop=settings.dropout,
            embd_pdrop=settings.dropout, attn_pdrop=settings.dropout, tie_word_embeddings=True, use_cache=False,
            bos_token_id=None, eos_token_id=None, attn_implementation="sdpa",
        ))
    from transformers import MambaConfig, MambaForCausalLM

    # transformers' Mamba has no dropout.
    return MambaForCausalLM(MambaConfig(
        vocab_size=vocab_size, hidden_size=settings.hidden_size, num_hidden_layers=mamba_layers,
        tie_word_embeddings=True, use_cache=False,
    ))


def matched_shapes(settings: Settings, vocab_size: int) -> dict:
    """Per model kind, the keyword arguments of `build_model` that give the Transformer's parameter count.

    Parameters are linear in the minRNN's MLP width and in Mamba's depth, so two probes give the exact solution.
    """
    target = build_model("gpt2", settings, vocab_size).num_parameters()
    shapes = {"gpt2": {}}
    for kind in settings.models:
        if kind in ("mingru", "minlstm"):
            if settings.intermediate_size is not None:
                shapes[kind] = {"intermediate_size": settings.intermediate_size}
                continue
            p0, p1 = (build_model(kind, settings, vocab_size, intermediate_size=w).num_parameters() for w in (0, 64))
            # A multiple of 32 keeps the matrices friendly to fast kernels; the count stays within about 1%.
            width = 32 * round((target - p0) / ((p1 - p0) / 64) / 32)
            if width < 0:
                raise SystemExit(
                    f"{kind}: without an MLP it already has {p0:,} parameters, more than the Transformer's {target:,};"
                    f" lower --expansion-factor or give --intermediate-size."
                )
            shapes[kind] = {"intermediate_size": width}
        elif kind == "mamba":
            p1, p2 = (build_model(kind, settings, vocab_size, mamba_layers=n).num_parameters() for n in (1, 2))
            shapes[kind] = {"mamba_layers": max(1, round((target - (p1 - (p2 - p1))) / (p2 - p1)))}
    return shapes


def make_optimizer(model, settings: Settings):
    """AdamW as nanoGPT: weight decay on matrices and embeddings, none on biases and norms."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, settings.beta2))


# ------------------------------------------------------------------------------------------------------ training


def mean_loss(model, inputs, targets, batch_size: int, device) -> float:
    """Mean next-character cross-entropy over all positions of `inputs`/`targets` `(n, context)`."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x, y = inputs[start : start + batch_size].to(device), targets[start : start + batch_size].to(device)
            logits = model(input_ids=x).logits.float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
    model.train()
    return total / targets.numel()


def train_one(kind: str, shape: dict, settings: Settings, data: CharData, device, budget: str,
              time_budget_s: float | None) -> dict:
    """Train one model under one budget; returns its summary and its curve (one point per evaluation)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(settings.seed)
    model = build_model(kind, settings, len(data.chars), **shape).to(device).train()
    optimizer = make_optimizer(model, settings)
    generator = torch.Generator().manual_seed(settings.seed)
    eval_generator = torch.Generator().manual_seed(settings.seed + 1)
    eval_set = [random_windows(data.test, settings.batch_size, settings.context, eval_generator)
                for _ in range(settings.eval_batches)]
    eval_inputs, eval_targets = (torch.cat(parts) for parts in zip(*eval_set))

    def progress(step: int, elapsed: float) -> float:
        return step / settings.max_steps if budget == "steps" else elapsed / time_budget_s

    history, step, train_time, loss_sum = [], 0, 0.0, 0.0
    while progress(step, train_time) < 1.0:
        # The schedule is a function of the budget's progress: steps, or seconds of training.
        lr = lr_at(progress(step, train_time) * settings.max_steps, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = random_windows(data.train, settings.batch_size, settings.context, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        logits = model(input_ids=inputs.to(device)).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.to(device).reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        loss_sum += loss.item()  # .item() also waits for the GPU
        train_time += time.perf_counter() - started
        step += 1

        if step % settings.eval_every == 0 or progress(step, train_time) >= 1.0:
            point = {
                "step": step, "train_time_s": round(train_time, 2),
                "train_loss": loss_sum / (step - (history[-1]["step"] if history else 0)),
                "test_loss": mean_loss(model, eval_inputs, eval_targets, settings.batch_size, device),
            }
            history.append(point)
            loss_sum = 0.0
            print(f"[{budget}] {kind:>8} step {step:>6}  {train_time:8.1f}s  lr {lr:.2e}  "
                  f"train {point['train_loss']:.4f}  test (sample) {point['test_loss']:.4f}", flush=True)

    tokens = step * settings.batch_size * settings.context
    return {
        "name": kind, "budget": budget, "params": model.num_parameters(), "steps": step, "tokens": tokens,
        "train_time_s": train_time, "tokens_per_s": tokens / train_time,
        "test_loss": mean_loss(model, *test_windows(data.test, settings.context), settings.batch_size, device),
        "history": history, "shape": shape,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    settings = parse_settings(Settings, argv, __doc__)
    device = setup_torch(settings.num_threads, settings.device)
    data = load_chars(Path(settings.data) if settings.data else DEFAULT_DATA)
    shapes = matched_shapes(settings, len(data.chars))

    runs, time_budget_s = [], settings.time_budget_s
    for budget in settings.budgets:
        if budget == "time" and time_budget_s is None:
            reference = next((r for r in runs if r["name"] == "gpt2"), runs[0])
            time_budget_s = reference["train_time_s"]
        runs += [train_one(kind, shapes[kind], settings, data, device, budget, time_budget_s)
                 for kind in settings.models]

    describe = {"steps": f"{settings.max_steps} steps",
                "time": f"{time_budget_s:.0f} s" if time_budget_s is not None else "-"}
    rows = [[
        f"{run['budget']} ({describe[run['budget']]})", run["name"],
        ", ".join(f"{k}={v}" for k, v in run["shape"].items()) or "-", f"{run['params']:,}", run["steps"],
        f"{run['tokens']:,}", f"{run['train_time_s']:.0f}", f"{run['tokens_per_s']:,.0f}", f"{run['test_loss']:.4f}",
        PAPER_TEST_LOSS[run["name"]],
    ] for run in runs]
    table = markdown_table(
        ["budget", "model", "matched by", "params", "steps", "train tokens", "train wall-clock (s)", "tokens/s",
         "test loss", "paper test loss (6x384, 5000 steps)"], rows,
    )
    header = (
        f"Shakespeare char-level: {settings.num_hidden_layers} layers x {settings.hidden_size}, context "
        f"{settings.context}, batch {settings.batch_size}, dropout {settings.dropout}, lr {settings.lr:g} -> "
        f"{settings.min_lr:g} cosine ({settings.warmup_steps} warmup steps); test loss = mean cross-entropy (nats "
        f"per character) over the whole test split; {device_name(device)}."
    )
    output_dir = Path(settings.output_dir)
    output_dir = output_dir if output_dir.is_absolute() else REPO_ROOT / output_dir
    histories = {f"{run['name']} ({run['budget']})": run["history"] for run in runs}
    write_results(output_dir, table, header, histories, settings)
    for budget in settings.budgets:
        plot_curves({run["name"]: run["history"] for run in runs if run["budget"] == budget}, "test_loss",
                    "test loss (sampled windows)", f"{header}\nbudget: {describe[budget]}",
                    output_dir / f"curves_{budget}.png")
    return runs


if __name__ == "__main__":
    main()
