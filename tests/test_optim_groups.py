"""AdamW param groups: decay exclusions, layer-wise lr decay, coverage, frozen params."""
from __future__ import annotations

import pytest
import torch

from llm2clip.model import LLM2CLIPModel
from llm2clip.optim_groups import build_param_groups, is_no_decay, param_groups_for_llm2clip
from llm2clip.vision import VisionTower

LAYERS = 3
TOWER_CFG = {
    "kind": "hf_clip", "hf_class": "CLIPVisionModel", "image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3,
    "logit_scale_init": None, "logit_bias_init": None, "out_dim": 12,
    "proj": {"in_dim": 16, "out_dim": 12, "bias": False},
    "hf_config": {"model_type": "clip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                  "num_hidden_layers": LAYERS, "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
}


def _model(freeze_first_k=0, logit_bias=False):
    tower = VisionTower.from_config(TOWER_CFG)
    if freeze_first_k:
        tower.freeze(freeze_first_k)
    return LLM2CLIPModel(tower, llm_dim=8, embed_dim=6, adapter_blocks=1, logit_bias=logit_bias)


def _groups(model, **kw):
    args = dict(tower_lr=1e-3, head_lr=2e-3, adapter_lr=3e-3, weight_decay=0.05, layer_decay=0.5)
    args.update(kw)
    return param_groups_for_llm2clip(model, **args)


def _names(model):
    return {id(p): n for n, p in model.named_parameters()}


def test_every_trainable_param_exactly_once():
    m = _model(logit_bias=True)
    groups = _groups(m)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters() if p.requires_grad}
    torch.optim.AdamW(groups)  # torch accepts the groups (extra keys included)


def test_frozen_params_excluded():
    m = _model(freeze_first_k=2)
    ids = {id(p) for g in _groups(m) for p in g["params"]}
    frozen = {id(p) for p in m.parameters() if not p.requires_grad}
    assert frozen and not ids & frozen
    assert ids == {id(p) for p in m.parameters() if p.requires_grad}


def test_weight_decay_exclusions():
    m = _model(logit_bias=True)
    names = _names(m)
    for g in _groups(m):
        for p in g["params"]:
            n = names[id(p)]
            excluded = (p.ndim <= 1 or n.endswith(".bias") or "position_embedding" in n or "class_embedding" in n
                        or n in ("logit_scale", "logit_bias"))
            assert g["weight_decay"] == (0.0 if excluded else 0.05), n
    # spot checks
    assert is_no_decay("tower.model.embeddings.position_embedding.weight", torch.zeros(5, 4))
    assert is_no_decay("tower.model.post_layernorm.weight", torch.zeros(4))
    assert not is_no_decay("tower.model.embeddings.patch_embedding.weight", torch.zeros(4, 3, 2, 2))
    assert not is_no_decay("adapter.blocks.0.fc1.weight", torch.zeros(4, 4))
    assert is_no_decay("tower.model.head.probe", torch.zeros(1, 1, 4))


def test_layer_decay_formula_and_part_lrs():
    m = _model()
    names = _names(m)
    decay, L = 0.5, LAYERS
    for g in _groups(m, layer_decay=decay):
        for p in g["params"]:
            n = names[id(p)]
            if n.startswith("tower.model.encoder.layers."):
                i = int(n.split(".")[4])
                scale, base = decay ** (L - i), 1e-3
            elif n.startswith(("tower.model.embeddings.", "tower.model.pre_layrnorm.")):
                scale, base = decay ** (L + 1), 1e-3
            elif n.startswith("tower."):  # post-layernorm, pretrained projection
                scale, base = 1.0, 1e-3
            elif n.startswith("visual_proj"):
                scale, base = 1.0, 2e-3
            elif n.startswith("adapter"):
                scale, base = 1.0, 3e-3
            else:
                assert n == "logit_scale"
                scale, base = 1.0, 2e-3  # defaults to head_lr
            assert g["lr_scale"] == pytest.approx(scale), n
            assert g["base_lr"] == pytest.approx(base), n
            assert g["lr"] == pytest.approx(base * scale), n
    g = _groups(m, logit_scale_lr=7e-4)
    assert [x["lr"] for x in g if x["group_name"].startswith("logit_scale")] == [pytest.approx(7e-4)]


def test_build_param_groups_generic():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    b.weight.requires_grad_(False)
    shared = [("w", a.weight)]
    parts = {"x": [("w", a.weight), ("b", a.bias)], "y": shared + [("w2", b.weight), ("b2", b.bias)]}
    groups = build_param_groups(parts, {"x": 1.0, "y": 2.0}, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted({id(a.weight), id(a.bias), id(b.bias)})  # shared once, frozen out
    assert all(g["lr_scale"] == 1.0 for g in groups)
    with pytest.raises(ValueError, match="no learning rate"):
        build_param_groups(parts, {"x": 1.0}, weight_decay=0.1)
    with pytest.raises(ValueError, match="outside"):
        build_param_groups({"x": [("w", a.weight)]}, {"x": 1.0}, 0.1, 0.9, lambda part, n: 5, num_layers=2)
