"""minrnn_training.tokenizer (`scripts/train_tokenizer.py`): byte-level BPE and character-level tokenizers that
AutoTokenizer loads, with a chat template that chat tools accept."""

import pytest
from conftest import tiny_model

from minrnn_training import tokenizer as train_tokenizer

SAMPLES = [
    "def f(x):\n\treturn x ** 2  # squared\n",
    "Unicode: naïve café, 東京, emoji 🙂, tabs\tand  double  spaces.",
    "  leading spaces, trailing newline\n\n",
]


def load(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_bpe_round_trip_and_specials(tmp_path):
    """Byte-level BPE on the embedded corpus: any text, even unseen scripts, decodes to itself."""
    train_tokenizer.main(["--vocab-size", "600", "--out", str(tmp_path)])
    tokenizer = load(tmp_path)
    assert len(tokenizer) == 600
    assert tokenizer.bos_token == tokenizer.eos_token == train_tokenizer.EOS_TOKEN
    assert tokenizer.pad_token == train_tokenizer.PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"
    for text in SAMPLES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # Merges were learned: English compresses well below one token per character.
    english = "The class statement defines a new class object with the given name."
    assert len(tokenizer(english)["input_ids"]) < len(english) / 2
    batch = tokenizer(["a", "a longer line"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0


def test_char_level_round_trip(tmp_path):
    """One token per character of the training text (Shakespeare gives the paper's 65 + 3 specials)."""
    data = tmp_path / "shakespeare.txt"
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    data.write_text(text * 20)
    train_tokenizer.main(["--dataset", str(data), "--char-level", "--out", str(tmp_path / "tok")])
    tokenizer = load(tmp_path / "tok")
    # Only the first 90% of the file is the training split; every character already occurs there.
    assert len(tokenizer) == len(set(text)) + 3
    sample = "Speak, Citizen!\nhear me."
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    # "!" never occurs in the training text: it becomes the unknown token, the rest round-trips.
    assert len(ids) == len(sample) and tokenizer.decode(ids) == sample.replace("!", train_tokenizer.UNK_TOKEN)
    assert tokenizer.decode(tokenizer("all: hear\n")["input_ids"]) == "all: hear\n"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small for byte-level BPE: it needs at least 258"):
        train_tokenizer.train_bpe_tokenizer(["text"], 100)


def test_bad_data_is_one_line(tmp_path):
    data = tmp_path / "latin1.txt"
    data.write_bytes("café".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"^error: dataset file '.*latin1.txt' is not UTF-8 text: byte 0xe9 at "
                                         r"offset 3"):
        train_tokenizer.main(["--dataset", str(data), "--out", str(tmp_path / "tok")])
    with pytest.raises(SystemExit, match=r"^error: vocab_size=100 is too small for byte-level BPE"):
        train_tokenizer.main(["--vocab-size", "100", "--out", str(tmp_path / "tok")])


def test_streaming_needs_a_character_budget(tmp_path):
    with pytest.raises(SystemExit, match="--streaming needs --max-chars"):
        train_tokenizer.main(["--dataset", "x.jsonl", "--streaming", "--out", str(tmp_path)])


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Who is there?\n"}]


def test_saved_chat_template_serves_chat_tools(tmp_path):
    """The saved tokenizer renders messages with the default template, and a text-generation pipeline takes a
    conversation with a tiny model (its reply comes back as the assistant's message)."""
    from transformers import pipeline

    data = tmp_path / "play.txt"
    data.write_text("Who is there? Nay, answer me: stand, and unfold yourself.\n" * 20)
    train_tokenizer.main(["--dataset", str(data), "--char-level", "--out", str(tmp_path / "tok")])
    tokenizer = load(tmp_path / "tok")
    assert (tmp_path / "tok" / "chat_template.jinja").is_file()
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == "System: Be brief.\n\nUser: Who is there?\n\nAssistant:"
    assert tokenizer.apply_chat_template(MESSAGES[1:], tokenize=False) == "User: Who is there?\n\n"
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
    reply = chat(MESSAGES, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert reply[:2] == MESSAGES and reply[-1]["role"] == "assistant" and len(reply[-1]["content"]) > 0


def test_chat_template_given_as_text_or_file(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "chat.jinja").write_text(template)
    train_tokenizer.main(["--char-level", "--max-chars", "20000", "--chat-template", str(tmp_path / "chat.jinja"),
                          "--out", str(tmp_path / "tok")])
    assert load(tmp_path / "tok").apply_chat_template(MESSAGES[:1], tokenize=False) == "[system] Be brief.\n"
    assert train_tokenizer.chat_template(template) == template
    with pytest.raises(SystemExit, match=r"^error: chat_template 'x\{\{': Jinja syntax error at line 1"):
        train_tokenizer.main(["--chat-template", "x{{", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
