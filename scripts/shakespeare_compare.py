"""Language-model quality: minGRU and minLSTM against Transformers (Llama, GPT-2), the community minGRU and Mamba.

    python scripts/shakespeare_compare.py --config configs/experiments/shakespeare_cpu.yaml       # char level
    python scripts/shakespeare_compare.py --config configs/experiments/shakespeare_cpu_long.yaml  # 10 min/model
    python scripts/shakespeare_compare.py --config configs/experiments/embedded_bpe_cpu.yaml      # subword
    python scripts/shakespeare_compare.py --config configs/experiments/shakespeare_nanogpt.yaml   # GPU
    python scripts/shakespeare_compare.py --config ... --data path/to/tinyshakespeare.txt --models mingru,llama

Corpora: a text file at character level (default: nanoGPT's `shakespeare_char` data, tinyshakespeare.txt), or
`--data embedded` (Python's documentation topics, `pydoc_data.topics`) with `--tokenizer bpe`, a byte-level BPE
trained on the training split. The last 10% of the text is the test split (nanoGPT's); the last `val_fraction` of
the rest is the validation split that picks learning rates. All models see the same batches in the same order
(random windows of `context` tokens, drawn from one seed) under the same schedule shape (AdamW, linear warmup,
cosine decay from the learning rate to `min_lr`).

Models, all at the parameter count of the GPT-2 model of `hidden_size` x `num_hidden_layers` (MLP widths, or
Mamba's depth, solved to match): `llama` (transformers' `LlamaForCausalLM`: RoPE, RMSNorm, SwiGLU, no biases),
`gpt2` (`GPT2LMHeadModel`, learned positions), `mingru`/`minlstm` (this package, the paper's LM block: norm ->
causal conv -> minRNN -> residual; norm -> MLP -> residual), `community-mingru` (the `minLM` of the
`minGRU-pytorch` package, `pip install minrnn[compare]`; skipped with a message when absent) and `mamba`.

Budgets, one after the other in the same run:
- `grid`: every model at every learning rate of `lr_grid` for `grid_time_s` seconds of training; each model's
  best rate (lowest validation loss) is the rate of its later budgets. Its best runs are the short
  equal-time result. Without it every model trains at `lr`.
- `steps`: every model trains `max_steps` steps (the paper's comparison);
- `time`: every model trains for the same time, `time_budget_s` (default: what the Transformer took for
  `max_steps` in the steps budget); the schedule runs over that time instead of over steps.
With `dropout_grid`, each `steps`/`time` budget first trains every model at every dropout of the grid (at its best
rate, seed `seed`) and keeps the one with the lowest validation loss: dropout matters once a model overfits, so it
is tuned at the budget it is used for, after the rate. With `seeds`, the budget's result is every model at its
(rate, dropout) under each seed (weights and batch order), reported per seed and as mean and min-max.
Time on CPU is the training process's CPU time (`time.process_time`, one torch thread per run with
`num_threads: 1`), so runs sharing a machine, or running `jobs` at a time, get the same compute; on GPU it is
wall-clock. Evaluations are not counted.

Reported per run: validation and test loss on the whole split (non-overlapping `context`-token windows, nats per
token), parameters, training tokens, training time and tokens/s. Each finished run is written at once to
`output_dir/runs/` and reused by a rerun with the same settings, so an interrupted run resumes; then
`results.md`, `history.json` and `curves_<budget>.png`.
"""

import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

from experiment_common import REPO_ROOT, device_name, markdown_table, plot_curves, setup_torch, write_results

from minrnn_training.config import parse_settings
from minrnn_training.schedule import lr_at
from minrnn_training.step import backward, make_optimizer, one_process_accelerator, optimizer_step

# Where `python scripts/download_tinyshakespeare.py` puts the corpus.
DEFAULT_DATA = REPO_ROOT / "data" / "tinyshakespeare.txt"
MODEL_KINDS = ("mingru", "minlstm", "llama", "gpt2", "community-mingru", "mamba")
BUDGETS = ("grid", "steps", "time")
TOKENIZERS = ("char", "bpe")
# Test loss reported in the paper (Shakespeare, character level); the paper gives minLSTM and the Transformer
# only as "about 1.55" in its figure.
PAPER_TEST_LOSS = {"mingru": "1.548", "minlstm": "~1.55", "gpt2": "~1.55", "llama": "~1.55", "mamba": "1.575"}
MISSING_COMMUNITY = ("community-mingru: skipped, the minGRU-pytorch package is not installed "
                     "(pip install 'minrnn[compare]', or pip install minGRU-pytorch).")


@dataclass
class Settings:
    """Every setting of the comparison; YAML (`--config`) and `--key value` options override these."""

    data: str | None = None  # None: data/tinyshakespeare.txt (scripts/download_tinyshakespeare.py); "embedded": pydoc
    tokenizer: str = "char"  # char: one token per character; bpe: byte-level BPE trained on the training split
    bpe_vocab_size: int = 1024
    val_fraction: float = 0.1  # of the text before the test split (the last 10%)
    models: list[str] = field(default_factory=lambda: ["mingru", "minlstm", "llama", "gpt2"])
    budgets: list[str] = field(default_factory=lambda: ["steps", "time"])
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
    lr_grid: list[float] = field(default_factory=list)  # the `grid` budget's learning rates
    grid_time_s: float = 60.0
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 1337
    # Dropout tuned per model after the rate, at each steps/time budget (empty: `dropout` alone), and the seeds of
    # those budgets' final runs (empty: `seed` alone). Grids run at `dropout` and `seed`.
    dropout_grid: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    time_budget_s: float | None = None  # None: the Transformer's time for max_steps (steps budget)
    # Evaluation: a fixed sample of validation windows during training; the whole splits at the end.
    eval_every: int = 250
    eval_batches: int = 20
    # Machine and output.
    device: str = "auto"
    num_threads: int = 0  # 0 = torch's default
    jobs: int = 1  # runs trained at the same time, each in its own process (use with num_threads: 1)
    output_dir: str = "results/shakespeare"

    def validate(self):
        for name in ("hidden_size", "num_hidden_layers", "context", "batch_size", "max_steps", "eval_every",
                     "eval_batches", "num_heads", "jobs", "bpe_vocab_size"):
            if getattr(self, name) <= 0:
                raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer; got {getattr(self, name)}.")
        for name, values, valid in (("models", self.models, MODEL_KINDS), ("budgets", self.budgets, BUDGETS)):
            bad = [v for v in values if v not in valid]
            if bad or not values:
                raise SystemExit(f"--{name} {','.join(values)}: each must be one of {', '.join(valid)}.")
        if self.tokenizer not in TOKENIZERS:
            raise SystemExit(f"--tokenizer {self.tokenizer}: must be one of {', '.join(TOKENIZERS)}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise SystemExit(f"--val-fraction {self.val_fraction} must be strictly between 0 and 1.")
        if self.hidden_size % self.num_heads:
            raise SystemExit(f"--hidden-size {self.hidden_size} must be divisible by --num-heads {self.num_heads}.")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise SystemExit(f"--warmup-steps {self.warmup_steps} must be in [0, --max-steps {self.max_steps}).")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise SystemExit(f"--time-budget-s must be > 0 seconds (or none); got {self.time_budget_s}.")
        if "time" in self.budgets and self.time_budget_s is None and "steps" not in self.budgets:
            raise SystemExit("--budgets time alone needs --time-budget-s (the default is measured by the steps run).")
        if ("grid" in self.budgets) != bool(self.lr_grid):
            raise SystemExit(
                f"--budgets grid and --lr-grid go together; got budgets {','.join(self.budgets)} and "
                f"lr_grid {self.lr_grid or 'empty'}: give both (e.g. --lr-grid 1e-3,2e-3,4e-3) or neither."
            )
        if any(not 0.0 <= p < 1.0 for p in [self.dropout, *self.dropout_grid]):
            raise SystemExit(f"--dropout {self.dropout} and every --dropout-grid value {self.dropout_grid} must be "
                             "in [0, 1).")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.dropout_grid)) != len(self.dropout_grid):
            raise SystemExit(f"--seeds {self.seeds} and --dropout-grid {self.dropout_grid} must not repeat a value.")
        if "grid" in self.budgets and (self.grid_time_s <= 0 or min(self.lr_grid) <= 0):
            raise SystemExit(f"--grid-time-s {self.grid_time_s} and every --lr-grid value {self.lr_grid} must be > 0.")


# ---------------------------------------------------------------------------------------------------------- data


@dataclass
class TokenData:
    """The corpus as int64 token tensors: `train`, `validation` (picks learning rates) and `test` (reported)."""

    train: "torch.Tensor"  # noqa: F821
    validation: "torch.Tensor"  # noqa: F821
    test: "torch.Tensor"  # noqa: F821
    vocab_size: int
    description: str


def load_chars(path: Path, val_fraction: float = 0.1) -> TokenData:
    """nanoGPT's character-level data: every distinct character a token; the last 10% test, then validation."""
    import torch

    if not path.is_file():
        raise SystemExit(f"--data {path}: no such file; `python scripts/download_tinyshakespeare.py` fetches "
                         "tinyshakespeare (1,115,394 characters) to data/tinyshakespeare.txt.")
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {ch: i for i, ch in enumerate(chars)}
    tokens = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    test_cut = int(0.9 * len(tokens))
    val_cut = int((1.0 - val_fraction) * test_cut)
    return TokenData(train=tokens[:val_cut], validation=tokens[val_cut:test_cut], test=tokens[test_cut:],
                     vocab_size=len(chars), description=f"{path.name}, {len(chars)} characters (char level)")


def load_bpe(documents: list[str], name: str, vocab_size: int, val_fraction: float) -> TokenData:
    """Byte-level BPE data: the tokenizer is trained on the training split only; EOS after every document."""
    import torch

    from minrnn_training.data import split_by_characters, tokenize_documents
    from minrnn_training.tokenizer import train_bpe_tokenizer

    rest, test = split_by_characters(documents, 0.1)
    train, validation = split_by_characters(rest, val_fraction)
    tokenizer = train_bpe_tokenizer(train, vocab_size)
    splits = [torch.from_numpy(tokenize_documents(part, tokenizer, tokenizer.eos_token_id))
              for part in (train, validation, test)]
    chars = sum(len(doc) for doc in documents)
    tokens = sum(len(part) for part in splits)
    return TokenData(*splits, vocab_size=len(tokenizer),
                     description=f"{name}, byte-level BPE of {len(tokenizer)} tokens "
                                 f"({chars / tokens:.2f} characters per token)")


def load_data(settings: Settings) -> TokenData:
    if settings.data == "embedded":
        from minrnn_training.data import DEFAULT_CORPUS, default_corpus

        documents, name = default_corpus(), DEFAULT_CORPUS
    else:
        path = Path(settings.data) if settings.data else DEFAULT_DATA
        if settings.tokenizer == "char":
            return load_chars(path, settings.val_fraction)
        if not path.is_file():
            raise SystemExit(f"--data {path}: no such file.")
        documents, name = [path.read_text(encoding="utf-8")], path.name
    if settings.tokenizer == "char":
        raise SystemExit("--data embedded needs --tokenizer bpe (the character level is for text files).")
    return load_bpe(documents, name, settings.bpe_vocab_size, settings.val_fraction)


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


def community_available() -> bool:
    try:
        import minGRU_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build_community_mingru(settings: Settings, vocab_size: int, ff_width: int):
    """The `minGRU-pytorch` package's `minLM` (conv on, as the paper's block) with this comparison's interface:
    `model(input_ids=...)` returns an output with `.logits` `(batch, seq, vocab)`, and `num_parameters()`."""
    import torch
    from minGRU_pytorch.minLM import minLM
    from transformers.modeling_outputs import CausalLMOutput

    class CommunityMinGRU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = minLM(
                num_tokens=vocab_size, dim=settings.hidden_size, depth=settings.num_hidden_layers,
                # minLM sizes its MLP as int(dim * ff_mult); the half keeps the rounding off `ff_width`.
                ff_mult=(ff_width + 0.5) / settings.hidden_size, expansion=settings.expansion_factor,
                conv_kernel_size=settings.conv_kernel, enable_conv=True, dropout=settings.dropout,
            )

        def forward(self, input_ids):
            return CausalLMOutput(logits=self.lm(input_ids))

        def num_parameters(self) -> int:
            return sum(p.numel() for p in self.parameters())

    return CommunityMinGRU()


def build_model(kind: str, settings: Settings, vocab_size: int, intermediate_size: int | None = None,
                mamba_layers: int | None = None):
    """One of `MODEL_KINDS` at the settings' shape; all but `community-mingru` tie the embedding and the head."""
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
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        # Llama has dropout only on the attention weights.
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=settings.hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=settings.num_hidden_layers, num_attention_heads=settings.num_heads,
            num_key_value_heads=settings.num_heads, max_position_embeddings=settings.context,
            attention_dropout=settings.dropout, attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
            use_cache=False, bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
        ))
    if kind == "community-mingru":
        return build_community_mingru(settings, vocab_size, intermediate_size)
    from transformers import MambaConfig, MambaForCausalLM

    # transformers' Mamba has no dropout.
    return MambaForCausalLM(MambaConfig(
        vocab_size=vocab_size, hidden_size=settings.hidden_size, num_hidden_layers=mamba_layers,
        tie_word_embeddings=True, use_cache=False,
    ))


def matched_shapes(settings: Settings, vocab_size: int) -> dict:
    """Per model kind, the keyword arguments of `build_model` that give the GPT-2 model's parameter count.

    Parameters are linear in the MLP width and in Mamba's depth, so two probes give the exact solution.
    """
    target = build_model("gpt2", settings, vocab_size).num_parameters()
    shapes = {"gpt2": {}}
    for kind in settings.models:
        if kind in ("mingru", "minlstm", "llama", "community-mingru"):
            if settings.intermediate_size is not None and kind in ("mingru", "minlstm"):
                shapes[kind] = {"intermediate_size": settings.intermediate_size}
                continue
            p0, p1 = (build_model(kind, settings, vocab_size, intermediate_size=w).num_parameters() for w in (0, 64))
            # A multiple of 32 keeps the matrices friendly to fast kernels; the count stays within about 1%.
            width = 32 * round((target - p0) / ((p1 - p0) / 64) / 32)
            if width <= 0:
                raise SystemExit(
                    f"{kind}: without an MLP it already has {p0:,} parameters, about the Transformer's {target:,};"
                    f" lower --expansion-factor or give --intermediate-size."
                )
            shapes[kind] = {"intermediate_size": width}
        elif kind == "mamba":
            p1, p2 = (build_model(kind, settings, vocab_size, mamba_layers=n).num_parameters() for n in (1, 2))
            shapes[kind] = {"mamba_layers": max(1, round((target - (p1 - (p2 - p1))) / (p2 - p1)))}
    return shapes


# ------------------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class Run:
    """One training: a model kind under one budget (`steps`, or seconds of training time) at one learning rate,
    and at a dropout and seed other than the settings' where given."""

    kind: str
    budget: str
    lr: float
    time_budget_s: float | None = None  # None: `max_steps` steps
    dropout: float | None = None  # None: the settings' `dropout`
    seed: int | None = None  # None: the settings' `seed`

    @property
    def file_name(self) -> str:
        # Only what differs from the settings is in the name, so runs saved before dropout and seeds were
        # varied keep their names and are reused.
        dropout = "" if self.dropout is None else f"-dropout{self.dropout:g}"
        seed = "" if self.seed is None else f"-seed{self.seed}"
        return f"{self.budget}-{self.kind}-lr{self.lr:g}{dropout}{seed}.json"


def make_run(kind: str, budget: str, lr: float, time_budget_s: float | None, settings: "Settings",
             dropout: float | None = None, seed: int | None = None) -> Run:
    """A `Run`, with `dropout`/`seed` left at None where they equal the settings' (one name per distinct run)."""
    return Run(kind, budget, lr, time_budget_s, None if dropout in (None, settings.dropout) else dropout,
               None if seed in (None, settings.seed) else seed)


def run_settings(settings: "Settings", run: Run) -> "Settings":
    """The settings one run trains under: the run's own dropout and seed in place of the settings'."""
    return replace(settings, dropout=settings.dropout if run.dropout is None else run.dropout,
                   seed=settings.seed if run.seed is None else run.seed)


def mean_loss(model, inputs, targets, batch_size: int, device) -> float:
    """Mean next-token cross-entropy over all positions of `inputs`/`targets` `(n, context)`."""
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


def train_one(run: Run, shape: dict, settings: Settings, data: TokenData) -> dict:
    """Train one model under one budget; returns its summary and its curve (one point per evaluation)."""
    import torch
    import torch.nn.functional as F

    settings = run_settings(settings, run)
    device = setup_torch(settings.num_threads, settings.device)
    # CPU time of this process: runs sharing the machine get the same compute however busy it is.
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    torch.manual_seed(settings.seed)
    accelerator = one_process_accelerator(device)
    model = build_model(run.kind, settings, data.vocab_size, **shape).to(device).train()
    model, optimizer = accelerator.prepare(
        model, make_optimizer(model, lr=run.lr, weight_decay=settings.weight_decay, betas=(0.9, settings.beta2)))
    # The same schedule shape at every rate: warmup to `run.lr`, cosine to `min_lr` scaled as `run.lr / lr`.
    schedule = {"lr": run.lr, "min_lr": settings.min_lr * run.lr / settings.lr,
                "warmup_steps": settings.warmup_steps, "max_steps": settings.max_steps}
    generator = torch.Generator().manual_seed(settings.seed)
    eval_generator = torch.Generator().manual_seed(settings.seed + 1)
    eval_set = [random_windows(data.validation, settings.batch_size, settings.context, eval_generator)
                for _ in range(settings.eval_batches)]
    eval_inputs, eval_targets = (torch.cat(parts) for parts in zip(*eval_set))

    def progress(step: int, elapsed: float) -> float:
        return step / settings.max_steps if run.time_budget_s is None else elapsed / run.time_budget_s

    history, step, train_time, loss_sum = [], 0, 0.0, 0.0
    while progress(step, train_time) < 1.0:
        # The schedule is a function of the budget's progress: steps, or seconds of training.
        lr = lr_at(progress(step, train_time) * settings.max_steps, **schedule)
        inputs, targets = random_windows(data.train, settings.batch_size, settings.context, generator)
        inputs, targets = inputs.to(device), targets.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = clock()

        def forward_backward(_, inputs=inputs, targets=targets):
            logits = model(input_ids=inputs).logits
            return backward(accelerator, F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         targets.reshape(-1)))

        result = optimizer_step(accelerator, model, optimizer, forward_backward, lr=lr, grad_clip=settings.grad_clip)
        loss_sum += result.loss  # the loss as a float waits for the GPU
        train_time += clock() - started
        step += 1

        if step % settings.eval_every == 0 or progress(step, train_time) >= 1.0:
            point = {
                "step": step, "train_time_s": round(train_time, 2),
                "train_loss": loss_sum / (step - (history[-1]["step"] if history else 0)),
                "val_loss": mean_loss(model, eval_inputs, eval_targets, settings.batch_size, device),
            }
            history.append(point)
            loss_sum = 0.0
            print(f"[{run.budget}] {run.kind:>16} lr {run.lr:g} step {step:>6}  {train_time:8.1f}s  lr {lr:.2e}  "
                  f"train {point['train_loss']:.4f}  val (sample) {point['val_loss']:.4f}", flush=True)

    tokens = step * settings.batch_size * settings.context
    return {
        "name": run.kind, "budget": run.budget, "lr": run.lr, "dropout": settings.dropout, "seed": settings.seed,
        "params": model.num_parameters(), "steps": step,
        "tokens": tokens, "train_time_s": train_time, "tokens_per_s": tokens / train_time,
        "val_loss": mean_loss(model, *test_windows(data.validation, settings.context), settings.batch_size, device),
        "test_loss": mean_loss(model, *test_windows(data.test, settings.context), settings.batch_size, device),
        "history": history, "shape": shape,
    }


def training_settings(settings: Settings) -> dict:
    """The settings a finished run depends on: a saved run is reused only when these are unchanged."""
    ignored = ("models", "budgets", "lr", "lr_grid", "grid_time_s", "dropout_grid", "seeds", "time_budget_s",
               "eval_every", "device", "num_threads", "jobs", "output_dir")
    return {k: v for k, v in asdict(settings).items() if k not in ignored}


def train_all(runs: list[Run], shapes: dict, settings: Settings, data: TokenData, runs_dir: Path) -> list[dict]:
    """Train `runs` (`jobs` at a time), each result saved to `runs_dir` as it finishes; saved ones are reused."""
    results, todo = {}, []
    for run in runs:
        path = runs_dir / run.file_name
        saved = json.loads(path.read_text()) if path.is_file() else None
        if saved is not None and saved["settings"] == training_settings(run_settings(settings, run)) and \
                saved["time_budget_s"] == run.time_budget_s and saved["steps_budget"] == settings.max_steps:
            print(f"[{run.budget}] {run.kind} lr {run.lr:g}: reusing {path}", flush=True)
            # Runs saved before dropout and seeds were varied lack these two; their settings hold them.
            saved.setdefault("dropout", saved["settings"]["dropout"])
            saved.setdefault("seed", saved["settings"]["seed"])
            results[run] = saved
        else:
            todo.append(run)

    def save(run: Run, result: dict) -> None:
        result.update(settings=training_settings(run_settings(settings, run)), time_budget_s=run.time_budget_s,
                      steps_budget=settings.max_steps)
        runs_dir.mkdir(parents=True, exist_ok=True)
        (runs_dir / run.file_name).write_text(json.dumps(result, indent=1) + "\n")
        results[run] = result

    if settings.jobs == 1 or len(todo) <= 1:
        for run in todo:
            save(run, train_one(run, shapes[run.kind], settings, data))
    else:
        # Separate processes, not threads: each run's CPU-time clock then counts only its own work.
        with ProcessPoolExecutor(settings.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(train_one, run, shapes[run.kind], settings, data): run for run in todo}
            # Saved as each finishes, not in submission order, so an interruption loses only the runs in flight.
            for future in as_completed(futures):
                save(futures[future], future.result())
    return [results[run] for run in runs]


def main(argv: list[str] | None = None) -> list[dict]:
    settings = parse_settings(Settings, argv, __doc__)
    if "community-mingru" in settings.models and not community_available():
        print(MISSING_COMMUNITY, flush=True)
        settings.models = [kind for kind in settings.models if kind != "community-mingru"]
    device = setup_torch(settings.num_threads, settings.device)
    data = load_data(settings)
    shapes = matched_shapes(settings, data.vocab_size)
    output_dir = Path(settings.output_dir)
    output_dir = output_dir if output_dir.is_absolute() else REPO_ROOT / output_dir
    runs_dir = output_dir / "runs"
    time_unit = "CPU s" if device.type == "cpu" else "s"

    best_lr = {kind: settings.lr for kind in settings.models}
    best_dropout = {kind: settings.dropout for kind in settings.models}
    seeds = settings.seeds or [settings.seed]
    results, grid, time_budget_s = [], [], settings.time_budget_s
    dropout_grids = {}  # budget -> the runs of its dropout grid
    for budget in settings.budgets:
        if budget == "grid":
            grid = train_all([Run(kind, "grid", lr, settings.grid_time_s) for kind in settings.models
                              for lr in settings.lr_grid], shapes, settings, data, runs_dir)
            for kind in settings.models:
                best = min((r for r in grid if r["name"] == kind), key=lambda r: r["val_loss"])
                best_lr[kind] = best["lr"]
                results.append(best)
            continue
        if budget == "time" and time_budget_s is None:
            reference = next((r for r in results if r["name"] in ("llama", "gpt2")), results[0])
            time_budget_s = reference["train_time_s"]
        budget_s = time_budget_s if budget == "time" else None
        if settings.dropout_grid:
            dropout_grids[budget] = train_all([
                make_run(kind, budget, best_lr[kind], budget_s, settings, dropout=p)
                for kind in settings.models for p in settings.dropout_grid], shapes, settings, data, runs_dir)
            for kind in settings.models:
                best = min((r for r in dropout_grids[budget] if r["name"] == kind), key=lambda r: r["val_loss"])
                best_dropout[kind] = best["dropout"]
        # The seed-`seed` run at the chosen dropout is the dropout grid's, reused from runs/.
        results += train_all([make_run(kind, budget, best_lr[kind], budget_s, settings, dropout=best_dropout[kind],
                                       seed=seed) for kind in settings.models for seed in seeds],
                             shapes, settings, data, runs_dir)

    describe = {"grid": f"{settings.grid_time_s:g} {time_unit}, best lr", "steps": f"{settings.max_steps} steps",
                "time": f"{time_budget_s:.0f} {time_unit}" if time_budget_s is not None else "-"}
    char_shakespeare = settings.tokenizer == "char" and settings.data is None
    rows = [[
        describe[run["budget"]], run["name"], ", ".join(f"{k}={v}" for k, v in run["shape"].items()) or "-",
        f"{run['params']:,}", f"{run['lr']:g}", f"{run['dropout']:g}", run["seed"], run["steps"], f"{run['tokens']:,}",
        f"{run['tokens'] / len(data.train):.1f}", f"{run['train_time_s']:.0f}",
        f"{run['tokens_per_s']:,.0f}", f"{run['val_loss']:.4f}", f"{run['test_loss']:.4f}",
    ] + ([PAPER_TEST_LOSS.get(run["name"], "-")] if char_shakespeare else []) for run in results]
    table = markdown_table(
        ["budget", "model", "matched by", "params", "lr", "dropout", "seed", "steps", "train tokens", "epochs",
         f"train time ({time_unit})", f"tokens/{time_unit}", "val loss", "test loss"]
        + (["paper test loss (6x384, 5000 steps)"] if char_shakespeare else []),
        rows,
    )
    if len(seeds) > 1:
        table = f"{seed_summary(results, seeds, describe, len(data.train))}\n\nEvery run:\n\n{table}"
    for budget, runs in reversed(dropout_grids.items()):
        cells = {(r["name"], r["dropout"]): r for r in runs}
        def cell(kind, p, cells=cells, best_dropout=best_dropout):
            val = f"{cells[kind, p]['val_loss']:.4f}"
            return (f"**{val}**" if p == best_dropout[kind] else val) + f" / {cells[kind, p]['test_loss']:.4f}"

        dropout_rows = [[kind, f"{best_lr[kind]:g}"] + [cell(kind, p) for p in settings.dropout_grid]
                        for kind in settings.models]
        dropout_table = markdown_table(["model", "lr"] + [f"dropout {p:g}" for p in settings.dropout_grid],
                                       dropout_rows)
        table = (f"Dropout grid, {describe[budget]}, seed {settings.seed}: validation / test loss at each model's "
                 f"best rate (the lowest validation loss in bold is the dropout of the final runs):\n\n"
                 f"{dropout_table}\n\n{table}")
    if grid:
        lrs = settings.lr_grid
        cells = {(r["name"], r["lr"]): r for r in grid}
        grid_rows = [[kind] + [
            (f"**{cells[kind, lr]['val_loss']:.4f}**" if lr == best_lr[kind] else f"{cells[kind, lr]['val_loss']:.4f}")
            + f" ({cells[kind, lr]['steps']} steps)" for lr in lrs] for kind in settings.models]
        grid_table = markdown_table(["model"] + [f"lr {lr:g}" for lr in lrs], grid_rows)
        table = (f"Learning-rate grid: validation loss after {settings.grid_time_s:g} {time_unit} of training "
                 f"(best in bold):\n\n{grid_table}\n\nResults (each model at its best learning rate):\n\n{table}")
    dropout = (f"dropout tuned per model over {settings.dropout_grid}" if settings.dropout_grid
               else f"dropout {settings.dropout}")
    header = (
        f"{data.description}: {settings.num_hidden_layers} layers x {settings.hidden_size}, context "
        f"{settings.context}, batch {settings.batch_size}, {dropout}, lr -> {settings.min_lr:g} "
        f"cosine ({settings.warmup_steps / settings.max_steps:.0%} warmup); loss = mean cross-entropy (nats per token) "
        f"over the whole split; {device_name(device)}."
    )

    def label(run: dict, *varied: str) -> str:
        return " ".join([run["name"]] + [f"{key} {run[key]:g}" for key in varied])

    varied = ("seed",) if len(seeds) > 1 else ()
    histories = {f"{label(run, *varied)} ({run['budget']})": run["history"] for run in results}
    histories.update({f"{label(run, 'dropout')} ({budget}, dropout grid)": run["history"]
                      for budget, runs in dropout_grids.items() for run in runs})
    write_results(output_dir, table, header, histories, settings)
    for budget in settings.budgets:
        plot_curves({label(run, *(varied if budget != "grid" else ())): run["history"] for run in results
                     if run["budget"] == budget}, "val_loss", "validation loss (sampled windows)",
                    f"{header}\nbudget: {describe[budget]}", output_dir / f"curves_{budget}.png",
                    time_label=f"training time ({time_unit})")
        if budget in dropout_grids:
            plot_curves({label(run, "dropout"): run["history"] for run in dropout_grids[budget]}, "val_loss",
                        "validation loss (sampled windows)",
                        f"{header}\nbudget: {describe[budget]}, dropout grid (seed {settings.seed})",
                        output_dir / f"curves_{budget}_dropout.png", time_label=f"training time ({time_unit})")
    return results


def seed_summary(results: list[dict], seeds: list[int], describe: dict, train_tokens: int) -> str:
    """Per budget and model, the mean and the range (min, max) over the seeds of the final runs' numbers."""
    rows = []
    for budget in dict.fromkeys(run["budget"] for run in results if run["budget"] != "grid"):
        for kind in dict.fromkeys(run["name"] for run in results if run["budget"] == budget):
            runs = [run for run in results if run["budget"] == budget and run["name"] == kind]

            def spread(key: str, runs=runs) -> str:
                values = [run[key] for run in runs]
                return f"{sum(values) / len(values):.4f} [{min(values):.4f}, {max(values):.4f}]"

            rows.append([describe[budget], kind, f"{runs[0]['lr']:g}", f"{runs[0]['dropout']:g}", len(runs),
                         f"{sum(run['steps'] for run in runs) / len(runs):,.0f}",
                         f"{sum(run['tokens'] for run in runs) / len(runs) / train_tokens:.1f}",
                         spread("val_loss"), spread("test_loss")])
    table = markdown_table(["budget", "model", "lr", "dropout", "seeds", "steps (mean)", "epochs (mean)",
                            "val loss, mean [min, max]", "test loss, mean [min, max]"], rows)
    return (f"Over seeds {', '.join(map(str, seeds))} (weights and batch order; mean and [min, max]; "
            f"a difference is a difference only where the ranges do not overlap):\n\n{table}")


if __name__ == "__main__":
    main()
