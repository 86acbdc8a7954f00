"""The sections of bench/gpu_check.py (see that file's docstring).

Each section is `fn(ctx, res, budget)`: it fills the dict `res` as it goes (so a timeout or an error
keeps what was measured before it) and may return a status ("ok", "fail", "skip"). Every measurement
goes through the components the trainers use: `load_config` on the paper configs, `TextEncoder`,
`TextEmbedder`, `Stage1Task`, `Stage2Task`, `Trainer.build_engine` (DeepSpeed) and the trainer's step.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gpu_check_fixtures import (CAPTION_FIELDS, PAPER, PLANNER_NOTE, Budget, Ctx, count_params, is_oom, planned_gib,
                                train_step)

def llm_folder(ctx: Ctx, res: dict, budget: Budget) -> str:
    """Setup: write the random-weight LLM folder that embed and stage1 load (its own budget)."""
    path = ctx.llm_folder()
    res.update(path=str(path), seconds=ctx.setup_seconds["llm_folder"],
               gib=round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30, 2))
    return "ok"


# --- (a) attention kernels ------------------------------------------------------------------------
def attention(ctx: Ctx, res: dict, budget: Budget) -> str:
    """Bidirectional TextEncoder outputs of eager / sdpa / flash-attn (if importable) in bf16 against an
    fp32 eager reference, padded (left) and packed rows; plus: the first token sees the last (not
    causal) and pad-token ids do not leak into real tokens."""
    from transformers import AutoModel, LlamaConfig

    from llm2clip.text.encoder import TextEncoder
    from llm2clip.text.tokenize import collate, collate_packed, pack_rows

    impls = ["eager", "sdpa"]
    if importlib.util.find_spec("flash_attn") is None:
        res["flash_attention_2"] = "skipped: flash_attn not importable"
    elif not ctx.cuda:
        res["flash_attention_2"] = "skipped: needs CUDA"
    else:
        impls.append("flash_attention_2")
    tol_bf16, tol_same = 5e-2, 1e-3
    res.update(tolerance_vs_fp32=tol_bf16, tolerance_pad_leak=tol_same, shapes=[])
    ok = True
    for k, name in enumerate(ctx.shape["attn_shapes"]):
        if k and not budget.allows(5):  # the budget cuts later pieces, never the first
            res["shapes"].append({"shape": name, "status": "skip", "reason": "section budget spent"})
            continue
        shape = ctx.llm_shape(name)
        cfg = LlamaConfig(**shape, is_causal=False)
        g = torch.Generator().manual_seed(0)
        L = ctx.shape["attn_len"]
        lengths = torch.randint(L // 4, L + 1, (8,), generator=g).tolist()
        encoded = [(torch.randint(4, shape["vocab_size"], (n,), generator=g).tolist(), [1] * n) for n in lengths]
        padded = collate(encoded, 0, "left").to(ctx.dev)
        leak = collate(encoded, 3, "left").to(ctx.dev)  # same captions, other pad id
        rows = pack_rows(lengths, max(lengths))
        packed = collate_packed(encoded, rows, 0).to(ctx.dev)
        order = torch.tensor([i for r in rows for i in r], device=ctx.dev)
        one = torch.randint(4, shape["vocab_size"], (1, L), generator=g).to(ctx.dev)
        one2 = one.clone()
        one2[0, -1] = (one2[0, -1] + 1) % shape["vocab_size"]
        torch.manual_seed(0)
        with torch.device(ctx.dev):
            ref_model = AutoModel.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        with torch.no_grad():
            ref = TextEncoder(ref_model.eval()).encode(padded)
        sd = ref_model.state_dict()
        del ref_model
        row: dict[str, Any] = {"shape": name, "captions": len(lengths), "max_len": max(lengths),
                               "packed_rows": len(rows), "impls": {}}
        for impl in impls:
            with torch.device(ctx.dev):
                m = AutoModel.from_config(cfg, attn_implementation=impl, dtype=torch.bfloat16)
            m.load_state_dict(sd)
            enc = TextEncoder(m.eval())
            with torch.no_grad():
                out_pad = enc.encode(padded)
                out_pack = torch.empty_like(out_pad)
                out_pack[order] = enc.encode(packed)
                out_leak = enc.encode(leak)
                h1 = m(input_ids=one).last_hidden_state[0, 0].float()
                h2 = m(input_ids=one2).last_hidden_state[0, 0].float()

            def rel(a, b):
                return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

            r = {"rel_err_padded_vs_fp32": rel(out_pad, ref), "rel_err_packed_vs_fp32": rel(out_pack, ref),
                 "rel_err_pad_id_change": rel(out_leak, out_pad),
                 "first_token_sees_last": float((h1 - h2).abs().max()) > 0}
            r["ok"] = (r["rel_err_padded_vs_fp32"] < tol_bf16 and r["rel_err_packed_vs_fp32"] < tol_bf16
                       and r["rel_err_pad_id_change"] < tol_same and r["first_token_sees_last"])
            ok &= r["ok"]
            row["impls"][impl] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
            del m, enc
            ctx.free()
        res["shapes"].append(row)
        del sd
        ctx.free()
    return "ok" if ok else "fail"


# --- configs from the paper recipe, pointed at the fixtures ---------------------------------------
def _cfg(ctx: Ctx, cls, which: str, overrides: list[str]):
    from llm2clip.config import load_config

    return load_config(cls, ctx.repo / PAPER[which], overrides)


def _stage1_config(ctx: Ctx, zero: int, micro_batch: int):
    from llm2clip.schema import Stage1Config

    src = json.dumps([{"kind": "shards", "path": ctx.train_spec, "fields": CAPTION_FIELDS}])
    return _cfg(ctx, Stage1Config, "stage1", [
        f"run.output_dir={ctx.work / f'stage1_z{zero}'}", "run.tensorboard=false", "run.progress_bar=false",
        f"text.model_path={ctx.llm_folder()}", "text.gradient_checkpointing=true", f"data.sources={src}",
        # data.prefetch=0: the packing switch between variants changes how batches are tokenised, so they
        # are made on demand rather than a few ahead with the previous variant's packing
        "data.val_path=", "data.prefetch=0", f"train.micro_batch_size={micro_batch}", f"train.zero_stage={zero}",
        "train.eval_every=0", "train.save_every=0", "optim.warmup_steps=0", f"train.precision={ctx.precision}"])


# --- (c) embed forward ------------------------------------------------------------------------------
def embed(ctx: Ctx, res: dict, budget: Budget) -> str:
    """TextEmbedder (the embed step's batching, padded vs packed) at the LLM shape, forward only:
    tokens/s of real tokens, MFU = 2 N_nonemb per real token, padding fraction."""
    from llm2clip.schema_embed import EmbedConfig
    from llm2clip.text.embedder import TextEmbedder

    cfg = _cfg(ctx, EmbedConfig, "embed", [f"text.model_path={ctx.llm_folder()}", f"data.shards={ctx.train_spec}",
                                           f"output.out_dir={ctx.work / 'embed_out'}"])
    caps = ctx.captions()
    n = ctx.shape["embed_captions"]
    caps = (caps * (n // max(len(caps), 1) + 1))[:n]
    t0 = time.perf_counter()
    base = TextEmbedder(cfg.text, token_budget=cfg.batch.token_budget, max_batch_size=cfg.batch.max_batch_size)
    enc = base.encoder()
    res["load_s"] = round(time.perf_counter() - t0, 2)
    total, nonemb = count_params(enc.backbone)
    res.update(n_params=total, n_params_nonemb=nonemb, attn_implementation=enc.attn_implementation,
               dtype=base.compute_dtype, token_budget=cfg.batch.token_budget, captions=n,
               flops_rule="2 * N_nonemb per real token", variants=[])
    for k, packing in enumerate(("off", "on")):
        if k and not budget.allows(5):
            res["variants"].append({"packing": packing, "status": "skip", "reason": "section budget spent"})
            continue
        tc = dataclasses.replace(cfg.text, packing=packing)
        emb = TextEmbedder(tc, token_budget=cfg.batch.token_budget, max_batch_size=cfg.batch.max_batch_size,
                           encoder=enc, ptok=base.tokenizer())
        encoded = emb.encode(caps)
        emb.embed_encoded(encoded[: max(8, n // 16)])  # warm-up (kernels, allocator)
        ctx.reset_peak()
        _, st = emb.embed_encoded(encoded)
        tps = st.tokens / st.seconds
        res["variants"].append({"packing": packing, "packed": emb.packing, "status": "ok", **st.as_dict(),
                                "tokens_per_s": round(tps, 1), "mfu": ctx.mfu(2 * nonemb * tps),
                                "peak_mem_gib": ctx.peak_gib()})
    emb = None  # the last embedder holds the encoder too
    del enc, base
    ctx.free()
    return "ok"


# --- (b) stage-1 training step -----------------------------------------------------------------------
def _stage1_packing_switch(task) -> Callable[[str], bool] | None:
    """How to set text.packing for Stage1Task's step (it batches through task.embedder, a TextEmbedder),
    or None when this version's step cannot pack. Returns whether rows are really packed."""
    from llm2clip.text.embedder import TextEmbedder

    old = getattr(task, "embedder", None)
    if old is None or not hasattr(old, "train_batch"):
        return None

    def set_packing(mode: str) -> bool:
        task.embedder = TextEmbedder(dataclasses.replace(task.cfg.text, packing=mode), token_budget=old.token_budget,
                                     max_batch_size=old.max_batch_size, encoder=task.encoder, ptok=task.ptok,
                                     lockstep=old.lockstep)
        return bool(task.embedder.packing)
    return set_packing


def stage1(ctx: Ctx, res: dict, budget: Budget) -> str:
    """Stage1Task (paper config: LoRA r16, bidirectional, mean pooling, InfoNCE with hard negatives) on
    the DeepSpeed engine the trainer builds: replicated (ZeRO-0) with gradient checkpointing on and off
    (and packing on/off where the task supports it), then ZeRO-3 (world size 1). Per variant: real
    tokens/s, MFU = 4 N_nonemb per real token (recompute not counted), peak memory."""
    from llm2clip import distributed as D
    from llm2clip.engine import Trainer
    from llm2clip.memory_plan import plan_stage1
    from llm2clip.tasks.stage1 import Stage1Task

    D.init_distributed(single_process_group=True)
    mb = ctx.shape["stage1_micro_batch"]
    W, I = ctx.shape["warmup"], ctx.shape["iters"]
    res.update(micro_batch_pairs=mb, flops_rule="4 * N_nonemb per real token (no recompute)",
               memory_planner_note=PLANNER_NOTE, modes=[])
    ok = True
    tpc = None  # real tokens per caption, measured
    for mode, zero in (("replicated", 0), ("zero3", 3)):
        m: dict[str, Any] = {"mode": mode, "zero_stage": zero, "variants": []}
        res["modes"].append(m)
        if zero and not budget.allows(20 if ctx.cuda else 3):
            m.update(status="skip", reason="section budget spent")
            continue
        cfg = _stage1_config(ctx, zero, mb)
        # under ZeRO-3 the planner runs before the engine exists: once HfDeepSpeedConfig is live, building
        # its meta-device model would go through zero.Init. Tokens per caption from the replicated mode.
        pre_plan = planned_gib(plan_stage1, cfg, 1, tokens_per_caption=tpc) if zero == 3 else None
        task = Stage1Task(cfg)
        trainer = Trainer(cfg.run, cfg.train, cfg.optim, task, cfg)
        t0 = time.perf_counter()
        engine, _ = trainer.build_engine()
        m["build_s"] = round(time.perf_counter() - t0, 2)
        total, nonemb = count_params(task.encoder.backbone)
        m.update(n_params=total, n_params_nonemb=nonemb, attn_implementation=task.encoder.attn_implementation)
        set_packing = _stage1_packing_switch(task)
        if set_packing is None:
            m["packing_note"] = "Stage1Task's step has no packing switch in this version: packing=off only"
        batches = task.batches(None)
        backbone = task.encoder.backbone
        gcs = [True, False] if zero == 0 else [True]
        packs = ["off", "on"] if set_packing else ["off"]
        if zero == 3:
            packs = packs[-1:]
        for gc_on in gcs:
            if gc_on:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            else:
                backbone.gradient_checkpointing_disable()
            for pk in packs:
                v: dict[str, Any] = {"grad_ckpt": gc_on, "packing": pk}
                m["variants"].append(v)
                if (m["variants"][:-1] or zero) and not budget.allows(5 if ctx.cuda else 1):
                    v.update(status="skip", reason="section budget spent")
                    continue
                if set_packing:
                    v["packed"] = set_packing(pk)
                try:
                    for _ in range(W):
                        train_step(trainer, engine, batches)
                    ctx.reset_peak()
                    t0 = time.perf_counter()
                    tok = items = 0
                    wait = 0.0
                    for _ in range(I):
                        _, _, n_tok, n_items, w = train_step(trainer, engine, batches)
                        tok, items, wait = tok + n_tok, items + n_items, wait + w
                    ctx.sync()
                    dt = time.perf_counter() - t0
                    tps = tok / dt
                    v.update(status="ok", steps=I, s_per_step=round(dt / I, 4), data_wait_frac=round(wait / dt, 4),
                             real_tokens=tok,
                             tokens_per_s=round(tps, 1), pairs_per_s=round(items / dt, 2),
                             mfu=ctx.mfu(4 * nonemb * tps), peak_mem_gib=ctx.peak_gib())
                    tpc = max(1, tok // (I * mb * (3 if cfg.data.hard_negatives else 2)))
                    vcfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, gradient_checkpointing=gc_on))
                    v["planned_peak_gib"] = (pre_plan if zero == 3 else
                                             planned_gib(plan_stage1, vcfg, 1, tokens_per_caption=tpc))
                except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else ends the mode
                    if not is_oom(e):
                        raise
                    v.update(status="oom", error=str(e).splitlines()[0][:300])
                    engine.zero_grad()
                    ctx.free()
        m["status"] = "ok"
        # everything that holds the model, the closure too, before the next mode loads another copy
        del engine, trainer, task, batches, backbone, set_packing
        ctx.free()
        ok &= all(v.get("status") in ("ok", "skip", "oom") for v in m["variants"])
    return "ok" if ok else "fail"


# --- (d) / (e) stage-2 step ---------------------------------------------------------------------
def _stage2(ctx: Ctx, res: dict, budget: Budget, which: str, folder: Path, candidates: list[int], iters: int) -> str:
    """Stage2Task (paper config) on the trainer's DeepSpeed engine: the largest batch from `candidates`
    that fits (one real batch tiled to each size, through task.loss), then real-loader steps at that batch: images/s,
    MFU = 6 x (N_tower x tokens per image + N_proj + N_adapter) per image (recompute not counted),
    peak memory and the fraction of step time spent waiting for the loader."""
    from llm2clip import distributed as D
    from llm2clip.engine import Trainer
    from llm2clip.memory_plan import plan_stage2
    from llm2clip.schema_stage2 import Stage2Config
    from llm2clip.tasks.stage2 import Stage2Task

    D.init_distributed(single_process_group=True)
    llm_dim = int(ctx.llm_shape(ctx.shape["llm"])["hidden_size"])
    sc = ctx.sidecars(llm_dim)
    cfg = _cfg(ctx, Stage2Config, which, [
        f"run.output_dir={ctx.work / which}", "run.tensorboard=false", "run.progress_bar=false",
        f"vision.path={folder}", f"data.shards={ctx.train_spec}", f"data.sidecar.out_dir={sc}",
        "data.sidecar.image_root=", "data.original_fields=[txt, 'json:short_alt']",
        "data.dense_fields=['json:dense', 'json:dense_alt']", f"data.num_workers={ctx.shape['workers']}",
        "data.val_shards=", f"train.micro_batch_size={candidates[0]}", "train.eval_every=0", "train.save_every=0",
        f"train.precision={ctx.precision}"])
    task = Stage2Task(cfg)
    trainer = Trainer(cfg.run, cfg.train, cfg.optim, task, cfg)
    t0 = time.perf_counter()
    engine, _ = trainer.build_engine()
    res["build_s"] = round(time.perf_counter() - t0, 2)
    model = task.model
    tower = model.tower
    S = tower.image_size
    if tower.kind == "timm":
        tokens = int(tower.model.patch_embed.num_patches) + int(getattr(tower.model, "num_prefix_tokens", 1))
    else:
        tokens = (S // int(tower.model.config.patch_size)) ** 2 + 1
    n_tower = sum(p.numel() for p in tower.parameters())
    n_rest = sum(p.numel() for p in model.visual_proj.parameters()) + sum(p.numel() for p in model.adapter.parameters())
    flops_img = 6 * (n_tower * tokens + n_rest)
    res.update(tower_kind=tower.kind, image_size=S, tokens_per_image=tokens, n_params_tower=n_tower,
               n_params_adapter_proj=n_rest, llm_dim=llm_dim, grad_ckpt=cfg.vision.gradient_checkpointing,
               flops_rule="6 x (N_tower x tokens + N_proj + N_adapter) per image (no recompute)",
               memory_planner_note="llm2clip.memory_plan.plan_stage2 at the loader's batch (world 1)", search=[])

    # the search tiles one real loader batch (whatever its format: uint8 or float pixels, extra keys)
    # up to each candidate size, so it costs no decoding
    first = task.batches(None)
    proto = next(first)
    del first  # shuts its workers down
    n0 = int(proto["pixels"].shape[0])

    def tiled(B: int) -> dict:
        reps = -(-B // n0)
        out = {}
        for k, v in proto.items():
            if torch.is_tensor(v) and v.ndim and v.shape[0] == n0:
                out[k] = v.repeat(reps, *([1] * (v.ndim - 1)))[:B]
            elif isinstance(v, list) and len(v) == n0:
                out[k] = (v * reps)[:B]
            else:
                out[k] = v
        return out

    def rand_step(B: int) -> None:
        loss, _, _ = task.loss(engine, tiled(B))
        engine.backward(loss)
        engine.step()

    best = None
    for B in candidates:
        if best is not None and not budget.allows(15 if ctx.cuda else 1):
            res["search"].append({"batch": B, "status": "skip", "reason": "section budget spent"})
            break
        try:
            rand_step(B)
            ctx.reset_peak()
            t0 = time.perf_counter()
            rand_step(B)
            ctx.sync()
            dt = time.perf_counter() - t0
            res["search"].append({"batch": B, "status": "ok", "images_per_s": round(B / dt, 1),
                                  "mfu": ctx.mfu(flops_img * B / dt), "peak_mem_gib": ctx.peak_gib()})
            best = B
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            res["search"].append({"batch": B, "status": "oom"})
            engine.zero_grad()
            ctx.free()
            break
    if best is None:
        res["loader"] = {"status": "skip", "reason": "no batch size fitted"}
        return "fail"
    task.cfg.train.micro_batch_size = best  # the loader reads it when batches() builds the stream
    batches = task.batches(None)
    t0 = time.perf_counter()
    train_step(trainer, engine, batches)  # first batch: loader start-up, kept out of the rate
    startup = time.perf_counter() - t0
    ctx.reset_peak()
    t0 = time.perf_counter()
    wait, done = 0.0, 0
    for _ in range(iters):
        wait += train_step(trainer, engine, batches)[4]
        done += 1
        if not budget.allows(0):
            break
    ctx.sync()
    dt = time.perf_counter() - t0
    res["loader"] = {"status": "ok", "batch": best, "steps": done, "workers": cfg.data.num_workers,
                     "first_step_s": round(startup, 2), "s_per_step": round(dt / done, 4),
                     "images_per_s": round(best * done / dt, 1), "mfu": ctx.mfu(flops_img * best * done / dt),
                     "peak_mem_gib": ctx.peak_gib(), "data_wait_frac": round(wait / dt, 4),
                     "planned_peak_gib": planned_gib(plan_stage2, cfg, 1, llm_dim=llm_dim)}
    del batches, engine, trainer, task, model, tower
    ctx.free()
    return "ok"


def stage2(ctx: Ctx, res: dict, budget: Budget) -> str:
    return _stage2(ctx, res, budget, "stage2", ctx.vit_folder(), ctx.shape["stage2_batches"],
                   ctx.shape["stage2_iters"])


def timm_eva02(ctx: Ctx, res: dict, budget: Budget) -> str:
    """The timm EVA02 tower through build_vision_tower('timm', folder) and a stage-2 step (paper EVA02
    config), at a fixed batch."""
    if importlib.util.find_spec("timm") is None:
        res["reason"] = "timm is not importable here (it needs torchvision, which breaks the CPU torch)"
        return "skip"
    import timm

    res["timm_version"] = timm.__version__
    res["arch"] = ctx.shape["timm_arch"]
    return _stage2(ctx, res, budget, "timm", ctx.timm_folder(), [ctx.shape["timm_batch"]], ctx.shape["warmup"] + 1)
