"""Tiny random models: each family builds, saves via save_pretrained and reloads offline to the same outputs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from llm2clip.data.synthetic import render_scene, sample_scene, write_tokenizer
from llm2clip.testing import tiny_models as tm

TEXTS = ["a red circle", "Given a caption, retrieve a similar relevant caption. a large blue star on the left"]


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def image():
    import random
    return render_scene(sample_scene(random.Random(0), 64))


def _text_batch(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)(TEXTS, padding=True, return_tensors="pt")


@pytest.mark.parametrize("family", tm.LLM_FAMILIES)
def test_llm_builds_saves_reloads(family, tok_dir, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    rng_before = torch.random.get_rng_state()
    path = tm.make_tiny_llm(tmp_path / family, tok_dir, family=family, seed=0)
    assert torch.equal(rng_before, torch.random.get_rng_state()), "global torch RNG must be untouched"
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    cfg = json.loads((path / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert cfg["vocab_size"] == len(tok) and cfg["pad_token_id"] == tok.pad_token_id == 1
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    loader = AutoModel if family == "bert" else AutoModelForCausalLM
    batch = _text_batch(path)
    with torch.no_grad():
        outs = []
        for _ in range(2):  # same seed twice -> same weights; reload -> same outputs
            fresh = tm.make_tiny_llm(tmp_path / f"{family}-again", tok_dir, family=family, seed=0)
            m = loader.from_pretrained(fresh).eval()
            outs.append(m(**batch, output_hidden_states=True).hidden_states[-1])
        reloaded = loader.from_pretrained(path).eval()
        out = reloaded(**batch, output_hidden_states=True).hidden_states[-1]
    assert out.shape == (2, batch["input_ids"].shape[1], 64) and torch.isfinite(out).all()
    assert torch.equal(out, outs[0]) and torch.equal(outs[0], outs[1])
    if family != "bert":
        assert cfg["num_key_value_heads"] == 2
        other = loader.from_pretrained(tm.make_tiny_llm(tmp_path / "seed1", tok_dir, family=family, seed=1))
        assert not torch.equal(other.get_input_embeddings().weight, reloaded.get_input_embeddings().weight)


def test_clip_builds_saves_reloads(tok_dir, tmp_path, image):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = tm.make_tiny_clip(tmp_path / "clip", tok_dir, seed=0)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("a photo of a circle.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # CLIP pools at eos
    proc = AutoImageProcessor.from_pretrained(path)
    pixels = proc(images=[image, image.rotate(90)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 64, 64)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    model = CLIPModel.from_pretrained(path).eval()
    assert model.config.text_config.vocab_size == len(tok) and model.config.projection_dim == 64
    with torch.no_grad():
        a = model(**batch, pixel_values=pixels)
        b = CLIPModel.from_pretrained(tm.make_tiny_clip(tmp_path / "clip2", tok_dir, seed=0)).eval()(
            **batch, pixel_values=pixels)
    assert a.image_embeds.shape == (2, 64) and a.text_embeds.shape == (2, 64)
    assert torch.equal(a.logits_per_image, b.logits_per_image)


def test_siglip_vision_builds_saves_reloads(tmp_path, image):
    from transformers import AutoImageProcessor, AutoModel, SiglipVisionModel

    path = tm.make_tiny_siglip_vision(tmp_path / "siglip", seed=0)
    pixels = AutoImageProcessor.from_pretrained(path)(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    model = AutoModel.from_pretrained(path).eval()
    assert isinstance(model, SiglipVisionModel)
    with torch.no_grad():
        a = model(pixel_values=pixels).pooler_output
        b = SiglipVisionModel.from_pretrained(tm.make_tiny_siglip_vision(tmp_path / "s2", seed=0))(
            pixel_values=pixels).pooler_output
    assert a.shape == (1, 64) and torch.equal(a, b)


def test_tokenizer_without_pad(tok_dir, tmp_path):
    from transformers import AutoTokenizer

    dst = tm.save_tokenizer_without_pad(tok_dir, tmp_path / "nopad")
    tok = AutoTokenizer.from_pretrained(dst)
    assert tok.pad_token is None and tok.pad_token_id is None
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    with pytest.raises(ValueError):
        tok(TEXTS, padding=True)


def test_unknown_family(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        tm.make_tiny_llm(tmp_path / "x", tok_dir, family="gpt9")


def test_cli(tok_dir, tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_models.py"
    spec = importlib.util.spec_from_file_location("make_tiny_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    paths = mod.main(["--tokenizer", str(tok_dir), "--out", str(tmp_path / "models"), "--families", "qwen2,siglip"])
    assert set(paths) == {"qwen2", "siglip"}
    assert (tmp_path / "models" / "tiny-qwen2" / "config.json").is_file()
    assert (tmp_path / "models" / "tiny-siglip" / "preprocessor_config.json").is_file()
    assert json.loads(capsys.readouterr().out)["qwen2"].endswith("tiny-qwen2")
