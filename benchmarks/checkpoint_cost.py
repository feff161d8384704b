"""Time and disk of one training checkpoint: save, the check `--resume` makes, load.

    python benchmarks/checkpoint_cost.py                                  # the 125M recipe, 3 repetitions
    python benchmarks/checkpoint_cost.py --config configs/tiny.yaml --reps 1

Builds the recipe's model (fp32, one CPU process) and its AdamW state (one step), then writes checkpoints with
`minrnn_training.checkpoint.save_checkpoint` as a run does, without and with `checkpoint_hashes` (the hashing
thread's work is timed apart: it runs while training goes on), and times `resumable_checkpoint` (what `--resume`
verifies) and `load_checkpoint`. Prints a markdown table, one row per repetition and setting.
"""

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class NoData:
    """The data position of a run without data: nothing to save."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "web_125m.yaml"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args(argv)

    import torch
    from accelerate import Accelerator

    from minrnn_training.checkpoint import (
        load_checkpoint,
        resumable_checkpoint,
        save_checkpoint,
        save_tied_weights_once,
        write_checkpoint_hashes,
    )
    from minrnn_training.config import SettingsParser, model_config
    from minrnn_training.step import make_optimizer
    from minrnn_training.tokenizer import train_tokenizer
    from modeling_minrnn import MinRNNForCausalLM

    settings, _ = SettingsParser().parse(["--config", args.config])
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    vocab_size = settings.vocab_size or settings.tokenizer_vocab_size
    model = MinRNNForCausalLM(model_config(settings, vocab_size))
    model, optimizer = accelerator.prepare(model, make_optimizer(model, lr=1e-4, weight_decay=0.1))
    save_tied_weights_once(accelerator)  # as a run does
    ids = torch.randint(0, vocab_size, (1, 16))
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()  # the AdamW moments exist, as in a run
    tokenizer = train_tokenizer(iter(["a few words for a small tokenizer"] * 100), char_level=False, vocab_size=300)
    root = Path(args.out or tempfile.mkdtemp(prefix="checkpoint_cost_"))
    rows = []
    for rep in range(args.reps):
        for hashes in (False, True):
            out = root / f"hashes_{hashes}"
            shutil.rmtree(out, ignore_errors=True)
            config = dataclasses.replace(settings, output_dir=str(out), checkpoint_hashes=hashes)
            start = time.perf_counter()
            path = save_checkpoint(accelerator, model, tokenizer, config,
                                   {"step": 1, "tokens_seen": 0, "world_size": 1}, NoData())
            save = time.perf_counter() - start
            start = time.perf_counter()
            if hashes:
                write_checkpoint_hashes(path)  # a run does this in a thread, while training goes on
            hashing = time.perf_counter() - start
            start = time.perf_counter()
            resumable_checkpoint(str(out))
            verify = time.perf_counter() - start
            start = time.perf_counter()
            load_checkpoint(accelerator, path, NoData())
            load = time.perf_counter() - start
            size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
            rows.append({"rep": rep, "hashes": hashes, "save_s": save, "hash_thread_s": hashing if hashes else None,
                         "verify_s": verify, "load_s": load, "bytes": size})
            shutil.rmtree(out)
    print(f"{model.num_parameters():,} parameters, {args.config}; command: python benchmarks/checkpoint_cost.py "
          + " ".join(sys.argv[1:] if argv is None else argv))
    print("| hashes | save (s) | hashing thread (s) | verify on --resume (s) | load (s) | checkpoint size |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        thread = "-" if row["hash_thread_s"] is None else f"{row['hash_thread_s']:.2f}"
        print(f"| {'yes' if row['hashes'] else 'no'} | {row['save_s']:.2f} | {thread} | {row['verify_s']:.3f} | "
              f"{row['load_s']:.2f} | {row['bytes'] / 1e9:.2f} GB |")
    return rows


if __name__ == "__main__":
    main()
