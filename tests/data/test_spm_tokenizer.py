"""SPMTokenizer (GPT-NeoX's name): a SentencePiece .model file trained here on Python's own
sources; round trips, eod and vocabulary size, and preprocess_data.py writing ids with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.tokenizer import EOD_TOKEN, SPMTokenizer, build_tokenizer

spm = pytest.importorskip("sentencepiece")

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(json.__file__).parent  # the stdlib json package: about 50 KB of Python
SAMPLE = "def loads(s, *, cls=None):\n    return  s  # ünïcode €😀\n"


def train(out: Path, with_eod: bool) -> str:
    """A 400-piece BPE model that keeps text exactly (no normalisation, unknown bytes as byte
    pieces); with_eod adds GPT-NeoX's <|endoftext|> as a piece, else it is Llama-like (</s> = 2)."""
    lines = [line for path in sorted(SOURCE.glob("*.py")) for line in path.read_text().splitlines()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(out), vocab_size=400, model_type="bpe",
        user_defined_symbols=[EOD_TOKEN] if with_eod else [], normalization_rule_name="identity",
        remove_extra_whitespaces=False, byte_fallback=True, minloglevel=2)
    return f"{out}.model"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("spm")
    return {"eod": train(tmp / "eod", True), "llama": train(tmp / "llama", False)}


def test_round_trip_eod_and_vocab_size(models):
    tok = build_tokenizer("SPMTokenizer", models["eod"])
    assert isinstance(tok, SPMTokenizer)
    # unk 0, bos 1, eos 2, then the user-defined <|endoftext|>; no pad piece, so pad = eod
    assert (tok.vocab_size, tok.eod, tok.pad) == (400, 3, 3)
    ids = tok.tokenize(SAMPLE)
    assert tok.detokenize(np.array(ids)) == SAMPLE
    assert len(ids) < len(SAMPLE.encode())  # merges were learned
    assert tok.tokenize(f"a{EOD_TOKEN}b").count(3) == 1  # one piece, never split
    assert tok.tokenize_batch([SAMPLE, "class"]) == [ids, tok.tokenize("class")]
    assert tok.detokenize(ids + [tok.eod]) == SAMPLE + EOD_TOKEN
    assert max(ids) < tok.vocab_size


def test_model_without_endoftext_ends_documents_with_eos(models):
    tok = build_tokenizer("SPMTokenizer", models["llama"])
    assert (tok.vocab_size, tok.eod, tok.pad) == (400, 2, 2)
    assert tok.detokenize(tok.tokenize(SAMPLE)) == SAMPLE


def test_unusable_files_fail_in_one_line(models, tmp_path):
    with pytest.raises(ValueError, match="SPMTokenizer needs vocab_file to be set"):
        build_tokenizer("SPMTokenizer")
    with pytest.raises(FileNotFoundError, match="vocab_file '.*nope.model' \\(for SPMTokenizer\\) does not exist"):
        build_tokenizer("SPMTokenizer", str(tmp_path / "nope.model"))
    (tmp_path / "bad.model").write_text("not a model")
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece model file"):
        build_tokenizer("SPMTokenizer", str(tmp_path / "bad.model"))
    no_eos = str(tmp_path / "noeos")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SAMPLE.splitlines() * 20), model_prefix=no_eos,
                                   vocab_size=30, model_type="bpe", eos_id=-1, minloglevel=2)
    with pytest.raises(ValueError, match=f"noeos.model: SentencePiece model has neither {EOD_TOKEN} nor an eos"):
        build_tokenizer("SPMTokenizer", f"{no_eos}.model")


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_data_with_spm(models, tmp_path, workers):
    docs = [f"def f{i}(x):\n    return x * {i}  # dokument {i} ü\n" for i in range(6)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "tools/datasets/preprocess_data.py"), "--input",
                          str(tmp_path / "docs.jsonl"), "--tokenizer-type", "SPMTokenizer", "--vocab-file",
                          models["eod"], "--append-eod", "--output-prefix", str(tmp_path / "out"),
                          "--workers", str(workers)], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    tok = build_tokenizer("SPMTokenizer", models["eod"])
    ds = MMapIndexedDataset(str(tmp_path / "out_text_document"))
    assert len(ds) == 6 and ds.dtype == np.uint16
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == tok.tokenize(doc) + [3]
        assert tok.detokenize(ds[i][:-1]) == doc
