"""The memory plan (llm2clip/memory_plan.py, tools/plan_memory.py) against what is really allocated.

- Parameter / master / gradient / optimizer bytes: equal (to the byte) to the storages a live DeepSpeed
  engine holds (tests/dist_scripts/memory_alloc.py), ZeRO 0, 2, 3, 1 and 2 processes.
- Activations: within 10% of the bytes autograd really keeps for backward in a CPU forward of the
  stage-1 encoder (saved_tensors_hooks, deduplicated by storage, parameters excluded).
- Counts of the Llama-3.2-1B shape, built on the meta device, equal the published figure and the LoRA
  count worked out by hand.
"""
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, torchrun

ALLOC = str(ROOT / "tests/dist_scripts/memory_alloc.py")

LLAMA_3_2_1B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
                "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def _tiny_llama(path, **kw):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, **kw)
    torch.manual_seed(0)
    tf.AutoModel.from_config(cfg).save_pretrained(str(path))
    return path


def _check_alloc_lines(out: str, stages: set[int], nproc: int) -> None:
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {r["stage"] for r in rows} == stages, out[-2000:]
    assert len(rows) == len(stages) * nproc, out[-2000:]  # every rank reports every stage
    for r in rows:
        assert r["measured"] == r["planned"], r
        assert r["meta_counts"][1] == r["real_counts"][1]  # trainable (LoRA) counted on the meta device


def test_engine_allocation_equals_plan_one_process(tmp_path):
    model = _tiny_llama(tmp_path / "m")
    p = subprocess.run([sys.executable, ALLOC, str(model), "0", "2", "3"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    _check_alloc_lines(p.stdout, {0, 2, 3}, 1)


@pytest.mark.slow
def test_engine_allocation_equals_plan_two_processes(tmp_path):
    """World 2: ZeRO-3 partitions (ceil(numel/2) each, small tensors persistent on every rank) and the
    ZeRO-2 flat partition, byte for byte."""
    model = _tiny_llama(tmp_path / "m")
    p = torchrun(ALLOC, [str(model), "0", "1", "2", "3"], timeout=400)
    _check_alloc_lines(p.stdout, {0, 1, 2, 3}, 2)


def test_llama_3_2_1b_shape_counts(tmp_path):
    from llm2clip.memory_plan import count_params, meta_model, read_model_config, zero_state
    from llm2clip.schema import LoraConfig

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    cfg = read_model_config(str(tmp_path))
    c = count_params(meta_model(cfg, LoraConfig(r=16)))
    assert c.n_frozen == 1_235_814_400  # Llama-3.2-1B's published size (tied embeddings, no LM head)
    h, kv, f = 2048, 8 * 64, 8192
    per_layer = 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + f) + (f + h))  # q, k+v, o, gate+up, down
    assert c.n_trainable == 16 * per_layer == 11_272_192
    comp = {x.name: x.bytes for x in zero_state(c, 3, 8, 2, {"zero_optimization": {
        "stage3_param_persistence_threshold": 0}})}
    assert comp["base weights"] == sum(-(-n // 8) for n in c.frozen) * 2
    assert comp["optimizer states"] == 8 * sum(-(-n // 8) for n in c.trainable) + 4


@pytest.mark.parametrize("attn,ckpt", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_activations_within_10_percent_of_measured(attn, ckpt):
    """Measured: the bytes autograd keeps for backward in the stage-1 encoder's packed forward (CPU,
    fp32, LoRA with dropout), via saved_tensors_hooks, each storage once, parameters left out; with
    gradient checkpointing, the layer inputs kept plus the one layer recomputed during backward (its
    saved tensors measured the same way)."""
    import transformers as tf
    from peft import LoraConfig as PeftLora, get_peft_model

    from llm2clip.memory_plan import MemoryPlan, _activation_components, trace_activations
    from llm2clip.schema import LoraConfig
    from llm2clip.text.encoder import TextEncoder

    lora = LoraConfig(r=8, alpha=16, dropout=0.05)
    L, R, W = 3, 4, 96
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=128, num_hidden_layers=L, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=352)
    cfg.is_causal = False
    torch.manual_seed(0)
    model = get_peft_model(tf.AutoModel.from_config(cfg, attn_implementation=attn),
                           PeftLora(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                    target_modules=lora.target_modules)).train()
    enc = TextEncoder(model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    full = saved_bytes(enc, R, W, params)
    if ckpt:  # checkpointing keeps each layer's input, then recomputes one layer at a time in backward
        per_layer = (full - measure_with_layers(enc, model, 1, R, W, params)) / (L - 1)
        measured = full - L * per_layer + L * 128 * 4 * R * W + per_layer
    else:
        measured = full
    act = trace_activations(cfg, lora, torch.float32)
    plan = MemoryPlan("t", 1, 80.0)
    _activation_components(plan, cfg, act, R * W, R, W, L, ckpt, attn, 4)
    assert abs(plan.total - measured) <= 0.10 * measured, (plan.total, measured, plan.components)


def saved_bytes(enc, R: int, W: int, params) -> int:
    """Bytes of the distinct storages autograd saves for backward in one packed forward (4 captions per
    row), parameters excluded: the measurement the plan's activations are checked against."""
    seen: dict[int, int] = {}

    def pack(t):
        k = t.untyped_storage().data_ptr()
        if k not in params:
            seen[k] = max(seen.get(k, 0), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(3, 100, (R, W))
    ones = torch.ones(R, W, dtype=torch.long)
    seg = torch.arange(R * W).view(R, W) // (W // 4)  # 4 captions per packed row
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc(ids, ones, ones, seg)
    return sum(seen.values())


def measure_with_layers(enc, model, layers: int, R: int, W: int, params) -> int:
    """The same forward with only the first `layers` decoder layers (per-layer bytes by difference)."""
    base = model.get_base_model()
    keep = base.layers
    base.layers = keep[:layers]
    try:
        torch.manual_seed(0)
        return saved_bytes(enc, R, W, params)
    finally:
        base.layers = keep


def _stage1_yaml(tmp_path, model_path, **train):
    import yaml

    cfg = {"run": {"output_dir": str(tmp_path / "run")},
           "text": {"model_path": str(model_path), "attn_implementation": "sdpa", "max_length": 64},
           "data": {"sources": [{"path": "x.tar"}]},
           "train": {"micro_batch_size": 8, "deepspeed_config": str(ROOT / "ds_configs/zero3_bf16.json"), **train}}
    p = tmp_path / "stage1.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools/plan_memory.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


@pytest.mark.slow
def test_tool_prints_plan_and_verdict(tmp_path):
    cfgp = _stage1_yaml(tmp_path, _tiny_llama(tmp_path / "m"))
    p = _tool("--config", str(cfgp), "--world", "2", "--gpu-mem", "80")
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("base weights", "trainable params", "gradients", "optimizer states", "activations",
                 "attention workspace", "contrastive logits", "deepspeed buckets", "total", "fits:"):
        assert name in p.stdout, p.stdout
    p = _tool("--config", str(cfgp), "--world", "2", "--gpu-mem", "0.01", "--json")
    assert p.returncode == 3  # does not fit
    d = json.loads(p.stdout)
    assert d["fits"] is False and d["total"] == sum(d["components"].values())


def test_bad_input_model_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    cfgp = _stage1_yaml(tmp_path, tmp_path / "empty")
    p = _tool("--config", str(cfgp), "--world", "8")
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "text.model_path" in lines[0] and "config.json" in lines[0], p.stderr


def test_log_plan_warns_when_it_does_not_fit(caplog):
    import logging

    from llm2clip.memory_plan import MemoryPlan, log_plan

    log = logging.getLogger("llm2clip")
    plan = MemoryPlan("stage1", 8, gpu_mem_gib=1.0)
    plan.add("base weights", 2 * 1024 ** 3)
    with caplog.at_level(logging.INFO, logger="llm2clip"):
        log_plan(plan, log)
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "DOES NOT FIT" in warn[0].getMessage() and "micro_batch_size" in warn[0].getMessage()
    caplog.clear()
    plan.gpu_mem_gib = 80.0
    with caplog.at_level(logging.INFO, logger="llm2clip"):
        log_plan(plan, log)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "fits: 2.0 GiB of 80 GiB" in caplog.text


def test_planning_leaves_the_training_rng_alone():
    """The engine logs the plan after seeding: a plan that drew from the RNG (LoRA init, dropout in the
    traces) would change the run's dropout masks, so a logged plan would change the losses."""
    from transformers import LlamaConfig

    from llm2clip.memory_trace import meta_model, trace_activations
    from llm2clip.schema import LoraConfig as LoraCfg

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    meta_model(cfg, LoraCfg())
    trace_activations(cfg, LoraCfg(), torch.float32)
    assert torch.equal(torch.rand(3), want)


def test_contrastive_chunk_plans_one_chunks_activations(tmp_path):
    """GradCache keeps one chunk's graph: micro-batch 8 in chunks of 2 plans the activations of micro-batch 2,
    plus the micro-batch's cached embeddings (and, under ZeRO 0-2, the early chunks' gradient sum)."""
    from llm2clip.memory_plan import plan_from_config

    cfgp = _stage1_yaml(tmp_path, _tiny_llama(tmp_path / "m"))
    plans = {(mb, c, z): plan_from_config(str(cfgp), 2, overrides=[f"train.micro_batch_size={mb}",
                                                                   f"train.contrastive_chunk={c}",
                                                                   f"train.strategy={z}"])
             for mb, c, z in ((8, 0, "zero3"), (2, 0, "zero3"), (8, 2, "zero3"), (8, 2, "replicated"))}
    act = {k: p.get("activations") for k, p in plans.items()}
    assert act[8, 2, "zero3"] == act[2, 0, "zero3"] == act[8, 0, "zero3"] // 4
    z3, rep = plans[8, 2, "zero3"], plans[8, 2, "replicated"]
    assert z3.get("gradcache embeddings") == 2 * 8 * 3 * 64 * 2  # 8 x (query, positive, hard negative), bf16
    assert "gradcache gradient sum" not in {c.name for c in z3.components}
    assert rep.get("gradcache gradient sum") == rep.get("trainable params")  # one bf16 copy of the LoRA
    assert z3.info["contrastive_chunk"] == 2
