"""Pretrain a minGRU / minLSTM language model with accelerate, from one CPU to many GPUs.

    accelerate launch scripts/pretrain.py                       # tiny recipe on the embedded corpus, offline
    python scripts/download_tinyshakespeare.py && \\
        accelerate launch scripts/pretrain.py --config configs/shakespeare_char.yaml --max-steps 2000
    accelerate launch --multi_gpu --num_processes 2 scripts/pretrain.py --batch-size 8   # 2 processes on CPUs
    accelerate launch scripts/pretrain.py --output-dir out/tiny --resume   # continue after a crash
    accelerate launch scripts/pretrain.py --carry-state        # each row reads its own stream; state carried over
    accelerate launch scripts/pretrain.py --init-from out/tiny --dataset my.txt --output-dir out/tuned  # fine-tune

Settings come from a recipe (`--config`, YAML or JSON, default `configs/tiny.yaml`) overridden by
`--key value` options (`--max-steps 50 --lr 1e-3`, or `--max_steps`); `--help` lists every key
with the recipe's value. The settings are `minrnn_training.config.TrainConfig`; the loop a reader
follows from data to checkpoint is `minrnn_training.loop.train`, in the named steps of `loop.Trainer`.

One output folder holds one run: a new run refuses a folder holding another (`--resume` continues it,
`--overwrite_output_dir` deletes it); a finished run is trained further by a new run with `--init-from` it.
Bad settings, data and checkpoints stop the run with one line before any work (`accelerate launch -q` leaves out
the launcher's traceback after it).

The output folder holds a `save_pretrained` model (with its remote code), the tokenizer
(with a chat template), a generation config, `training_summary.json`, `train_log.jsonl` (one line per step, and
per evaluation), `loss_curve.png`, TensorBoard logs and `checkpoints/step-0000200/`.
"""

from minrnn_training.loop import main

if __name__ == "__main__":
    main(description=__doc__)
