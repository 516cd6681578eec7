"""Process settings for the device a rank computes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT

# Allocates and frees a 64 MiB tensor 24 + 4 times and reports the page faults of the last four.
# With the setting glibc first grows its heap several times (small chunks that torch frees into
# glibc's per-thread cache sit between the freed blocks until that cache is full), then reuses
# the freed blocks. How many steps that takes depends on the address layout: after 10 steps 3
# fresh processes in 10 still faulted on every step, after 16 none in 30. Run in a fresh
# interpreter: the setting is process-wide and cannot be undone.
PROBE = """
import json, resource, sys
import torch
from megatron.parallel.device import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
def step():
    x = torch.empty(16 * 2**20, dtype=torch.float32)
    x.fill_(1.0)
    del x
for _ in range(24):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def probe(mode: str, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat") or sys.platform != "linux", reason="glibc only")
def test_keep_freed_host_memory_stops_page_faults():
    default = probe("default")
    kept = probe("keep")
    # 4 x 64 MiB of fresh pages = 4 x 16,384 faults of 4 KiB by default; none once memory is kept.
    assert default["faults"] >= 4 * 16_000
    assert kept["applied"] is True and kept["faults"] < 1_000


def test_user_malloc_settings_win():
    assert probe("keep", MALLOC_MMAP_MAX_="65536")["applied"] is False
