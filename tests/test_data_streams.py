"""Data streams: each sample read once per epoch over ranks x workers, the block shuffle, exact resume,
topology changes, empty and 1-sample shards, skipped keys named per reason."""
import io
import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llm2clip.config import load_config
from llm2clip.data.sidecar import write_sidecar
from llm2clip.data.shards import iter_tar_samples
from llm2clip.data.stage2_stream import Stage2Stream, make_loader
from llm2clip.data.streams import (EmptyStreamError, ShuffledReader, TopologyError, Unit, assign_units,
                                   check_streams, check_topology)
from llm2clip.schema_stage2 import Stage2Config
from tests.helpers import write_shard

FIELDS = ["txt", "short_alt", "dense", "dense_alt"]


def add_sidecars(shards, emb_dir, width=64, seed=0):
    rng = np.random.default_rng(seed)
    for sh in shards:
        samples = [(s["__key__"], {f: rng.standard_normal(width).astype(np.float16) for f in FIELDS})
                   for s in iter_tar_samples(str(sh), want={"txt"})]
        write_sidecar(Path(emb_dir) / Path(sh).name, samples, FIELDS, width, "float16", "fp0")


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """2 shards x 200 samples of 224 px JPEGs with 1024-wide fp16 sidecars (real data's proportions of
    member data to 512-byte tar headers; see docs/PERFORMANCE.md for the tiny-shard figure)."""
    from llm2clip.data.synthetic import generate
    root = tmp_path_factory.mktemp("realistic")
    generate(root / "data", n_train=400, n_val=4, seed=0, image_size=224, shard_size=200, cls_per_class=1)
    shards = sorted((root / "data/train").glob("shard-*.tar"))
    add_sidecars(shards, root / "emb", width=1024)
    return root, shards


def cfg_for(shards_spec, emb, *extra):
    return load_config(Stage2Config, None, [f"data.shards={shards_spec}", f"data.sidecar.out_dir={emb}",
                                            "vision.path=x", "data.original_fields=[txt, 'json:short_alt']",
                                            *extra])


def stream(cfg, mb, rank=0, world=1, start=None):
    return Stage2Stream(cfg.data, mb, 0, rank, world, 32, (0.5,) * 3, (0.5,) * 3, False, start)


def test_each_sample_read_once_over_ranks_and_workers(realistic):
    """2 shards, 2 ranks x 4 workers (8 streams, 4 per shard), one epoch: every sample read exactly once,
    and the bytes read stay within 1.1x the dataset's bytes (image shards + sidecars)."""
    root, shards = realistic
    cfg = cfg_for(f"{root}/data/train/shard-*.tar", root / "emb")
    total = sum(os.path.getsize(p) for p in shards) + sum(os.path.getsize(p) for p in (root / "emb").glob("*.tar"))
    samples = bytes_read = 0
    keys = Counter()
    for rank in range(2):
        it = iter(make_loader(stream(cfg, 50, rank, 2), 4))
        for _ in range(4):  # each stream owns 400 / 8 = 50 samples: one batch is its epoch
            b = next(it)
            samples += b["_stats"]["samples_read"]
            bytes_read += b["_stats"]["bytes_read"]
            keys.update(b["keys"])
        del it
    assert samples == 400, samples
    assert len(keys) == 400 and set(keys.values()) == {1}
    assert bytes_read <= 1.1 * total, (bytes_read, total)


def test_unit_assignment_covers_every_sample_once():
    shards = [f"s{i}" for i in range(3)]
    for sizes, S in (([10, 7, 0], 5), ([10, 7, 3], 3), ([10, 7, 3], 2), ([1, 1, 1], 2)):
        owned = Counter()
        for s in range(S):
            for u in assign_units(shards, sizes, S, s):
                owned.update((u.shard, i) for i in range(u.lo, u.hi))
        assert sorted(owned) == sorted((sh, i) for sh, n in zip(shards, sizes) for i in range(n))
        assert set(owned.values()) == {1}
    # no count: the streams sharing the shard each keep every k-th sample
    assert assign_units(["a"], [None], 3, 2) == [Unit("a", 0, None, 3, 2)]


def _fake_read(sizes):
    def read(unit, start, stats):
        n = sizes[unit.shard]
        stats["samples_read"] = stats.get("samples_read", 0)
        for i in range(max(start, unit.lo), n if unit.hi is None else unit.hi):
            stats["samples_read"] += 1
            yield i, (unit.shard, i)
    return read


def test_block_shuffle_mixes_shards_and_resumes_exactly_mid_block():
    sizes = {f"s{i}": 40 for i in range(6)}
    units = [Unit(s, 0, n) for s, n in sizes.items()]

    def take(buffer, n, state=None):
        r = ShuffledReader(units, _fake_read(sizes), 0, "t", buffer, state)
        it = iter(r)
        out = [next(it) for _ in range(n)]
        return out, r.state(), dict(r.stats)

    ref, _, _ = take(50, 500)  # crosses blocks and an epoch (240 samples)
    assert sorted(ref[:240]) == sorted((s, i) for s in sizes for i in range(40))  # an epoch is a permutation
    mixed = sum(a[0] != b[0] for a, b in zip(ref, ref[1:])) / (len(ref) - 1)
    plain, _, _ = take(1, 500)
    unmixed = sum(a[0] != b[0] for a, b in zip(plain, plain[1:])) / (len(plain) - 1)
    assert mixed > 0.6 and unmixed < 0.05, (mixed, unmixed)
    for cut in (1, 77, 240, 263):  # mid-block, block edge, epoch edge
        head, st, stats = take(50, cut)
        st = json.loads(json.dumps(st))  # through JSON, as in a checkpoint
        r = ShuffledReader(units, _fake_read(sizes), 0, "t", 50, st)
        it = iter(r)
        assert head + [next(it) for _ in range(500 - cut)] == ref
        full = ShuffledReader(units, _fake_read(sizes), 0, "t", 50)
        fit = iter(full)
        for _ in range(500):
            next(fit)
        assert r.stats == full.stats  # read counters continue exactly too


def test_shuffle_buffer_mixes_shards_within_stage2_batches(tiny_world, tmp_path):
    """One stream over 4 shards: adjacent samples of a batch come from different shards far more often
    with the buffer than without it."""
    shards = sorted((tiny_world["data"] / "train").glob("shard-*.tar"))
    add_sidecars(shards, tmp_path / "emb")

    def adjacent_diff(buffer):
        cfg = cfg_for(f"{tiny_world['data']}/train/shard-*.tar", tmp_path / "emb", f"data.shuffle_buffer={buffer}")
        keys = [k for _, b in zip(range(4), make_loader(stream(cfg, 50), 0)) for k in b["keys"]]
        shard_of = [int(k.split("_")[1]) // 200 for k in keys]
        return sum(a != b for a, b in zip(shard_of, shard_of[1:])) / (len(keys) - 1)

    on, off = adjacent_diff(400), adjacent_diff(1)
    assert on > 0.6 and off < 0.05, (on, off)


def test_topology_change_is_refused_or_reset():
    saved = {"workers": {"0": {}}, "batches": 4, "topology": [2, 2]}
    assert check_topology(saved, 2, 2, False) is saved
    with pytest.raises(TopologyError, match=r"2 ranks x 2 loader workers.*1 ranks x 3 workers.*reset_data_position"):
        check_topology(saved, 1, 3, False)
    assert check_topology(saved, 1, 3, True) is None
    assert check_topology(None, 1, 3, False) is None


def _img(seed):
    from PIL import Image
    b = io.BytesIO()
    Image.new("RGB", (40, 40), (seed * 40 % 255, 90, 30)).save(b, "JPEG")
    return b.getvalue()


def _img2dataset_shard(path, n, start=0):
    """A shard as img2dataset writes it, with its _stats.json (successes: n)."""
    write_shard(path, [(f"{start + i:09d}", {"jpg": _img(i), "txt": f"a caption {start + i}",
                                            "json": json.dumps({"short_alt": f"alt {start + i}",
                                                                "dense": f"dense {start + i}"})})
                      for i in range(n)])
    Path(str(path)[:-4] + "_stats.json").write_text(json.dumps({"successes": n, "count": max(n, 3)}))


def test_empty_shards_are_skipped_and_a_stream_without_data_fails(tmp_path, caplog):
    """img2dataset's edges: an empty shard (successes: 0) is never read as a stream's only shard; a stream
    with no data at all is an error naming its shards, before training (counts) or at run time (none)."""
    d = tmp_path / "d"
    d.mkdir()
    _img2dataset_shard(d / "00000.tar", 5)
    _img2dataset_shard(d / "00001.tar", 0)
    _img2dataset_shard(d / "00002.tar", 4, 100)
    add_sidecars(sorted(d.glob("*.tar")), tmp_path / "emb")
    cfg = cfg_for(f"{d}/*.tar", tmp_path / "emb", "data.original_fields=[txt]")
    ds = Stage2Stream(cfg.data, 4, 0, 0, 1, 32, (0.5,) * 3, (0.5,) * 3, False)  # 3 shards, 2 workers
    keys = [k for _, b in zip(range(6), make_loader(ds, 2)) for k in b["keys"]]  # the empty shard gets no stream
    assert set(keys) == {f"{i:09d}" for i in range(5)} | {f"{100 + i:09d}" for i in range(4)}
    with pytest.raises(EmptyStreamError, match="00001.tar"):
        check_streams([[str(d / "00001.tar")]], [[0]], 2)
    # no counts at all: found at run time, with the shard named, instead of looping forever
    os.remove(d / "00001_stats.json")
    units = [Unit(str(d / "00001.tar"))]
    from llm2clip.data.pairs import ShardPairSource
    from llm2clip.schema import PairSourceConfig
    src = ShardPairSource(PairSourceConfig(path=str(d / "00001.tar"), fields=["txt", "json:short_alt"]), 0, 0, 1, "x")
    assert src.units == units
    with caplog.at_level(logging.WARNING, logger="llm2clip"), pytest.raises(EmptyStreamError, match="00001.tar"):
        src.next()
    assert "00001.tar: no usable sample" in caplog.text


@pytest.mark.parametrize("negatives", [True, False])
def test_one_sample_shard_in_stage1(tmp_path, negatives):
    from llm2clip.data.pairs import PairStream
    from llm2clip.schema import PairSourceConfig, Stage1DataConfig
    _img2dataset_shard(tmp_path / "00000.tar", 6)
    _img2dataset_shard(tmp_path / "00001.tar", 1, 100)
    cfg = Stage1DataConfig(sources=[PairSourceConfig(path=str(tmp_path / "*.tar"), fields=["txt", "json:short_alt"])],
                           hard_negatives=negatives)
    ps = PairStream(cfg, 4, seed=0, rank=0, world=1)
    batches = [ps.next_batch() for _ in range(5)]  # 20 examples over 7 samples: epochs roll over
    texts = [e.query + e.positive for b, _ in batches for e in b]
    assert any("100" in t for t in texts)
    for b, use_neg in batches:
        assert use_neg == negatives
        for e in b:
            assert (e.negative is not None) == negatives
            if negatives:  # the negative is another sample's caption
                assert e.negative not in (e.query, e.positive)
    # the lone sample of its own rank's data: a clear error with negatives, fine without
    only = Stage1DataConfig(sources=[PairSourceConfig(path=str(tmp_path / "00001.tar"), fields=["txt", "json:short_alt"])],
                            hard_negatives=negatives)
    ps = PairStream(only, 2, seed=0, rank=0, world=1)
    if negatives:
        with pytest.raises(ValueError, match="only usable caption sample.*hard_negatives=false"):
            ps.next_batch()
    else:
        assert len(ps.next_batch()[0]) == 2


def test_skipped_keys_named_per_reason_and_only_chosen_embedding_decoded(tmp_path, caplog, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    _img2dataset_shard(d / "00000.tar", 8)
    add_sidecars([d / "00000.tar"], tmp_path / "emb")
    with tarfile.open(d / "00000.tar") as tf:
        victim = [m for m in tf.getmembers() if m.name.endswith(".jpg")][2]
    with open(d / "00000.tar", "r+b") as fh:
        fh.seek(victim.offset_data)
        fh.write(b"\0" * victim.size)
    import llm2clip.data.stage2_stream as S2
    calls = []
    real = S2.decode_npy
    monkeypatch.setattr(S2, "decode_npy", lambda b, *a, **k: calls.append(1) or real(b, *a, **k))
    cfg = cfg_for(f"{d}/*.tar", tmp_path / "emb", "data.original_fields=[txt]")
    with caplog.at_level(logging.WARNING, logger="llm2clip"):
        b = next(iter(make_loader(stream(cfg, 7), 0)))
    assert f"{d / '00000.tar'}: image of sample '000000002' does not decode" in caplog.text
    assert "BytesIO" not in caplog.text
    assert b["_stats"]["corrupt_images"] == 1 and b["_stats"]["samples_read"] == 8
    assert len(calls) == 8  # one embedding per drawn sample, not one per field


@pytest.mark.slow
def test_resume_with_other_worker_count_is_refused_then_reset(tiny_world, tmp_path):
    """A stage-2 checkpoint written with 2 loader workers: resuming with 1 stops before training with both
    topologies named; run.reset_data_position=true resumes the model with a fresh data position."""
    import sys
    from tests.helpers import ROOT, read_metrics, run_cmd
    w = tiny_world
    add_sidecars(sorted((w["data"] / "train").glob("shard-*.tar")), tmp_path / "emb")
    out = tmp_path / "run"

    def train(*extra, check=True):
        return run_cmd([sys.executable, str(ROOT / "tools/train_stage2.py"),
                        "--set", f"run.output_dir={out}", "--set", f"vision.path={w['clip']}",
                        "--set", "model.embed_dim=32", "--set", "model.adapter_blocks=1",
                        "--set", f"data.shards={w['data']}/train/shard-*.tar", "--set", f"data.sidecar.out_dir={tmp_path}/emb",
                        "--set", "data.original_fields=[txt, 'json:short_alt']", "--set", "data.val_shards=",
                        "--set", "train.deepspeed_config=" + str(ROOT / "ds_configs/zero1_bf16.json"),
                        "--set", "train.micro_batch_size=8",
                        "--set", "train.eval_every=0", "--set", "train.save_every=2", "--set", "run.progress_bar=false",
                        "--set", "run.tensorboard=false", "--set", "run.log_every=1", *extra], timeout=300, check=check)

    train("--set", "train.max_steps=4", "--set", "train.stop_after=2", "--set", "data.num_workers=2")
    p = train("--set", "train.max_steps=4", "--set", "data.num_workers=1", check=False)
    assert p.returncode != 0
    assert "1 ranks x 2 loader workers" in p.stderr and "1 ranks x 1 workers" in p.stderr, p.stderr[-3000:]
    assert "run.reset_data_position=true" in p.stderr
    train("--set", "train.max_steps=4", "--set", "data.num_workers=1", "--set", "run.reset_data_position=true")
    steps = sorted({m["step"] for m in read_metrics(out) if "train/loss" in m})
    assert steps == [1, 2, 3, 4]


def test_stage1_rank_without_samples_fails_at_construction_naming_the_shard(tmp_path):
    from llm2clip.data.pairs import PairStream
    from llm2clip.schema import PairSourceConfig, Stage1DataConfig
    _img2dataset_shard(tmp_path / "00000.tar", 0)
    cfg = Stage1DataConfig(sources=[PairSourceConfig(path=str(tmp_path / "*.tar"), fields=["txt", "json:short_alt"])])
    with pytest.raises(EmptyStreamError, match="00000.tar"):
        PairStream(cfg, 2, seed=0, rank=0, world=1)


def test_unreadable_shard_is_a_named_read_error(tmp_path, caplog):
    from llm2clip.data.shards import ReadStats
    rs = ReadStats()
    with caplog.at_level(logging.WARNING, logger="llm2clip"):
        assert list(iter_tar_samples(str(tmp_path / "gone.tar"), rs)) == []
    assert len(rs.read_errors) == 1 and "gone.tar" in caplog.text
