"""Text corpora for tokenizer training and pretraining: loading, splitting, packing, serving batches.

One loader serves every script (`train_tokenizer.py`, `pretrain.py`, the experiments and benchmarks):

- no dataset: the embedded default corpus, Python's own documentation topics
  (`pydoc_data.topics`, ~465k characters of English shipped with every CPython), so the
  main job runs offline with nothing outside the installed project;
- local `.txt` / `.jsonl` / `.json` / `.parquet` files (a list of paths and globs, or one
  string with a comma list), read through `datasets` (a text file is one document);
- a Hugging Face Hub dataset id (`--dataset-config`, `--text-column`), streamed when asked.

Finite corpora without a validation split hold out the last `val_fraction` of their
characters (nanoGPT's rule for Shakespeare: first 90% train, last 10% validation).
Streams without a validation split hold out their first `val_documents` documents.

Packing: documents are tokenised, each followed by EOS, concatenated and cut into
fixed blocks of `block_size` tokens (labels = inputs; the model shifts them).

Training batches come from one interface, `BatchSource.take(step, micro, shard) -> Batch`, with three sources:
`PackedBlocks` (an in-memory corpus in shuffled blocks), `StreamedBlocks` (a streamed corpus packed on the fly) and
`TokenStreams` (contiguous streams for carried-state training). Each process takes its own rows (`Shard`) of the
same global batch, and each source's `state_dict` is what a checkpoint must hold to continue it exactly.
"""

from __future__ import annotations

import codecs
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .config import ConfigError, TrainConfig

if TYPE_CHECKING:
    import datasets

DEFAULT_CORPUS = "pydoc_data.topics"
LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")


@dataclass
class TextSplits:
    """A corpus split into train and validation text.

    Finite corpora hold lists of documents; streamed ones hold `datasets.IterableDataset`s
    whose rows have a `"text"` column.
    """

    name: str
    train: list[str] | datasets.IterableDataset
    validation: list[str] | datasets.IterableDataset
    streaming: bool


def default_corpus() -> list[str]:
    """The documentation topics shipped with CPython, one document per topic, in name order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _parts(dataset: str | list[str]) -> list[str]:
    """The paths, globs or Hub id that `dataset` names: a list of them, or one string with a comma list."""
    items = [dataset] if isinstance(dataset, str) else list(dataset)
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def _local_files(spec: str) -> list[str] | None:
    """The files `spec` names (path, glob or comma list), or None when it is not local."""
    parts = _parts(spec)
    looks_local = any(
        os.path.exists(part) or any(ch in part for ch in "*?[") or os.path.splitext(part)[1].lower() in LOCAL_BUILDERS
        for part in parts
    )
    if not looks_local:
        return None
    files: list[str] = []
    for part in parts:
        matches = sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part]
        if os.path.isdir(part):
            matches = sorted(
                os.path.join(part, name) for name in os.listdir(part)
                if os.path.splitext(name)[1].lower() in LOCAL_BUILDERS
            )
        if not matches:
            what = "a folder with no .txt/.jsonl/.json/.parquet file" if os.path.isdir(part) else "matches no file"
            raise FileNotFoundError(f"--dataset {part}: {what}; give existing files, globs or a Hub dataset id")
        missing = [path for path in matches if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"--dataset {part}: no such file ({missing[0]}); give existing files, globs "
                                    "or a Hub dataset id")
        files.extend(matches)
    return files


def check_local_files(dataset: str | list[str] | None) -> list[str] | None:
    """The local files `dataset` names (None: not local), each readable; `.txt` files must be UTF-8 text.

    Cheap enough to run before anything else (no `datasets`), so a bad file is one line, not a traceback
    from deep inside the loader minutes later.
    """
    if not dataset:
        return None
    files = _local_files(",".join(_parts(dataset)))
    for path in files or []:
        if LOCAL_BUILDERS.get(os.path.splitext(path)[1].lower()) == "text":
            _check_utf8_text(path)
    return files


def _check_utf8_text(path: str, chunk_bytes: int = 1 << 24) -> None:
    """Raise naming `path` and the first byte that is not UTF-8 text (a NUL counts: binary data)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        offset = 0
        while True:
            chunk = handle.read(chunk_bytes)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                at = offset - pending + error.start
                raise ValueError(f"dataset file {path!r} is not UTF-8 text: byte 0x{error.object[error.start]:02x} at "
                                 f"offset {at} ({error.reason}); convert it to UTF-8 or leave it out") from None
            if "\0" in text:
                raise ValueError(f"dataset file {path!r} is not text: it holds NUL bytes (binary data?); leave it out")
            if not chunk:
                return
            offset += len(chunk)


def _builder_for(files: list[str]) -> str:
    extensions = {os.path.splitext(path)[1].lower() for path in files}
    builders = {LOCAL_BUILDERS.get(ext) for ext in extensions}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"dataset files {files}: extensions {sorted(extensions)} must all be one kind of "
            f"{sorted(LOCAL_BUILDERS)}"
        )
    return builders.pop()


def _column(dataset, text_column: str, name: str):
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(
            f"dataset {name!r} has no text column {text_column!r}; its columns are {columns} (use --text-column)")
    if columns is not None and columns != [text_column]:
        dataset = dataset.select_columns([text_column])
    return dataset.rename_column(text_column, "text") if text_column != "text" else dataset


def split_by_characters(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Cut a document list at `1 - val_fraction` of its characters (the document there is cut in two)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    total = sum(len(doc) for doc in documents)
    cut = int(total * (1.0 - val_fraction))
    train, validation, seen = [], [], 0
    for doc in documents:
        if seen + len(doc) <= cut:
            train.append(doc)
        elif seen >= cut:
            validation.append(doc)
        else:
            train.append(doc[: cut - seen])
            validation.append(doc[cut - seen :])
        seen += len(doc)
    return train, validation


def load_text_splits(
    dataset: str | list[str] | None = None,
    *,
    dataset_config: str | None = None,
    text_column: str = "text",
    streaming: bool = False,
    val_fraction: float = 0.1,
    val_documents: int = 1000,
) -> TextSplits:
    """Load `dataset` (None: the embedded default corpus) as train/validation text.

    `dataset` is a Hub id or local files: a list of paths and globs, or one string with a comma list.

    Raises a clear error for a missing file, a missing text column or an empty corpus.
    """
    if not dataset:
        if streaming:
            raise ValueError("streaming=True needs a dataset; the embedded default corpus is held in memory")
        train, validation = split_by_characters(default_corpus(), val_fraction)
        return TextSplits(DEFAULT_CORPUS, train, validation, streaming=False)

    import datasets

    files = check_local_files(dataset)
    dataset = ",".join(_parts(dataset))  # one name for the corpus, the comma list of its parts
    if files is not None:
        builder = _builder_for(files)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        loaded = datasets.load_dataset(builder, data_files=files, streaming=streaming, **kwargs)
    else:
        try:
            loaded = datasets.load_dataset(dataset, dataset_config, streaming=streaming)
        except (ConnectionError, FileNotFoundError) as error:
            raise FileNotFoundError(
                f"dataset {dataset!r} is not a local file and could not be loaded from the Hub ({error}); "
                "check the id, --dataset-config and the network (or HF_HUB_OFFLINE with a cached copy)"
            ) from error
    if "train" not in loaded:
        raise ValueError(f"dataset {dataset!r} has no 'train' split; its splits are {list(loaded)}")
    train = _column(loaded["train"], text_column, dataset)
    val_name = next((split for split in VALIDATION_SPLIT_NAMES if split in loaded), None)
    validation = _column(loaded[val_name], text_column, dataset) if val_name else None

    if streaming:
        if validation is None:
            if val_documents < 1:
                raise ValueError(f"val_documents={val_documents} must be >= 1 to hold out a validation stream")
            validation, train = train.take(val_documents), train.skip(val_documents)
        if next(iter(train), None) is None:
            raise ValueError(f"dataset {dataset!r}: the training stream is empty")
        return TextSplits(dataset, train, validation, streaming=True)

    train_docs = [text for text in train["text"] if text]
    if validation is None:
        train_docs, val_docs = split_by_characters(train_docs, val_fraction)
    else:
        val_docs = [text for text in validation["text"] if text]
    splits = TextSplits(dataset, train_docs, val_docs, streaming=False)
    check_not_empty(splits)
    return splits


def check_not_empty(splits: TextSplits) -> None:
    """Raise if a finite corpus has no training or no validation text."""
    for split in ("train", "validation"):
        if not any(getattr(splits, split)):
            raise ValueError(f"dataset {splits.name!r}: the {split} split has no text")


def iter_texts(texts, max_chars: int | None = None) -> Iterator[str]:
    """Documents of a split (list or stream), stopping after about `max_chars` characters."""
    seen = 0
    for item in texts:
        text = item if isinstance(item, str) else item["text"]
        if not text:
            continue
        yield text
        seen += len(text)
        if max_chars is not None and seen >= max_chars:
            return


def tokenize_documents(texts: list[str], tokenizer, eos_token_id: int) -> np.ndarray:
    """One token stream: each document's ids followed by EOS. Returns int64 `(num_tokens,)`."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stream = np.fromiter(
        (token for doc in ids for token in (*doc, eos_token_id)), dtype=np.int64, count=sum(len(doc) + 1 for doc in ids)
    )
    return stream


@dataclass
class Batch:
    """Training rows: `inputs` int64 `(rows, block_size)`; `targets` the same shape, or None where the inputs are
    their own labels (the model shifts them); `fresh`: the rows start their streams (no state to carry in)."""

    inputs: np.ndarray
    targets: np.ndarray | None = None
    fresh: bool = True


@dataclass(frozen=True)
class Shard:
    """Which rows of a step's global batch this process trains: `batch_size` rows at each of `accumulation`
    micro-steps, rank `rank` of `world_size` processes. The global batch's layout does not depend on the split."""

    batch_size: int
    accumulation: int = 1
    rank: int = 0
    world_size: int = 1


class BatchSource(Protocol):
    """Where a training run's batches come from."""

    def take(self, step: int, micro: int, shard: Shard) -> Batch:
        """This process's rows of micro-step `micro` of optimizer step `step`."""

    def state_dict(self) -> dict:
        """What a checkpoint must hold to continue exactly (empty where batches are a pure function of the step)."""

    def load_state_dict(self, state: dict) -> None: ...


class PackedBlocks:
    """Training blocks cut from an in-memory token stream, a fresh order every epoch.

    Epoch `e` cuts the stream at a seeded offset in `[0, block_size)` (so block borders
    move between epochs, as nanoGPT's random windows do) and visits its blocks in a
    seeded permutation. Batch `i` is a pure function of `(seed, i)`: resuming needs only
    the step counter, and every process derives its own rows of the same global batch.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int):
        self.tokens = tokens
        self.block_size = block_size
        self.seed = seed
        # Same count for every offset, so epoch boundaries are fixed positions.
        self.blocks_per_epoch = (len(tokens) - (block_size - 1)) // block_size
        if self.blocks_per_epoch < 1:
            raise ValueError(
                f"block_size={block_size} is larger than the training data ({len(tokens)} tokens); "
                f"use a block size of at most {len(tokens) // 2} or more data"
            )
        self._epoch = None

    def _epoch_layout(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(self.block_size))
            self._epoch = (epoch, offset, rng.permutation(self.blocks_per_epoch))
        return self._epoch[1], self._epoch[2]

    def batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Rows `[rank*batch_size, (rank+1)*batch_size)` of global batch `index`. `(batch_size, block_size)`."""
        first = (index * world_size + rank) * batch_size
        rows = []
        for position in range(first, first + batch_size):
            offset, order = self._epoch_layout(position // self.blocks_per_epoch)
            start = offset + int(order[position % self.blocks_per_epoch]) * self.block_size
            rows.append(self.tokens[start : start + self.block_size])
        return np.stack(rows)

    def take(self, step: int, micro: int, shard: Shard) -> Batch:
        index = step * shard.accumulation + micro
        return Batch(self.batch(index, shard.batch_size, shard.rank, shard.world_size))

    def state_dict(self) -> dict:
        return {}  # a pure function of the step

    def load_state_dict(self, state: dict) -> None:
        pass


class TokenStreams:
    """`tokens` `(n,)` cut into `num_streams` contiguous parts of `n // num_streams` tokens (the rest unused).

    Block `i` of stream `s` holds inputs `tokens[start : start + block_size]` and targets one token later, with
    `start = s * part + (i % blocks_per_epoch) * block_size`: consecutive blocks continue each other, and every
    token of a part is predicted once per epoch. Epoch `e = i // blocks_per_epoch` starts the parts over.
    """

    def __init__(self, tokens: np.ndarray, num_streams: int, block_size: int):
        self.tokens = tokens
        self.num_streams = num_streams
        self.block_size = block_size
        self.part = len(tokens) // num_streams
        # One extra token: the last block's last target.
        self.blocks_per_epoch = (self.part - 1) // block_size
        if self.blocks_per_epoch < 1:
            raise ValueError(
                f"carried state: {len(tokens)} training tokens cut into {num_streams} streams (batch_size x "
                f"processes x gradient_accumulation_steps) leave {self.part} tokens per stream, fewer than "
                f"block_size + 1 = {block_size + 1}; use fewer rows, a smaller block_size or more data"
            )

    def starts_epoch(self, index: int) -> bool:
        """Whether block `index` is the first of an epoch (every stream starts over: no state to carry in)."""
        return index % self.blocks_per_epoch == 0

    def block(self, index: int, streams: range) -> tuple[np.ndarray, np.ndarray]:
        """Block `index` of `streams`: `(inputs, targets)`, each int64 `(len(streams), block_size)`."""
        offset = (index % self.blocks_per_epoch) * self.block_size
        starts = np.asarray(streams) * self.part + offset
        window = self.tokens[starts[:, None] + np.arange(self.block_size + 1)]
        return window[:, :-1], window[:, 1:]

    def take(self, step: int, micro: int, shard: Shard) -> Batch:
        # One stream per row of the global batch: micro-step m of process p reads streams
        # [(m * processes + p) * batch_size, ... + batch_size), so the layout is that of one big batch.
        first = (micro * shard.world_size + shard.rank) * shard.batch_size
        inputs, targets = self.block(step, range(first, first + shard.batch_size))
        return Batch(inputs, targets, fresh=self.starts_epoch(step))

    def state_dict(self) -> dict:
        return {}  # a pure function of the step

    def load_state_dict(self, state: dict) -> None:
        pass


class StreamedBlocks:
    """Training blocks packed on the fly from a (per-process) text stream.

    The state is the stream's own `state_dict()` plus the tokens read but not yet
    emitted, so a resumed run continues from exactly the same token.
    """

    def __init__(self, stream, tokenizer, block_size: int, eos_token_id: int):
        self.stream = stream
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.eos_token_id = eos_token_id
        self.buffer: list[int] = []
        self._iterator = None

    def _next_document(self) -> str:
        if self._iterator is None:
            self._iterator = iter(self.stream)
        for row in self._iterator:
            if row["text"]:
                return row["text"]
        # End of the stream: start another pass (the stream's state counts epochs).
        self._iterator = iter(self.stream)
        row = next(self._iterator, None)
        if row is None:
            raise ValueError("the training stream has no documents for this process")
        return row["text"]

    def batch(self, batch_size: int) -> np.ndarray:
        """The next `(batch_size, block_size)` tokens of this process's stream."""
        needed = batch_size * self.block_size
        while len(self.buffer) < needed:
            ids = self.tokenizer(self._next_document(), add_special_tokens=False)["input_ids"]
            self.buffer.extend(ids)
            self.buffer.append(self.eos_token_id)
        out, self.buffer = self.buffer[:needed], self.buffer[needed:]
        return np.asarray(out, dtype=np.int64).reshape(batch_size, self.block_size)

    def take(self, step: int, micro: int, shard: Shard) -> Batch:
        return Batch(self.batch(shard.batch_size))  # the stream is already this process's own

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.buffer = list(state["buffer"])
        self._iterator = None


def validation_blocks(texts, tokenizer, block_size: int, eos_token_id: int, max_blocks: int) -> np.ndarray:
    """The first `max_blocks` consecutive blocks of the validation split. `(n, block_size)`."""
    needed = max_blocks * block_size
    pieces, count = [], 0
    # Document by document, so a long validation stream is read only as far as needed.
    for text in iter_texts(texts):
        pieces.append(tokenize_documents([text], tokenizer, eos_token_id))
        count += len(pieces[-1])
        if count >= needed:
            break
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = min(max_blocks, len(tokens) // block_size)
    if n < 1:
        raise ValueError(
            f"block_size={block_size} is larger than the validation data ({len(tokens)} tokens); "
            "use a smaller block size or more validation data"
        )
    return tokens[: n * block_size].reshape(n, block_size)


def training_data(config: TrainConfig, splits: TextSplits, tokenizer, vocab_size: int, shard: Shard):
    """`(batches, validation blocks, training tokens)` of one process: its `BatchSource`, its own share of the
    validation blocks (the same count on every process: FSDP forwards are collective) and the corpus size in tokens
    (None when streamed)."""
    eos = tokenizer.eos_token_id
    world, rank = shard.world_size, shard.rank
    val_per_process = config.eval_batches * config.batch_size
    val = validation_blocks(splits.validation, tokenizer, config.block_size, eos, val_per_process * world)
    if len(val) < world:
        raise ConfigError(f"the validation split gives {len(val)} blocks of {config.block_size} tokens, fewer than "
                          f"the {world} processes")
    val = val[rank::world][: len(val) // world]
    if splits.streaming:
        from datasets.distributed import split_dataset_by_node

        stream = split_dataset_by_node(splits.train, rank=rank, world_size=world)
        return StreamedBlocks(stream, tokenizer, config.block_size, eos), val, None
    tokens = tokenize_documents(splits.train, tokenizer, eos)
    if int(tokens.max()) >= vocab_size:
        raise ConfigError(f"the tokenizer produced id {int(tokens.max())}, outside the model's vocab_size={vocab_size}")
    if config.carry_state:
        source = TokenStreams(tokens, config.batch_size * world * config.gradient_accumulation_steps, config.block_size)
    else:
        source = PackedBlocks(tokens, config.block_size, config.seed)
    return source, val, len(tokens)
