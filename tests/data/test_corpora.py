"""Built-in corpora beyond stdlib: Debian packages (a fake root) and downloads (file:// URLs and
unreachable hosts only: tests never touch real external hosts)."""

import gzip
import json
import os
import socket
import subprocess
import sys
import zipfile

import pytest
import zstandard

from megatron.data.corpora import CORPORA, CorpusOptions, CorpusUnavailable
from megatron.data.corpus_sources import debian_documents, take_until
from megatron.data.indexed_dataset import MMapIndexedDataset
from megatron.tokenizer import build_tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
FILLER = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 4


def b64(n):
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def fake_debian(root):
    src = root / "usr/share/doc/python3.11/html/_sources"
    (src / "library").mkdir(parents=True)
    (src / "tutorial.rst.txt").write_text("Tutorial\n========\n" + FILLER)
    (src / "library" / "os.rst.txt").write_text(":mod:`os`\n" + FILLER)
    entries = ["Header of the database\n", "Apple \\Ap\"ple\\, n.\n   A fruit.\n",
               "Zebra \\Ze\"bra\\, n.\n   A horse.\n"]
    dictd = root / "usr/share/dictd"
    dictd.mkdir(parents=True)
    blob = "".join(entries).encode()
    with gzip.open(dictd / "gcide.dict.dz", "wb") as f:
        f.write(blob)
    o1, o2 = len(entries[0]), len(entries[0]) + len(entries[1])
    index = [f"00-database-short\t{b64(0)}\t{b64(o1)}", f"apple\t{b64(o1)}\t{b64(len(entries[1]))}",
             f"pomme\t{b64(o1)}\t{b64(len(entries[1]))}", f"zebra\t{b64(o2)}\t{b64(len(entries[2]))}"]
    (dictd / "gcide.index").write_text("\n".join(index) + "\n")
    return entries


def test_take_until_skips_what_does_not_fit():
    assert take_until(["aaaa", "bbbbbbbb", " ", "cc", "dd"], 8) == ["aaaa", "cc", "dd"]
    assert take_until(["é" * 3], 5) == []  # bytes, not characters


def test_debian_documents_from_installed_packages(tmp_path):
    entries = fake_debian(tmp_path)
    docs = debian_documents(10_000, str(tmp_path))
    # Docs in sorted path order (library/ before tutorial), then dictionary entries: headers left out
    # and an entry shared by two headwords taken once.
    assert docs == [":mod:`os`\n" + FILLER, "Tutorial\n========\n" + FILLER, entries[1], entries[2]]
    opts = CorpusOptions(data_dir=str(tmp_path / "out"), vocab_size=300, max_mb=0.01, progress=False,
                         system_root=str(tmp_path))
    result = CORPORA["debian"](opts)
    assert (result.documents, result.text_bytes) == (4, sum(len(d.encode()) for d in docs))
    tok = build_tokenizer("HFTokenizer", result.vocab_file)
    assert tok.detokenize(MMapIndexedDataset(result.data_path)[3]) == entries[2] + "<|endoftext|>"


def test_debian_without_packages_names_them(tmp_path):
    with pytest.raises(CorpusUnavailable, match=r"run `apt-get install python3-doc dict-gcide`"):
        CORPORA["debian"](CorpusOptions(data_dir=str(tmp_path), system_root=str(tmp_path), progress=False))


def test_enwik8_and_pile_from_file_urls(tmp_path):
    pages = "".join(f"<page><title>T{i}</title><text xml:space=\"preserve\">Page {i} &amp; more: {FILLER}</text></page>"
                    for i in range(3))
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as z:
        z.writestr("enwik8", "<mediawiki>" + pages + "</mediawiki>")
    opts = dict(data_dir=str(tmp_path / "d"), vocab_size=300, max_mb=1.0, progress=False)
    result = CORPORA["enwik8"](CorpusOptions(urls=(f"file://{tmp_path}/e.zip",), **opts))
    assert result.documents == 3 and os.path.isfile(tmp_path / "d/enwik8/raw/enwik8.zip")
    tok = build_tokenizer("HFTokenizer", result.vocab_file)
    assert tok.detokenize(MMapIndexedDataset(result.data_path)[1][:-1]) == f"Page 1 & more: {FILLER}"

    lines = [json.dumps({"text": f"doc {i} {FILLER}", "meta": {"pile_set_name": "Pile-CC"}}) for i in range(5)]
    (tmp_path / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    result = CORPORA["pile"](CorpusOptions(urls=(f"file://{tmp_path}/00.jsonl.zst",), **opts))
    assert result.documents == 5 and os.path.isfile(tmp_path / "d/pile/raw/00.jsonl.zst")


def run_prepare(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "prepare_data.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


def test_download_failures_are_clear(tmp_path):
    res = run_prepare("enwik8", "--data-dir", str(tmp_path), "--url", "http://127.0.0.1:9/enwik8.zip",
                      "--timeout", "2", "--no-progress")
    assert res.returncode == 1
    assert ("error: could not download http://127.0.0.1:9/enwik8.zip ([Errno 111] Connection refused). Without "
            f"internet access, download it on another machine and copy it to {tmp_path}/enwik8/raw/enwik8.zip") \
        in res.stderr
    # A host that accepts the connection but never answers: the timeout fires.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/00.jsonl.zst"
        res = run_prepare("pile", "--data-dir", str(tmp_path), "--url", url, "--timeout", "0.5", "--no-progress")
    assert res.returncode == 1 and f"could not download {url} (timed out)" in res.stderr
    assert not os.listdir(tmp_path / "pile" / "raw")  # no partial file left behind
    res = run_prepare("pile", "--data-dir", str(tmp_path), "--no-progress")
    assert res.returncode == 1 and "corpus 'pile' needs the URL of at least one .jsonl.zst shard" in res.stderr
