"""Bad input in the data paths: skipped and counted (never fatal) or a clear error naming file/line/sample."""
import io
import json
import logging

import pytest
from PIL import Image

from llm2clip.data.pairs import JsonlPairSource, PairStream, ShardPairSource
from llm2clip.data.shards import expand_shards, iter_tar_samples
from llm2clip.schema import PairSourceConfig, Stage1DataConfig
from tests.helpers import caption_sample, write_shard


def _jpg(color=(200, 30, 30)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(b, "JPEG")
    return b.getvalue()


def test_missing_and_empty_caption_fields_are_skipped_and_counted(tmp_path, caplog):
    samples = [caption_sample(i) for i in range(6)]
    samples[2] = ("s0002", {"txt": "only a txt caption"})  # no .json at all
    samples[4] = caption_sample(4, dense="   ", txt="")  # empty captions: dense and txt blank
    write_shard(tmp_path / "a.tar", samples)
    cfg = PairSourceConfig(path=str(tmp_path / "a.tar"), fields=["txt", "json:dense"])
    src = ShardPairSource(cfg, seed=0, rank=0, world=1, name="src0")
    with caplog.at_level(logging.WARNING, logger="llm2clip"):
        got = [src.next() for _ in range(4)]
    assert src.skipped == 2
    assert "s0002" in caplog.text and "s0004" in caplog.text and "a.tar" in caplog.text
    assert all(e.query and e.positive and e.negative for e in got)
    assert all({e.query, e.positive} <= {f"caption {i}" for i in range(6)} | {"a dense caption"} for e in got)


def test_pair_stream_is_deterministic_and_resumable(tmp_path):
    for s in range(3):
        write_shard(tmp_path / f"{s}.tar", [caption_sample(100 * s + i) for i in range(7)])
    cfg = Stage1DataConfig(sources=[PairSourceConfig(path=str(tmp_path / "*.tar"), fields=["txt", "json:short_alt"])])
    a = PairStream(cfg, 4, seed=1, rank=0, world=1)
    ref = [a.next_batch() for _ in range(12)]  # crosses shard and epoch boundaries (21 samples)
    b = PairStream(cfg, 4, seed=1, rank=0, world=1)
    for _ in range(5):
        b.next_batch()
    c = PairStream(cfg, 4, seed=1, rank=0, world=1)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))  # through JSON, as in a checkpoint
    assert [c.next_batch() for _ in range(7)] == ref[5:]
    assert PairStream(cfg, 4, seed=2, rank=0, world=1).next_batch() != ref[0]


def test_ranks_read_disjoint_samples(tmp_path):
    for s in range(4):
        write_shard(tmp_path / f"{s}.tar", [caption_sample(100 * s + i) for i in range(5)])
    cfg = PairSourceConfig(path=str(tmp_path / "*.tar"), fields=["txt", "json:short_alt"])
    seen = []
    for rank in range(2):
        src = ShardPairSource(cfg, 0, rank, 2, "src0")
        seen.append({e.query if e.query.startswith("caption") else e.positive for e in (src.next() for _ in range(10))})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20


def test_jsonl_malformed_line_is_named(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"query": "a", "positive": "b"}\n{"query": "c", "positive": "d"}\n{"query": "e"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: malformed pair line"):
        JsonlPairSource(PairSourceConfig(kind="jsonl", path=str(p)), 0, 0, 1, "j")
    p.write_text('{"query": "a", "positive": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2"):
        JsonlPairSource(PairSourceConfig(kind="jsonl", path=str(p)), 0, 0, 1, "j")


def test_single_source_batches_mix_by_weight(tmp_path):
    write_shard(tmp_path / "img.tar", [caption_sample(i) for i in range(8)])
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(8)))
    # weights given: this shard has no _stats.json, so mixing by size (the default) would be refused
    cfg = Stage1DataConfig(sources=[PairSourceConfig(path=str(tmp_path / "img.tar"), fields=["txt", "json:dense"],
                                                     weight=1.0),
                                    PairSourceConfig(kind="jsonl", path=str(p), weight=1.0)])
    stream = PairStream(cfg, 4, seed=0, rank=0, world=1)
    kinds = []
    for _ in range(40):
        batch, use_neg = stream.next_batch()
        from_jsonl = [e.query.startswith("q") for e in batch]
        assert len(set(from_jsonl)) == 1  # one source per batch
        assert use_neg == (not from_jsonl[0])  # the JSONL pairs have no negatives
        kinds.append(from_jsonl[0])
    assert 10 < sum(kinds) < 30


@pytest.mark.parametrize("cut", ["block", "mid-member"])
def test_truncated_tar_ends_the_shard_with_a_named_warning(tmp_path, caplog, cut):
    """tarfile alone ends a cut-off archive silently (losing the tail without a word); we warn."""
    write_shard(tmp_path / "t.tar", [caption_sample(i) for i in range(20)])
    data = (tmp_path / "t.tar").read_bytes()
    n = len(data) // 2 // 512 * 512 if cut == "block" else len(data) // 2 + 100
    (tmp_path / "t.tar").write_bytes(data[:n])
    with caplog.at_level(logging.WARNING, logger="llm2clip"):
        got = list(iter_tar_samples(str(tmp_path / "t.tar")))
    assert 0 < len(got) < 20
    assert "t.tar" in caplog.text and "read error" in caplog.text
    full = tmp_path / "full.tar"
    write_shard(full, [caption_sample(i) for i in range(20)])
    assert len(list(iter_tar_samples(str(full)))) == 20  # an intact tar reads whole, silently


def test_shard_spec_errors_name_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no shard matches '.*nothing-\{0\.\.3\}\.tar'"):
        expand_shards(str(tmp_path / "nothing-{0..3}.tar"))
    write_shard(tmp_path / "x-1.tar", [caption_sample(0)])
    write_shard(tmp_path / "y-1.tar", [caption_sample(1)])
    assert len(expand_shards(f"{tmp_path}/x-{{1..1}}.tar::{tmp_path}/y-*.tar")) == 2
