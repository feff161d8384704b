"""minrnn_training: pretraining minGRU / minLSTM language models with accelerate.

The modules, in the order a run uses them:

- `config`: the run's settings (`TrainConfig`), read by transformers' `HfArgumentParser` from a recipe file and
  command-line options; every bad value is one line (`ConfigError`).
- `data`: corpora (local files, Hub datasets, the embedded one), split, tokenized and served as training batches
  by one interface (`BatchSource`): shuffled in-memory blocks, a packed stream, contiguous carried-state streams.
- `tokenizer`: byte-level BPE or character-level tokenizers, saved with a chat template.
- `carried_state`: the detached state carried from block to block (truncated backpropagation through time).
- `schedule`: the learning-rate schedule and the weight-decay policy of every training script of the project.
- `step`: one optimizer step on accelerate (AdamW, accumulation, clipping), shared with the experiment scripts.
- `chunked_backward`: exact gradients over blocks longer than memory, chunk by chunk through `accelerator.backward`.
- `evaluation`: validation loss, samples, the loss curve.
- `checkpoint`: atomic, rotated, verified checkpoints and the output folder's rules.
- `loop`: `main` (what `scripts/pretrain.py` runs), `preflight`, and the loop in named steps (`Trainer`, `train`).

Importing this package (or `config`, `data`, `checkpoint`) does not import torch: bad settings fail in a second.
"""
