"""Embed step: batching invariance, token-budget padding, sidecar layout and values, 2-process ==
1-process byte for byte, kill-and-rerun, tamper detection, fingerprint refusal, text feature cache."""
from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import ROOT, run_cmd, torchrun
from llm2clip.config import load_config
from llm2clip.data import sidecar as S
from llm2clip.data.shards import get_caption, iter_tar_samples
from llm2clip.schema import TextEncoderConfig
from llm2clip.schema_embed import EmbedConfig
from llm2clip.tasks.embed import EmbedConflictError, assign_lpt, assign_windows, plan_jobs, plan_windows, run_embed
from llm2clip.text import feature_cache as FC
from llm2clip.text.batching import fixed_batches, plan_batches
from llm2clip.text.embedder import TextEmbedder

FIELDS = ["txt", "json:dense", "json:dense_alt"]
NAMES = ["txt", "dense", "dense_alt"]
TOOL = str(ROOT / "tools" / "embed_captions.py")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from llm2clip.data.synthetic import generate
    from llm2clip.testing.tiny_models import make_tiny_llm

    root = tmp_path_factory.mktemp("embed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM2CLIP_HASH_CACHE", str(root / "hashes.json"))
        generate(root / "data", n_train=300, n_val=20, seed=0, image_size=32, shard_size=90, cls_per_class=0)
        # shard 3 (30 samples): first sample without .txt, second without json "dense"
        _drop_captions(root / "data" / "train" / "shard-000003.tar")
        llama = make_tiny_llm(root / "llama", root / "data" / "tokenizer", family="llama", seed=0)
        w = {"root": root, "data": root / "data", "llama": llama}
        w["clean"] = root / "clean"
        w["clean_summary"] = run_embed(cfg(w, w["clean"]))
        yield w


def _drop_captions(path: Path) -> None:
    with tarfile.open(path) as tf:
        items = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    keys = sorted({n.split(".")[0] for n, _ in items})
    with tarfile.open(path, "w") as tf:
        for name, data in items:
            key, ext = name.split(".", 1)
            if key == keys[0] and ext == "txt":
                continue
            if key == keys[1] and ext == "json":
                meta = json.loads(data)
                del meta["dense"]
                data = json.dumps(meta).encode()
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def overrides(w, out: Path, *extra: str) -> list[str]:
    d = w["data"]
    return [f"text.model_path={w['llama']}", "text.attn_implementation=sdpa", "text.max_length=64",
            f"data.shards={d}/train/shard-*.tar::{d}/val/shard-{{000000..000000}}.tar",
            f"data.fields=[{', '.join(FIELDS)}]", f"output.out_dir={out}", f"output.image_root={d}",
            "batch.token_budget=400", "batch.max_batch_size=64", "run.progress_bar=false", *extra]


def cfg(w, out: Path, *extra: str) -> EmbedConfig:
    return load_config(EmbedConfig, None, overrides(w, out, *extra))


def sidecars(out: Path) -> list[Path]:
    return sorted(out.rglob("shard-*.tar"))


def read_sidecar(path: Path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, name, ext = m.name.split(".")
            assert ext == "npy"
            out.setdefault(key, {})[name] = np.load(io.BytesIO(tf.extractfile(m).read()), allow_pickle=False)
    return out


def encoder(w, padding_side: str = "left"):
    from llm2clip.text.encoder import build_text_encoder

    enc, ptok = build_text_encoder(TextEncoderConfig(model_path=str(w["llama"]), attn_implementation="sdpa",
                                                     max_length=64, padding_side=padding_side))
    return enc.eval(), ptok


def embed(enc, ptok, texts, packing="auto", token_budget=16384, max_batch_size=1024):
    """(embeddings [N, H], stats) through the TextEmbedder with an already-built encoder."""
    e = TextEmbedder(TextEncoderConfig(model_path=".", packing=packing), "cpu", token_budget, max_batch_size,
                     encoder=enc, ptok=ptok)
    e._packing = packing != "off"
    return e.embed_encoded(e.encode(texts))


def captions(w, n: int = 60) -> list[str]:
    out = []
    for s in iter_tar_samples(str(w["data"] / "train" / "shard-000000.tar"), want={"txt", "json"}):
        out += [c for c in (get_caption(s, f) for f in FIELDS) if c]
    return out[:n]


# --- batching ---------------------------------------------------------------------------------
def test_plan_batches_respects_budget_and_covers_everything():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=500).tolist()
    batches = plan_batches(lengths, token_budget=1000, max_batch_size=32)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) <= 32 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 1000) for b in batches)
    assert plan_batches(lengths, 1000, 32) == batches
    assert plan_batches([5000, 3], 100, 8) == [[0], [1]]  # longer than the budget: alone


def test_lpt_assignment_balances_unequal_shards():
    weights = [90, 90, 90, 30, 20, 500, 10]
    a = assign_lpt(weights, 2)
    assert sorted(i for r in a for i in r) == list(range(7)) and a == assign_lpt(weights, 2)
    loads = [sum(weights[i] for i in r) for r in a]
    assert max(loads) == 500 and a[0] == [5]


def test_windows_come_from_global_order_whatever_the_world_size():
    weights = [90, 90, 90, 30, 20, 500, 10]
    todo = list(range(7))
    assert plan_windows(7, todo, 1) == [[i] for i in range(7)]
    assert plan_windows(7, todo, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    for W in (1, 2, 3, 4):
        windows = plan_windows(7, todo, W)
        per_world = {world: assign_windows(windows, weights, world) for world in (1, 2, 3)}
        for world, a in per_world.items():
            assert len(a) == world
            # each rank gets whole windows; together they are exactly the global windows, each once
            assert sorted(w for r in a for w in r) == windows
        assert per_world[1] == [sorted(windows, key=lambda w: -sum(weights[i] for i in w))]  # heaviest first
    a = assign_windows(plan_windows(7, todo, 2), weights, 2)  # [0,1] [2,3] [4,5] [6]: 180 120 520 10
    assert a == [[[4, 5]], [[0, 1], [2, 3], [6]]]
    # a rerun keeps the cut points: shard 2 done, its window-mate 3 alone; the other windows unchanged
    assert plan_windows(7, [0, 1, 3, 4, 5, 6], 2) == [[0, 1], [3], [4, 5], [6]]
    assert plan_windows(7, [], 2) == [] and assign_windows([], weights, 2) == [[], []]


@pytest.mark.parametrize("side", ["left", "right"])
def test_embedding_is_invariant_to_batching(world, side):
    enc, ptok = encoder(world, side)
    texts = captions(world, 48)
    bucketed, st = embed(enc, ptok, texts, "off", token_budget=300, max_batch_size=16)
    assert st.batches > 3 and st.padding_fraction > 0  # real mixed-length batches with padding
    packed, st = embed(enc, ptok, texts, "on", token_budget=300, max_batch_size=16)
    assert st.batches > 3 and st.padding_fraction < 0.05
    alone = torch.cat([embed(enc, ptok, [t])[0] for t in texts])
    for got in (bucketed, packed):
        np.testing.assert_allclose(got.half().float().numpy(), alone.half().float().numpy(), rtol=2e-3, atol=2e-3)
        assert (got - alone).abs().max() < 1e-4  # fp32 noise only


def test_token_budget_pads_less_than_fixed_batches(world):
    _, ptok = encoder(world)
    lengths = [len(ptok.encode_one(t)[0]) for t in captions(world, 270)]  # fields interleaved, file order

    def pad(batches):
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths) / padded

    budget = pad(plan_batches(lengths, 400, 64))
    naive = pad(fixed_batches(len(lengths), 16))
    assert budget < 0.1 < naive and budget < naive / 3, (budget, naive)
    assert world["clean_summary"]["padding_fraction"] < naive


# --- the embed job ----------------------------------------------------------------------------
def test_sidecar_layout_manifest_index_and_values(world):
    out, summ = world["clean"], world["clean_summary"]
    assert summ["shards"] == 5 and summ["written"] == 5 and summ["skipped"] == 0
    assert summ["captions"] == 320 * 3 - 2 and summ["missing_captions"] == 2 and summ["tokens"] > 0
    assert json.loads((out / "embed_summary.json").read_text())["captions"] == summ["captions"]
    enc, ptok = encoder(world)
    for img in sorted((world["data"] / "train").glob("shard-*.tar")) + [world["data"] / "val" / "shard-000000.tar"]:
        sc = out / img.parent.name / img.name
        assert S.validate_sidecar(sc) is None
        man = S.read_manifest(sc)
        samples = list(iter_tar_samples(str(img), want={"txt", "json"}))
        got = read_sidecar(sc)
        assert list(got) == [s["__key__"] for s in samples], "same keys, same order"
        assert man["count"] == man["image_samples"] == len(samples) and man["fields"] == NAMES
        assert man["width"] == 64 and man["dtype"] == "float16" and man["fingerprint"] == summ["fingerprint"]
        assert man["sources"] == dict(zip(NAMES, FIELDS))
        if img.name == "shard-000003.tar" and img.parent.name == "train":
            assert man["missing"] == {"txt": [samples[0]["__key__"]], "dense": [samples[1]["__key__"]], "dense_alt": []}
            assert "txt" not in got[samples[0]["__key__"]]
    # values: the sidecar equals each caption embedded alone (fp16 rounding)
    s = samples[4]
    alone = embed(enc, ptok, [get_caption(s, f) for f in FIELDS])[0].half().numpy()
    for j, n in enumerate(NAMES):
        assert got[s["__key__"]][n].dtype == np.float16 and got[s["__key__"]][n].shape == (64,)
        np.testing.assert_allclose(got[s["__key__"]][n].astype(np.float32), alone[j].astype(np.float32), atol=2e-3, rtol=2e-3)
    idx = json.loads((out / "train" / "index.json").read_text())
    assert idx["shards"] == 4 and idx["samples"] == 300 and idx["fingerprint"] == summ["fingerprint"]
    assert idx["fields"] == NAMES and idx["width"] == 64 and idx["missing"] == {"txt": 1, "dense": 1, "dense_alt": 0}
    assert FC.fingerprint_of(idx["encoder"]) == summ["fingerprint"]


# runs tools/embed_captions.py's main once per argv list in one process (one torchrun launch, one
# import of torch, for several configs)
EMBED_MANY = """import json, sys
sys.path.insert(0, sys.argv[1])
from embed_captions import main
for argv in json.loads(sys.argv[2]):
    main(argv)
"""


def test_two_processes_equal_one_process_byte_for_byte(world, tmp_path):
    """1 process == 2 processes, byte for byte, with one shard per window (the default) and with
    batch.window_shards=2 (windows are cut in the global shard order, then whole windows go to ranks:
    with windows cut from each rank's share, the ranks batched other captions together)."""
    env = {"LLM2CLIP_HASH_CACHE": str(world["root"] / "hashes.json")}
    script = tmp_path / "embed_many.py"
    script.write_text(EMBED_MANY)
    runs = {(n, W): tmp_path / f"{n}proc-w{W}" for n in (1, 2) for W in (1, 2)}

    def argvs(n):
        return json.dumps([[f"--set={o}" for o in overrides(world, runs[n, W], f"batch.window_shards={W}")]
                           for W in (1, 2)])

    run_cmd([sys.executable, str(script), str(Path(TOOL).parent), argvs(1)], env_extra=env, timeout=180)
    p = torchrun(str(script), [str(Path(TOOL).parent), argvs(2)], nproc=2, env_extra=env, timeout=180)
    for W in (1, 2):
        one, two = runs[1, W], runs[2, W]
        summ = json.loads((two / "embed_summary.json").read_text())
        assert summ["world_size"] == 2 and summ["written"] == 5 and not summ["errors"], p.stdout[-2000:]
        assert all(t > 0 for t in summ["encode_seconds_per_rank"]), "both ranks must get work"
        assert json.loads((one / "embed_summary.json").read_text())["padded_tokens"] == summ["padded_tokens"]
        a, b = sidecars(one), sidecars(two)
        assert [x.relative_to(one) for x in a] == [x.relative_to(two) for x in b] and len(a) == 5
        for x, y in zip(a, b):
            dx, dy = read_sidecar(x), read_sidecar(y)
            assert sorted(dx) == sorted(dy)
            assert all(np.array_equal(dx[k][n], dy[k][n]) for k in dx for n in dx[k]), (W, x)
            assert x.read_bytes() == y.read_bytes(), (W, x)
            assert S.manifest_path(x).read_text() == S.manifest_path(y).read_text()
        assert (one / "train" / "index.json").read_text() == (two / "train" / "index.json").read_text()


def test_kill_and_rerun_completes_without_recomputing(world, tmp_path):
    clean, out = world["clean"], tmp_path / "out"
    shutil.copytree(clean, out)
    t1, t2 = out / "train" / "shard-000001.tar", out / "train" / "shard-000002.tar"
    # shard 1: killed while writing (only a partial temp file); shard 2: tar renamed, manifest never written
    t1.unlink()
    S.manifest_path(t1).unlink()
    (out / "train" / ".shard-000001.tar.tmp.4242").write_bytes(b"partial")
    S.manifest_path(t2).unlink()
    t2.write_bytes(t2.read_bytes()[:3000])
    kept = {p: p.stat().st_mtime_ns for p in sidecars(out) if p not in (t1, t2)}
    summ = run_embed(cfg(world, out))
    assert (summ["skipped"], summ["written"], summ["redone"]) == (3, 2, 1)
    assert summ["captions"] == 2 * 90 * 3
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "finished shards must not be rewritten"
    assert not list(out.rglob(".*.tmp.*"))
    for x in sidecars(clean):
        assert (out / x.relative_to(clean)).read_bytes() == x.read_bytes()
    assert (out / "train" / "index.json").read_text() == (clean / "train" / "index.json").read_text()
    assert run_embed(cfg(world, out))["skipped"] == 5  # and a third run does nothing


def test_tampered_sidecar_is_detected_redone_and_refused(world, tmp_path):
    clean, out = world["clean"], tmp_path / "out"
    shutil.copytree(clean, out)
    trunc, tamp = out / "train" / "shard-000000.tar", out / "val" / "shard-000000.tar"
    trunc.write_bytes(trunc.read_bytes()[:-1024])
    data = bytearray(tamp.read_bytes())
    data[len(data) // 2] ^= 0x01
    tamp.write_bytes(bytes(data))
    images = [str(world["data"] / "train" / "shard-000000.tar"), str(world["data"] / "val" / "shard-000000.tar")]
    c = cfg(world, out)
    fp = world["clean_summary"]["fingerprint"]
    missing, invalid = S.check_sidecars(images, c.output, fp)  # start-up check: manifests and sizes only
    assert missing == [] and [i for i, _ in invalid] == images[:1] and "truncated" in invalid[0][1]
    missing, invalid = S.check_sidecars(images, c.output, fp, verify=True)
    assert missing == [] and [i for i, _ in invalid] == images
    assert "truncated" in invalid[0][1] and "sha256" in invalid[1][1]
    # the explicit full check over 2 ranks (each a share) names both bad shards and fails
    env = {"LLM2CLIP_HASH_CACHE": str(world["root"] / "hashes.json")}
    p = torchrun(TOOL, ["--verify", *[f"--set={o}" for o in overrides(world, out)]], nproc=2, env_extra=env,
                 timeout=120, check=False)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((out / "verify_report.json").read_text())
    assert report["world_size"] == 2 and report["shards"] == 5 and not report["ok"]
    assert {b["image"] for b in report["bad_shards"]} == set(images)
    assert "truncated" in p.stdout + p.stderr and "sha256" in p.stdout + p.stderr
    with pytest.raises(S.SidecarError, match="truncated"):
        next(S.iter_joined(images[0], str(trunc), expected_fingerprint=fp))
    summ = run_embed(c)
    assert (summ["skipped"], summ["written"], summ["redone"]) == (3, 2, 2)
    for x in sidecars(clean):
        assert (out / x.relative_to(clean)).read_bytes() == x.read_bytes()
    assert S.check_sidecars(images, c.output, fp) == ([], [])
    from llm2clip.tasks.verify_sidecars import run_verify
    report = run_verify(c)
    assert report["ok"] and report["shards"] == 5 and report["bad"] == 0 and len(report["fingerprints"]) == 1


def test_other_encoder_is_refused_unless_overwrite(world, tmp_path):
    clean, out = world["clean"], tmp_path / "out"
    shutil.copytree(clean, out)
    before = {p: p.read_bytes() for p in sidecars(out)}
    old_fp = world["clean_summary"]["fingerprint"]
    other = cfg(world, out, "text.max_length=32")  # another encoder setting -> another fingerprint
    with pytest.raises(EmbedConflictError) as e:
        run_embed(other)
    new_fp = FC.encoder_fingerprint(other.text, "")
    assert old_fp in str(e.value) and new_fp in str(e.value) and "overwrite" in str(e.value)
    assert {p: p.read_bytes() for p in sidecars(out)} == before, "nothing may be touched"
    # a new shard into the same folder is refused too (the index belongs to the old encoder)
    (out / "val" / "shard-000000.tar").unlink()
    S.manifest_path(out / "val" / "shard-000000.tar").unlink()
    with pytest.raises(EmbedConflictError, match="index.json"):
        run_embed(other)
    summ = run_embed(cfg(world, out, "text.max_length=32", "output.overwrite=true"))
    assert summ["written"] == 5 and summ["fingerprint"] == new_fp
    for p in sidecars(out):
        assert S.read_manifest(p)["fingerprint"] == new_fp and S.validate_sidecar(p) is None
    assert json.loads((out / "train" / "index.json").read_text())["fingerprint"] == new_fp
    img = str(world["data"] / "train" / "shard-000001.tar")
    with pytest.raises(S.SidecarMismatchError, match=old_fp):
        next(S.iter_joined(img, str(out / "train" / "shard-000001.tar"), expected_fingerprint=old_fp))
    assert len(list(S.iter_joined(img, str(out / "train" / "shard-000001.tar"), expected_fingerprint=new_fp))) == 90


def test_flat_output_name_clash_and_beside_images(world, tmp_path):
    from llm2clip.config import ConfigError

    with pytest.raises(ConfigError, match="image_root"):  # train/ and val/ both have shard-000000.tar
        plan_jobs(cfg(world, tmp_path / "flat", "output.image_root="))
    data = tmp_path / "data"
    shutil.copytree(world["data"] / "val", data / "val")
    c = load_config(EmbedConfig, None, [o for o in overrides(world, tmp_path) if not o.startswith("output.")] +
                    [f"data.shards={data}/val/*.tar", "output.suffix=_emb"])
    assert run_embed(c)["written"] == 1
    assert (data / "val" / "shard-000000_emb.tar").is_file() and (data / "val" / "index_emb.json").is_file()
    summ = run_embed(c)  # the glob now also matches the sidecar: it is not taken for an image shard
    assert summ["shards"] == 1 and summ["skipped"] == 1


# --- fingerprints and the text feature cache --------------------------------------------------
def test_fingerprint_is_content_based(world, tmp_path):
    base = TextEncoderConfig(model_path=str(world["llama"]), max_length=64)
    hashes = FC.FileHashCache(tmp_path / "h.json")
    fp = FC.encoder_fingerprint(base, "", hashes)
    assert hashes.hashed_bytes > 0
    moved = tmp_path / "copy"
    shutil.copytree(world["llama"], moved)
    assert FC.encoder_fingerprint(TextEncoderConfig(model_path=str(moved), max_length=64), "", hashes) == fp
    again = FC.FileHashCache(tmp_path / "h.json")  # a new job: hashes come from the memo file
    assert FC.encoder_fingerprint(base, "", again) == fp and again.hashed_bytes == 0
    variants = [FC.encoder_fingerprint(base, "Given a caption: ", hashes)]
    for change in ({"pooling": "last"}, {"template": "llama3"}, {"attention": "causal"}, {"max_length": 65}):
        variants.append(FC.encoder_fingerprint(TextEncoderConfig(**{**base.__dict__, **change}), "", hashes))
    assert len(set(variants + [fp])) == len(variants) + 1
    # base + LoRA differs from base, and a LoRA change is seen
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    for i, r in enumerate((4, 8)):
        m = get_peft_model(AutoModel.from_pretrained(str(world["llama"])),
                           LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        m.save_pretrained(str(tmp_path / f"lora{i}"))
    fps = {FC.encoder_fingerprint(TextEncoderConfig(**{**base.__dict__, "lora_path": str(tmp_path / f"lora{i}")}), "", hashes)
           for i in range(2)}
    assert len(fps) == 2 and fp not in fps


def test_text_feature_cache_computes_only_missing(world, tmp_path):
    enc, ptok = encoder(world)
    texts = captions(world, 12)
    calls: list[list[str]] = []

    class Spy(torch.nn.Module):
        hidden_size, can_pack = enc.hidden_size, enc.can_pack

        def __init__(self):
            super().__init__()
            self.inner = enc

        def encode(self, batch):
            calls.append(batch.n_captions)
            return self.inner.encode(batch)

    built = []

    def build():
        built.append(1)
        return Spy(), ptok

    tcfg = TextEncoderConfig(model_path=str(world["llama"]), attn_implementation="sdpa", max_length=64)
    cache = tmp_path / "cache"

    def features(ts, c, build_encoder):
        return TextEmbedder(c, "cpu", loader=build_encoder).features(ts, cache_dir=str(cache))

    first = features(texts[:8], tcfg, build)
    assert len(built) == 1 and sum(calls) == 8
    alone = torch.cat([embed(enc, ptok, [t])[0] for t in texts])
    assert (first - alone[:8]).abs().max() < 1e-4

    def no_llm():
        raise AssertionError("everything is cached: the LLM must not be loaded")

    again = features(texts[:8], tcfg, no_llm)
    assert torch.equal(again, first)
    calls.clear()
    more = features(texts[4:] + texts[4:6], tcfg, build)
    assert len(built) == 2 and sum(calls) == 4, "only the 4 uncached texts are encoded (duplicates once)"
    assert (more - torch.cat([alone[4:], alone[4:6]])).abs().max() < 1e-4
    assert len(FC.TextFeatureCache(cache, FC.encoder_fingerprint(tcfg))) == 12
    # rows and their keys live in one file: a stale summary json (a crash between the two renames, or
    # another job writing it) cannot pair a row with the wrong text
    fp = FC.encoder_fingerprint(tcfg)
    meta = json.loads((cache / f"text_features-{fp[:16]}.json").read_text())
    meta["count"] = 8
    (cache / f"text_features-{fp[:16]}.json").write_text(json.dumps(meta))
    assert torch.equal(features(texts[:8], tcfg, no_llm), first)
    assert len(FC.TextFeatureCache(cache, fp)) == 12
    # another encoder gets its own cache file
    other = TextEncoderConfig(**{**tcfg.__dict__, "max_length": 32})
    features(texts[:2], other, build)
    assert len(built) == 3 and len(list(cache.glob("*.safetensors"))) == 2


def test_settings_must_match_the_stage1_export(world, tmp_path):
    from llm2clip.config import ConfigError
    from llm2clip.tasks.embed import check_export_settings

    export = tmp_path / "merged"
    shutil.copytree(world["llama"], export)
    (export / "llm2clip_text.json").write_text(json.dumps({"pooling": "mean", "attention": "bidirectional",
                                                           "template": "none", "max_length": 64}))
    check_export_settings(cfg(world, tmp_path / "o", f"text.model_path={export}"))
    with pytest.raises(ConfigError, match="text.pooling='last'.*pooling='mean'"):
        check_export_settings(cfg(world, tmp_path / "o", f"text.model_path={export}", "text.pooling=last"))
    with pytest.raises(ConfigError, match="template"):
        run_embed(cfg(world, tmp_path / "o", f"text.model_path={export}", "text.template=llama3"))


@pytest.mark.parametrize("extra", [("batch.window_shards=3",), ("batch.prefetch=false", "text.padding_side=right",
                                                                 "batch.token_budget=64")])
def test_windows_prefetch_and_padding_side_give_the_same_vectors(world, tmp_path, extra):
    out = tmp_path / "out"
    summ = run_embed(cfg(world, out, *extra))
    assert summ["written"] == 5 and summ["captions"] == world["clean_summary"]["captions"]
    for x in sidecars(world["clean"]):
        y = out / x.relative_to(world["clean"])
        assert S.validate_sidecar(y) is None
        dx, dy = read_sidecar(x), read_sidecar(y)
        assert list(dx) == list(dy)
        for k in dx:
            for n in dx[k]:
                np.testing.assert_allclose(dx[k][n].astype(np.float32), dy[k][n].astype(np.float32), atol=2e-3, rtol=2e-3)


def test_embed_reads_image_shards_over_http_and_pipe(world, tmp_path):
    """The embed step's input from a URL (loopback HTTP server) or a `pipe:` command: the same sidecars,
    byte for byte, as from the local files; the sidecars are written locally under out_dir."""
    from tests.http_fixture import LoopbackServer

    d, clean = world["data"], world["clean"]
    with LoopbackServer(d) as srv:
        out = tmp_path / "http"
        summ = run_embed(cfg(world, out, f"data.shards={srv.url}/train/shard-{{000000..000003}}.tar",
                             f"output.image_root={srv.url}"))
        assert summ["written"] == 4 and summ["read_errors"] == 0
    pipe = tmp_path / "pipe"
    assert run_embed(cfg(world, pipe, f"data.shards=pipe:cat {d}/train/shard-00000{{0,1}}.tar"))["written"] == 2
    for x in sorted((clean / "train").glob("shard-*.tar")):
        assert (out / "train" / x.name).read_bytes() == x.read_bytes()
        if x.name in ("shard-000000.tar", "shard-000001.tar"):
            assert (pipe / "train" / x.name).read_bytes() == x.read_bytes()
