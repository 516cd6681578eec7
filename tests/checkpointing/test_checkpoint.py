"""`latest` moves only after a complete save; pruning happens after it moved."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron.checkpointing.checkpoint import latest_tag, save_checkpoint


class FakeEngine:
    """Writes one shard per save, as DeepSpeed's engine would; `fail` simulates a crash mid-save."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert save_latest is False  # the framework writes `latest` itself, last
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "mp_rank_00_model_states.pt").write_bytes(b"partial" if self.fail else b"complete")
        if self.fail:
            raise OSError(28, "No space left on device")


def test_latest_moves_only_after_a_complete_save(tmp_path):
    config = tmp_path / "run.yml"
    config.write_text("train_iters: 2\n")
    save = str(tmp_path / "ckpt")
    save_checkpoint(FakeEngine(), save, 1, 8, (str(config),), None)
    assert latest_tag(save) == "global_step1"
    assert (Path(save) / "global_step1" / "configs" / "run.yml").read_text() == "train_iters: 2\n"
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint(FakeEngine(fail=True), save, 2, 16, (str(config),), None)
    assert latest_tag(save) == "global_step1"  # the half-written global_step2 is never named
    assert sorted(p.name for p in Path(save).iterdir()) == ["global_step1", "global_step2", "latest"]


def test_keep_last_n_prunes_after_latest_moved(tmp_path):
    save = str(tmp_path / "ckpt")
    for it in (1, 2, 3):
        save_checkpoint(FakeEngine(), save, it, it * 8, (), keep_last_n=2)
    assert sorted(p.name for p in Path(save).iterdir()) == ["global_step2", "global_step3", "latest"]
    assert latest_tag(save) == "global_step3"
