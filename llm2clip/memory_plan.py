"""Per-GPU memory plan of a stage-1, embed or stage-2 run, from the model's config.json alone.

    plan = plan_stage1(cfg, world=8, gpu_mem_gib=80)
    print(plan.table())            # bytes by component, total, verdict

No weights are read. Parameter counts are exact: the model is built on the meta device
(`AutoModel.from_config` under `torch.device("meta")`), with the LoRA applied by peft as training does.
Parameter, gradient and optimizer bytes follow what DeepSpeed allocates for the ZeRO stage (checked
against a live engine in tests/test_memory_plan.py). Activations come from tracing one and two layers
of the meta model under `torch.autograd.graph.saved_tensors_hooks` (the tensors autograd keeps for
backward, deduplicated by storage, parameters left out) at two sequence lengths: the linear part is the
per-token activation memory, the quadratic part is the attention workspace of a kernel that keeps the
probabilities (eager; SDPA's math path). Flash-attention keeps none (only a log-sum-exp per token).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm2clip.memory_trace import (  # noqa: F401 (PlanError, read_model_config: part of this module's API)
    Activations, ParamCounts, PlanError, count_params, meta_model, read_model_config, trace_activations)

GiB = 1024 ** 3
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    task: str
    world: int
    gpu_mem_gib: float
    components: list[Component] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, nbytes: float, note: str = "") -> None:
        self.components.append(Component(name, int(nbytes), note))

    def get(self, name: str) -> int:
        return sum(c.bytes for c in self.components if c.name == name)

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem_gib * GiB

    def verdict(self) -> str:
        t = self.total / GiB
        if self.fits:
            return f"fits: {t:.1f} GiB of {self.gpu_mem_gib:g} GiB per GPU ({self.gpu_mem_gib - t:.1f} GiB spare)"
        return (f"DOES NOT FIT: {t:.1f} GiB needed per GPU, {self.gpu_mem_gib:g} GiB available; lower "
                "train.micro_batch_size, turn on text.gradient_checkpointing, or use more GPUs / ZeRO-3")

    def table(self) -> str:
        head = f"memory plan: {self.task}, {self.world} GPU(s), " + ", ".join(f"{k}={v}" for k, v in self.info.items())
        rows = [head] + [f"  {c.name:<24} {c.bytes / GiB:9.3f} GiB  {c.note}" for c in self.components]
        rows += [f"  {'total':<24} {self.total / GiB:9.3f} GiB", "  " + self.verdict()]
        return "\n".join(rows)

    def as_dict(self) -> dict:
        return {"task": self.task, "world": self.world, "gpu_mem_gib": self.gpu_mem_gib, "info": self.info,
                "components": {c.name: c.bytes for c in self.components}, "total": self.total, "fits": self.fits}


# ---- DeepSpeed state ----------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def zero_state(counts: ParamCounts, stage: int, world: int, pbytes: int, ds: dict) -> list[Component]:
    """Per-rank bytes of the model, fp32 master, gradients and Adam states under a ZeRO stage, as DeepSpeed
    0.19 allocates them: stage 3 partitions every tensor (ceil(numel / world) each, plus a whole copy of
    those under stage3_param_persistence_threshold); stages 1/2 partition master, gradients and optimizer
    state of the flat trainable group; the low-precision model stays whole below stage 3."""
    zo = ds.get("zero_optimization", {}) or {}
    shard = world if stage >= 1 else 1
    n_tr = counts.n_trainable
    if stage == 3:
        thr = int(zo.get("stage3_param_persistence_threshold", 100000))
        part = lambda ns: sum(_ceil_div(n, world) for n in ns)  # noqa: E731
        # persistent (small) tensors also stay whole on every rank; at world 1 the partition is the whole
        persist = lambda ns: sum(n for n in ns if n <= thr) if world > 1 else 0  # noqa: E731
        base = (part(counts.frozen) + persist(counts.frozen)) * pbytes
        train = (part(counts.trainable) + persist(counts.trainable)) * pbytes
        tr_part = part(counts.trainable)
    else:
        base, train = counts.n_frozen * pbytes, n_tr * pbytes
        tr_part = _ceil_div(n_tr, shard)
    out = [Component("base weights", base, "frozen, " + ("ZeRO-3 partitioned" if stage == 3 else "whole on every rank")),
           Component("trainable params", train, "low-precision copy the model runs on")]
    master = 0 if (stage == 0 and pbytes == 4) else tr_part * 4
    out.append(Component("fp32 master", master, "" if master else "fp32 training: the params are the master"))
    if stage == 0:
        grads = n_tr * pbytes
    elif stage == 3:
        grads = tr_part * pbytes  # grad_partitions_flat_buffer (gradient accumulation dtype = param dtype)
    else:
        grads = tr_part * 4  # the fp32 reduction result in this rank's partition
    out.append(Component("gradients", grads, f"{'partitioned' if stage >= 1 else 'whole'}"))
    # + AdamW's fp32 `step` scalar per tensor it sees (ZeRO hands it one flat tensor per group)
    steps = 4 * (len(counts.trainable) if stage == 0 else 1)
    out.append(Component("optimizer states", 2 * 4 * tr_part + steps, "AdamW exp_avg + exp_avg_sq, fp32"))
    return out


def zero_buckets(stage: int, pbytes: int, ds: dict, largest_layer: int) -> Component:
    """Communication buffers: the gradient reduce bucket(s) and, for ZeRO-3, the gathered parameters in
    flight (prefetch bucket + the layer being computed)."""
    zo = ds.get("zero_optimization", {}) or {}
    if stage == 0:
        return Component("deepspeed buckets", 0, "none at ZeRO-0")
    rb = int(float(zo.get("reduce_bucket_size", 5e8)))
    if stage == 3:
        prefetch = int(float(zo.get("stage3_prefetch_bucket_size", 5e7)))
        live = min(int(float(zo.get("stage3_max_live_parameters", 1e9))), 2 * largest_layer)
        b = rb * pbytes + (prefetch + live) * pbytes
        return Component("deepspeed buckets", b, "reduce bucket + prefetch + gathered layers in flight")
    n = 2 if zo.get("overlap_comm", stage == 3) else 1
    red = 4 if stage == 1 else pbytes
    return Component("deepspeed buckets", n * rb * red, f"{n} reduce bucket(s)")


def _layer_numel(model) -> int:
    """numel of the largest decoder/encoder layer (what ZeRO-3 gathers at once)."""
    best = 0
    for mod in model.modules():
        if type(mod).__name__.endswith(("DecoderLayer", "Layer")) and mod is not model:
            best = max(best, sum(p.numel() for p in mod.parameters()))
    return best


def _precision(train) -> str:
    return "bf16" if train.precision == "auto" else train.precision  # a plan is for the GPU run


def _ds(train) -> tuple[dict, int]:
    if not train.deepspeed_config:
        return {}, int(train.zero_stage or 0)
    from llm2clip.engine import read_ds_json

    ds = read_ds_json(train.deepspeed_config)
    stage = train.zero_stage if train.zero_stage is not None else ds.get("zero_optimization", {}).get("stage", 0)
    return ds, int(stage)


def _activation_components(plan: MemoryPlan, hf_cfg, act: Activations, tokens: int, rows: int, width: int,
                           layers: int, ckpt: bool, attn: str, pbytes: int) -> None:
    """attn: "flash" (flash-attn varlen: no mask), "sdpa" (fused kernel + the packed block mask) or
    "eager" (probabilities kept, the quadratic term of the trace)."""
    hidden = int(hf_cfg.hidden_size)
    heads = int(getattr(hf_cfg, "num_attention_heads", 1))
    head_dim = int(getattr(hf_cfg, "head_dim", None) or hidden // heads)
    per_layer = act.per_token_layer
    if attn != "eager":  # a fused kernel also keeps its output for backward (eager's trace has the probs)
        per_layer += heads * head_dim * pbytes
    # pooling keeps the selected hidden rows and the selection (bool mask + int64 segment ids)
    fixed = act.per_token_fixed + hidden * pbytes + 9
    full = layers * per_layer * tokens + fixed * tokens
    with_ckpt = layers * hidden * pbytes * tokens + per_layer * tokens + fixed * tokens
    plan.add("activations", with_ckpt if ckpt else full,
             f"{tokens:,} tokens; {per_layer / 1024:.1f} KiB/token/layer; without checkpointing "
             f"{full / GiB:.2f} GiB, with {with_ckpt / GiB:.2f} GiB")
    if attn == "eager":
        quad = act.quad_layer * rows * width * width * (1 if ckpt else layers)
        plan.add("attention workspace", quad, "eager: attention probabilities")
    else:
        plan.add("attention workspace", (1 if ckpt else layers) * heads * tokens * 4,
                 "fused kernel: log-sum-exp per token and head")
    if attn == "sdpa":  # eager adds the mask to the scores (nothing kept); flash-attn varlen has none
        plan.add("attention mask", rows * width * width * pbytes, "packed rows' block-diagonal mask")


def _gradcache_components(plan: MemoryPlan, emb_bytes: int, counts: ParamCounts, stage: int, pbytes: int) -> None:
    """What GradCache keeps besides one chunk's graph (llm2clip/gradcache.py): the whole micro-batch's
    embeddings from the no-grad pass and their gradients; under ZeRO 0-2 also the early chunks' summed
    parameter gradients (a full copy of the trainable gradients; ZeRO-3 accumulates in its partitions)."""
    plan.add("gradcache embeddings", 2 * emb_bytes, "micro-batch embeddings and their gradients")
    if stage < 3:
        plan.add("gradcache gradient sum", counts.n_trainable * pbytes, "early chunks' trainable gradients")


def plan_stage1(cfg, world: int, gpu_mem_gib: float = 80.0, tokens_per_caption: int | None = None) -> MemoryPlan:
    """tokens_per_caption: mean caption length in tokens (instruction and template included); default
    text.max_length, the worst case (packing removes padding, so shorter captions cost less)."""
    prec = _precision(cfg.train)
    pbytes = _DTYPE_BYTES[prec]
    dtype = torch.bfloat16 if pbytes == 2 else torch.float32
    ds, stage = _ds(cfg.train)
    hf_cfg = read_model_config(cfg.text.model_path)
    model = meta_model(hf_cfg, cfg.lora)
    counts = count_params(model)
    layers = int(hf_cfg.num_hidden_layers)
    per_example = 3 if cfg.data.hard_negatives else 2
    n_capt = cfg.train.micro_batch_size * per_example
    chunk = cfg.train.contrastive_chunk
    rows = (chunk or cfg.train.micro_batch_size) * per_example  # captions in one graph (GradCache: a chunk's)
    width = cfg.text.max_length
    tokens = rows * min(width, tokens_per_caption or width)
    # auto = flash-attn on the GPU the plan is for (its varlen route needs no mask); SDPA's fused kernels
    # keep no probabilities either, but the packed rows' mask
    attn = {"auto": "flash", "flash_attention_2": "flash"}.get(cfg.text.attn_implementation,
                                                               cfg.text.attn_implementation)
    plan = MemoryPlan("stage1", world, gpu_mem_gib,
                      info={"model": Path(cfg.text.model_path).name, "zero": stage, "precision": prec,
                            "micro_batch": cfg.train.micro_batch_size, "contrastive_chunk": chunk,
                            "max_length": width,
                            "grad_ckpt": cfg.text.gradient_checkpointing, "lora_r": cfg.lora.r if cfg.lora.enabled else 0,
                            "params": f"{counts.n_frozen:,} frozen + {counts.n_trainable:,} trainable"})
    plan.components += zero_state(counts, stage, world, pbytes, ds)
    act = trace_activations(hf_cfg, cfg.lora, dtype)
    _activation_components(plan, hf_cfg, act, tokens, rows, width, layers, cfg.text.gradient_checkpointing,
                           attn, pbytes)
    if chunk:
        _gradcache_components(plan, n_capt * int(hf_cfg.hidden_size) * pbytes, counts, stage, pbytes)
    g = n_capt * world
    n_local = cfg.train.micro_batch_size
    # gathered embeddings (fp32) + logits of the local queries against every document, and their softmax
    plan.add("contrastive logits", g * int(hf_cfg.hidden_size) * 4 + 3 * n_local * g * 4,
             f"{n_local} queries x {g} gathered captions")
    plan.components.append(zero_buckets(stage, pbytes, ds, _layer_numel(model)))
    return plan


def plan_embed(cfg, world: int, gpu_mem_gib: float = 80.0) -> MemoryPlan:
    """The frozen LLM whole on every GPU (no gradients) + one forward's transient tensors."""
    from llm2clip.text.encoder import resolve_dtype

    hf_cfg = read_model_config(cfg.text.model_path)
    dt = cfg.text.dtype if cfg.text.dtype != "auto" else "bfloat16"
    pbytes = 4 if resolve_dtype(dt) == torch.float32 else 2
    n = sum(p.numel() for p in meta_model(hf_cfg).parameters())
    plan = MemoryPlan("embed", world, gpu_mem_gib, info={"model": Path(cfg.text.model_path).name,
                                                          "token_budget": cfg.batch.token_budget})
    plan.add("base weights", n * pbytes, f"{n:,} params, frozen, whole on every rank (inference)")
    h = int(hf_cfg.hidden_size)
    f = int(getattr(hf_cfg, "intermediate_size", 4 * h))
    T = cfg.batch.token_budget
    # no graph: the residual stream + one layer's widest intermediates (gate, up, act) alive at once
    plan.add("activations", T * (3 * h + 3 * f) * pbytes, f"{T:,} tokens, one layer at a time (no grad)")
    plan.add("attention workspace", int(getattr(hf_cfg, "num_attention_heads", 1)) * T * 4, "flash-attn lse")
    return plan


def plan_stage2(cfg, world: int, gpu_mem_gib: float = 80.0, llm_dim: int | None = None) -> MemoryPlan:
    """Vision tower (trained) + projection + adapter on precomputed embeddings. llm_dim: the caption
    embeddings' width (the task knows it from the sidecars); default model.llm_dim, else 4096 (Llama-3-8B)."""
    from llm2clip.model.adapter import LLMAdapter

    prec = _precision(cfg.train)
    pbytes = _DTYPE_BYTES[prec]
    ds, stage = _ds(cfg.train)
    hf_cfg = read_model_config(cfg.vision.path, "vision.path")
    vcfg = getattr(hf_cfg, "vision_config", hf_cfg)
    from transformers import AutoModel

    with torch.device("meta"):
        tower = AutoModel.from_config(vcfg)
        llm_dim = llm_dim or cfg.model.llm_dim or 4096
        adapter = LLMAdapter(llm_dim, cfg.model.embed_dim, cfg.model.adapter_blocks, cfg.model.adapter_expansion,
                             cfg.model.adapter_dropout)
    n_tower = sum(p.numel() for p in tower.parameters())
    tr = [p.numel() for p in tower.parameters()] + [p.numel() for p in adapter.parameters()]
    tr.append(int(getattr(vcfg, "hidden_size", 1024)) * cfg.model.embed_dim)  # visual_proj
    counts = ParamCounts([], tr)
    B = cfg.train.micro_batch_size
    chunk = cfg.train.contrastive_chunk
    img = cfg.vision.image_size or int(getattr(vcfg, "image_size", 224))
    patch = int(getattr(vcfg, "patch_size", 14))
    tokens = (chunk or B) * ((img // patch) ** 2 + 1)  # patch tokens in one graph (GradCache: a chunk's)
    plan = MemoryPlan("stage2", world, gpu_mem_gib, info={"tower": Path(cfg.vision.path).name, "zero": stage,
                                                           "precision": prec, "micro_batch": B,
                                                           "contrastive_chunk": chunk, "image": img,
                                                           "llm_dim": llm_dim,
                                                           "params": f"{n_tower:,} tower + adapter"})
    plan.components += zero_state(counts, stage, world, pbytes, ds)
    h = int(getattr(vcfg, "hidden_size", 1024))
    f = int(getattr(vcfg, "intermediate_size", 4 * h))
    L = int(getattr(vcfg, "num_hidden_layers", 24))
    # ViT block: ~ (8 h + 2 f) values per token saved (norms, qkv, attn out, mlp in/act) — no meta trace
    # for vision towers yet (their forward takes pixels)
    per = (8 * h + 2 * f) * pbytes
    ck = cfg.vision.gradient_checkpointing
    full = L * per * tokens
    plan.add("activations", (L * h * pbytes * tokens + per * tokens) if ck else full,
             f"{tokens:,} patch tokens; without checkpointing {full / GiB:.2f} GiB")
    if chunk:  # image and text embeddings
        _gradcache_components(plan, 2 * B * cfg.model.embed_dim * pbytes, counts, stage, pbytes)
    g = B * world
    plan.add("contrastive logits", 2 * g * cfg.model.embed_dim * 4 + 3 * B * g * 4, f"{B} x {g} logits")
    plan.components.append(zero_buckets(stage, pbytes, ds, 0))
    return plan


def resolve_strategy(cfg, world: int, gpu_mem_gib: float) -> tuple[int, str, MemoryPlan | None]:
    """(ZeRO stage, why, plan) for stage 1's train.strategy: zero3 -> 3; replicated -> the DeepSpeed file's
    1 or 2 (else 2); auto -> an explicit train.zero_stage if given, else replicated when its plan fits the
    device. `plan`: the replicated plan auto computed (None otherwise), which is the run's own plan when
    replicated is chosen, so the caller need not compute it again."""
    import dataclasses

    _, file_stage = _ds(dataclasses.replace(cfg.train, zero_stage=None))
    rep = file_stage if file_stage in (1, 2) else 2
    s = cfg.train.strategy
    if s == "zero3":
        return 3, "train.strategy=zero3: the frozen base partitioned over the ranks", None
    if s == "replicated":
        return rep, f"train.strategy=replicated: the frozen base whole on every rank, LoRA under ZeRO-{rep}", None
    if cfg.train.zero_stage is not None:
        return (cfg.train.zero_stage, f"train.strategy=auto keeps the explicit train.zero_stage={cfg.train.zero_stage}",
                None)
    plan = plan_stage1(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=rep)), world,
                       gpu_mem_gib)
    need = f"{plan.total / GiB:.1f} GiB of {gpu_mem_gib:.0f} GiB"
    if plan.fits:
        return rep, f"train.strategy=auto: replicated base fits ({need} per device by the memory plan)", plan
    return 3, f"train.strategy=auto: replicated base would not fit ({need} per device), so ZeRO-3", None


def detect_task(raw: dict) -> str:
    if "vision" in raw:
        return "stage2"
    if "lora" in raw or "sources" in (raw.get("data") or {}):
        return "stage1"
    if "batch" in raw or "output" in raw:
        return "embed"
    raise PlanError("cannot tell the config's task (stage1 has lora/data.sources, embed has batch/output, stage2 "
                    "has vision); pass --task stage1|embed|stage2")


def plan_from_config(path: str, world: int, gpu_mem_gib: float = 80.0, task: str = "auto",
                     overrides: list[str] | None = None, tokens_per_caption: int | None = None) -> MemoryPlan:
    import yaml

    from llm2clip.config import load_config

    if task == "auto":
        task = detect_task(yaml.safe_load(Path(path).read_text()) or {})
    if task == "stage1":
        from llm2clip.schema import Stage1Config

        cfg = load_config(Stage1Config, path, overrides)
        # the ZeRO stage the run will use: train.strategy decides it as Stage1Task does (not the DeepSpeed
        # file alone); auto's own plan is reused unless a caption length was given
        stage, why, plan = resolve_strategy(cfg, world, gpu_mem_gib)
        if plan is None or tokens_per_caption:
            cfg.train.zero_stage = stage
            plan = plan_stage1(cfg, world, gpu_mem_gib, tokens_per_caption)
        plan.info["strategy"] = why
        return plan
    if task == "embed":
        from llm2clip.schema_embed import EmbedConfig

        return plan_embed(load_config(EmbedConfig, path, overrides), world, gpu_mem_gib)
    if task == "stage2":
        from llm2clip.schema_stage2 import Stage2Config

        return plan_stage2(load_config(Stage2Config, path, overrides), world, gpu_mem_gib)
    raise PlanError(f"--task {task!r}: use stage1, embed or stage2")


def device_memory_gib() -> float:
    """Memory of this rank's GPU (GiB); on CPU the host's (what a CPU run can use)."""
    import os

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB


def log_plan(plan: MemoryPlan, log) -> None:
    """What the trainers call at start: the table, and a warning before the first step when it won't fit."""
    log.info(plan.table())
    if not plan.fits:
        log.warning(f"memory plan: {plan.verdict()}")


def dump(plan: MemoryPlan) -> str:
    return json.dumps(plan.as_dict(), indent=1)
