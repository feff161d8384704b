"""minrnn_training.data: corpora split as nanoGPT does, and the three batch sources behind one interface (shuffled
in-memory blocks, a packed stream, carried-state streams), each process taking its own rows of one global batch."""

import json

import numpy as np
import pytest

from minrnn_training.data import (
    PackedBlocks,
    Shard,
    StreamedBlocks,
    TokenStreams,
    load_text_splits,
    split_by_characters,
)


def test_text_file_split_is_nanogpt_and_blocks_are_exact(tmp_path):
    path = tmp_path / "a.txt"
    text = "".join(chr(65 + i % 26) for i in range(1000))
    path.write_text(text)
    splits = load_text_splits(str(path))
    assert splits.train == [text[:900]] and splits.validation == [text[900:]]
    assert split_by_characters(["abcd", "efgh"], 0.25) == (["abcd", "ef"], ["gh"])

    import numpy as np

    with pytest.raises(ValueError, match=r"block_size=10 is larger than the training data \(9 tokens\)"):
        PackedBlocks(np.arange(9), block_size=10, seed=1)
    tokens = np.arange(103)
    blocks = PackedBlocks(tokens, block_size=10, seed=1)
    assert blocks.blocks_per_epoch == 9
    # Two processes' rows of a global batch are the single process's rows, in order.
    whole = blocks.batch(3, batch_size=4)
    assert (np.concatenate([blocks.batch(3, 2, rank, 2) for rank in (0, 1)]) == whole).all()
    epoch = np.concatenate([blocks.batch(i, 1) for i in range(9)])
    offset = int(epoch[0, 0]) % 10
    assert sorted(int(row[0]) for row in epoch) == [offset + 10 * k for k in range(9)]
    assert all((row == np.arange(row[0], row[0] + 10)).all() for row in epoch)


def test_streamed_blocks_resume_exactly(tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    from minrnn_training.tokenizer import train_char_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"body": f"document {i} " * (i % 5 + 1)}) + "\n" for i in range(200)))
    train_char_tokenizer(["document 0123456789 "]).save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")

    def blocks():
        splits = load_text_splits(str(data), text_column="body", streaming=True, val_documents=10)
        return StreamedBlocks(splits.train, tokenizer, block_size=16, eos_token_id=tokenizer.eos_token_id)

    first = blocks()
    first.batch(3)
    state = json.loads(json.dumps(first.state_dict()))
    expected = [first.batch(3) for _ in range(4)]
    second = blocks()
    second.load_state_dict(state)
    assert all((second.batch(3) == want).all() for want in expected)
    stream = np.concatenate([b.ravel() for b in expected])
    assert tokenizer.eos_token_id in stream


def test_streams_are_contiguous_parts_read_in_lockstep():
    tokens = np.arange(1000)
    streams = TokenStreams(tokens, num_streams=4, block_size=16)
    assert streams.part == 250 and streams.blocks_per_epoch == 15  # 15 * 16 + 1 <= 250
    inputs, targets = streams.block(0, range(4))
    assert (inputs[:, 0] == [0, 250, 500, 750]).all() and (targets == inputs + 1).all()
    following, _ = streams.block(1, range(1, 3))
    assert (following[:, 0] == inputs[1:3, -1] + 1).all()  # block 1 continues block 0, stream by stream
    assert streams.starts_epoch(0) and not streams.starts_epoch(14) and streams.starts_epoch(15)
    assert (streams.block(15, range(4))[0] == inputs).all()
    assert int(streams.block(14, range(4))[1].max()) <= 999
    with pytest.raises(ValueError, match=r"leave 10 tokens per stream, fewer than block_size \+ 1 = 17"):
        TokenStreams(np.arange(100), num_streams=10, block_size=16)


@pytest.mark.parametrize("make", [
    lambda: PackedBlocks(np.arange(2000), block_size=10, seed=3),
    lambda: TokenStreams(np.arange(2000), num_streams=12, block_size=10),
], ids=["packed", "streams"])
def test_processes_and_micro_steps_share_out_one_global_batch(make):
    """Every (process, micro-step) takes different rows, and together they are the rows one process would take
    at once: 2 processes x 2 micro-steps x 3 rows == 1 process x 1 micro-step x 12 rows."""
    source = make()
    for step in (0, 5):
        whole = source.take(step, 0, Shard(batch_size=12))
        parts = {(micro, rank): source.take(step, micro, Shard(3, accumulation=2, rank=rank, world_size=2))
                 for micro in (0, 1) for rank in (0, 1)}
        rows = [parts[micro, rank].inputs for micro in (0, 1) for rank in (0, 1)]
        assert (np.concatenate(rows) == whole.inputs).all()
        assert len({row.tobytes() for part in rows for row in part}) == 12
        if whole.targets is not None:
            targets = np.concatenate([parts[micro, rank].targets for micro in (0, 1) for rank in (0, 1)])
            assert (targets == whole.targets).all()
    assert source.state_dict() == {}


def test_a_dataset_that_names_no_file_says_so_in_one_line(tmp_path, monkeypatch):
    from minrnn_training.data import check_local_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(FileNotFoundError, match=r"^--dataset missing\.txt: no such file \(missing\.txt\); give "):
        check_local_files(["missing.txt"])
    with pytest.raises(FileNotFoundError, match=r"^--dataset missing\.txt: no such file"):
        check_local_files(["a.txt,missing.txt"])
    with pytest.raises(FileNotFoundError, match=r"^--dataset \*\.jsonl: matches no file; "):
        check_local_files(["*.jsonl"])
    with pytest.raises(FileNotFoundError, match=r"^--dataset empty: a folder with no \.txt/\.jsonl/\.json/\.parquet"):
        check_local_files(["empty"])
    assert check_local_files(["a.txt"]) == ["a.txt"]
