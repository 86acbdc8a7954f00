"""Adapter shape/parameter count, vision towers from tiny local HF folders, LLM2CLIPModel save/load."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from llm2clip.model import LLM2CLIPModel, LLMAdapter
from llm2clip.vision import VisionTower, VisionTowerError, build_vision_tower

H, LAYERS, IMG, PATCH, PROJ = 32, 2, 32, 8, 24
VISION = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=LAYERS, num_attention_heads=2,
              image_size=IMG, patch_size=PATCH)
TEXT = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            bos_token_id=1, eos_token_id=3, pad_token_id=0)


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


def _save(model, path, preprocessor: dict | None = None):
    model.save_pretrained(str(path))
    if preprocessor is not None:
        (path / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import transformers as tf
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    clip = tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=PROJ,
                                      logit_scale_init_value=3.0))
    out = {"clip": _save(clip, root / "clip", {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]})}
    out["clip_vision"] = _save(tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)), root / "clip_vision")
    out["clip_vision_proj"] = _save(tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**VISION, projection_dim=PROJ)),
                                    root / "clip_vision_proj")
    out["siglip_vision"] = _save(tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)), root / "siglip_vision")
    sig = tf.SiglipModel(tf.SiglipConfig(text_config=dict(TEXT, projection_size=H), vision_config=VISION))
    with torch.no_grad():
        sig.logit_scale.fill_(2.5)
        sig.logit_bias.fill_(-7.0)
    out["siglip"] = _save(sig, root / "siglip")
    v2 = {k: v for k, v in VISION.items() if k != "image_size"}
    out["siglip2_vision"] = _save(tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**v2, num_patches=16)),
                                  root / "siglip2_vision")
    return out


def _pixels(b=2, size=IMG, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- adapter -------------------------------------------------------------------------------------

def test_adapter_parameter_count_matches_paper():
    with torch.device("meta"):
        a = LLMAdapter(2048, embed_dim=1280, num_blocks=4)
    total = sum(p.numel() for p in a.parameters())
    blocks = sum(p.numel() for p in a.blocks.parameters())
    blocks_weights_only = sum(p.numel() for n, p in a.blocks.named_parameters() if n.endswith("fc1.weight") or n.endswith("fc2.weight"))
    # Per block: LN 2*2048 + fc1 2048*4096+4096 + fc2 4096*2048+2048 = 16,787,456.
    assert blocks == 4 * 16_787_456 == 67_149_824
    assert round(blocks / 1e6, 1) == 67.1           # the paper's "67.1M" = the 4 residual blocks
    assert round(blocks_weights_only / 1e6, 1) == 67.1  # (also when counting Linear weights only)
    # + final LayerNorm (4,096) + Linear(2048 -> 1280) with bias (2,622,720)
    assert total == 67_149_824 + 4_096 + 2_622_720 == 69_776_640


def test_adapter_forward_and_width_error():
    a = LLMAdapter(16, embed_dim=8, num_blocks=2, source="/models/llm-x")
    x = torch.randn(5, 16)
    y = a(x)
    assert y.shape == (5, 8) and y.dtype == torch.float32
    # L2-normalisation first: the output does not depend on the input's norm.
    torch.testing.assert_close(a(3.0 * x), y)
    with pytest.raises(ValueError) as e:
        a(torch.randn(5, 12))
    msg = str(e.value)
    assert "16" in msg and "12" in msg and "/models/llm-x" in msg and "adapter_in_dim" in msg
    assert LLMAdapter(16, 8, num_blocks=0)(x).shape == (5, 8)


# ---- vision towers -------------------------------------------------------------------------------

def test_clip_full_folder(folders):
    t = build_vision_tower("auto", folders["clip"])
    assert t.kind == "hf_clip" and t.out_dim == PROJ and t.proj is not None
    assert t.image_size == IMG and t.num_layers == LAYERS and len(t.blocks()) == LAYERS
    assert t.mean == (0.1, 0.2, 0.3) and t.std == (0.4, 0.5, 0.6)
    assert t.logit_scale_init == pytest.approx(3.0)
    t.eval()
    y = t(_pixels())
    assert y.shape == (2, PROJ)
    # Matches the HF model's own image features (pooled -> visual_projection).
    from transformers import CLIPModel
    ref = CLIPModel.from_pretrained(str(folders["clip"]), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(t(_pixels()), ref.get_image_features(pixel_values=_pixels()).pooler_output)
    t2 = build_vision_tower("hf_clip", folders["clip"], use_pretrained_proj=False)
    assert t2.proj is None and t2.out_dim == H


def test_clip_vision_folders(folders):
    t = build_vision_tower("auto", folders["clip_vision"])
    assert t.out_dim == H and t.proj is None and t.logit_scale_init is None
    from llm2clip.data.transforms import OPENAI_CLIP_MEAN
    assert t.mean == OPENAI_CLIP_MEAN
    tp = build_vision_tower("auto", folders["clip_vision_proj"])
    assert tp.out_dim == PROJ and tp(_pixels()).shape == (2, PROJ)


def test_siglip_folders(folders):
    t = build_vision_tower("auto", folders["siglip_vision"])
    assert t.kind == "hf_siglip" and t.out_dim == H and t.mean == (0.5, 0.5, 0.5)
    assert t(_pixels()).shape == (2, H)
    full = build_vision_tower("auto", folders["siglip"])
    assert full.logit_scale_init == pytest.approx(2.5) and full.logit_bias_init == pytest.approx(-7.0)
    t2 = build_vision_tower("auto", folders["siglip2_vision"])
    assert t2.image_size == 4 * PATCH and t2.hf_class == "Siglip2VisionModel"
    assert t2(_pixels(size=t2.image_size)).shape == (2, H)


def test_image_size_override_interpolates(folders):
    t = build_vision_tower("auto", folders["clip_vision"], image_size=48)
    assert t.image_size == 48 and t(_pixels(size=48)).shape == (2, H)


def test_freezing(folders):
    t = build_vision_tower("auto", folders["clip"], freeze=True)
    assert not any(p.requires_grad for p in t.parameters())
    t = build_vision_tower("auto", folders["clip"], freeze_first_k=1)
    frozen = {n for n, p in t.named_parameters() if not p.requires_grad}
    assert any(n.startswith("model.embeddings.") for n in frozen)
    assert any(n.startswith("model.pre_layrnorm.") for n in frozen)
    assert any(n.startswith("model.encoder.layers.0.") for n in frozen)
    assert not any(n.startswith("model.encoder.layers.1.") for n in frozen)
    assert not any(n.startswith(("model.post_layernorm", "proj")) for n in frozen)
    with pytest.raises(VisionTowerError):
        build_vision_tower("auto", folders["clip"], freeze_first_k=LAYERS + 1)


def test_grad_checkpointing_same_grads(folders):
    grads = []
    for gc in (False, True):
        t = build_vision_tower("auto", folders["clip"], grad_checkpointing=gc, freeze_first_k=1)
        t.train()
        calls = []
        t.blocks()[-1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        t(_pixels()).square().sum().backward()
        assert len(calls) == (2 if gc else 1)  # checkpointed blocks recompute in backward
        grads.append({n: p.grad.clone() for n, p in t.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


def test_tower_errors(tmp_path, folders):
    with pytest.raises(VisionTowerError, match="does not exist"):
        build_vision_tower("auto", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VisionTowerError, match="no config.json") as e:
        build_vision_tower("hf_clip", tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    with pytest.raises(VisionTowerError, match="unknown vision tower kind"):
        build_vision_tower("resnet", folders["clip"])
    with pytest.raises(VisionTowerError, match="not a CLIP model"):
        build_vision_tower("hf_clip", folders["siglip_vision"])


@pytest.mark.skipif(__import__("importlib").util.find_spec("timm") is not None, reason="timm installed")
def test_timm_missing_is_clear(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))
    with pytest.raises(VisionTowerError, match="timm.*optional") as e:
        build_vision_tower("auto", tmp_path)
    assert "torchvision" in str(e.value)


def test_logit_scale_init_rule():
    from llm2clip.model.clip_model import initial_logit_scale

    assert initial_logit_scale(4.2, 2.0) == pytest.approx(4.2)  # the source checkpoint's scale first
    assert initial_logit_scale(None, 2.0) == pytest.approx(2.0)  # else the configured value
    assert initial_logit_scale(None, None) == pytest.approx(math.log(100.0))  # else where pretrained CLIPs end
    assert initial_logit_scale(None, None, logit_bias=True) == pytest.approx(math.log(10.0))  # SigLIP


def test_checkpoint_logit_scale_from_open_clip_file(tmp_path):
    """EVA02-CLIP hub folders keep the whole open_clip checkpoint (with logit_scale) beside the timm weights."""
    from safetensors.torch import save_file

    from llm2clip.vision.towers import checkpoint_logit_scale

    assert checkpoint_logit_scale(tmp_path) is None
    save_file({"visual.trunk.pos_embed": torch.zeros(1, 2, 4)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_logit_scale(tmp_path) is None
    save_file({"logit_scale": torch.tensor(4.6), "visual.trunk.pos_embed": torch.zeros(1, 2, 4)},
              str(tmp_path / "open_clip_model.safetensors"))
    assert checkpoint_logit_scale(tmp_path) == pytest.approx(4.6)


def _timm_folder(root, logit_scale: float | None):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    arch = "eva02_tiny_patch14_224"  # EVA02 blocks (rope, swiglu), the paper's tower family, 5.5M params
    m = timm.create_model(arch, pretrained=False, num_classes=0)
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 0,
                                                  "pretrained_cfg": {"input_size": [3, 224, 224]}}))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(root / "model.safetensors"))
    if logit_scale is not None:
        save_file({"logit_scale": torch.tensor(logit_scale)}, str(root / "open_clip_model.safetensors"))
    return root


def test_timm_tower_keeps_logit_scale(tmp_path):
    with_scale = build_vision_tower("auto", _timm_folder(tmp_path / "eva", 4.4))
    assert with_scale.kind == "timm" and with_scale.logit_scale_init == pytest.approx(4.4)
    m = LLM2CLIPModel(with_scale, llm_dim=16, embed_dim=12, logit_scale_init=1.0)
    assert m.logit_scale.item() == pytest.approx(4.4)
    bare = build_vision_tower("auto", _timm_folder(tmp_path / "eva_bare", None))
    assert bare.logit_scale_init is None
    assert LLM2CLIPModel(bare, llm_dim=16, embed_dim=12, logit_scale_init=1.5).logit_scale.item() == pytest.approx(1.5)
    assert LLM2CLIPModel(bare, llm_dim=16, embed_dim=12).logit_scale.item() == pytest.approx(math.log(100.0))
    assert m.encode_image(_pixels(size=224)).shape == (2, 12)


def test_tower_config_roundtrip(folders):
    for key in ("clip", "siglip_vision", "siglip2_vision"):
        t = build_vision_tower("auto", folders[key]).eval()
        t2 = VisionTower.from_config(json.loads(json.dumps(t.to_config()))).eval()
        t2.load_state_dict(t.state_dict())
        x = _pixels(size=t.image_size)
        with torch.no_grad():
            torch.testing.assert_close(t2(x), t(x), rtol=0, atol=0)


# ---- LLM2CLIP model -----------------------------------------------------------------------------

def test_model_forward_and_clamp(folders):
    m = LLM2CLIPModel(build_vision_tower("auto", folders["clip"]), llm_dim=16, embed_dim=12, adapter_blocks=2)
    assert m.logit_scale.item() == pytest.approx(3.0)  # kept from the CLIP folder
    assert m.visual_proj.bias is None and m.visual_proj.in_features == PROJ
    img, txt, scale = m(_pixels(), torch.randn(2, 16))
    assert img.shape == txt.shape == (2, 12)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    assert scale.item() == pytest.approx(math.exp(3.0), rel=1e-6)
    assert m.encode_image(_pixels()).shape == (2, 12) and m.encode_text_embedding(torch.randn(3, 16)).shape == (3, 12)
    with torch.no_grad():
        m.logit_scale.fill_(7.0)
    assert m(_pixels(), torch.randn(2, 16))[2].item() == pytest.approx(100.0, rel=1e-5)
    m.clamp_logit_scale()
    assert m.logit_scale.item() == pytest.approx(math.log(100.0))
    default = LLM2CLIPModel(build_vision_tower("auto", folders["clip_vision"]), llm_dim=16, embed_dim=12)
    assert default.logit_scale.item() == pytest.approx(math.log(100.0))  # no scale in the folder
    configured = LLM2CLIPModel(build_vision_tower("auto", folders["clip_vision"]), llm_dim=16, embed_dim=12,
                               logit_scale_init=2.0)
    assert configured.logit_scale.item() == pytest.approx(2.0)
    kept = LLM2CLIPModel(build_vision_tower("auto", folders["clip"]), llm_dim=16, embed_dim=12, logit_scale_init=2.0)
    assert kept.logit_scale.item() == pytest.approx(3.0)  # the checkpoint's learned scale wins
    sig = LLM2CLIPModel(build_vision_tower("auto", folders["siglip"]), llm_dim=16, embed_dim=12, logit_bias=True)
    out = sig(_pixels(), torch.randn(2, 16))
    assert len(out) == 4 and out[3].item() == pytest.approx(-7.0)


@pytest.mark.parametrize("key", ["clip", "siglip"])
def test_save_load_identical(folders, tmp_path, key):
    torch.manual_seed(0)
    m = LLM2CLIPModel(build_vision_tower("auto", folders[key]), llm_dim=16, embed_dim=12, adapter_blocks=2,
                      logit_bias=key == "siglip", text_encoder_info={"path": "/models/llm", "fingerprint": "abc"})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))  # move away from the init so a silent re-init would show
    m.eval()
    out_dir = tmp_path / "ckpt"
    m.save_pretrained(out_dir)
    assert sorted(os.listdir(out_dir)) == ["llm2clip_config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp folders left behind
    cfg = json.loads((out_dir / "llm2clip_config.json").read_text())
    assert cfg["text_encoder"]["fingerprint"] == "abc" and cfg["llm_dim"] == 16 and cfg["image_size"] == IMG
    # Rebuild must not need the tower folder.
    src = folders[key]
    hidden = src.parent / (src.name + ".hidden")
    os.rename(src, hidden)
    try:
        m2 = LLM2CLIPModel.from_pretrained(out_dir).eval()
    finally:
        os.rename(hidden, src)
    x, e = _pixels(), torch.randn(2, 16)
    with torch.no_grad():
        for a, b in zip(m(x, e), m2(x, e)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert m2.adapter.source == "/models/llm"
    # Saving again over an existing folder replaces it atomically.
    with torch.no_grad():
        m.logit_scale.fill_(1.0)
    m.save_pretrained(out_dir)
    assert LLM2CLIPModel.from_pretrained(out_dir).logit_scale.item() == pytest.approx(1.0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM2CLIPModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "llm2clip_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LLM2CLIPModel.from_pretrained(tmp_path / "half")
