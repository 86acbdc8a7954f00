"""Remote shards (http over a loopback server, pipe:): the same samples as local files, transient
failures retried and resumed, a shard that keeps failing or is cut short skipped, counted and named;
URL specs, sizes and sidecar naming."""
import logging
import re
import shutil
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest

from llm2clip.data import sidecar as S
from llm2clip.data.io import open_shard
from llm2clip.data.shards import ReadStats, expand_shards, iter_tar_samples, shard_size
from llm2clip.data.stage2_stream import Stage2Stream, make_loader
from tests.http_fixture import LoopbackServer
from tests.test_data_streams import add_sidecars, cfg_for


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """2 train shards x 20 samples with sidecars, plus `gone.tar` (sidecar, no image shard: 404) and
    `cut.tar` (the first 7 samples of shard 0 without the end-of-archive marker), served over HTTP."""
    from llm2clip.data.synthetic import generate
    root = tmp_path_factory.mktemp("remote")
    generate(root / "data", n_train=40, n_val=0, seed=0, image_size=32, shard_size=20, cls_per_class=0)
    train = root / "data" / "train"
    for name in ("gone.tar", "cut.tar"):
        shutil.copy(train / "shard-000000.tar", train / name)
    add_sidecars(sorted(train.glob("*.tar")), root / "emb", width=16)  # both with 20 samples in the manifest
    (train / "gone.tar").unlink()
    with tarfile.open(train / "cut.tar") as tf:
        end = tf.getmembers()[7 * 3 - 1]  # 3 members per sample (jpg, txt, json): cut after the 7th sample
    data = (train / "cut.tar").read_bytes()
    (train / "cut.tar").write_bytes(data[: end.offset_data + -(-end.size // 512) * 512])
    with LoopbackServer(root) as srv:
        yield SimpleNamespace(root=root, train=train, url=srv.url, srv=srv)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setenv("LLM2CLIP_SHARD_BACKOFF", "0.01")
    monkeypatch.setenv("LLM2CLIP_SHARD_RETRIES", "3")


def samples(spec, stats=None):
    return [{k: v for k, v in s.items() if k != "__shard__"} for s in iter_tar_samples(spec, stats)]


def test_http_and_pipe_give_the_local_samples(served):
    local = str(served.train / "shard-000000.tar")
    ref = samples(local)
    assert len(ref) == 20
    for spec in (f"{served.url}/data/train/shard-000000.tar", f"pipe:cat {local}"):
        rs = ReadStats()
        assert samples(spec, rs) == ref, spec
        assert rs.bytes_read == (served.train / "shard-000000.tar").stat().st_size and not rs.read_errors
    # URLs are brace-expanded, never globbed or checked for existence; local specs as before
    assert expand_shards(f"{served.url}/data/train/shard-{{000000..000001}}.tar::{served.url}/x/*.tar") == [
        f"{served.url}/data/train/shard-000000.tar", f"{served.url}/data/train/shard-000001.tar", f"{served.url}/x/*.tar"]
    assert shard_size(f"{served.url}/data/train/shard-000001.tar") == 20  # the folder's sizes.json, over HTTP
    assert shard_size(f"{served.url}/nowhere/shard-000001.tar") is None


def test_cut_connections_are_retried_and_resumed(served, caplog):
    path = "/data/train/shard-000001.tar"
    served.srv.cut[path] = 2
    before = served.srv.requests[path]
    rs = ReadStats()
    with caplog.at_level(logging.WARNING, logger="llm2clip"):
        got = samples(served.url + path, rs)
    assert got == samples(str(served.train / "shard-000001.tar")) and not rs.read_errors
    assert served.srv.requests[path] - before == 3
    assert len(re.findall(r"retry \d/3 in", caplog.text)) == 2 and "shard-000001.tar: read failed at byte" in caplog.text
    f = open_shard(served.url + path)  # without retries a cut connection is an error, not a short file
    f.retries = 0
    served.srv.cut[path] = 1
    with pytest.raises(OSError, match="giving up after 1 attempts"):
        f.read()


def test_stage2_stream_over_http_equals_local_and_skips_bad_remote_shards(served, caplog):
    def keys_and_batches(spec, emb=served.root / "emb"):
        cfg = cfg_for(spec, emb, "data.original_fields=[txt]", "data.dense_fields=[dense]",
                      "data.shuffle_buffer=1")
        ds = Stage2Stream(cfg.data, 5, 0, 0, 1, 32, (0.5,) * 3, (0.5,) * 3, False)
        return [b for _, b in zip(range(8), make_loader(ds, 0))]

    local = keys_and_batches(f"{served.train}/shard-{{000000..000001}}.tar")
    remote = keys_and_batches(f"{served.url}/data/train/shard-{{000000..000001}}.tar")
    both = keys_and_batches(f"{served.url}/data/train/shard-{{000000..000001}}.tar", f"{served.url}/emb")  # sidecars too
    for other in (remote, both):
        assert [b["keys"] for b in other] == [b["keys"] for b in local]
        for a, b in zip(local, other):
            assert np.array_equal(a["pixels"].numpy(), b["pixels"].numpy())
            assert np.array_equal(a["emb"].numpy(), b["emb"].numpy())
    # the start-up check of sidecars in object storage reads their manifests through the same opener
    scan = S.scan_sidecars([f"{served.url}/data/train/shard-000001.tar"],
                           SimpleNamespace(out_dir=f"{served.url}/emb", image_root="", suffix=""), "fp0", ["txt"])
    assert not scan.missing and not scan.invalid and list(scan.manifests.values())[0]["image_samples"] == 20
    # a shard that 404s forever and one cut short at a member boundary: skipped, counted, named; the run goes on
    with caplog.at_level(logging.WARNING, logger="llm2clip"):
        bad = keys_and_batches(f"{served.url}/data/train/{{gone,cut,shard-000001}}.tar")
    keys = [k for b in bad for k in b["keys"]]
    good = {k for b in local for k in b["keys"] if k >= "train_000000020"}
    assert good <= set(keys) and not {k for k in keys if k < "train_000000020"} - {f"train_{i:09d}" for i in range(7)}
    assert f"{served.url}/data/train/gone.tar" in caplog.text and f"{served.url}/data/train/cut.tar" in caplog.text
    assert "end-of-archive" in caplog.text
    assert bad[-1]["_stats"]["read_errors"] >= 2, bad[-1]["_stats"]


def test_sidecar_paths_for_remote_image_shards(tmp_path):
    cfg = SimpleNamespace(out_dir=str(tmp_path / "emb"), image_root="s3://bkt/cc3m", suffix="")
    assert S.sidecar_path_for("s3://bkt/cc3m/train/00001.tar", cfg) == str(tmp_path / "emb/train/00001.tar")
    assert S.sidecar_path_for("pipe:aws s3 cp s3://bkt/cc3m/train/00002.tar -", cfg) == \
        str(tmp_path / "emb/train/00002.tar")
    flat = SimpleNamespace(out_dir=str(tmp_path / "emb"), image_root="", suffix="_e")
    assert S.sidecar_path_for("https://h/x/00003.tar", flat) == str(tmp_path / "emb/00003_e.tar")
    with pytest.raises(S.SidecarError, match="not under output.image_root"):
        S.sidecar_path_for("s3://other/00001.tar", cfg)
    with pytest.raises(S.SidecarError, match="set output.out_dir"):
        S.sidecar_path_for("https://h/x/00003.tar", SimpleNamespace(out_dir="", image_root="", suffix="_e"))
    with pytest.raises(S.SidecarError, match="local or mounted"):
        S.write_sidecar("s3://bkt/emb/00001.tar", [], ["txt"], 4, "float16", "fp")
    # sidecars may be read from a URL (a copy in object storage): manifest and index through the opener
    url_cfg = SimpleNamespace(out_dir="https://h/emb", image_root="s3://bkt/cc3m", suffix="")
    assert S.sidecar_path_for("s3://bkt/cc3m/train/00001.tar", url_cfg) == "https://h/emb/train/00001.tar"
    assert S.manifest_path("https://h/emb/train/00001.tar") == "https://h/emb/train/00001.manifest.json"
