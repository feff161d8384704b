"""Train a tokenizer for minrnn: byte-level BPE (GPT-2 style) or character-level.

    python scripts/train_tokenizer.py --dataset data.txt --vocab-size 8192 --out tok/
    python scripts/download_tinyshakespeare.py   # data/tinyshakespeare.txt
    python scripts/train_tokenizer.py --dataset data/tinyshakespeare.txt --char-level --out tok/

Trained on the training split only (validation text stays unseen) and saved as a
`PreTrainedTokenizerFast` that `AutoTokenizer.from_pretrained(out)` loads, with
`<|endoftext|>` as BOS and EOS (documents are separated by it), `<|pad|>` for padding
and left padding, so batched generation continues every row from its last token.
Byte-level BPE encodes any text losslessly; a character-level vocabulary holds the
characters of the training text plus `<|unk|>` for the rest.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from text_data import iter_texts, load_text_splits  # noqa: E402

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"


def _wrap(tokenizer_object, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        # Decoding must give back the exact text (no space clean-up around punctuation).
        clean_up_tokenization_spaces=False,
        **special,
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE with `vocab_size` entries (specials included) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS_TOKEN, PAD_TOKEN]
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(specials)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: it needs at least {minimum} (256 bytes + specials)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)


def train_char_tokenizer(texts: Iterable[str]):
    """One token per character seen in `texts` (sorted), plus the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set().union(*(set(text) for text in texts)))
    if not chars:
        raise ValueError("cannot train a character-level tokenizer on empty text")
    vocab = {token: index for index, token in enumerate([EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *chars])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # [\s\S] matches every character, newlines included; Fuse joins them back without spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer, unk_token=UNK_TOKEN)


def train_tokenizer(texts: Iterable[str], *, char_level: bool, vocab_size: int):
    """A character-level or byte-level BPE tokenizer trained on `texts`."""
    return train_char_tokenizer(texts) if char_level else train_bpe_tokenizer(texts, vocab_size)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="Hub id or local .txt/.jsonl/.parquet files (default: the embedded corpus)")
    parser.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it whole")
    parser.add_argument("--max-chars", type=int, default=None, help="train on about this many characters (needed for big streams)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size, specials included")
    parser.add_argument("--char-level", action="store_true", help="one token per character instead of BPE")
    parser.add_argument("--out", required=True, help="output folder for the tokenizer")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.streaming and args.max_chars is None:
        raise SystemExit("--streaming needs --max-chars: a tokenizer trainer must see a finite sample of the stream")
    try:
        splits = load_text_splits(args.dataset, dataset_config=args.dataset_config, text_column=args.text_column, streaming=args.streaming)
        texts = iter_texts(splits.train, args.max_chars)
        tokenizer = train_tokenizer(texts, char_level=args.char_level, vocab_size=args.vocab_size)
    except (ValueError, FileNotFoundError) as error:  # bad data or settings: one line, not a traceback
        raise SystemExit(f"error: {error}") from None
    tokenizer.save_pretrained(args.out)
    kind = "character-level" if args.char_level else "byte-level BPE"
    print(f"saved a {kind} tokenizer with {len(tokenizer)} tokens trained on {splits.name} to {args.out}")


if __name__ == "__main__":
    main()
