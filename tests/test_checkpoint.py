"""Atomic checkpoints: a crash while saving leaves the previous checkpoint the newest complete one."""
import random

import numpy as np
import pytest
import torch

from llm2clip import checkpoint as C


def _save(out, step, keep_last=3, data=None):
    tmp = C.begin_save(str(out), step)
    (tmp / "engine").mkdir()
    (tmp / "engine" / "weights.bin").write_bytes(b"x" * 10)
    C.save_rank_state(tmp, 0, data or {"pos": step})
    return C.commit_save(tmp, {"step": step, "samples_seen": step * 8}, keep_last)


def test_crash_during_save_keeps_previous(tmp_path):
    _save(tmp_path, 4)
    # a save of step 8 that died half way: files written, never committed
    tmp = C.begin_save(str(tmp_path), 8)
    (tmp / "engine").mkdir()
    (tmp / "engine" / "weights.bin").write_bytes(b"partial")
    assert C.latest_checkpoint(C.checkpoint_root(tmp_path)).name == "step_00000004"
    assert C.resolve_resume("auto", str(tmp_path)).name == "step_00000004"
    # a complete-looking folder without the COMPLETE marker is not a checkpoint either
    fake = C.step_dir(str(tmp_path), 12)
    fake.mkdir()
    (fake / "trainer_state.json").write_text("{}")
    assert C.latest_checkpoint(C.checkpoint_root(tmp_path)).name == "step_00000004"
    # the next save removes the stale temporary folder
    _save(tmp_path, 16)
    assert not list(C.checkpoint_root(tmp_path).glob(".step_*.tmp"))
    assert C.latest_checkpoint(C.checkpoint_root(tmp_path)).name == "step_00000016"
    assert C.read_trainer_state(C.latest_checkpoint(C.checkpoint_root(tmp_path)))["samples_seen"] == 128


def test_keep_last_prunes_oldest(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in C.list_checkpoints(C.checkpoint_root(tmp_path))] == ["step_00000003", "step_00000004"]


def test_resume_modes(tmp_path):
    assert C.resolve_resume("auto", str(tmp_path)) is None
    ck = _save(tmp_path, 2)
    assert C.resolve_resume("none", str(tmp_path)) is None
    assert C.resolve_resume(str(ck), str(tmp_path)) == ck
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        C.resolve_resume(str(tmp_path / "nope"), str(tmp_path))


def test_rng_and_data_state_roundtrip(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    ck = _save(tmp_path, 5, data={"epoch": 1, "pos": 7, "nested": {"a": [1, 2]}})
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    data = C.load_rank_state(ck, 0)
    assert data == {"epoch": 1, "pos": 7, "nested": {"a": [1, 2]}}
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1] and got[2] == expect[2]
    assert C.load_rank_state(ck, 3) == {}  # a rank the checkpoint did not have (world grew)
    assert not any(p.suffix in (".pt", ".pkl", ".pickle") for p in ck.iterdir())  # our files are JSON/safetensors
