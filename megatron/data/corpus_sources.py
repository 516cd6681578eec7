"""Where the built-in corpora's documents come from: installed files or downloads.

Every source returns documents in a deterministic order, taken while they fit under a byte cap,
so the same options always prepare the same corpus. A source that cannot be had raises
``CorpusUnavailable`` whose message says what to do: the apt package to install, or where to
put a file that could not be downloaded (so a machine without internet can still be served by
copying the file in).
"""

from __future__ import annotations

import glob
import gzip
import html
import os
import re
import sysconfig
import urllib.error
import urllib.request
import zipfile
from typing import Iterable

from megatron.data.text_files import iter_texts

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"


class CorpusUnavailable(RuntimeError):
    """A corpus' inputs are missing; the message names the fix."""


def take_until(texts: Iterable[str], max_bytes: int) -> list[str]:
    """Non-blank texts in order while they fit under ``max_bytes`` (UTF-8); a text that would
    overflow is skipped, not a stopping point, so later smaller ones can still fill the cap."""
    docs: list[str] = []
    total = 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if total + size <= max_bytes and text.strip():
            docs.append(text)
            total += size
        if total >= max_bytes:
            break
    return docs


# ---- the Python standard library (always there) ---------------------------------------------

_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_documents(max_bytes: int) -> list[str]:
    """The Python standard library's .py sources, one document per file.

    Order is deterministic: library modules first, then test suites (less typical code, so they
    are the part the byte cap cuts), each in sorted path order; files are taken while they fit
    under ``max_bytes``. Installed third-party packages
    are excluded; files that are not valid UTF-8 (the test suite has deliberate ones) are skipped.
    """
    root = sysconfig.get_paths()["stdlib"]
    library: list[str] = []
    tests: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        rel_parts = os.path.relpath(dirpath, root).split(os.sep)
        bucket = tests if _TEST_DIRS.intersection(rel_parts) else library
        bucket.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    docs: list[str] = []
    total = 0
    for path in sorted(library) + sorted(tests):
        # Files that would overflow the cap are skipped, not a stopping point, so a small cap
        # still fills up with the smaller files that follow.
        if total + os.path.getsize(path) > max_bytes:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        size = len(text.encode("utf-8"))
        if total + size <= max_bytes and text.strip():
            docs.append(text)
            total += size
    return docs


# ---- Debian packages ------------------------------------------------------------------------

DEBIAN_PACKAGES = "python3-doc dict-gcide"


def python_doc_texts(root: str) -> Iterable[str]:
    """python3.X-doc: the reStructuredText sources of the Python documentation, one per file."""
    for path in sorted(glob.glob(os.path.join(root, "usr/share/doc/python3*/html/_sources/**/*.txt"), recursive=True)):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


_DICTD_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(field: str) -> int:
    value = 0
    for c in field:
        value = value * 64 + _DICTD_DIGITS[c]
    return value


def gcide_texts(root: str) -> Iterable[str]:
    """dict-gcide: the entries of the Collaborative International Dictionary of English (Webster
    1913 + WordNet), one document per entry in file order. The dictd index gives each entry's
    offset and length (base-64 numbers); the .dict.dz file is gzip-compatible."""
    index_path = os.path.join(root, "usr/share/dictd/gcide.index")
    with open(index_path, encoding="utf-8", errors="replace") as f:
        spans = []
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 3 and not parts[0].startswith("00"):  # 00-database-* / 00database*: headers
                spans.append((_dictd_number(parts[1]), _dictd_number(parts[2])))
    data = gzip.open(os.path.join(root, "usr/share/dictd/gcide.dict.dz")).read()
    for offset, length in sorted(set(spans)):  # several headwords can share one entry
        yield data[offset:offset + length].decode("utf-8", errors="replace")


def debian_documents(max_bytes: int, root: str = "/") -> list[str]:
    """The Python documentation (python3-doc) first, then GCIDE (dict-gcide), under the cap."""
    have_docs = bool(glob.glob(os.path.join(root, "usr/share/doc/python3*/html/_sources")))
    have_gcide = os.path.isfile(os.path.join(root, "usr/share/dictd/gcide.index"))
    if not (have_docs or have_gcide):
        raise CorpusUnavailable(
            "corpus 'debian' is built from installed Debian packages, and none is installed: "
            f"run `apt-get install {DEBIAN_PACKAGES}` (python3-doc: the Python documentation's "
            "reST sources; dict-gcide: the GCIDE dictionary)"
        )

    def texts() -> Iterable[str]:
        if have_docs:
            yield from python_doc_texts(root)
        if have_gcide:
            yield from gcide_texts(root)

    return take_until(texts(), max_bytes)


# ---- downloads ------------------------------------------------------------------------------


def download(url: str, dest: str, timeout: float, progress: bool = False) -> str:
    """Fetch ``url`` to ``dest`` unless it is already there (so a file copied in by hand is used
    as is). Fails with CorpusUnavailable naming the URL and where to put the file."""
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.{os.getpid()}.part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            bar = None
            if progress:
                from tqdm import tqdm

                size = response.headers.get("Content-Length")
                bar = tqdm(total=int(size) if size else None, unit="B", unit_scale=True,
                           desc=f"downloading {os.path.basename(dest)}")
            while chunk := response.read(1 << 20):
                out.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
    except (urllib.error.URLError, OSError, ValueError) as err:  # timeouts are OSErrors
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = getattr(err, "reason", err)
        raise CorpusUnavailable(
            f"could not download {url} ({reason}). Without internet access, download it on another "
            f"machine and copy it to {dest}, then run again."
        ) from err
    os.replace(tmp, dest)
    return dest


_PAGE_TEXT = re.compile(r"<text[^>]*>(.*?)</text>", re.S)


def enwik8_documents(max_bytes: int, raw_dir: str, url: str, timeout: float, progress: bool = False) -> list[str]:
    """enwik8 (the first 100 MB of an English Wikipedia XML dump): one document per page, the
    wikitext inside <text> with XML entities decoded."""
    archive = download(url, os.path.join(raw_dir, "enwik8.zip"), timeout, progress)
    try:
        with zipfile.ZipFile(archive) as z:
            xml = z.read("enwik8").decode("utf-8", errors="replace")
    except (zipfile.BadZipFile, KeyError) as err:
        raise CorpusUnavailable(f"{archive} is not the enwik8 zip ({err}); delete it and run again") from err
    return take_until((html.unescape(m.group(1)) for m in _PAGE_TEXT.finditer(xml)), max_bytes)


def pile_documents(max_bytes: int, raw_dir: str, urls: list[str], timeout: float, progress: bool = False) -> list[str]:
    """Pile-format shards (jsonl.zst lines {"text", "meta"}) fetched from ``urls``, in order."""
    if not urls:
        raise CorpusUnavailable(
            "corpus 'pile' needs the URL of at least one .jsonl.zst shard: pass --url URL (repeatable); "
            f"or copy shards into {raw_dir} and pass their file names as --url"
        )
    paths = []
    for url in urls:
        dest = os.path.join(raw_dir, os.path.basename(url.split("?")[0]) or "shard.jsonl.zst")
        paths.append(download(url, dest, timeout, progress))
    return take_until(iter_texts(paths, "text"), max_bytes)


