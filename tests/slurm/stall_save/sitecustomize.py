"""Loaded by every rank when this folder is on PYTHONPATH (test_slurm.py's mid-write kill): the
first torch.save into NEOX_STALL_SAVE_TAG's folder writes a partial file, leaves a marker and
hangs, so the test can kill -9 the job while the checkpoint is half-written."""

import os

_TAG = os.environ.get("NEOX_STALL_SAVE_TAG")

if _TAG:
    import time

    import torch

    _real_save = torch.save

    def _stalling_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and f"/{_TAG}/" in str(f):
            with open(f, "wb") as partial:
                partial.write(b"PK\x03\x04 half-written")
            open(os.environ["NEOX_STALL_SAVE_MARKER"], "a").close()
            time.sleep(3600)
        return _real_save(obj, f, *args, **kwargs)

    torch.save = _stalling_save
