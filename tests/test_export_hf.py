"""Hugging Face export of the vision tower: a plain transformers process (llm2clip never imported)
loads it and gets the same image embeddings as llm2clip.load_model(...).encode_image."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llm2clip.export_hf import HFExportError, export_hf_vision
from llm2clip.model import LLM2CLIPModel
from llm2clip.vision import build_vision_tower

H, IMG = 32, 32
VISION = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2, num_attention_heads=2, image_size=IMG,
              patch_size=8)
TEXT = dict(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            bos_token_id=1, eos_token_id=3, pad_token_id=0)

# Runs in a fresh interpreter: transformers only. Prints, per folder in argv[2:], the embeddings of the
# pixels in argv[1].
LOADER = r"""
px = torch.load(sys.argv[1])
for d in sys.argv[2:]:
    print(json.dumps(one(d)))
"""
ONE = r"""
import json, sys, torch, transformers as tf
def one(d):
  m = tf.AutoModel.from_pretrained(d).eval()
  out = {"auto_class": type(m).__name__}
  with torch.no_grad():
      pooled = m(pixel_values=px).pooler_output
      if json.load(open(d + "/config.json"))["model_type"] == "clip_vision_model":
          wp = tf.CLIPVisionModelWithProjection.from_pretrained(d).eval()
          emb = wp(pixel_values=px).image_embeds
          out["pooled_same"] = bool(torch.equal(wp.vision_model(pixel_values=px).pooler_output, pooled))
      else:
          from safetensors.torch import load_file
          emb = pooled @ load_file(d + "/visual_projection.safetensors")["weight"].T
  proc = tf.AutoImageProcessor.from_pretrained(d)
  out["processor"] = type(proc).__name__
  out["emb"] = emb.tolist()
  out["llm2clip_imported"] = any(k.startswith("llm2clip") for k in sys.modules)
  return out
"""


def _model_dir(tmp_path, kind: str, pretrained_proj: bool):
    import transformers as tf

    tmp_path.mkdir()
    torch.manual_seed(0)
    src = tmp_path / f"src_{kind}"
    if kind == "clip":
        tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)).save_pretrained(src)
    else:
        tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)).save_pretrained(src)
    m = LLM2CLIPModel(build_vision_tower("auto", src, use_pretrained_proj=pretrained_proj), llm_dim=16, embed_dim=12,
                      adapter_blocks=1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))  # trained weights differ from the source folder's
    return m.save_pretrained(tmp_path / f"model_{kind}")


CASES = [("clip", False), ("clip", True), ("siglip", False)]


def test_hf_export_matches_encode_image(tmp_path):
    """CLIP (fresh projection; kept pretrained projection folded in) and SigLIP (+ projection file)."""
    import llm2clip

    outs, ours = [], []
    px = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    torch.save(px, tmp_path / "px.pt")
    for i, (kind, pretrained_proj) in enumerate(CASES):
        model_dir = _model_dir(tmp_path / str(i), kind, pretrained_proj)
        out = export_hf_vision(model_dir, tmp_path / str(i) / "hf_vision")
        assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
        outs.append(str(out))
        ours.append(llm2clip.load_model(str(model_dir)).encode_image(px))
    # one fresh interpreter for all folders (its transformers import dominates the test's time)
    r = subprocess.run([sys.executable, "-c", ONE + LOADER, str(tmp_path / "px.pt"), *outs], capture_output=True,
                       text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()[-len(CASES):]]
    for (kind, _), got, mine in zip(CASES, rows, ours):
        assert not got["llm2clip_imported"]
        assert got["auto_class"] == ("CLIPVisionModel" if kind == "clip" else "SiglipVisionModel")
        assert got["processor"].startswith("CLIPImageProcessor" if kind == "clip" else "SiglipImageProcessor")
        if kind == "clip":
            assert got["pooled_same"]
        torch.testing.assert_close(torch.tensor(got["emb"]), mine, rtol=0, atol=1e-5)


def test_hf_export_refuses_unrepresentable(tmp_path):
    import transformers as tf

    src = tmp_path / "src"
    tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)).save_pretrained(src)
    m = LLM2CLIPModel(build_vision_tower("auto", src, image_size=48), llm_dim=16, embed_dim=12, adapter_blocks=1)
    with pytest.raises(HFExportError, match="trained at 48px"):
        export_hf_vision(m, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
