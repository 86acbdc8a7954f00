"""The synthetic WebDataset generator: determinism, layout, caption truth, eval copies, tokenizer."""

import hashlib
import importlib.util
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llm2clip.data import synthetic as syn

N_TRAIN, N_VAL, SHARD, PER_CLASS = 60, 24, 25, 3
CAPTION_FIELDS = ("caption", "short_alt", "dense", "dense_alt")
PALETTE = {**syn.COLORS, **syn.BACKGROUNDS}


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "a"
    summary = syn.generate(out, n_train=N_TRAIN, n_val=N_VAL, seed=0, shard_size=SHARD, cls_per_class=PER_CLASS)
    return out, summary


def _hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(split_dir: Path) -> dict:
    """{key: {ext: bytes}} over all shards of a split, keys in file order."""
    out = {}
    for tar_path in sorted(split_dir.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _metas(split_dir: Path) -> list:
    return [json.loads(s["json"]) for s in _samples(split_dir).values()]


def _nearest(rgb) -> str:
    return min(PALETTE, key=lambda name: sum((a - b) ** 2 for a, b in zip(PALETTE[name], rgb)))


def _pixel(img: np.ndarray, x: float, y: float):
    """Mean colour of the 3x3 pixels around (x, y) (JPEG makes single pixels noisy)."""
    xi, yi = int(x), int(y)
    return img[yi - 1:yi + 2, xi - 1:xi + 2].reshape(-1, 3).mean(0)


def test_summary_and_counts(data):
    out, summary = data
    assert summary["train"] == {"samples": N_TRAIN, "shards": 3}
    assert summary["val"] == {"samples": N_VAL, "shards": 1}
    assert summary["classification"]["images"] == len(syn.SHAPES) * PER_CLASS
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        sizes = json.loads((out / split / "sizes.json").read_text())
        assert sum(sizes.values()) == n
        for name, count in sizes.items():
            with tarfile.open(out / split / name) as tar:
                members = tar.getmembers()
            assert len(members) == 3 * count
            assert all(m.mtime == 0 for m in members)
            stats = json.loads((out / split / name.replace(".tar", "_stats.json")).read_text())
            assert stats == {"count": count, "successes": count}
    assert not list(out.rglob("*.tmp")), "temporary files left behind"
    assert (out / "README.txt").read_text().startswith("Synthetic LLM2CLIP data")


def test_same_seed_identical_bytes_other_seed_differs(data, tmp_path):
    out, _ = data
    kwargs = dict(n_train=N_TRAIN, n_val=N_VAL, shard_size=SHARD, cls_per_class=PER_CLASS)
    syn.generate(tmp_path / "b", seed=0, **kwargs)
    assert _hashes(tmp_path / "b") == _hashes(out)
    syn.generate(tmp_path / "c", seed=1, **kwargs)
    other = _hashes(tmp_path / "c")
    assert other["train/shard-000000.tar"] != _hashes(out)["train/shard-000000.tar"]
    assert other["tokenizer/tokenizer.json"] == _hashes(out)["tokenizer/tokenizer.json"]  # data-independent


def test_smaller_run_is_a_prefix_and_removes_stale_shards(data, tmp_path):
    out, _ = data
    small = tmp_path / "small"
    syn.generate(small, n_train=N_TRAIN, n_val=4, seed=0, shard_size=SHARD, cls_per_class=1)
    syn.generate(small, n_train=10, n_val=4, seed=0, shard_size=SHARD, cls_per_class=1)
    assert sorted(p.name for p in (small / "train").iterdir()) == [
        "shard-000000.tar", "shard-000000_stats.json", "sizes.json"]
    full, part = _samples(out / "train"), _samples(small / "train")
    assert list(part) == list(full)[:10]
    assert all(part[k] == full[k] for k in part)


def test_sample_fields_and_keys(data):
    out, _ = data
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        samples = _samples(out / split)
        assert list(samples) == [f"{split}_{i:09d}" for i in range(n)]
        for key, s in samples.items():
            assert "." not in key and set(s) == {"jpg", "txt", "json"}
            meta = json.loads(s["json"])
            assert meta["key"] == key and meta["caption"] == s["txt"].decode("utf-8")
            assert {"caption", "short_alt", "dense", "dense_alt", "objects", "background", "width",
                    "height"} <= set(meta)
            assert len({meta[f] for f in CAPTION_FIELDS}) == 4, "the four captions must differ"
            assert 1 <= len(meta["objects"]) <= 3
            img = Image.open(io.BytesIO(s["jpg"]))
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (meta["width"], meta["height"])


def _words(text: str) -> list:
    return re.findall(r"[a-z]+", text.lower())


def test_captions_are_true_of_the_objects(data):
    out, _ = data
    metas = _metas(out / "train") + _metas(out / "val")
    templates_seen = set()
    for m in metas:
        objs, bg = m["objects"], m["background"]
        colors, shapes = {o["color"] for o in objs}, {o["shape"] for o in objs}
        for field in CAPTION_FIELDS:
            words = _words(m[field])
            # every object named by colour and shape; no colour/shape/background that is not there
            for o in objs:
                assert o["color"] in words and o["shape"] in words, (field, m[field], o)
            assert {w for w in words if w in syn.COLORS} == colors, m[field]
            assert {w for w in words if w in syn.SHAPES or w[:-1] in syn.SHAPES or w[:-2] in syn.SHAPES} <= shapes
            assert {w for w in words if w in syn.BACKGROUNDS} <= {bg}, m[field]
        for field in ("dense", "dense_alt"):
            text, words = m[field].lower(), _words(m[field])
            assert bg in words and syn._COUNT[len(objs)] in words, m[field]
            assert {w for w in words if w in syn.SIZES} == {o["size"] for o in objs}
            for o in objs:
                assert (f"{o['size']} {o['color']} {o['shape']}" in text
                        or f"{o['shape']} that is {o['size']} and {o['color']}" in text), (m[field], o)
                pos = o["position"]
                assert any(p in text for p in (syn._POS_AT[pos], syn._POS_NOUN[pos], f"({pos})")), (text, o)
            sides = {"left", "right", "top", "bottom"}
            assert {w for w in words if w in sides} == {w for o in objs for w in o["position"].split()} & sides
            templates_seen.add(re.sub(r"[a-z]+ (circle|cross|diamond|square|star|triangle)", "", text)[:12])
    assert len(templates_seen) >= 4, "dense captions should use several templates"


def _cell_centre(position: str, size: int):
    """Pixel centre of the grid cell a position NAME denotes, derived independently of the generator."""
    col = 0 if "left" in position else 2 if "right" in position else 1
    row = 0 if "top" in position else 2 if "bottom" in position else 1
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def test_pixels_match_captions(data):
    out, _ = data
    checked = 0
    for key, s in list(_samples(out / "val").items()):
        meta = json.loads(s["json"])
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).astype(float)
        assert _nearest(img[1, 1]) == meta["background"]  # corners are never covered by an object
        occupied = set()
        for o in meta["objects"]:
            x, y = _cell_centre(o["position"], meta["width"])
            assert _nearest(_pixel(img, x, y)) == o["color"], (key, o)
            occupied.add((x, y))
            checked += 1
        for pos in syn.POSITIONS.values():  # empty cells show the background
            x, y = _cell_centre(pos, meta["width"])
            if (x, y) not in occupied:
                assert _nearest(_pixel(img, x, y)) == meta["background"], (key, pos)
    assert checked >= N_VAL


def test_objects_are_in_distinct_cells_and_sizes_differ(data):
    out, _ = data
    for m in _metas(out / "train"):
        cells = [(o["row"], o["col"]) for o in m["objects"]]
        assert len(set(cells)) == len(cells) and cells == sorted(cells)
        for o in m["objects"]:
            assert syn.POSITIONS[(o["row"], o["col"])] == o["position"]
            assert o["radius"] < m["width"] / 6  # stays inside its cell
    big = [o["radius"] for m in _metas(out / "train") for o in m["objects"] if o["size"] == "large"]
    small = [o["radius"] for m in _metas(out / "train") for o in m["objects"] if o["size"] == "small"]
    assert min(big) > 1.4 * max(small)


def test_retrieval_eval_copies(data):
    out, _ = data
    root = out / "eval" / "retrieval"
    karpathy = json.loads((root / "karpathy.json").read_text())
    val = _samples(out / "val")
    assert karpathy["dataset"] == "synthetic" and len(karpathy["images"]) == N_VAL
    for i, (entry, (key, s)) in enumerate(zip(karpathy["images"], val.items())):
        meta = json.loads(s["json"])
        assert entry["filename"] == f"{key}.jpg" and entry["split"] == "test" and entry["imgid"] == i
        assert [x["raw"] for x in entry["sentences"]] == [meta[f] for f in CAPTION_FIELDS]
        assert all(x["tokens"] and all(t == t.lower() for t in x["tokens"]) for x in entry["sentences"])
        assert (root / "images" / entry["filename"]).read_bytes() == s["jpg"]
    lines = [json.loads(line) for line in (root / "long.jsonl").read_text().splitlines()]
    assert len(lines) == N_VAL
    for line, s in zip(lines, val.values()):
        assert (root / line["image"]).is_file() and line["caption"] == json.loads(s["json"])["dense"]


def test_classification_eval_copies(data):
    out, _ = data
    root = out / "eval" / "classification"
    classnames = (root / "classnames.txt").read_text().splitlines()
    assert classnames == sorted(syn.SHAPES) == sorted(p.name for p in root.iterdir() if p.is_dir())
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates[0] == "a photo of a {c}." and all("{c}" in t for t in templates)
    for name in classnames:
        files = sorted((root / name).glob("*.jpg"))
        assert len(files) == PER_CLASS
        img = np.asarray(Image.open(files[0]).convert("RGB")).astype(float)
        # exactly one object: exactly one cell centre differs from the background (corner) colour
        bg = _nearest(img[1, 1])
        assert bg in syn.BACKGROUNDS
        cells = [_nearest(_pixel(img, *_cell_centre(p, img.shape[1]))) for p in syn.POSITIONS.values()]
        assert sum(c != bg for c in cells) == 1


def test_tokenizer_roundtrip_without_unk(data, offline):
    from transformers import AutoTokenizer

    out, summary = data
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert (tok.unk_token, tok.pad_token, tok.bos_token, tok.eos_token) == ("<unk>", "<pad>", "<s>", "</s>")
    assert (tok.unk_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert len(tok) == summary["tokenizer"]["vocab_size"]
    chat = ("<|start_header_id|>user<|end_header_id|>\n\nGiven a caption, retrieve a similar relevant "
            "caption !@#$%^&*()_+-=[]{};':\",./<>?|`~ 0123456789<|eot_id|>")
    templates = (out / "eval" / "classification" / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates and all("{c}" in t for t in templates)
    texts = list(syn.INSTRUCTIONS) + [chat] + [t.format(c=c) for t in templates for c in syn.SHAPES]
    texts += [m[f] for m in _metas(out / "train") + _metas(out / "val") for f in CAPTION_FIELDS]
    texts += ["Represent the query for retrieving evidence documents", "Given a web search query, "
              "retrieve relevant passages that answer the query", "A man is riding a horse on the beach."]
    enc = tok(texts)
    for text, ids in zip(texts, enc["input_ids"]):
        assert ids[0] == tok.bos_token_id and ids[1:].count(tok.bos_token_id) == 0
        assert tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))
    for text in syn.INSTRUCTIONS:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    assert tok("zyzzyva")["input_ids"] == [2, 0]  # unknown words do map to <unk>
    batch = tok(["a red circle", "a photo of a blue star on a gray background"], padding=True)
    assert batch["input_ids"][0][-1] == tok.pad_token_id and batch["attention_mask"][0][-1] == 0


def test_cli(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic_data.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary = mod.main(["--out", str(tmp_path / "cli"), "--train", "7", "--val", "3", "--shard-size", "4",
                        "--cls-per-class", "1", "--image-size", "48"])
    assert summary["train"] == {"samples": 7, "shards": 2} and summary["image_size"] == 48
    assert json.loads(capsys.readouterr().out)["val"]["samples"] == 3
    meta = json.loads(_samples(tmp_path / "cli" / "val")["val_000000000"]["json"])
    assert meta["width"] == meta["height"] == 48


def test_webdataset_reads_the_shards(data):
    import webdataset as wds

    out, _ = data
    urls = [str(p) for p in sorted((out / "train").glob("shard-*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    samples = list(ds)
    assert len(samples) == N_TRAIN
    assert samples[0]["__key__"] == "train_000000000" and samples[0]["jpg"].size == (64, 64)
    assert samples[0]["txt"] == samples[0]["json"]["caption"]


def test_colour_classes(tmp_path):
    """--cls-attr color: 8 colour classes; every image's single object has its folder's colour."""
    syn.generate(tmp_path / "c", n_train=2, n_val=2, seed=0, image_size=64, shard_size=2, cls_per_class=3,
                 cls_attr="color")
    root = tmp_path / "c" / "eval" / "classification"
    classnames = (root / "classnames.txt").read_text().splitlines()
    assert classnames == sorted(syn.COLORS) == sorted(p.name for p in root.iterdir() if p.is_dir())
    for name in classnames:
        for f in sorted((root / name).glob("*.jpg")):
            img = np.asarray(Image.open(f).convert("RGB")).astype(float)
            colours = {_nearest(img[int((r + .5) * 64 / 3), int((c + .5) * 64 / 3)]) for r in range(3) for c in range(3)}
            assert name in colours
    with pytest.raises(ValueError, match="cls_attr"):
        syn.generate(tmp_path / "d", n_train=1, n_val=1, cls_attr="size")
