"""Sidecar format and the stage-2 reader: naming, atomic writing + manifest validation, the streaming
merge-join (corrupt image, missing embedding, corrupt member, truncated shards), fingerprint refusal."""
from __future__ import annotations

import io
import hashlib
import json
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llm2clip.config import ConfigError, load_config
from llm2clip.data import sidecar as S
from llm2clip.schema_embed import EmbedConfig, field_name

W, FP, FP2 = 8, "a" * 64, "b" * 64
JPEG_LIKE = b"\xff\xd8\xff\xe0 not really a jpeg"


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def make_image_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                _member(tf, f"{key}.{ext}", data)
    return path


def vec(i: int, field: str = "txt") -> np.ndarray:
    return (np.arange(W, dtype=np.float32) * 0.01 + i + (0.5 if field == "dense" else 0.0)).astype(np.float16)


def make_sidecar(path: Path, keys: list[str], fields=("txt", "dense"), skip: dict | None = None, fp: str = FP) -> dict:
    """Sidecar for `keys`; skip = {key: [fields without an embedding]}."""
    skip = skip or {}
    samples = [(k, {f: vec(i, f) for f in fields if f not in skip.get(k, [])}) for i, k in enumerate(keys)]
    return S.write_sidecar(path, samples, list(fields), W, "float16", fp, {"image_shard": "x"})


def keys_n(n: int, prefix: str = "s") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def imgs(keys: list[str]) -> list[tuple[str, dict[str, bytes]]]:
    return [(k, {"jpg": JPEG_LIKE + k.encode(), "txt": b"a caption"}) for k in keys]


def rewrite_tar(path: Path, edit) -> None:
    """Rebuild a tar, passing each (name, data) through edit() (returns None to drop it)."""
    with tarfile.open(path) as tf:
        items = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for name, data in items:
            out = edit(name, data)
            if out is not None:
                _member(tf, name, out)


def refresh_manifest(sidecar: Path) -> None:
    """Make the manifest match the tar again (to test the reader beyond manifest validation)."""
    m = S.read_manifest(sidecar)
    m["sha256"], m["bytes"] = hashlib.sha256(sidecar.read_bytes()).hexdigest(), sidecar.stat().st_size
    S.manifest_path(sidecar).write_text(json.dumps(m))


# --- naming / config --------------------------------------------------------------------------
def test_sidecar_path_for(tmp_path):
    cfg = SimpleNamespace(out_dir="out", image_root=str(tmp_path / "data"), suffix="")
    img = str(tmp_path / "data" / "cc3m" / "train" / "00001.tar")
    assert S.sidecar_path_for(img, cfg) == "out/cc3m/train/00001.tar"
    assert S.manifest_path("out/cc3m/train/00001.tar").name == "00001.manifest.json"
    assert S.sidecar_path_for(img, SimpleNamespace(out_dir="out", image_root="", suffix="_e")) == "out/00001_e.tar"
    beside = SimpleNamespace(out_dir="", image_root="", suffix="_emb")
    assert S.sidecar_path_for(img, beside) == str(tmp_path / "data" / "cc3m" / "train" / "00001_emb.tar")
    assert S.index_path_for(S.sidecar_path_for(img, beside), beside).name == "index_emb.json"
    with pytest.raises(S.SidecarError, match="image_root"):
        S.sidecar_path_for("/elsewhere/x.tar", cfg)


def test_config_validation():
    ok = ["text.model_path=m", "data.shards=x.tar", "output.out_dir=o"]
    cfg = load_config(EmbedConfig, None, ok + ["data.fields=[txt, json:dense_alt, json:Meta.Cap]"])
    assert [field_name(f) for f in cfg.data.fields] == ["txt", "dense_alt", "meta_cap"]
    with pytest.raises(ConfigError, match="both be stored"):
        load_config(EmbedConfig, None, ok + ["data.fields=[txt, json:txt]"])
    with pytest.raises(ConfigError, match="out_dir"):
        load_config(EmbedConfig, None, ["text.model_path=m", "data.shards=x.tar"])
    with pytest.raises(ConfigError, match="not a caption field"):
        load_config(EmbedConfig, None, ok + ["data.fields=[jpg]"])
    with pytest.raises(ConfigError, match="Did you mean 'batch.token_budget'"):
        load_config(EmbedConfig, None, ok + ["batch.token_budgt=5"])


# --- writing / validation ---------------------------------------------------------------------
def test_write_is_deterministic_self_describing_and_validates(tmp_path):
    keys = keys_n(5)
    m1 = make_sidecar(tmp_path / "a" / "x.tar", keys, skip={keys[1]: ["dense"]})
    m2 = make_sidecar(tmp_path / "b" / "x.tar", keys, skip={keys[1]: ["dense"]})
    assert (tmp_path / "a" / "x.tar").read_bytes() == (tmp_path / "b" / "x.tar").read_bytes()
    assert m1 == m2 and m1["count"] == 5 and m1["missing"] == {"txt": [], "dense": [keys[1]]}
    assert m1["keys_sorted"] and m1["width"] == W and m1["dtype"] == "float16" and m1["fingerprint"] == FP
    assert S.validate_sidecar(tmp_path / "a" / "x.tar") is None
    assert not list((tmp_path / "a").glob(".*tmp*")), "temp files left behind"
    with tarfile.open(tmp_path / "a" / "x.tar") as tf:
        names = tf.getnames()
        arr = np.load(io.BytesIO(tf.extractfile(f"{keys[0]}.dense.npy").read()), allow_pickle=False)
    assert names[:3] == [f"{keys[0]}.txt.npy", f"{keys[0]}.dense.npy", f"{keys[1]}.txt.npy"]
    assert arr.dtype == np.float16 and arr.shape == (W,) and np.array_equal(arr, vec(0, "dense"))


def test_truncated_tampered_and_unfinished_are_detected(tmp_path):
    keys = keys_n(20)
    img = make_image_shard(tmp_path / "img" / "x.tar", imgs(keys))
    cfg = SimpleNamespace(out_dir=str(tmp_path / "emb"), image_root="", suffix="")
    sc = Path(S.sidecar_path_for(str(img), cfg))
    make_sidecar(sc, keys)
    assert S.check_sidecars([str(img)], cfg, FP) == ([], [])
    # tampered, same size: only the sha256 notices
    data = bytearray(sc.read_bytes())
    data[2000] ^= 0xFF
    sc.write_bytes(bytes(data))
    assert "sha256" in S.validate_sidecar(sc)
    assert S.validate_sidecar(sc, verify=False) is None
    # the start-up check reads manifests and sizes only; hashing is the explicit --verify
    assert S.check_sidecars([str(img)], cfg, FP) == ([], [])
    missing, invalid = S.check_sidecars([str(img)], cfg, FP, verify=True)
    assert missing == [] and len(invalid) == 1 and "sha256" in invalid[0][1]
    with pytest.raises(S.SidecarError, match="sha256"):
        S.open_sidecar(str(sc), verify=True)
    # truncated: the size check (cheap, done by the reader on open) notices
    sc.write_bytes(bytes(data[:5000]))
    assert "truncated" in S.validate_sidecar(sc, verify=False)
    with pytest.raises(S.SidecarError, match=r"x\.tar.*truncated.*embed_captions"):
        list(S.iter_joined(str(img), str(sc)))
    # unfinished: tar present, no manifest
    make_sidecar(sc, keys)
    S.manifest_path(sc).unlink()
    assert "no valid manifest" in S.validate_sidecar(sc)
    assert S.check_sidecars([str(img)], cfg, FP) == ([str(img)], [])
    # another encoder / a field it lacks
    make_sidecar(sc, keys, fp=FP2)
    _, invalid = S.check_sidecars([str(img)], cfg, FP)
    assert FP2 in invalid[0][1] and FP in invalid[0][1]
    make_sidecar(sc, keys, fp=FP)
    _, invalid = S.check_sidecars([str(img)], cfg, FP, fields=["json:dense_alt"])
    assert "dense_alt" in invalid[0][1]


def test_rewrite_removes_old_manifest_first(tmp_path):
    keys = keys_n(3)
    sc = tmp_path / "x.tar"
    make_sidecar(sc, keys)

    def boom():
        yield keys[0], {"txt": vec(0), "dense": vec(0, "dense")}
        raise KeyboardInterrupt  # killed mid-shard

    with pytest.raises(KeyboardInterrupt):
        S.write_sidecar(sc, boom(), ["txt", "dense"], W, "float16", FP)
    assert not S.manifest_path(sc).exists() and S.validate_sidecar(sc) is not None
    assert not list(tmp_path.glob(".*tmp*"))


# --- the join ---------------------------------------------------------------------------------
def test_join_values_order_and_streaming(tmp_path, monkeypatch):
    keys = keys_n(50)
    img = make_image_shard(tmp_path / "x.tar", imgs(keys))
    sc = tmp_path / "emb" / "x.tar"
    make_sidecar(sc, keys)
    consumed = {"n": 0}
    from llm2clip.data import join as J
    real = J.iter_tar_samples

    def counting(path, *a, **k):
        for s in real(path, *a, **k):
            if str(path) == str(img):
                consumed["n"] += 1
            yield s

    monkeypatch.setattr(J, "iter_tar_samples", counting)
    stats = S.JoinStats()
    it = S.iter_joined(str(img), str(sc), ["txt", "json:dense"], FP, stats)
    first = next(it)
    assert consumed["n"] <= 2, "the join must stream, not buffer the shard"
    rest = list(it)
    out = [first] + rest
    assert [s["__key__"] for s in out] == keys
    assert out[3]["jpg"] == JPEG_LIKE + keys[3].encode()
    assert np.array_equal(out[3]["emb"]["dense"], vec(3, "dense")) and out[3]["emb"]["txt"].dtype == np.float16
    d = stats.as_dict()
    assert d.pop("bytes_read") <= img.stat().st_size + sc.stat().st_size and d.pop("samples_read") == 50
    assert d == {"joined": 50, "image_only": 0, "sidecar_only": 0, "no_image": 0, "missing_field": {},
                 "bad_embedding": 0, "read_errors": 0}


def test_join_corrupt_image_missing_embedding_and_one_sided_keys(tmp_path):
    keys = keys_n(12)
    samples = imgs(keys)
    samples[2] = (keys[2], {"jpg": b"garbage, not an image"})  # corrupt image: passed through for stage 2
    samples[5] = (keys[5], {"txt": b"no image member"})  # image member missing
    del samples[8]  # key 8 on the sidecar side only
    img = make_image_shard(tmp_path / "x.tar", samples)
    sc = tmp_path / "emb" / "x.tar"
    # key 3: no embedding at all (caption missing); key 4: only txt
    make_sidecar(sc, [k for k in keys if k != keys[3]], skip={keys[4]: ["dense"]})
    stats = S.JoinStats()
    out = {s["__key__"]: s for s in S.iter_joined(str(img), str(sc), None, FP, stats)}
    assert out[keys[2]]["jpg"] == b"garbage, not an image"
    assert set(out) == set(keys) - {keys[3], keys[5], keys[8]}
    assert set(out[keys[4]]["emb"]) == {"txt"}
    assert (stats.joined, stats.image_only, stats.sidecar_only, stats.no_image) == (9, 1, 1, 1)
    assert stats.missing_field == {"dense": 1}


def test_join_skips_undecodable_member_and_names_it(tmp_path, caplog):
    keys = keys_n(6)
    img = make_image_shard(tmp_path / "x.tar", imgs(keys))
    sc = tmp_path / "emb" / "x.tar"
    make_sidecar(sc, keys)
    bad = f"{keys[1]}.dense.npy"
    rewrite_tar(sc, lambda n, d: b"\x93NUMPY garbage" if n == bad else
                (S.encode_npy(np.zeros(W + 1, np.float16)) if n == f"{keys[2]}.txt.npy" else d))
    refresh_manifest(sc)
    logger = logging.getLogger("llm2clip")
    logger.addHandler(caplog.handler)
    try:
        stats = S.JoinStats()
        out = {s["__key__"]: s for s in S.iter_joined(str(img), str(sc), ["txt", "dense"], FP, stats)}
    finally:
        logger.removeHandler(caplog.handler)
    assert set(out) == set(keys) and set(out[keys[1]]["emb"]) == {"txt"} and set(out[keys[2]]["emb"]) == {"dense"}
    assert len(stats.bad_embedding) == 2 and stats.bad_embedding[0].endswith(bad)
    assert bad in caplog.text and "shape (9,)" in caplog.text


def test_join_refuses_other_encoder_and_unknown_field(tmp_path):
    keys = keys_n(4)
    img = make_image_shard(tmp_path / "x.tar", imgs(keys))
    sc = tmp_path / "emb" / "x.tar"
    make_sidecar(sc, keys, fp=FP2)
    with pytest.raises(S.SidecarMismatchError) as e:
        next(S.iter_joined(str(img), str(sc), None, expected_fingerprint=FP))
    assert FP in str(e.value) and FP2 in str(e.value) and str(sc) in str(e.value)
    with pytest.raises(S.SidecarMismatchError, match="dense_alt"):
        next(S.iter_joined(str(img), str(sc), ["json:dense_alt"]))
    with pytest.raises(S.SidecarError, match="no valid manifest"):
        next(S.iter_joined(str(img), str(tmp_path / "nope.tar")))


def test_join_unsorted_keys_and_truncated_shards(tmp_path):
    keys = ["k9", "k3", "k7", "k1", "k5", "k2"]  # not sorted: the join relies on the shared order
    img = make_image_shard(tmp_path / "x.tar", imgs(keys))
    sc = tmp_path / "emb" / "x.tar"
    m = make_sidecar(sc, [k for k in keys if k != "k7"])
    assert not m["keys_sorted"]
    stats = S.JoinStats()
    assert [s["__key__"] for s in S.iter_joined(str(img), str(sc), None, FP, stats)] == ["k9", "k3", "k1", "k5", "k2"]
    assert stats.image_only == 1
    # image shard truncated mid-way (tarfile may or may not report it): the rest of the sidecar is counted
    data = (tmp_path / "x.tar").read_bytes()
    (tmp_path / "x.tar").write_bytes(data[: len(data) // 2 + 100])
    stats = S.JoinStats()
    got = [s["__key__"] for s in S.iter_joined(str(img), str(sc), None, FP, stats)]
    assert len(got) < 5 and got == ["k9", "k3", "k1", "k5", "k2"][: len(got)]
    assert stats.sidecar_only == 5 - len(got)


def test_preflight_scan_trusts_only_a_current_index(tmp_path):
    """scan_sidecars (the stage-2 start-up check) takes a folder's index.json in place of the manifests
    only while it is current: a manifest rewritten after it, or a tar of another size, sends that shard
    back to its manifest (and its problem is reported as before)."""
    import os
    cfg = SimpleNamespace(out_dir=str(tmp_path / "emb"), image_root="", suffix="")
    images, manifests = [], []
    for i, n in enumerate((3, 4, 5)):
        img = make_image_shard(tmp_path / "img" / f"{i}.tar", imgs(keys_n(n, f"k{i}_")))
        images.append(str(img))
        manifests.append(make_sidecar(Path(S.sidecar_path_for(str(img), cfg)), keys_n(n, f"k{i}_")))
    S.write_index(tmp_path / "emb" / "index.json", manifests)
    scan = S.scan_sidecars(images, cfg, FP, ["txt"])
    assert scan.from_index == 3 and not scan.missing and not scan.invalid
    assert [scan.manifests[i]["image_samples"] for i in images] == [3, 4, 5]
    assert scan.manifests[images[0]]["fingerprint"] == FP
    # shard 1 re-embedded after the index (another encoder); shard 2's tar replaced by a shorter one
    sc1, sc2 = (Path(S.sidecar_path_for(images[k], cfg)) for k in (1, 2))
    make_sidecar(sc1, keys_n(4, "k1_"), fp=FP2)
    later = os.stat(tmp_path / "emb" / "index.json").st_mtime_ns + 10**9
    os.utime(S.manifest_path(sc1), ns=(later, later))
    sc2.write_bytes(sc2.read_bytes()[:2048])
    scan = S.scan_sidecars(images, cfg, FP, ["txt"])
    assert scan.from_index == 1 and list(scan.manifests) == [images[0]]
    assert [i for i, _ in scan.invalid] == images[1:]
    assert FP2 in scan.invalid[0][1] and "truncated" in scan.invalid[1][1]
    # the index is never used for the full check
    assert S.scan_sidecars(images[:1], cfg, FP, ["txt"], verify=True).from_index == 0


def test_encode_npy_writes_what_numpy_writes():
    """The cached-header encoder (one header per dtype and shape) gives np.save's bytes exactly."""
    import io

    import numpy as np

    from llm2clip.data.sidecar import decode_npy, encode_npy

    for a in (np.random.rand(64).astype(np.float16), np.random.rand(4096).astype(np.float32),
              np.random.rand(3, 4)[:, 1], np.arange(7, dtype=np.int64)):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
        assert encode_npy(a) == buf.getvalue(), a.dtype
        assert np.array_equal(decode_npy(encode_npy(a)), a)
