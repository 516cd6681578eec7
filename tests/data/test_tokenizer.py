"""Tokenizer factory, vocab padding and the three tokenizer types."""

import json

import numpy as np
import pytest

from megatron.tokenizer.train import train_bpe
from megatron.tokenizer import CharLevelTokenizer, build_tokenizer, pad_vocab_size

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i, 'hello world')\n",
] * 20


def test_pad_vocab_size():
    assert pad_vocab_size(50277, 128, 2) == 50432
    assert pad_vocab_size(50432, 128, 2) == 50432
    assert pad_vocab_size(257, 128, 1) == 384
    assert pad_vocab_size(8000, 64, 4) == 8192
    with pytest.raises(ValueError, match="must be positive, got 100, 0, 1"):
        pad_vocab_size(100, 0, 1)


def test_unknown_type_and_missing_files(tmp_path):
    with pytest.raises(ValueError) as err:
        build_tokenizer("SentencePiece")
    assert str(err.value) == (
        "unknown tokenizer_type 'SentencePiece'; valid types: HFTokenizer, GPT2BPETokenizer, CharLevelTokenizer, "
        "SPMTokenizer"
    )
    # GPT-NeoX's two other types are named with what to use instead.
    with pytest.raises(ValueError) as err:
        build_tokenizer("HFGPT2Tokenizer", "gpt2.json")
    assert str(err.value) == ("tokenizer_type 'HFGPT2Tokenizer' is not supported: use GPT2BPETokenizer with "
                              "vocab_file (vocab.json) and merge_file (merges.txt), or HFTokenizer with a tokenizers "
                              "JSON file")
    with pytest.raises(ValueError, match="^tokenizer_type 'TiktokenTokenizer' is not supported: tiktoken fetches"):
        build_tokenizer("TiktokenTokenizer", "cl100k_base")
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError) as err:
        build_tokenizer("HFTokenizer", missing)
    assert str(err.value) == f"vocab_file {missing!r} (for HFTokenizer) does not exist"
    vocab = tmp_path / "vocab.json"
    vocab.write_text("{}")
    with pytest.raises(FileNotFoundError, match="merge_file '.*merges.txt' \\(for GPT2BPETokenizer\\) does not exist"):
        build_tokenizer("GPT2BPETokenizer", str(vocab), str(tmp_path / "merges.txt"))
    with pytest.raises(ValueError, match="HFTokenizer needs vocab_file to be set"):
        build_tokenizer("HFTokenizer")
    with pytest.raises(ValueError, match="vocab.json: not a tokenizers JSON file"):
        build_tokenizer("HFTokenizer", str(vocab))


def test_char_level_round_trip():
    tok = build_tokenizer("CharLevelTokenizer")
    assert isinstance(tok, CharLevelTokenizer)
    assert (tok.vocab_size, tok.eod, tok.pad) == (257, 256, 256)
    text = "héllo\x00 wörld ✓"
    ids = tok.tokenize(text)
    assert ids[:3] == [104, 0xC3, 0xA9]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.detokenize(np.array(ids)) == text
    assert tok.tokenize_batch(["ab", ""]) == [[97, 98], []]
    assert tok.detokenize([104, 105, 256]) == "hi<|endoftext|>"
    with pytest.raises(ValueError, match="id 300 is outside 0..256"):
        tok.detokenize([300])


def test_hf_tokenizer_trained_in_test(tmp_path):
    path = str(tmp_path / "tokenizer.json")
    train_bpe(TEXT, 300, path)
    tok = build_tokenizer("HFTokenizer", path)
    assert (tok.eod, tok.pad) == (0, 1)
    assert 258 < tok.vocab_size <= 300
    sample = "def add(x, y):\n    return x + y  # ünïcode\n"
    ids = tok.tokenize(sample)
    assert tok.detokenize(ids) == sample
    # Merges were learned: fewer tokens than bytes.
    assert len(ids) < len(sample.encode("utf-8"))
    assert tok.tokenize_batch([sample, "class"]) == [ids, tok.tokenize("class")]
    assert tok.tokenize("<|endoftext|>") == [0]
    assert tok.detokenize(ids + [tok.eod]) == sample + "<|endoftext|>"


def test_hf_tokenizer_without_padding_pads_with_eod(tmp_path):
    path = str(tmp_path / "tokenizer.json")
    train_bpe(TEXT, 300, path)
    spec = json.loads(open(path).read())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|padding|>"]
    del spec["model"]["vocab"]["<|padding|>"]
    open(path, "w").write(json.dumps(spec))
    tok = build_tokenizer("HFTokenizer", path)
    assert (tok.eod, tok.pad) == (0, 0)


def test_gpt2_bpe_from_vocab_and_merges(tmp_path):
    # A miniature GPT-2 style vocabulary: byte-level symbols ("Ġ" is the space byte).
    vocab = {"<|endoftext|>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "Ġ": 5, "w": 6, "r": 7, "d": 8,
             "he": 9, "ll": 10, "hell": 11, "hello": 12, "Ġw": 13}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh e\nl l\nhe ll\nhell o\nĠ w\n")
    tok = build_tokenizer("GPT2BPETokenizer", str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert (tok.vocab_size, tok.eod, tok.pad) == (14, 0, 0)
    ids = tok.tokenize("hello world")
    assert ids == [12, 13, 4, 7, 3, 8]
    assert tok.detokenize(ids) == "hello world"
    assert tok.tokenize("hello<|endoftext|>") == [12, 0]
