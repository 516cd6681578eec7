"""BPE training in the GPT-NeoX-20B layout: specials, space-run ids, consistent pre-tokenization."""

import json
import os
import subprocess
import sys

import pytest
import zstandard

from megatron.tokenizer import build_tokenizer
from megatron.tokenizer.train import space_run_tokens, split_space_runs, train_bpe

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
# Real, varied text: two stdlib modules cut into 40 documents.
_SRC = "".join(open(os.path.join(os.path.dirname(os.__file__), m)).read() for m in ("textwrap.py", "json/decoder.py"))
CODE = [_SRC[i * len(_SRC) // 40:(i + 1) * len(_SRC) // 40] for i in range(40)]


def test_split_space_runs_mirrors_added_token_matching():
    assert split_space_runs("a  b") == ["a", "b"]
    # 25 spaces: 24 is a token, the 25th stays with the next word (as at encode time).
    assert split_space_runs("a" + " " * 25 + "x") == ["a", " x"]
    assert split_space_runs(" " * 48 + "y") == ["y"]
    assert split_space_runs(" " * 49 + "y") == [" y"]
    assert split_space_runs("x y ") == ["x y "]
    assert split_space_runs("    ") == []
    assert split_space_runs("a  b", max_space_run=0) == ["a  b"]
    assert space_run_tokens()[0] == " " * 24 and space_run_tokens()[-1] == "  " and len(space_run_tokens()) == 23


def test_train_bpe_layout_and_round_trip(tmp_path):
    path = str(tmp_path / "tok.json")
    size = train_bpe(iter(CODE), 400, path)  # a one-pass iterator is enough
    tok = build_tokenizer("HFTokenizer", path)
    assert size == tok.vocab_size == 400
    assert (tok.eod, tok.pad) == (0, 1)
    raw = tok._tok
    # The last 23 ids are 24 down to 2 spaces, like 20B's 50254..50276.
    assert [raw.id_to_token(i) for i in range(377, 400)] == space_run_tokens()
    # No learned merge holds two byte-level spaces: space runs never reach the BPE model.
    learned = [t for t, i in raw.get_vocab().items() if 2 <= i < 377]
    assert learned and not [t for t in learned if "ĠĠ" in t]
    ids = tok.tokenize("    return x")
    assert ids[0] == raw.token_to_id("    ") == 397
    assert tok.tokenize("a" + " " * 30 + "b")[1:3] == [377, 395]  # 24 + 6 spaces
    for text in ["def f():\n" + " " * 25 + "pass\n", "  lead and trail  ", "ünïcode  x", CODE[7]]:
        assert tok.detokenize(tok.tokenize(text)) == text
    with pytest.raises(ValueError, match="vocab_size 270 is too small.*need 281"):
        train_bpe(CODE, 270, str(tmp_path / "small.json"))


def test_train_bpe_is_deterministic_and_prefix_space_option(tmp_path):
    a, b, c = (str(tmp_path / f"{n}.json") for n in "abc")
    train_bpe(CODE, 350, a)
    train_bpe(list(CODE), 350, b)
    assert open(a, "rb").read() == open(b, "rb").read()
    train_bpe(CODE, 350, c, add_prefix_space=True)
    spec = json.loads(open(c).read())
    assert spec["pre_tokenizer"]["add_prefix_space"] is True
    tok = build_tokenizer("HFTokenizer", c)
    # With a prefix space, a document's first word is the same token as mid-text.
    assert tok.tokenize("return") == tok.tokenize(" return")
    assert build_tokenizer("HFTokenizer", a).tokenize("return") != build_tokenizer("HFTokenizer", a).tokenize(" return")


def test_train_tokenizer_cli(tmp_path):
    cctx = zstandard.ZstdCompressor()
    lines = [json.dumps({"text": t}) for t in CODE] + ["not json"]
    (tmp_path / "a.jsonl.zst").write_bytes(cctx.compress(("\n".join(lines) + "\n").encode()))
    (tmp_path / "b.txt").write_text(CODE[0])
    out = tmp_path / "out" / "tok.json"
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    tool = os.path.join(ROOT, "tools/datasets/train_tokenizer.py")
    res = subprocess.run(
        [sys.executable, tool, "--input", f"{tmp_path}/*.jsonl.zst,{tmp_path}/b.txt", "--output", str(out),
         "--vocab-size", "380"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    nbytes = sum(len(t.encode()) for t in CODE) + len(CODE[0].encode())
    assert f"vocab_size=380 documents=41 bytes={nbytes} bad_json=1 missing_key=0" in res.stdout
    assert "a.jsonl.zst:41: bad json" in res.stderr
    assert build_tokenizer("HFTokenizer", str(out)).vocab_size == 380
    res = subprocess.run([sys.executable, tool, "--input", f"{tmp_path}/a.jsonl.zst", "--output", str(out),
                          "--jsonl-key", "body", "--no-progress"], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1 and "no documents were read" in res.stderr and not out.exists()
