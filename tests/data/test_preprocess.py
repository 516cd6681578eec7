"""The two command-line data tools, run as users run them (subprocess)."""

import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import zstandard

from megatron.tokenizer.train import train_bpe
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.tokenizer import build_tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
DOCS = [f"def f{i}(x):\n    return x * {i}  # document {i}\n" for i in range(12)]


def run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    vocab = str(tmp / "tok.json")
    train_bpe(DOCS * 5, 320, vocab)
    lines = [json.dumps({"text": d, "meta": {"pile_set_name": "code"}}) for d in DOCS[:8]]
    # Two faults in the compressed shard: a truncated JSON line and a line without "text".
    zst_lines = lines[:4] + ['{"text": "unterminated', json.dumps({"content": "x"})] + lines[4:6]
    cctx = zstandard.ZstdCompressor()
    # Two concatenated frames, as shards built by appending are.
    zst_payload = "\n".join(zst_lines[:3]) + "\n", "\n".join(zst_lines[3:]) + "\n"
    with open(tmp / "a.jsonl.zst", "wb") as f:
        for part in zst_payload:
            f.write(cctx.compress(part.encode()))
    # Plain jsonl: one empty document (counted, skipped) and a bare JSON list (not an object).
    plain = lines[6:8] + [json.dumps({"text": ""}), "[1, 2]"]
    (tmp / "b.jsonl").write_text("\n".join(plain) + "\n")
    with gzip.open(tmp / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": DOCS[8]}) + "\n")
    (tmp / "d.txt").write_text(DOCS[9])
    return tmp, vocab


def check_output(prefix, vocab):
    tok = build_tokenizer("HFTokenizer", vocab)
    ds = MMapIndexedDataset(prefix)
    assert ds.dtype == np.uint16
    assert len(ds) == 10
    for i in range(10):
        assert ds[i].tolist() == tok.tokenize(DOCS[i]) + [tok.eod]
    return ds


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_data(inputs, workers):
    tmp, vocab = inputs
    out = str(tmp / f"out{workers}")
    res = run([
        os.path.join(ROOT, "tools/datasets/preprocess_data.py"),
        "--input", f"{tmp}/a.*,{tmp}/[ab].jsonl*,{tmp}/c.jsonl.gz,{tmp}/d.txt",
        "--tokenizer-type", "HFTokenizer", "--vocab-file", vocab, "--append-eod",
        "--output-prefix", out, "--workers", str(workers), "--log-interval", "2",
    ], cwd=tmp)
    assert res.returncode == 0, res.stderr
    ds = check_output(out + "_text_document", vocab)
    summary = res.stdout.strip().splitlines()[-1]
    tokens = int(ds.sizes.sum())
    nbytes = sum(len(d.encode()) for d in DOCS[:10])
    assert summary.startswith(
        f"{out}_text_document: documents=10 tokens={tokens} bytes={nbytes} bad_json=2 missing_key=1 empty=1 seconds="
    )
    assert "a.jsonl.zst:5: bad json" in res.stderr
    assert "a.jsonl.zst:6: missing key" in res.stderr


def test_preprocess_errors(inputs):
    tmp, vocab = inputs
    tool = os.path.join(ROOT, "tools/datasets/preprocess_data.py")
    res = run([tool, "--input", f"{tmp}/none*.jsonl", "--tokenizer-type", "HFTokenizer", "--vocab-file", vocab,
               "--output-prefix", str(tmp / "x")], cwd=tmp)
    assert res.returncode == 2
    assert "--input '" in res.stderr and "none*.jsonl' matches no file" in res.stderr
    res = run([tool, "--input", f"{tmp}/b.jsonl", "--tokenizer-type", "Nope", "--output-prefix", str(tmp / "x")],
              cwd=tmp)
    assert res.returncode == 2
    assert "unknown tokenizer_type 'Nope'; valid types: HFTokenizer, GPT2BPETokenizer, CharLevelTokenizer" in res.stderr
    res = run([tool, "--input", f"{tmp}/b.jsonl", "--jsonl-keys", "body", "--tokenizer-type", "CharLevelTokenizer",
               "--output-prefix", str(tmp / "x")], cwd=tmp)
    assert res.returncode == 1
    assert "documents=0" in res.stdout and "missing_key=3 empty=0" in res.stdout


def test_prepare_data_stdlib_small(tmp_path):
    args = ["prepare_data.py", "stdlib", "--data-dir", str(tmp_path), "--vocab-size", "600", "--max-mb", "0.3",
            "--no-progress"]
    res = run(args, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    prefix = str(tmp_path / "stdlib" / "stdlib_text_document")
    vocab = str(tmp_path / "stdlib" / "tokenizer.json")
    assert f"  data_path: {prefix}\n  vocab_file: {vocab}\n  tokenizer_type: HFTokenizer\n" in res.stdout
    tok = build_tokenizer("HFTokenizer", vocab)
    assert (tok.eod, tok.pad, tok.vocab_size) == (0, 1, 600)
    ds = MMapIndexedDataset(prefix)
    manifest = json.loads((tmp_path / "stdlib" / "manifest.json").read_text())
    assert len(ds) == manifest["documents"] > 5
    assert int(ds.sizes.sum()) == manifest["tokens"]
    assert 0.2e6 < manifest["text_bytes"] <= 0.3e6
    assert all(ds[i][-1] == 0 and 0 not in ds[i][:-1] for i in range(len(ds)))
    # The first document is the first library module in sorted order: __future__.py.
    assert tok.detokenize(ds[0][:-1]) == open(os.path.join(os.path.dirname(os.__file__), "__future__.py")).read()

    start = time.perf_counter()
    again = run(args, cwd=ROOT)
    assert again.returncode == 0
    assert "stdlib: already prepared and valid, nothing to do" in again.stdout
    assert time.perf_counter() - start < 10

    # Different options rebuild; a corrupted output is detected and rebuilt.
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    rebuilt = run(args, cwd=ROOT)
    assert rebuilt.returncode == 0 and "prepared in" in rebuilt.stdout
    assert len(MMapIndexedDataset(prefix)) == manifest["documents"]


def test_prepare_data_unknown_corpus():
    res = run(["prepare_data.py", "wikipedia"], cwd=ROOT)
    assert res.returncode == 2
    assert "error: unknown corpus 'wikipedia'; known corpora: debian, enwik8, pile, stdlib" in res.stderr


def test_workers_do_not_change_a_byte(inputs):
    """A .jsonl.zst of 400 documents, about 600 kB (several 128k-character batches in flight):
    --workers 2 writes exactly the bytes --workers 1 writes."""
    tmp, vocab = inputs
    docs = [DOCS[i % len(DOCS)] * (20 + i % 30) + f"# {i}\n" for i in range(400)]
    assert sum(map(len, docs)) > 4 * (1 << 17)
    with open(tmp / "big.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress("\n".join(json.dumps({"text": d}) for d in docs).encode()))
    outputs = []
    for workers in (1, 2):
        out = str(tmp / f"big{workers}")
        res = run([os.path.join(ROOT, "tools/datasets/preprocess_data.py"), "--input", str(tmp / "big.jsonl.zst"),
                   "--tokenizer-type", "HFTokenizer", "--vocab-file", vocab, "--append-eod",
                   "--output-prefix", out, "--workers", str(workers)], cwd=tmp)
        assert res.returncode == 0, res.stderr
        outputs.append([open(f"{out}_text_document{ext}", "rb").read() for ext in (".bin", ".idx")])
    assert outputs[0] == outputs[1]
    assert len(MMapIndexedDataset(str(tmp / "big1_text_document"))) == 400


def test_ftfy_repairs_mojibake(tmp_path):
    broken = "The Mona Lisa doesn\u00c3\u00a2\u00e2\u201a\u00ac\u00e2\u201e\u00a2t have eyebrows."
    (tmp_path / "m.jsonl").write_text(json.dumps({"text": broken}) + "\n")
    tool = os.path.join(ROOT, "tools/datasets/preprocess_data.py")
    for flag, name in (([], "raw"), (["--ftfy"], "fixed")):
        res = run([tool, "--input", str(tmp_path / "m.jsonl"), "--tokenizer-type", "CharLevelTokenizer",
                   "--output-prefix", str(tmp_path / name), *flag], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
    tok = build_tokenizer("CharLevelTokenizer")
    assert tok.detokenize(MMapIndexedDataset(str(tmp_path / "fixed_text_document"))[0]) == \
        "The Mona Lisa doesn't have eyebrows."
    assert tok.detokenize(MMapIndexedDataset(str(tmp_path / "raw_text_document"))[0]) == broken
