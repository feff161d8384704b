"""Tokenizers for minrnn: byte-level BPE (GPT-2 style) or character-level, saved with a chat template.

Trained on the training split only (validation text stays unseen) and saved as a `PreTrainedTokenizerFast` that
`AutoTokenizer.from_pretrained(out)` loads, with `<|endoftext|>` as BOS and EOS (documents are separated by it),
`<|pad|>` for padding and left padding, so batched generation continues every row from its last token. Byte-level
BPE encodes any text losslessly; a character-level vocabulary holds the characters of the training text plus
`<|unk|>` for the rest.

The chat template (`DEFAULT_CHAT_TEMPLATE`, or one given) lets chat tools (`apply_chat_template`, a
`pipeline("text-generation")` given messages, `transformers serve`) take the tokenizer. The default writes a
conversation as plain text a model pretrained on prose can continue: each message as `Role: content` and a blank
line, then `Assistant:` for the reply; it adds no tokens, so it fits any vocabulary.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from .config import ConfigError, TrainConfig
from .data import iter_texts, load_text_splits

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- message['role'] | capitalize }}: {{ message['content'] | trim }}{{ '\\n\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)

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
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: it needs at least {minimum} "
                         "(256 bytes + specials)")
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


def chat_template(value: str | None) -> str:
    """The chat template `value` names: None for the default, a file holding one, or the template itself.

    Raises ValueError naming the problem when it is neither a file nor a template Jinja can read.
    """
    import jinja2

    if value is None:
        return DEFAULT_CHAT_TEMPLATE
    template = value
    if "{" not in value:  # not a Jinja template: a file name
        if not Path(value).is_file():
            raise ValueError(f"chat_template={value!r}: no such file, and not a Jinja template either")
        template = Path(value).read_text(encoding="utf-8")
    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(
            f"chat_template {value!r}: Jinja syntax error at line {error.lineno}: {error.message}") from None
    return template


def run_tokenizer(config: TrainConfig, splits, accelerator, checkpoint: Path | None):
    """A training run's tokenizer: the checkpoint's when resuming, a given one, the `init_from` model's, or one
    trained on the training split (by the main process, then loaded by all: every process gets the same ids); with
    the run's chat template."""
    from transformers import AutoTokenizer

    if checkpoint is not None:
        source = checkpoint / "tokenizer"
    elif config.tokenizer:
        source = Path(config.tokenizer)
    elif config.init_from:
        # The model's own tokenizer: in a checkpoint's `tokenizer/`, in a save_pretrained folder or Hub repository.
        checkpoint_tokenizer = Path(config.init_from) / "tokenizer"
        source = checkpoint_tokenizer if checkpoint_tokenizer.is_dir() else config.init_from
    else:
        source = Path(config.output_dir) / "tokenizer"
        if accelerator.is_main_process:
            texts = iter_texts(splits.train, config.tokenizer_max_chars)
            train_tokenizer(texts, char_level=config.char_level, vocab_size=config.tokenizer_vocab_size
                            ).save_pretrained(source)
        accelerator.wait_for_everyone()
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = chat_template(config.chat_template)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {source} has no EOS token; documents are separated by it")
    if config.vocab_size is not None and config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"vocab_size={config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens ({source}); "
            f"use vocab_size >= {len(tokenizer)} or none (= the tokenizer's size)"
        )
    return tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="train_tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None,
                        help="Hub id or local .txt/.jsonl/.parquet files (default: the embedded corpus)")
    parser.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it whole")
    parser.add_argument("--max-chars", type=int, default=None,
                        help="train on about this many characters (needed for big streams)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size, specials included")
    parser.add_argument("--char-level", action="store_true", help="one token per character instead of BPE")
    parser.add_argument("--chat-template", default=None,
                        help="Jinja chat template saved with the tokenizer, or a file holding it (default: "
                        "`Role: content` messages, then `Assistant:`)")
    parser.add_argument("--out", required=True, help="output folder for the tokenizer")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.streaming and args.max_chars is None:
        raise SystemExit("--streaming needs --max-chars: a tokenizer trainer must see a finite sample of the stream")
    try:
        splits = load_text_splits(args.dataset, dataset_config=args.dataset_config, text_column=args.text_column,
                                  streaming=args.streaming)
        template = chat_template(args.chat_template)
        texts = iter_texts(splits.train, args.max_chars)
        tokenizer = train_tokenizer(texts, char_level=args.char_level, vocab_size=args.vocab_size)
        tokenizer.chat_template = template
    except (ValueError, FileNotFoundError) as error:  # bad data or settings: one line, not a traceback
        raise SystemExit(f"error: {error}") from None
    tokenizer.save_pretrained(args.out)
    kind = "character-level" if args.char_level else "byte-level BPE"
    print(f"saved a {kind} tokenizer with {len(tokenizer)} tokens trained on {splits.name} to {args.out}")

