"""tools/eval_zero_shot.py end to end on tiny models + the synthetic eval sets (CPU).

Covers: LLM2CLIP + HF CLIP + a text-only LLM side by side (JSON + markdown), 2 ranks == 1 process
(metrics and every feature matrix bit-identical), the missing-image threshold, the eval path vs
calling the models directly, the text feature cache and fingerprint check, spec/kind errors.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import ROOT, torchrun
from llm2clip.config import ConfigError, load_config
from llm2clip.schema_eval import EvalConfig

TOOL = ROOT / "tools" / "eval_zero_shot.py"
_spec = importlib.util.spec_from_file_location("eval_zero_shot", TOOL)
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
    """tiny_world + a tiny LLM2CLIP export whose text side is the tiny llama."""
    from llm2clip.model.clip_model import LLM2CLIPModel
    from llm2clip.schema import TextEncoderConfig
    from llm2clip.text.feature_cache import FileHashCache, fingerprint_of, fingerprint_record
    from llm2clip.vision.towers import build_vision_tower

    root = tmp_path_factory.mktemp("eval")
    llama = str(tiny_world["llama"])
    # what stage 2 records (the embed step's fingerprint record) + the encoder folder
    record = fingerprint_record(TextEncoderConfig(model_path=llama, max_length=64), "", FileHashCache("off"))
    info = {**record, "fingerprint": fingerprint_of(record), "model_path": llama, "padding_side": "left"}
    torch.manual_seed(0)
    model = LLM2CLIPModel(build_vision_tower("auto", tiny_world["clip"]), llm_dim=64, embed_dim=32, adapter_blocks=1,
                          text_encoder_info=info)
    model.save_pretrained(root / "ours")
    no_path = {k: v for k, v in info.items() if k != "model_path"}
    model.text_encoder_info = no_path  # as stage 2 writes it today: fingerprint + settings, no folder
    model.save_pretrained(root / "ours_nopath")
    data = tiny_world["data"]
    return {**tiny_world, "root": root, "ours": root / "ours", "ours_nopath": root / "ours_nopath",
            "karpathy": data / "eval" / "retrieval" / "karpathy.json",
            "cls": data / "eval" / "classification", "val": str(data / "val" / "shard-*.tar")}


def _args(w, out: Path, extra=()) -> list[str]:
    return ["--model", f"ours=llm2clip:{w['ours']}", "--model", f"clip=hf_clip:{w['clip']}",
            "--model", f"llama=text:{w['llama']}",
            "--dataset", f"coco=karpathy:{w['karpathy']}",
            "--dataset", f"shapes=imagefolder:{w['cls']},templates=dataset|simple,"
                         f"templates={w['cls'] / 'zeroshot_classification_templates.txt'}",
            "--cra", f"val=shards:{w['val']},fields=txt|json:short_alt",
            "--output", str(out), "--set", "run.num_workers=0", "--set", "run.batch_size=16",
            "--set", "run.text_batch_size=64", "--set", "run.text_token_budget=1024", "--set", "run.progress=false",
            *extra]


@pytest.fixture(scope="module")
def single_run(world):
    out = world["root"] / "single" / "results.json"
    report = tool.main(_args(world, out, ["--set", "run.save_features=true"]))
    return out, report


def test_end_to_end_side_by_side(world, single_run):
    out, report = single_run
    saved = json.loads(out.read_text())
    assert saved["results"] == report["results"] and saved["format"] == "llm2clip-eval/1"
    res = saved["results"]
    assert list(res) == ["ours", "clip", "llama"]  # columns in the order given
    retrieval_keys = {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    zs_keys = {f"top{k}/{s}" for k in (1, 5) for s in ("dataset", "simple", "zeroshot_classification_templates.txt")}
    for m in ("ours", "clip"):
        assert set(res[m]["coco"]) == retrieval_keys
        assert set(res[m]["shapes"]) == zs_keys
        assert set(res[m]["val"]) == {"cra", "cra_lenient"}
    assert res["llama"]["coco"] is None and res["llama"]["shapes"] is None  # text models: CRA only
    assert set(res["llama"]["val"]) == {"cra", "cra_lenient"}
    values = [v for m in res.values() for d in m.values() if d for v in d.values()]
    assert values and all(0.0 <= v <= 100.0 for v in values)
    # top5 of 6 classes is never below top1
    assert all(res[m]["shapes"][f"top5/{s}"] >= res[m]["shapes"][f"top1/{s}"] for m in ("ours", "clip")
               for s in ("dataset", "simple"))
    ds = saved["datasets"]
    assert ds["coco"]["images"] == 200 and ds["coco"]["texts"] == 800 and ds["coco"]["missing"] == 0
    from llm2clip.eval.readers import read_imagefolder

    own = len(read_imagefolder(str(world["cls"])).templates)  # what the reader finds next to the data
    assert ds["shapes"]["classes"] == 6 and ds["shapes"]["templates"] == {"dataset": own, "simple": 1,
                                                                             "zeroshot_classification_templates.txt": 6}
    assert ds["val"]["pairs"] == 200 and ds["val"]["skipped"] == 0
    assert saved["baseline"] == "clip" and saved["world_size"] == 1
    assert saved["models"]["ours"]["text_encoder"]["model_path"] == str(world["llama"])
    assert saved["models"]["ours"]["text_stats"]["encoded"] > 0
    assert set(saved["timing"]["models"]["ours"]["datasets"]) == {"coco", "shapes", "val"}
    assert saved["config"]["models"]["ours"]["kind"] == "llm2clip"
    md = out.with_suffix(".md").read_text()
    assert "| dataset | metric | ours | clip | llama | Δ ours − clip | Δ llama − clip |" in md
    assert f"| coco | i2t_R@1 | {res['ours']['coco']['i2t_R@1']:.2f} | {res['clip']['coco']['i2t_R@1']:.2f} | – |" in md
    assert "| val | cra |" in md and "200 images, 800 captions" in md


def test_zero_shot_matches_direct_clip(world, single_run):
    """The hf_clip column equals a from-scratch computation with transformers directly."""
    from PIL import Image
    from transformers import AutoTokenizer, CLIPModel

    from llm2clip.eval.hf_clip import HFCLIPModel
    from llm2clip.eval.readers import read_imagefolder

    _, report = single_run
    clip = CLIPModel.from_pretrained(str(world["clip"])).eval()
    tok = AutoTokenizer.from_pretrained(str(world["clip"]))
    pre = HFCLIPModel.from_pretrained(world["clip"]).preprocess
    ds = read_imagefolder(str(world["cls"]))
    with torch.no_grad():
        prompts = [f"a photo of a {c}." for c in ds.classnames]  # "simple"
        t = clip.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
        t = getattr(t, "pooler_output", t)
        pix = torch.stack([pre(Image.open(p).convert("RGB")) for p, _ in ds.samples])
        i = clip.get_image_features(pixel_values=pix)
        i = getattr(i, "pooler_output", i)
    w = t / t.norm(dim=-1, keepdim=True)
    logits = (i / i.norm(dim=-1, keepdim=True)) @ w.T
    labels = torch.tensor([lab for _, lab in ds.samples])
    top1 = 100.0 * int((logits.argmax(1) == labels).sum()) / len(labels)
    assert report["results"]["clip"]["shapes"]["top1/simple"] == pytest.approx(top1, abs=1e-9)


def test_eval_path_matches_direct_calls(world):
    """text_features (dedup, sharding, batching) == the model's own encode_text; image features
    through the DataLoader path == preprocess + encode_image; the llm2clip text side == adapter(LLM)."""
    from llm2clip.eval.models import build_model
    from llm2clip.eval.readers import load_image, read_imagefolder
    from llm2clip.schema_eval import EvalModelConfig, EvalRunConfig
    from llm2clip.tasks.evaluate import encode_images

    run = EvalRunConfig(num_workers=0, batch_size=7, text_batch_size=5, progress=False)
    ds = read_imagefolder(str(world["cls"]))
    prompts = [f"a photo of a {c}." for c in ds.classnames] * 2 + ["a drawing of a star."]
    refs = [r for r, _ in ds.samples[:20]]
    clip = build_model("clip", EvalModelConfig(kind="hf_clip", path=str(world["clip"])), run)
    torch.testing.assert_close(clip.text_features(prompts), clip.clip.encode_text(prompts), rtol=1e-5, atol=1e-5)
    direct = clip.encode_image(torch.stack([clip.preprocess(load_image(r)) for r in refs]))
    torch.testing.assert_close(encode_images(clip, refs, run, "test"), direct, rtol=1e-5, atol=1e-5)

    ours = build_model("ours", EvalModelConfig(kind="llm2clip", path=str(world["ours"])), run)
    feats = ours.text_features(prompts)
    enc = ours.llm.embedder().encoder()
    batch = ours.llm.embedder().tokenizer()(prompts, "")
    with torch.no_grad():
        manual = ours.model.encode_text_embedding(enc(batch.input_ids, batch.attention_mask, batch.embed_mask))
    torch.testing.assert_close(feats, manual, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.encode_text(prompts), manual, rtol=1e-4, atol=1e-5)
    assert torch.equal(feats[0], feats[len(ds.classnames)])  # a repeated prompt is encoded once


def test_distributed_matches_single_process(world, single_run):
    out1, report1 = single_run
    out2 = world["root"] / "dist" / "results.json"
    torchrun(str(TOOL), _args(world, out2, ["--set", "run.save_features=true"]), nproc=2, timeout=300)
    r2 = json.loads(out2.read_text())
    assert r2["world_size"] == 2
    assert r2["results"] == report1["results"]  # identical floats, not approximately equal
    from safetensors.torch import load_file

    for m in ("ours", "clip", "llama"):
        a, b = load_file(report1["feature_files"][m]), load_file(r2["feature_files"][m])
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{m}/{k} differs between 1 and 2 ranks"


def test_missing_images_threshold(world, tmp_path, capsys):
    src = world["karpathy"].parent
    dst = tmp_path / "retrieval"
    shutil.copytree(src, dst)
    gone = sorted((dst / "images").iterdir())[:3]
    for p in gone:
        p.unlink()
    base = ["--model", f"hf_clip:{world['clip']}", "--output", str(tmp_path / "r.json"),
            "--set", "run.num_workers=0", "--set", "run.progress=false"]
    ds = f"karpathy:{dst / 'karpathy.json'}"
    with pytest.raises(SystemExit) as e:
        tool.main(base + ["--dataset", ds])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "MissingImagesError" in err and "3 of 200 images are missing" in err and str(gone[0]) in err
    assert not (tmp_path / "r.json").exists()  # nothing scored
    report = tool.main(base + ["--dataset", ds + ",max_missing_fraction=0.02"])
    info = report["datasets"]["karpathy"]
    assert info["missing"] == 3 and info["images"] == 197 and sorted(info["missing_files"]) == sorted(map(str, gone))
    assert "3 images missing" in (tmp_path / "r.md").read_text()


def test_text_cache_and_fingerprint(world, tmp_path):
    from llm2clip.eval.models import build_model
    from llm2clip.schema_eval import EvalModelConfig, EvalRunConfig

    run = EvalRunConfig(num_workers=0, progress=False, text_cache_dir=str(tmp_path / "cache"))
    texts = ["a red circle", "a blue square on a white background", "a red circle"]
    first = build_model("ours", EvalModelConfig(kind="llm2clip", path=str(world["ours"])), run)
    a = first.text_features(texts)
    assert first.llm.stats["encoded"] == 2 and first.llm.embedder()._enc is not None
    # the export without an encoder folder works from the cache alone; the LLM is never loaded
    second = build_model("ours", EvalModelConfig(kind="llm2clip", path=str(world["ours_nopath"])), run)
    assert torch.equal(second.text_features(texts), a)
    assert second.llm.stats["from_cache"] == 2 and second.llm.embedder()._enc is None
    with pytest.raises(ConfigError, match=r"text.model_path"):  # a new text needs the encoder
        second.text_features(["a green star"])
    # another LLM than the one stage 2 trained on is refused, naming what differs
    wrong = build_model("ours", EvalModelConfig(kind="llm2clip", path=str(world["ours"]),
                                                text={"model_path": str(world["qwen2"])}),
                        EvalRunConfig(num_workers=0, progress=False))
    with pytest.raises(ConfigError, match=r"fingerprint.*differ in: .*model"):
        wrong.text_features(texts)
    other_len = build_model("ours", EvalModelConfig(kind="llm2clip", path=str(world["ours"]), text={"max_length": 32}),
                            EvalRunConfig(num_workers=0, progress=False))
    with pytest.raises(ConfigError, match=r"differ in: max_length"):
        other_len.text_features(texts)


def test_specs_and_errors(world, tmp_path, capsys):
    ov = tool.quick_overrides(["llm2clip:runs/s2/export/model", "mine=hf_clip:/m/clip",
                               "text:/m/merged,text.max_length=64,name=enc"],
                              ["karpathy:/d/coco.json,images_root=/d/img,max_captions_per_image=5",
                               "imagefolder:/d/in/val,templates=openai80+simple"],
                              ["shards:/d/val/{000..009}.tar,fields=txt|json:short_alt,max_samples=100"], "o.json")
    cfg = load_config(EvalConfig, None, ov)
    assert list(cfg.models) == ["s2", "mine", "enc"] and cfg.models["enc"].text == {"max_length": 64}
    assert cfg.datasets["coco"].options == {"images_root": "/d/img", "max_captions_per_image": 5}
    assert cfg.datasets["val"].templates == ["openai80", "simple"]
    assert cfg.cra["val-shards"].path == "/d/val/{000..009}.tar"  # brace commas belong to the path
    assert cfg.cra["val-shards"].fields == ["txt", "json:short_alt"] and cfg.cra["val-shards"].max_samples == 100
    assert cfg.run.output == "o.json" and cfg.baseline_name() == "mine"

    def fails(args, *needles):
        with pytest.raises(SystemExit) as e:
            tool.main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, err

    ds = ["--dataset", f"karpathy:{world['karpathy']}"]
    fails(["--model", f"clipp:{world['clip']}", *ds], "models.", "not a valid kind", "llm2clip", "hf_clip", "text")
    fails(["--model", f"hf_clip:{world['clip']}", "--dataset", "coco:/x.json"], "not a dataset kind", "karpathy",
          "imagefolder")
    fails(["--model", f"hf_clip:{world['clip']}", *ds[:1], ds[1] + ",max_captions=5"],
          "no option 'max_captions'", "max_captions_per_image")
    fails(["--model", f"llm2clip:{world['clip']}", *ds], "not a llm2clip folder", "llm2clip_config.json")
    fails(["--model", f"clip=hf_clip:{world['clip']}", "--set", "models.clip.text.model_path=/x", *ds],
          "text overrides apply to llm2clip and text models")
    fails(["--model", f"text:{world['llama']}", *ds], "datasets need an image-text model")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"caption1": "a", "caption2": "b"}\n{"caption1": "c"}\n{"caption1": \n')
    fails(["--model", f"text:{world['llama']}", "--cra", f"jsonl:{bad}"], f"{bad}:3", "invalid JSON")


def test_cra_sources(world, tmp_path):
    from llm2clip.schema_eval import EvalCRAConfig
    from llm2clip.tasks.evaluate import read_cra

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"caption1": "a", "caption2": "b"}\n\n{"caption1": "c"}\n{"caption1": "d", "caption2": "e"}\n')
    p = read_cra("p", EvalCRAConfig(kind="jsonl", path=str(pairs)))
    assert (p.texts1, p.texts2, p.skipped) == (["a", "d"], ["b", "e"], 1) and p.skipped_examples == [f"{pairs}:3"]
    k = read_cra("k", EvalCRAConfig(kind="karpathy", path=str(world["karpathy"]), max_samples=50))
    data = json.loads(world["karpathy"].read_text())["images"]
    assert len(k.texts1) == 50 and k.texts1[0] == data[0]["sentences"][0]["raw"]
    assert k.texts2[0] == data[0]["sentences"][1]["raw"]
    s = read_cra("s", EvalCRAConfig(kind="shards", path=world["val"]))
    assert len(s.texts1) == 200 and s.texts1[0] == k.texts1[0]  # txt == first Karpathy sentence
