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


def test_files_are_on_disk_before_latest_moves(tmp_path, monkeypatch):
    """Every file of the checkpoint, and `latest`'s new content, is fsynced before the rename
    that makes `latest` name it; the directory after it (so the rename survives a crash)."""
    import os

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    config = tmp_path / "run.yml"
    config.write_text("train_iters: 2\n")
    save = tmp_path / "ckpt"
    save_checkpoint(FakeEngine(), str(save), 1, 8, (str(config),), None)
    moved = events.index(("replace", str(save / "latest")))
    synced_before = {path for kind, path in events[:moved] if kind == "fsync"}
    assert {str(save / "global_step1" / "mp_rank_00_model_states.pt"), str(save / "global_step1" / "configs" / "run.yml"),
            str(save / "latest.tmp")} <= synced_before
    assert ("fsync", str(save)) in events[moved:]


def test_keep_last_n_prunes_after_latest_moved(tmp_path):
    save = str(tmp_path / "ckpt")
    for it in (1, 2, 3):
        save_checkpoint(FakeEngine(), save, it, it * 8, (), keep_last_n=2)
    assert sorted(p.name for p in Path(save).iterdir()) == ["global_step2", "global_step3", "latest"]
    assert latest_tag(save) == "global_step3"


def write_small(save: Path, iteration: int) -> Path:
    """A real (tiny) checkpoint of ours, through the writer."""
    from megatron.checkpointing.loading import local_layers
    from megatron.checkpointing.writer import write_checkpoint
    from megatron.config.schema import ModelConfig
    from megatron.model import GPTModel, layer_defs

    model = ModelConfig(pos_emb="rotary", num_layers=1, hidden_size=16, num_attention_heads=2, no_weight_tying=True)
    layers = [(n, m.state_dict()) for n, m in local_layers(GPTModel(layer_defs(model, 128, 64, 32, seed=0)))]
    return write_checkpoint(save, iteration, layers, model, 100, tp=1, pp=1)


def test_what_load_may_name(tmp_path, capsys):
    """A fresh start only where the run will save; otherwise every unusable `load` is named."""
    from megatron.checkpointing.errors import CheckpointError
    from megatron.checkpointing.loading import open_checkpoint

    ck = tmp_path / "ck"
    assert open_checkpoint(str(ck), str(ck)) is None  # a job's first run: load = save, nothing yet
    with pytest.raises(CheckpointError, match=f"load: {tmp_path / 'typo'} does not exist; point load at"):
        open_checkpoint(str(tmp_path / "typo"), str(ck))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"load: {tmp_path / 'empty'} holds no checkpoint"):
        open_checkpoint(str(tmp_path / "empty"), str(ck))
    write_small(ck, 1)
    newest = write_small(ck, 2)
    assert open_checkpoint(str(ck), None).tag == "global_step2"
    (ck / "latest").unlink()
    with pytest.raises(CheckpointError, match=f"holds global_step2, global_step1 but no `latest` file naming the "
                                              f"one to resume; write it, e.g. echo global_step2 > {ck / 'latest'}"):
        open_checkpoint(str(ck), str(ck))
    (ck / "latest").write_bytes(b"\xff\xfe\x00junk")  # junk: named, and the newest complete one is used
    capsys.readouterr()
    assert open_checkpoint(str(ck), str(ck)).tag == "global_step2"
    assert f"{ck / 'latest'} does not hold a checkpoint tag (binary content)" in capsys.readouterr().err
    # The newest checkpoint truncated (a copy cut short): the previous complete one, loudly.
    (ck / "latest").write_text("global_step2")
    layer = newest / "layer_02-model_00-model_states.pt"
    layer.write_bytes(layer.read_bytes()[:64])
    capsys.readouterr()
    assert open_checkpoint(str(ck), str(ck)).tag == "global_step1"
    err = capsys.readouterr().err
    assert f"WARNING: the checkpoint `latest` names is unusable ({layer}: not a complete PyTorch checkpoint" in err
    assert f"loading the newest complete one instead: {ck / 'global_step1'}" in err
