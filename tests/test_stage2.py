"""Stage 2 on CPU: tiny CLIP tower + adapter on sidecar embeddings of a tiny Llama, synthetic data."""
import json
import sys

import pytest

from tests.helpers import ROOT, read_metrics, run_cmd, torchrun

TRAIN = str(ROOT / "tools/train_stage2.py")


@pytest.fixture(scope="module")
def embedded(tiny_world, tmp_path_factory):
    """Sidecars (fp32, so online and offline see the same numbers) for train + val shards."""
    out = tmp_path_factory.mktemp("emb")
    w = tiny_world
    run_cmd([sys.executable, str(ROOT / "tools/embed_captions.py"),
             "--set", f"text.model_path={w['llama']}", "--set", "text.attn_implementation=sdpa",
             "--set", f"data.shards={w['data']}/train/shard-*.tar::{w['data']}/val/shard-*.tar",
             "--set", "data.fields=[txt, 'json:short_alt', 'json:dense', 'json:dense_alt']",
             "--set", f"output.out_dir={out}", "--set", f"output.image_root={w['data']}",
             "--set", "output.dtype=float32", "--set", "run.progress_bar=false"], timeout=300)
    return out


def stage2_args(w, emb, out, *extra):
    return ["--set", f"run.output_dir={out}", "--set", f"vision.path={w['clip']}",
            "--set", "model.embed_dim=64", "--set", "model.adapter_blocks=2",
            "--set", f"data.shards={w['data']}/train/shard-*.tar",
            "--set", f"data.sidecar.out_dir={emb}", "--set", f"data.sidecar.image_root={w['data']}",
            "--set", "data.original_fields=[txt, 'json:short_alt']",
            "--set", "data.dense_fields=['json:dense', 'json:dense_alt']",
            "--set", f"data.val_shards={w['data']}/val/shard-*.tar",
            "--set", "optim.lr=3e-3", "--set", "optim.warmup_steps=5", "--set", "optim.layer_decay=0.9",
            "--set", "train.deepspeed_config=" + str(ROOT / "ds_configs/zero1_bf16.json"),
            "--set", "train.micro_batch_size=64", "--set", "run.progress_bar=false", "--set", "run.log_every=1",
            *extra]


@pytest.mark.slow
def test_two_process_stage2_lifts_retrieval(tiny_world, embedded, tmp_path):
    """Threshold: held-out dense-caption R@1 (200 pairs, chance 0.5%) starts below 2% and ends >= 5% (10x
    chance) in both directions; R@5 >= 15%."""
    out = tmp_path / "run"
    torchrun(TRAIN, stage2_args(tiny_world, embedded, out, "--set", "train.max_steps=80",
                                "--set", "train.eval_every=40", "--set", "train.save_every=40"), timeout=600)
    s = json.loads((out / "summary.json").read_text())
    a, b = s["eval_start"], s["eval_end"]
    assert a["eval/i2t_R@1"] < 2 and a["eval/t2i_R@1"] < 2, a
    assert b["eval/i2t_R@1"] >= 5 and b["eval/t2i_R@1"] >= 5, b
    assert b["eval/i2t_R@5"] >= 15 and b["eval/t2i_R@5"] >= 15, b
    rows = [m for m in read_metrics(out) if "train/loss" in m]
    assert 0 <= rows[-1]["perf/data_wait_frac"] <= 1 and rows[-1]["perf/items_per_s"] > 0
    # 2 loader workers per rank (data.num_workers default): their CPU shows up, not only the blocking wait
    assert rows[-1]["perf/loader_cpu_s_per_step"] > 0 and rows[-1]["perf/loader_core_frac"] > 0
    assert all(r["train/logit_scale"] <= 100.0 + 1e-4 for r in rows)
    from llm2clip.model.clip_model import LLM2CLIPModel
    m = LLM2CLIPModel.from_pretrained(out / "export/model")
    assert m.llm_dim == 64 and m.text_encoder_info.get("fingerprint")


@pytest.mark.slow
def test_resume_mid_epoch_two_workers(tiny_world, embedded, tmp_path):
    """2 processes x 2 loader workers: stop after 3 steps, resume to 6 == an uninterrupted 6-step run
    (losses and logit scale at every step)."""
    common = ["--set", "train.max_steps=6", "--set", "train.eval_every=0", "--set", "train.save_every=3",
              "--set", "data.val_shards=", "--set", "data.num_workers=2", "--set", "train.micro_batch_size=16"]
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(TRAIN, stage2_args(tiny_world, embedded, full, *common), timeout=300)
    torchrun(TRAIN, stage2_args(tiny_world, embedded, part, *common, "--set", "train.stop_after=3"), timeout=300)
    torchrun(TRAIN, stage2_args(tiny_world, embedded, part, *common), timeout=300)
    f = {m["step"]: m for m in read_metrics(full) if "train/loss" in m}
    p = {m["step"]: m for m in read_metrics(part) if "train/loss" in m}
    assert sorted(p) == list(range(1, 7))
    for s in range(1, 7):
        assert abs(f[s]["train/loss"] - p[s]["train/loss"]) < 1e-5, (s, f[s], p[s])
        assert abs(f[s]["train/logit_scale"] - p[s]["train/logit_scale"]) < 1e-5


def test_stream_keys_resume_exactly_with_workers(tiny_world, embedded):
    """The sequence of sample keys after a resume (2 loader workers) continues as if uninterrupted."""
    from llm2clip.data.stage2_stream import Stage2Stream, make_loader
    from llm2clip.config import load_config
    from llm2clip.schema_stage2 import Stage2Config
    w = tiny_world
    cfg = load_config(Stage2Config, None, [a for a in stage2_args(w, embedded, "/tmp/x") if a != "--set"])

    def stream(start):
        ds = Stage2Stream(cfg.data, 8, 0, 0, 1, 64, (0.5,) * 3, (0.5,) * 3, False, start)
        return iter(make_loader(ds, 2))

    it = stream(None)
    ref = [next(it) for _ in range(12)]
    del it
    states, consumed = {}, 0
    it = stream(None)
    for _ in range(7):
        b = next(it)
        states[b["_worker"]] = b["_state"]
        consumed += 1
    del it
    it = stream({"workers": states, "batches": consumed})
    rest = [next(it) for _ in range(5)]
    assert [b["keys"] for b in rest] == [b["keys"] for b in ref[7:]]
    import torch
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(rest, ref[7:]))  # same crops too
    assert len({k for b in ref for k in b["keys"]}) == 96  # no sample repeated within the epoch


def test_online_mode_matches_offline(tiny_world, embedded, tmp_path):
    """Same data, same steps: the frozen encoder in the loop gives the losses of the fp32 sidecars."""
    common = ["--set", "train.max_steps=4", "--set", "train.eval_every=0", "--set", "train.save_every=0",
              "--set", "data.val_shards=", "--set", "data.num_workers=0", "--set", "train.micro_batch_size=16"]
    off, on = tmp_path / "off", tmp_path / "on"
    run_cmd([sys.executable, TRAIN, *stage2_args(tiny_world, embedded, off, *common)], timeout=300)
    run_cmd([sys.executable, TRAIN, *stage2_args(tiny_world, embedded, on, *common, "--set", "text.mode=online",
                                                 "--set", f"text.encoder.model_path={tiny_world['llama']}",
                                                 "--set", "text.encoder.attn_implementation=sdpa")], timeout=300)
    lo = [m["train/loss"] for m in read_metrics(off) if "train/loss" in m]
    ln = [m["train/loss"] for m in read_metrics(on) if "train/loss" in m]
    assert len(lo) == len(ln) == 4
    assert all(abs(a - b) < 1e-3 for a, b in zip(lo, ln)), (lo, ln)


def _fails_before_training(tiny_world, embedded, tmp_path, *extra):
    out = tmp_path / "bad"
    p = run_cmd([sys.executable, TRAIN, *stage2_args(tiny_world, embedded, out, "--set", "train.max_steps=2",
                                                     *extra)], check=False, timeout=120)
    assert p.returncode != 0
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    return p.stdout + p.stderr


def test_width_mismatch_fingerprint_and_missing_sidecar_fail_early(tiny_world, embedded, tmp_path):
    err = _fails_before_training(tiny_world, embedded, tmp_path, "--set", "model.llm_dim=4096")
    assert "model.llm_dim=4096" in err and "64 wide" in err
    err = _fails_before_training(tiny_world, embedded, tmp_path, "--set", "data.fingerprint=deadbeef")
    assert "deadbeef" in err
    err = _fails_before_training(tiny_world, embedded, tmp_path, "--set", f"data.sidecar.out_dir={tmp_path}/none")
    assert "no complete sidecar" in err and "embed_captions.py" in err


def test_corrupt_image_is_skipped_and_counted(tiny_world, embedded, tmp_path):
    """A JPEG whose bytes are garbage (same size, so the sidecar still validates) is skipped and counted."""
    import shutil
    import tarfile
    from llm2clip.config import load_config
    from llm2clip.data.stage2_stream import Stage2Stream, make_loader
    from llm2clip.schema_stage2 import Stage2Config
    w = tiny_world
    (tmp_path / "data/train").mkdir(parents=True)
    (tmp_path / "emb/train").mkdir(parents=True)
    src = w["data"] / "train/shard-000000.tar"
    dst = tmp_path / "data/train/shard-000000.tar"
    shutil.copy(src, dst)
    for f in ("shard-000000.tar", "shard-000000.manifest.json"):
        shutil.copy(embedded / "train" / f, tmp_path / "emb/train" / f)
    with tarfile.open(dst) as tf:
        victims = [m for m in tf.getmembers() if m.name.endswith(".jpg")][3:5]
    with open(dst, "r+b") as fh:
        for m in victims:
            fh.seek(m.offset_data)
            fh.write(b"\x00" * m.size)
    args = [a for a in stage2_args(w, tmp_path / "emb", tmp_path / "run") if a != "--set"]
    cfg = load_config(Stage2Config, None, args + [f"data.shards={dst}", f"data.sidecar.image_root={tmp_path}/data"])
    ds = Stage2Stream(cfg.data, 50, 0, 0, 1, 64, (0.5,) * 3, (0.5,) * 3, False)
    batches = [b for _, b in zip(range(4), make_loader(ds, 0))]  # 200 samples: the whole shard
    keys = [k for b in batches for k in b["keys"]]
    bad = {m.name.split(".")[0] for m in victims}
    assert batches[-1]["_stats"]["corrupt_images"] == 2
    assert not bad & set(keys[:198])  # the damaged samples never reach the model
    assert all(b["pixels"].shape == (50, 3, 64, 64) for b in batches)


def test_datasets_mix_by_weight_and_by_size(tiny_world, embedded):
    from llm2clip.config import load_config
    from llm2clip.data.stage2_stream import Stage2Stream, dataset_weights, dataset_shards, make_loader
    from llm2clip.schema_stage2 import Stage2Config
    w = tiny_world
    spec = f"{w['data']}/train/shard-00000{{0..2}}.tar::{w['data']}/train/shard-000003.tar"
    assert dataset_weights(dataset_shards(spec), []) == [600.0, 200.0]  # default: by sample count
    args = [a for a in stage2_args(w, embedded, "/tmp/x") if a != "--set"]
    for weights, lo, hi in (([], 0.65, 0.85), ([1, 1], 0.4, 0.6)):
        cfg = load_config(Stage2Config, None, args + [f"data.shards={spec}", f"data.weights={weights}"])
        ds = Stage2Stream(cfg.data, 50, 0, 0, 1, 64, (0.5,) * 3, (0.5,) * 3, False)
        keys = [k for _, b in zip(range(8), make_loader(ds, 0)) for k in b["keys"]]
        frac_first = sum(int(k.split("_")[1]) < 600 for k in keys) / len(keys)
        assert lo < frac_first < hi, (weights, frac_first)


def test_load_model_api_encodes_text_through_the_recorded_encoder(tiny_world, tmp_path):
    import torch
    import llm2clip
    from llm2clip.model.clip_model import LLM2CLIPModel
    from llm2clip.schema import TextEncoderConfig
    from llm2clip.text.encoder import build_text_encoder
    from llm2clip.vision.towers import build_vision_tower
    from PIL import Image
    m = LLM2CLIPModel(build_vision_tower("auto", tiny_world["clip"]), llm_dim=64, embed_dim=32, adapter_blocks=1,
                      text_encoder_info={"model_path": str(tiny_world["llama"]), "pooling": "mean",
                                         "attention": "bidirectional", "template": "none", "max_length": 64})
    m.save_pretrained(tmp_path / "model")
    api = llm2clip.load_model(str(tmp_path / "model"))
    caps = ["a red circle", "two blue squares on a white background"]
    enc, ptok = build_text_encoder(TextEncoderConfig(model_path=str(tiny_world["llama"]), max_length=64))
    with torch.no_grad():
        ref = m.eval().encode_text_embedding(enc.eval().encode(ptok(caps)))
    assert torch.allclose(api.encode_text(caps), ref, atol=1e-5)
    img = api.encode_image(torch.stack([api.preprocess(Image.new("RGB", (80, 60), "red"))]))
    assert img.shape == (1, 32)
    from llm2clip.testing.tiny_models import make_tiny_llm
    narrow = make_tiny_llm(tmp_path / "narrow", tiny_world["tokenizer"], hidden=32)
    with pytest.raises(ValueError, match="32 wide but the adapter expects 64"):
        llm2clip.load_model(str(tmp_path / "model"), text_model_path=str(narrow)).encode_text(caps)


def test_missing_sidecars_can_run_the_embed_step_first(tiny_world, tmp_path):
    """data.missing_sidecars=embed: no sidecars yet -> stage 2 runs the embed step, then trains on them."""
    import yaml
    w = tiny_world
    emb = tmp_path / "emb"
    embed_cfg = tmp_path / "embed.yaml"
    embed_cfg.write_text(yaml.safe_dump({
        "text": {"model_path": str(w["llama"]), "attn_implementation": "sdpa", "max_length": 64},
        "data": {"shards": f"{w['data']}/train/shard-*.tar", "fields": ["txt", "json:short_alt", "json:dense",
                                                                        "json:dense_alt"]},
        "output": {"out_dir": str(emb), "image_root": str(w["data"])}, "run": {"progress_bar": False}}))
    out = tmp_path / "run"
    run_cmd([sys.executable, TRAIN, *stage2_args(w, emb, out, "--set", "train.max_steps=2", "--set", "data.val_shards=",
                                                 "--set", "train.eval_every=0", "--set", "data.num_workers=0",
                                                 "--set", "data.missing_sidecars=embed",
                                                 "--set", f"data.embed_config={embed_cfg}")], timeout=300)
    assert json.loads((emb / "train/index.json").read_text())["shards"] == 4
    assert (out / "export/model/model.safetensors").is_file()


def test_exact_epochs_when_shards_split_evenly(tiny_world, embedded):
    """data.epochs=2 with 4 equal shards over 1 rank x 2 workers: 32 steps of 50, every sample exactly twice."""
    from collections import Counter
    from llm2clip.config import load_config
    from llm2clip.data.stage2_stream import Stage2Stream, dataset_shards, make_loader, steps_for_epochs
    from llm2clip.schema_stage2 import Stage2Config
    w = tiny_world
    args = [a for a in stage2_args(w, embedded, "/tmp/x") if a != "--set"]
    cfg = load_config(Stage2Config, None, args + ["data.epochs=2", "data.num_workers=2"])
    steps, warn = steps_for_epochs(dataset_shards(cfg.data.shards), 2, 50, 1, 2)
    assert steps == 32 and warn is None
    ds = Stage2Stream(cfg.data, 50, 0, 0, 1, 64, (0.5,) * 3, (0.5,) * 3, False)
    counts = Counter(k for _, b in zip(range(steps), make_loader(ds, 2)) for k in b["keys"])
    assert len(counts) == 800 and set(counts.values()) == {2}
    # unbalanced: 3 streams over 4 shards -> a warning that epochs are approximate
    steps3, warn3 = steps_for_epochs(dataset_shards(cfg.data.shards), 1, 50, 1, 3)
    assert steps3 == 16 and "approximate" in warn3


def _corrupt_jpgs(tar_path, n_bad):
    """Overwrite the first n_bad JPEGs of a shard with zeros (same size: the sidecar still matches)."""
    import tarfile
    with tarfile.open(tar_path) as tf:
        victims = [m for m in tf.getmembers() if m.name.endswith(".jpg")][:n_bad]
    with open(tar_path, "r+b") as fh:
        for m in victims:
            fh.seek(m.offset_data)
            fh.write(b"\x00" * m.size)


@pytest.mark.slow
def test_data_counters_sum_over_ranks(tiny_world, embedded, tmp_path):
    """2 ranks, one shard each (num_workers=0: one stream per rank); rank 0's shard has 2 corrupt images,
    rank 1's has 3. metrics.jsonl, data_stats.json and TensorBoard say 5; the rank files say 2 and 3."""
    import shutil
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
                       "--set", "data.num_workers=0", "--set", "data.shuffle_buffer=1",  # shard order
                       "--set", "train.micro_batch_size=16",
                       "--set", "train.max_steps=3", "--set", "train.eval_every=0", "--set", "train.save_every=3")
    torchrun(TRAIN, args, timeout=300)
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


def test_uint8_loader_pixels_give_the_float_path_loss(tiny_world, embedded):
    """The loader ships uint8 crops; normalised on the device they equal the old float32 worker output
    bit for bit, and a stage-2 step's loss is the same; the validation share of a rank is uint8 too."""
    import numpy as np
    import torch
    from PIL import Image
    from llm2clip.config import load_config
    from llm2clip.data.rng import keyed_rng
    from llm2clip.data.shards import iter_tar_samples
    from llm2clip.data.stage2_stream import Stage2Stream, make_loader
    from llm2clip.data.transforms import TrainTransform
    from llm2clip.schema_stage2 import Stage2Config
    from llm2clip.tasks.stage2 import Stage2Task
    import io

    w = tiny_world
    cfg = load_config(Stage2Config, None, [a for a in stage2_args(w, embedded, "/tmp/x") if a != "--set"])
    task = Stage2Task(cfg)
    module = task.module().float()
    tower = task.model.tower
    ds = Stage2Stream(cfg.data, 8, 0, 0, 1, tower.image_size, tower.mean, tower.std, False)
    batch = next(iter(make_loader(ds, 0)))
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (8, 3, tower.image_size, tower.image_size)

    def old_float_crop(img, key):  # what the workers produced before: numpy float32, normalised on the host
        tf = TrainTransform(tower.image_size, tower.mean, tower.std, scale=tuple(cfg.data.crop_scale))
        box = tf.crop_box(img.width, img.height, keyed_rng(0, "crop", key, 0))
        a = np.asarray(img.convert("RGB").resize((tower.image_size,) * 2, Image.Resampling.BICUBIC, box=box),
                       dtype=np.float32) / 255.0
        a = (a - np.asarray(tower.mean, dtype=np.float32)) / np.asarray(tower.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    jpgs = {s["__key__"]: s["jpg"] for sh in sorted((w["data"] / "train").glob("shard-*.tar"))
            for s in iter_tar_samples(str(sh), want={"jpg"})}
    old = torch.stack([old_float_crop(Image.open(io.BytesIO(jpgs[k])), k) for k in batch["keys"]])
    new = task.device_pixels(batch["pixels"], torch.device("cpu"), torch.float32)
    assert torch.equal(new, old)

    class Engine:
        device = torch.device("cpu")

        def __call__(self, *a):
            return module(*a)

    loss, m, n = task.loss(Engine(), batch)
    ref = task.loss_fn(*module(old, batch["emb"].float()))
    assert n == 8 and torch.equal(loss, ref)
    # validation: each rank holds its own uint8 share, together the whole set once
    shares = []
    for rank in range(2):
        task.rank, task.world = rank, 2
        shares.append(task._load_val())
    assert all(px.dtype == torch.uint8 for px, _ in shares)
    task.rank, task.world = 0, 1
    whole, emb = task._load_val()
    assert sum(px.shape[0] for px, _ in shares) == whole.shape[0] > 0
    assert torch.equal(torch.cat([shares[0][0], shares[1][0]]).sort(0).values, whole.sort(0).values)
