"""Fault handling: counters from every rank, preflight before any model loads, non-finite steps named
and skippable, one job per run directory, metrics rows after a resume."""
import json
import shutil
import tarfile

import pytest

from tests.helpers import ROOT, read_metrics, torchrun
from tests.test_stage2 import TRAIN as TRAIN2, embedded, stage2_args  # noqa: F401 - fixture reused


def _corrupt_jpgs(tar_path, n_bad):
    """Overwrite the first n_bad JPEGs of a shard with zeros (same size: the sidecar still matches)."""
    with tarfile.open(tar_path) as tf:
        victims = [m for m in tf.getmembers() if m.name.endswith(".jpg")][:n_bad]
    with open(tar_path, "r+b") as fh:
        for m in victims:
            fh.seek(m.offset_data)
            fh.write(b"\x00" * m.size)


@pytest.mark.slow
def test_data_counters_sum_over_ranks(tiny_world, embedded, tmp_path):  # noqa: F811
    """2 ranks, one shard each (num_workers=0: one stream per rank); rank 0's shard has 2 corrupt images,
    rank 1's has 3. metrics.jsonl, data_stats.json and TensorBoard say 5; the rank files say 2 and 3."""
    w = tiny_world
    for sub in ("data/train", "emb/train"):
        (tmp_path / sub).mkdir(parents=True)
    for i, n_bad in ((0, 2), (1, 3)):
        name = f"shard-{i:06d}"
        shutil.copy(w["data"] / f"train/{name}.tar", tmp_path / f"data/train/{name}.tar")
        for f in (f"{name}.tar", f"{name}.manifest.json"):
            shutil.copy(embedded / "train" / f, tmp_path / "emb/train" / f)
        _corrupt_jpgs(tmp_path / f"data/train/{name}.tar", n_bad)
    out = tmp_path / "run"
    args = stage2_args(w, tmp_path / "emb", out, "--set", f"data.shards={tmp_path}/data/train/shard-*.tar",
                       "--set", f"data.sidecar.image_root={tmp_path}/data", "--set", "data.val_shards=",
                       "--set", "data.num_workers=0", "--set", "train.micro_batch_size=16",
                       "--set", "train.max_steps=3", "--set", "train.eval_every=0", "--set", "train.save_every=3")
    torchrun(TRAIN2, args, timeout=300)
    rows = [r for r in read_metrics(out) if "train/loss" in r]
    assert rows[-1]["data/corrupt_images"] == 5, rows[-1]
    assert json.loads((out / "export/data_stats.json").read_text())["data/corrupt_images"] == 5
    ck = out / "checkpoints/step_00000003"
    per_rank = [json.loads((ck / f"rank{r:05d}.json").read_text())["data"]["workers"]["0"]["stats"]["corrupt_images"]
                for r in (0, 1)]
    assert per_rank == [2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert ea.Scalars("data/corrupt_images")[-1].value == 5
