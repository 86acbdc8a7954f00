"""The one TextEmbedder: packing == padding, position-correct encoders, pooling scope, empty captions,
the dtype / attention policy."""
import pytest
import torch

from llm2clip.schema import TextEncoderConfig
from llm2clip.text.batching import plan_packed, plan_stats
from llm2clip.text.embedder import TextEmbedder
from llm2clip.text.encoder import block_mask, build_text_encoder, resolve_attn_implementation, segment_positions
from llm2clip.text.tokenize import EmptyCaptionError, PromptTokenizer, pack_rows

INSTR = "Given a caption, retrieve a similar relevant caption: "
MIXED = ["a cat", "a red circle on the left of a big green square above a small blue star on a white background",
         "two", "a small blue square", "the quick brown fox jumps over the lazy dog near the river bank today",
         "red", "a big yellow triangle at the bottom right corner"]


def _embedder(path, packing, budget=256, **kw):
    cfg = TextEncoderConfig(model_path=str(path), packing=packing, **kw)
    return TextEmbedder(cfg, device="cpu", token_budget=budget, max_batch_size=64)


def test_pack_rows_covers_everything_and_fills_rows():
    lengths = [5, 3, 8, 2, 2, 9, 1, 40, 7, 7]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(10))
    assert all(sum(lengths[i] for i in r) <= 10 or len(r) == 1 for r in rows)
    assert pack_rows(lengths, 10) == rows  # deterministic
    st = plan_stats(plan_packed(lengths, 40, 100), lengths)
    assert st.captions == 10 and st.tokens == sum(lengths)


def test_segment_positions_and_block_mask():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [-1, -1, 2, 2, 2, 2]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]]
    m = block_mask(seg, torch.float32)
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.float32
    assert m[0, 0, 0, 2] == 0 and m[0, 0, 0, 3] == torch.finfo(torch.float32).min  # no cross-caption attention
    assert m[0, 0, 5, 5] == 0 and (m[0, 0, 5, :5] < 0).all()  # a pad token sees only itself


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "bert"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_equals_unpacked(tiny_world, family, impl):
    """fp32: packed rows (several captions per row, block-diagonal float mask, positions restarting)
    give each caption the embedding it gets alone, with instructions and a template."""
    kw = dict(attn_implementation=impl, template="llama3" if family != "bert" else "none", max_length=64)
    packed, plain = _embedder(tiny_world[family], "on", **kw), _embedder(tiny_world[family], "off", **kw)
    assert packed.packing and not plain.packing
    e_packed = packed.embed(MIXED, INSTR)
    st = packed.stats
    assert st.batches < 4 and st.padded_tokens < 1.5 * st.tokens
    alone = torch.cat([plain.embed([t], INSTR) for t in MIXED])
    assert (e_packed - alone).abs().max() < 1e-5
    assert (packed.embed(MIXED[:1], INSTR) - alone[:1]).abs().max() < 1e-5  # a batch of one
    assert (plain.embed(MIXED, INSTR) - alone).abs().max() < 1e-5  # padded batches too


@pytest.mark.parametrize("side", ["left", "right"])
def test_absolute_position_encoder_is_batch_invariant(tiny_world, side):
    """BERT (absolute positions): a caption's embedding does not depend on what else is in its batch."""
    enc, ptok = build_text_encoder(TextEncoderConfig(model_path=str(tiny_world["bert"]), padding_side=side,
                                                     attn_implementation="eager"))
    enc.eval()
    with torch.no_grad():
        alone = enc.encode(ptok(["a cat"]))
        mixed = enc.encode(ptok(["a cat", MIXED[1], MIXED[4]]))
    assert (alone[0] - mixed[0]).abs().max() <= 1e-6


def test_pooling_scope_llm2vec_keeps_template_tail(tiny_world):
    """llama3 template: llm2vec pools the caption and <|eot_id|>; pool_scope=caption the caption only."""
    from llm2clip.text.tokenize import load_tokenizer

    tok = load_tokenizer(str(tiny_world["llama"]))
    tpl = "<s>{instruction}{text}</s>"  # special tokens of the test tokenizer stand in for the header / eot
    cap = tok("a red circle", add_special_tokens=False)["input_ids"]
    head = tok("<s>" + "Q: ", add_special_tokens=False)["input_ids"]
    tail = tok("</s>", add_special_tokens=False)["input_ids"]
    ids, m = PromptTokenizer(tok, tpl, 64, pool_scope="llm2vec").encode_one("a red circle", "Q: ")
    pre = ids[:len(ids) - len(head) - len(cap) - len(tail)]
    assert ids == pre + head + cap + tail
    assert m == [0] * (len(pre) + len(head)) + [1] * (len(cap) + len(tail))
    ids2, m2 = PromptTokenizer(tok, tpl, 64, pool_scope="caption").encode_one("a red circle", "Q: ")
    assert ids2 == ids and m2 == [0] * (len(pre) + len(head)) + [1] * len(cap) + [0] * len(tail)
    _, m3 = PromptTokenizer(tok, tpl, 64, pool_special_tokens=True).encode_one("a red circle", "Q: ")
    assert m3[:len(pre)] == [1] * len(pre)  # the tokenizer's BOS pooled too


def test_encoder_only_pools_every_non_pad_token_by_default(tiny_world):
    """sentence-transformers' mean pooling for BERT: [CLS] text [SEP], all of it."""
    emb = TextEmbedder(TextEncoderConfig(model_path=str(tiny_world["bert"])), device="cpu")
    ptok = emb.tokenizer()
    ids, m = ptok.encode_one("a red circle")
    assert ptok.special_prefix and m == [1] * len(ids) and ids[0] == ptok.special_prefix[0]
    off = TextEmbedder(TextEncoderConfig(model_path=str(tiny_world["bert"]), pool_special_tokens="no"), device="cpu")
    assert off.tokenizer().encode_one("a red circle")[1][0] == 0


def test_pooling_scope_changes_the_fingerprint(tiny_world):
    from llm2clip.text.feature_cache import encoder_fingerprint

    a = TextEncoderConfig(model_path=str(tiny_world["llama"]), template="llama3")
    b = TextEncoderConfig(model_path=str(tiny_world["llama"]), template="llama3", pool_scope="caption")
    c = TextEncoderConfig(model_path=str(tiny_world["llama"]), template="llama3", packing="off")
    assert encoder_fingerprint(a) != encoder_fingerprint(b)
    assert encoder_fingerprint(a) == encoder_fingerprint(c)  # packing does not change the math


def test_empty_caption_is_an_error_naming_it(tiny_world):
    emb = _embedder(tiny_world["llama"], "auto")
    with pytest.raises(EmptyCaptionError, match=r"shard-3.tar key 0007.*text.empty_captions=skip"):
        emb.embed(["a cat", "  "], labels=["shard-3.tar key 0001", "shard-3.tar key 0007"])


def test_dtype_and_attention_policy():
    import importlib.util

    assert resolve_attn_implementation("auto", torch.float32) == "sdpa"
    if importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        with pytest.raises(ValueError, match="bf16/fp16 only"):
            resolve_attn_implementation("flash_attention_2", torch.float32)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_stage1_step_packed_equals_padded(tiny_world, impl):
    """A stage-1 step (Stage1Task.loss: instructions, queries, positives, hard negatives) gives the same
    loss and LoRA gradients with packed rows as with padded ones (fp32), on fewer token slots."""
    from peft import LoraConfig, get_peft_model

    from llm2clip.data.pairs import Example
    from llm2clip.schema import Stage1Config
    from llm2clip.tasks.stage1 import Stage1Task
    from llm2clip.text.encoder import TextEncoder

    exs = [Example(MIXED[i], MIXED[(i + 1) % 7], MIXED[(i + 3) % 7]) for i in range(7)]
    results = {}
    for packing in ("on", "off"):
        cfg = Stage1Config()
        cfg.data.query_instruction = "Q: "
        cfg.text = TextEncoderConfig(model_path=str(tiny_world["llama"]), attn_implementation=impl, packing=packing,
                                     max_length=64)
        enc, ptok = build_text_encoder(cfg.text, dtype=torch.float32)
        torch.manual_seed(0)
        backbone = get_peft_model(enc.backbone, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        task = Stage1Task.__new__(Stage1Task)
        task.cfg, task.empty_skipped = cfg, 0
        task.encoder = TextEncoder(backbone, "mean")
        task.embedder = TextEmbedder(cfg.text, "cpu", encoder=task.encoder, ptok=ptok)

        class Engine:
            device = torch.device("cpu")

            def __call__(self, *a):
                return task.encoder(*a)

        task._prefetch = None
        task.stream = type("OneBatch", (), {"next_batch": lambda self: (exs, True), "state_dict": lambda self: {},
                                            "skipped": 0})()
        loss, _, n_tokens = task.loss(Engine(), task._next_batch())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}
        tb, _ = task.embedder.train_batch([t for e in exs for t in (e.query, e.positive, e.negative)], "")
        results[packing] = (loss.detach(), grads, n_tokens, tb.n_slots)
    (lp, gp, tp, sp), (lu, gu, tu, su) = results["on"], results["off"]
    assert abs(float(lp - lu)) < 1e-5 and tp == tu
    assert sp < 0.8 * su  # packing computes fewer token slots than padding to the longest
    assert gp.keys() == gu.keys() and len(gp) > 0
    for k in gp:  # relative to the gradient's scale (temperature 0.02 makes them ~10): fp32 summation noise
        assert (gp[k] - gu[k]).abs().max() <= 1e-5 * max(1.0, float(gu[k].abs().max())), k


@pytest.mark.slow
def test_zero3_with_lora_path_two_process(tiny_world, tmp_path):
    """text.lora_path under ZeRO-3 (2 processes): the adapter is merged into the partitioned weights
    (each layer gathered whole, merged, re-partitioned) and the embeddings equal base+adapter merged
    in one process; the CRA-style sharded embedding runs every rank in lockstep."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from tests.helpers import ROOT, torchrun

    torch.manual_seed(0)
    base = AutoModel.from_pretrained(str(tiny_world["llama"]))
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "adapter"))
    torchrun(str(ROOT / "tests/dist_scripts/zero3_lora_path.py"),
             [str(tiny_world["llama"]), str(tmp_path / "adapter"), str(tmp_path)], timeout=300)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(x["local_fraction"] < 0.6 for x in r), "ZeRO-3 partitioned the weights while loading"
    cfg = TextEncoderConfig(model_path=str(tiny_world["llama"]), lora_path=str(tmp_path / "adapter"),
                            attn_implementation="sdpa", max_length=64)
    plain = TextEmbedder(TextEncoderConfig(model_path=str(tiny_world["llama"]), attn_implementation="sdpa",
                                           max_length=64), "cpu")
    caps = ["a cat", "a red circle on the left", "two blue squares", "a star", "a big green triangle"]
    ref = TextEmbedder(cfg, "cpu").embed(caps)
    for x in r:
        got = torch.tensor(x["emb"])
        assert (got - ref).abs().max() < 1e-4
    assert (ref - plain.embed(caps)).abs().max() > 1e-3  # the adapter changes the embeddings


def test_embed_window_empty_captions_error_or_skip(tiny_world, tmp_path):
    """The embed step names the shard and key of an empty caption, or skips and counts it."""
    import json

    import webdataset as wds

    from llm2clip.tasks.embed import ShardJob, load_window

    shard = str(tmp_path / "s.tar")
    with wds.TarWriter(shard) as w:
        w.write({"__key__": "k0", "txt": "a cat", "json": json.dumps({"dense": "a small cat"})})
        w.write({"__key__": "k1", "txt": "   ", "json": json.dumps({"dense": "a dog"})})
        w.write({"__key__": "k2", "txt": "a star", "json": json.dumps({"dense": ""})})
        w.write({"__key__": "k3", "json": json.dumps({"dense": "no txt member at all"})})  # missing, not empty
    ptok = _embedder(tiny_world["llama"], "auto").tokenizer()
    job = ShardJob(shard, str(tmp_path / "s_emb.tar"), 0, None)
    with pytest.raises(EmptyCaptionError, match=r"2 empty.*s.tar key k1 field txt.*s.tar key k2 field json:dense"):
        load_window([job], ["txt", "json:dense"], ptok, "", "error")
    win = load_window([job], ["txt", "json:dense"], ptok, "", "skip")
    assert win.empty == 2 and len(win.items) == len(win.encoded) == 5
    assert ("k1" not in {k for _, k, f in win.items if f == "txt"})


def test_stage1_empty_captions_error_or_skip():
    from llm2clip.data.pairs import Example
    from llm2clip.schema import Stage1Config
    from llm2clip.tasks.stage1 import Stage1Task

    task = Stage1Task.__new__(Stage1Task)
    task.cfg, task.empty_skipped = Stage1Config(), 0
    exs = [Example("a cat", "a small cat", "a dog"), Example("a star", " ", "a moon"), Example("x", "y", None)]
    with pytest.raises(EmptyCaptionError, match=r"example 1 positive ' '"):
        task._non_empty(exs, True)
    task.cfg.text.empty_captions = "skip"
    assert task._non_empty(exs[::2], False) == (exs[::2], 0)  # no negatives used: a None negative is fine
    assert task._non_empty(exs[:2], True) == (exs[:1], 1)


def test_attention_backends_agree_cpu(tiny_world):
    """The GPU acceptance check's code path on CPU (fp32, eager vs sdpa, padded vs packed)."""
    from llm2clip.testing.attention_check import check_attention_backends

    r = check_attention_backends(str(tiny_world["llama"]), device="cpu", dtype=torch.float32)
    assert r["ok"] and set(r["max_abs_diff"]) == {"eager/padded", "eager/packed", "sdpa/padded", "sdpa/packed"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_backends_agree_gpu():
    """bf16 on GPU: flash-attn (if importable), sdpa and eager give the same bidirectional embeddings."""
    from llm2clip.testing.attention_check import check_attention_backends

    assert check_attention_backends()["ok"]


def test_export_record_pool_scope_is_checked(tiny_world, tmp_path):
    """A stage-1 record from before pool_scope pooled the caption only: with a template that has closing
    tokens the embed step must be told (pool_scope=caption); without one both scopes pool the same."""
    import json
    import shutil

    from llm2clip.config import ConfigError
    from llm2clip.text.settings import check_against_export

    export = tmp_path / "merged"
    shutil.copytree(tiny_world["llama"], export)
    (export / "llm2clip_text.json").write_text(json.dumps({"pooling": "mean", "attention": "bidirectional",
                                                           "template": "llama3", "max_length": 64}))
    with pytest.raises(ConfigError, match="text.pool_scope='llm2vec'.*pool_scope='caption'"):
        check_against_export(TextEncoderConfig(model_path=str(export), template="llama3"))
    check_against_export(TextEncoderConfig(model_path=str(export), template="llama3", pool_scope="caption"))
    (export / "llm2clip_text.json").write_text(json.dumps({"pooling": "mean", "template": "none"}))
    check_against_export(TextEncoderConfig(model_path=str(export)))
