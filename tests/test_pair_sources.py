"""Stage-1 text-pair sources (E5/Echo): each source's own instruction, one source per global batch,
mixed by size unless weighted."""
from __future__ import annotations

import collections
import json

import pytest

from llm2clip.config import ConfigError, load_config
from llm2clip.data.pairs import PairStream
from llm2clip.schema import Stage1Config
from tests.helpers import caption_sample, write_shard


def _jsonl(path, n, tag):
    path.write_text("".join(json.dumps({"query": f"{tag} q{i}", "positive": f"{tag} p{i}", "negative": f"{tag} n{i}"})
                            + "\n" for i in range(n)))
    return str(path)


def _cfg(tmp_path, *extra):
    big, small = _jsonl(tmp_path / "big.jsonl", 300, "big"), _jsonl(tmp_path / "small.jsonl", 100, "small")
    return load_config(Stage1Config, None, [
        "text.model_path=x",
        f"data.sources=[{{kind: jsonl, path: '{big}', instruction: 'Retrieve a passage: '}}, "
        f"{{kind: jsonl, path: '{small}', instruction: 'Retrieve a duplicate question: '}}]", *extra])


def test_each_batch_one_source_its_instruction_mixed_by_size(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.data.single_source_batches
    streams = [PairStream(cfg.data, 4, 0, rank, 2) for rank in range(2)]
    counts = collections.Counter()
    for _ in range(400):
        batches = [s.next_batch()[0] for s in streams]
        tags = {e.query.split()[0] for b in batches for e in b}
        assert len(tags) == 1  # one source for the whole global batch (both ranks)
        tag = tags.pop()
        instr = {e.instruction for b in batches for e in b}
        assert instr == {"Retrieve a passage: " if tag == "big" else "Retrieve a duplicate question: "}
        counts[tag] += 1
    assert 0.68 < counts["big"] / 400 < 0.82  # by size: 300 : 100 -> 75%


def test_weights_override_size_and_must_be_positive(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.data.sources[0].weight, cfg.data.sources[1].weight = 1.0, 3.0
    s = PairStream(cfg.data, 2, 0, 0, 1)
    assert s.weights == [1.0, 3.0]
    with pytest.raises(ConfigError, match="weight"):
        _cfg(tmp_path, "data.sources.0.weight=0")


def test_mixing_by_size_needs_counts_and_says_so(tmp_path):
    """A shard source without _stats.json / sizes.json cannot be mixed by size: the error names the
    source and asks for a weight (instead of silently weighting it 1 against thousands of pairs)."""
    write_shard(tmp_path / "img.tar", [caption_sample(i) for i in range(8)])
    big = _jsonl(tmp_path / "big.jsonl", 30, "big")
    cfg = load_config(Stage1Config, None, [
        "text.model_path=x",
        f"data.sources=[{{kind: shards, path: '{tmp_path / 'img.tar'}', fields: [txt, 'json:dense']}}, "
        f"{{kind: jsonl, path: '{big}'}}]"])
    with pytest.raises(ValueError, match=r"data.sources\[0\].*img.tar.*weight"):
        PairStream(cfg.data, 2, 0, 0, 1)
