"""Train a tokenizer for minrnn: byte-level BPE (GPT-2 style) or character-level, with a chat template.

    python scripts/train_tokenizer.py --dataset data.txt --vocab-size 8192 --out tok/
    python scripts/download_tinyshakespeare.py   # data/tinyshakespeare.txt
    python scripts/train_tokenizer.py --dataset data/tinyshakespeare.txt --char-level --out tok/

Also installed as the `minrnn-train-tokenizer` command; the trainers are in `minrnn_training.tokenizer`.
"""

from minrnn_training.tokenizer import main

if __name__ == "__main__":
    main()
