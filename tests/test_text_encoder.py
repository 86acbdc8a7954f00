"""Bidirectional attention, pooling masks, templates and bad-input errors of the text encoder."""
import pytest
import torch

from llm2clip.schema import TextEncoderConfig
from llm2clip.text.encoder import ModelFolderError, build_text_encoder, resolve_attn_implementation
from llm2clip.text.tokenize import TokenizerError


def _enc(path, **kw):
    cfg = TextEncoderConfig(model_path=str(path), **kw)
    enc, ptok = build_text_encoder(cfg)
    return enc.eval(), ptok


def _hidden(enc, batch):
    return enc.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_bidirectional_future_tokens_matter(tiny_world, family, impl, side):
    enc, ptok = _enc(tiny_world[family], attn_implementation=impl, padding_side=side)
    texts = ["a red circle on the left", "a small blue square"]
    changed = ["a red circle on the right", "a small blue star"]
    with torch.no_grad():
        for bs in (1, 2):  # batch size 1 and a padded batch
            b1, b2 = ptok(texts[:bs]), ptok(changed[:bs])
            h1, h2 = _hidden(enc, b1), _hidden(enc, b2)
            # token 1 (the first caption word) sees the last word only if attention is bidirectional
            pos = 1 if side == "right" else b1.input_ids.shape[1] - len(ptok.encode_one(texts[0])[0]) + 1
            assert (h1[0, pos] - h2[0, pos]).abs().max() > 1e-4


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_causal_mode_and_padding_does_not_leak(tiny_world, impl):
    enc, ptok = _enc(tiny_world["llama"], attn_implementation=impl, attention="causal")
    with torch.no_grad():
        h1 = _hidden(enc, ptok(["a red circle on the left"]))
        h2 = _hidden(enc, ptok(["a red circle on the right"]))
        assert torch.allclose(h1[0, 1], h2[0, 1], atol=1e-6)  # causal: the future is invisible
    for attention in ("bidirectional", "causal"):
        for side in ("left", "right"):
            enc, ptok = _enc(tiny_world["llama"], attn_implementation=impl, attention=attention, padding_side=side)
            with torch.no_grad():
                alone = enc.encode(ptok(["a cat"]))
                padded = enc.encode(ptok(["a cat", "a much longer caption about a big green star"]))
            assert torch.allclose(alone[0], padded[0], atol=1e-5), (attention, side)


def test_mean_pooling_excludes_instruction_and_template(tiny_world):
    enc, ptok = _enc(tiny_world["llama"], template="llama3", pool_scope="caption")  # llm2vec scope: test_embedder
    ids, mask = ptok.encode_one("a red circle", "Given a caption, retrieve a similar relevant caption: ")
    caption_ids = ptok.tok("a red circle", add_special_tokens=False)["input_ids"]
    kept = [i for i, m in zip(ids, mask) if m]
    assert kept == caption_ids  # exactly the caption tokens are pooled
    assert len(ids) > len(caption_ids) + 5
    batch = ptok(["a red circle"], "Given a caption, retrieve a similar relevant caption: ")
    with torch.no_grad():
        h = _hidden(enc, batch)[0]
        pooled = enc.encode(batch)[0]
    m = batch.embed_mask[0].bool()
    assert torch.allclose(pooled, h[m].mean(0), atol=1e-6)
    assert not torch.allclose(pooled, h.mean(0), atol=1e-4)


def test_last_and_cls_pooling(tiny_world):
    for side in ("left", "right"):
        enc, ptok = _enc(tiny_world["llama"], pooling="last", padding_side=side)
        b = ptok(["a cat", "a big green star on the left"])
        with torch.no_grad():
            h, pooled = _hidden(enc, b), enc.encode(b)
        last = b.attention_mask[0].nonzero().max()
        assert torch.allclose(pooled[0], h[0, last])
    enc, ptok = _enc(tiny_world["bert"], pooling="cls", padding_side="right")
    b = ptok(["a cat"])
    with torch.no_grad():
        assert torch.allclose(enc.encode(b)[0], _hidden(enc, b)[0, 0])


def test_truncation_keeps_template(tiny_world):
    enc, ptok = _enc(tiny_world["llama"], template="llama3", max_length=48, pool_scope="caption")
    full_ids, full_mask = ptok.encode_one("red", "")
    ids, mask = ptok.encode_one("red " * 100, "")
    assert len(ids) == 48 and sum(mask) == 48 - (len(full_ids) - sum(full_mask))
    tail = len(full_ids) - max(i for i, m in enumerate(full_mask) if m) - 1
    assert ids[-tail:] == full_ids[-tail:]  # the template's closing tokens survive truncation
    with pytest.raises(TokenizerError, match="no room"):
        _enc(tiny_world["llama"], template="llama3", max_length=8)[1].encode_one("red", "x " * 20)


def test_missing_model_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*nowhere"):
        build_text_encoder(TextEncoderConfig(model_path=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="no config.json"):
        from llm2clip.text.encoder import load_backbone
        load_backbone(TextEncoderConfig(model_path=str(tmp_path / "empty")))


def test_tokenizer_without_pad_token(tiny_world, tmp_path):
    from llm2clip.testing.tiny_models import save_tokenizer_without_pad
    nopad = save_tokenizer_without_pad(tiny_world["tokenizer"], tmp_path / "nopad")
    cfg = TextEncoderConfig(model_path=str(tiny_world["llama"]), tokenizer_path=str(nopad))
    with pytest.raises(TokenizerError, match=r"no pad token.*text.pad_token=eos"):
        build_text_encoder(cfg)
    cfg.pad_token = "eos"
    enc, ptok = build_text_encoder(cfg)
    assert ptok.tok.pad_token_id == ptok.tok.eos_token_id


def test_flash_attention_requested_but_missing_is_clear():
    import importlib.util
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn installed here")
    with pytest.raises(ImportError, match="flash-attn package is not installed"):
        resolve_attn_implementation("flash_attention_2")
    assert resolve_attn_implementation("auto") == "sdpa"
