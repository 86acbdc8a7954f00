#!/usr/bin/env python
"""Our trainers, loader and embed step against bare loops on identical shapes, batches and data.

    python bench/overhead.py --quick                  # < 3 min on 2 cores, data and models included
    python bench/overhead.py --repeats 5 --json out.json
    python bench/overhead.py --only loader,embed --smoke   # the seconds-long piece tests/ runs

Every comparison runs paired and interleaved (ours, bare, ours, bare, ...; `--repeats` pairs) on one
synthetic world built first (tiny random Llama + CLIP, 800 synthetic samples in 4 shards, sidecars from
our embed step); a comparison's ratio is the median over the pairs of (ours / bare) of the two runs
of a pair, which run back to back, and the JSON keeps every run. The bare loops are
written here with torch, transformers, peft, deepspeed, webdataset / tarfile, PIL and numpy only: they
import nothing from llm2clip (the trainer workers assert it). Settings come from configs/tiny/*.yaml;
the bare trainers take theirs from the resolved `config.yaml` and `deepspeed_config.json` that our
first run of the pair wrote (same DeepSpeed config, same ZeRO stage, same effective precision: fp32 on
CPU). Torch threads: `--threads` (default 1) for both sides, via OMP_NUM_THREADS and set_num_threads.

What each side measures:
- stage2: seconds per optimizer step, median over the steps after `--warmup` of one run (a fresh
  process); a run's figure is that median, the comparison's the median over runs.
  ours = tools/train_stage2.py (Trainer + Stage2Task, data.num_workers as configured) with
  run.log_every=1; a step's time is the engine's own perf row (items / perf/items_per_s): from the end
  of the previous step's logging to the end of this step, so it includes the data wait, the loss, the
  finite checks and collectives, backward, step and the preemption check; the logging itself is not
  in it and is reported apart (`logging_ms`, from the rows' wall-clock stamps). bare = a CLIP vision
  tower (transformers CLIPVisionModel from the same folder) + projection + an adapter of the same
  shape + inline symmetric CLIP loss, the same layer-decay AdamW groups and lr schedule, under
  deepspeed.initialize with the same JSON, fed by bench_loader.bare_loader (webdataset + PIL + numpy,
  the same workers, batch, crop, caption-field mix); a step = from the end of the previous step to
  the end of this one (next(loader) included).
- stage1_padded / stage1_packed: as stage2, tools/train_stage1.py with text.packing=off (padded
  micro-batches: the bare loop's shapes) and with the default (packed rows). bare = AutoModel (the
  tiny Llama, config.is_causal=False: bidirectional) + peft LoRA (same r, alpha, dropout, targets);
  captions from the same shards and fields, read with tarfile (caption members only, as ours) through
  a shuffle buffer of data.shuffle_buffer samples, two distinct fields per sample in random order and
  a hard negative from the micro-batch; one tokenizer call per micro-batch, left padding, positions
  counted from the first real token, mean pooling over the caption tokens, InfoNCE with identical
  captions masked; the same DeepSpeed JSON (ZeRO stage included). The target applies to the padded
  comparison; the packed one is shown for information.
- loader: images/s of one fresh pass over `--loader-images` images (worker start-up included) of
  bench_loader.our_loader and bench_loader.bare_loader (data.num_workers workers, batch as stage 2).
- embed_padded / embed_packed: captions/s of a whole embed job over the 4 shards' 4 caption fields,
  timed in one process after a warm-up job of each kind (imports excluded; model + tokenizer load
  included on both sides): ours = llm2clip.tasks.embed.run_embed with configs/tiny/embed.yaml and
  text.packing=off (the bare loop's shapes) or the default (packed); bare = tarfile read of the text
  members, one tokenizer call per shard, captions sorted by length and batched under the same token
  budget and batch cap (ours with packing off sorts and batches the same way), AutoModel forward, mean
  pooling, one float16 .npy per caption into an output tar (checked equal to ours: max abs difference
  in the JSON). *_vs_naive: against the loop without length sorting (file order, NAIVE_BATCH captions
  per batch, one tokenizer call per batch), the baseline packing's gain is usually quoted against.
  CPU ms per caption (all threads) is reported beside the wall rates: steadier on a shared machine.

Output: JSON (machine, load average at start and end, versions, command, date, every run, ratios)
and a markdown table (comparison, ours, bare, ratio, target, met?) on stdout; `--json PATH` writes it.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
MARK = "@@OVERHEAD "  # a worker's result line
FIELDS = ["txt", "json:short_alt", "json:dense", "json:dense_alt"]
ALL = ("loader", "stage2", "stage1", "embed")
NAIVE_BATCH = 64  # the file-order bare embed loop's batch (bench/bench_embed.py's naive default)
TARGETS = {  # comparison -> (what the ratio is, target sign, target value); None: shown for information
    "stage2": ("ours step / bare step", "<=", 1.15),
    "stage1_padded": ("ours step / bare step", "<=", 1.10),
    "stage1_packed": ("ours step / bare step", None, None),
    "loader": ("ours rate / bare rate", ">=", 1.0),
    "embed_padded": ("ours rate / bare rate", ">=", 1.0),
    "embed_packed": ("ours rate / bare rate", ">=", 1.5),
    "embed_packed_vs_naive": ("ours rate / bare naive rate", ">=", 1.5),
    "embed_padded_vs_naive": ("ours rate / bare naive rate", None, None),
}


# ==== helpers shared by both sides (stdlib only) =========================================================
def emit(result: dict) -> None:
    print(MARK + json.dumps(result), flush=True)


def lr_lambda(warmup: int, max_steps: int, schedule: str, min_ratio: float):
    """Linear warm-up, then cosine / linear decay to min_ratio (the schedule every trainer uses)."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t
        return min_ratio + (1 - min_ratio) * decay
    return f


def single_process_deepspeed():
    """A 1-rank gloo group, then DeepSpeed's view of it (what any single-process DeepSpeed script does)."""
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("RANK", "0"), ("WORLD_SIZE", "1"),
                 ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def assert_bare() -> None:
    if any(m == "llm2clip" or m.startswith("llm2clip.") for m in sys.modules):
        raise AssertionError("a bare loop imported llm2clip")


# ==== bare stage 2 =======================================================================================
def bare_stage2(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import CLIPVisionModel

    import bench_loader as BL  # bare_loader: webdataset + PIL + numpy (our_loader is never called here)

    torch.set_num_threads(spec["threads"])
    cfg, ds = spec["config"], spec["ds_config"]
    m, d, o = cfg["model"], cfg["data"], cfg["optim"]
    deepspeed = single_process_deepspeed()
    torch.manual_seed(0)
    pp = json.loads((Path(cfg["vision"]["path"]) / "preprocessor_config.json").read_text())
    mean = torch.tensor(pp["image_mean"]).view(3, 1, 1)
    std = torch.tensor(pp["image_std"]).view(3, 1, 1)
    size = int(pp["crop_size"]["height"])
    # the checkpoint's learned scale when it has one (a CLIPModel folder), else the CLIP loss' cap ln 100
    scale0 = json.loads((Path(cfg["vision"]["path"]) / "config.json").read_text()).get("logit_scale_init_value",
                                                                                         math.log(100.0))

    class Block(nn.Module):
        def __init__(self, dim, exp):
            super().__init__()
            self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, exp * dim), nn.Linear(exp * dim, dim)

        def forward(self, x):
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

    class Model(nn.Module):
        def __init__(self, llm_dim):
            super().__init__()
            self.tower = CLIPVisionModel.from_pretrained(cfg["vision"]["path"], dtype=torch.float32)
            hid, E = self.tower.config.hidden_size, m["embed_dim"]
            self.visual_proj = nn.Linear(hid, E, bias=False)
            nn.init.normal_(self.visual_proj.weight, std=hid ** -0.5)
            self.blocks = nn.ModuleList([Block(llm_dim, m["adapter_expansion"]) for _ in range(m["adapter_blocks"])])
            self.norm, self.proj = nn.LayerNorm(llm_dim), nn.Linear(llm_dim, E)
            self.logit_scale = nn.Parameter(torch.tensor([scale0]))

        def forward(self, px, emb):
            img = F.normalize(self.visual_proj(self.tower(pixel_values=px).pooler_output), dim=-1)
            x = F.normalize(emb, dim=-1)
            for b in self.blocks:
                x = b(x)
            txt = F.normalize(self.proj(self.norm(x)), dim=-1)
            return img, txt, self.logit_scale.clamp(0, math.log(100.0)).exp()

    shards = sorted(str(p) for p in Path(spec["root"], "data/train").glob("shard-*.tar"))
    model = Model(spec["llm_dim"])
    L = len(model.tower.encoder.layers)

    def group_of(name, p):  # the layer-decay AdamW groups: (part, layer, no decay)
        nd = p.ndim <= 1 or name.endswith(".bias") or re.search(r"logit_scale|position_embedding|class_embedding", name)
        if name.startswith("tower."):
            mm = re.match(r"tower\.encoder\.layers\.(\d+)\.", name)
            layer = int(mm.group(1)) + 1 if mm else 0 if name.startswith(("tower.embeddings.", "tower.pre_layrnorm.")) \
                else L + 1
            return ("tower", layer, bool(nd))
        return (name.split(".")[0] if name.split(".")[0] in ("visual_proj", "logit_scale") else "adapter", None, bool(nd))

    groups: dict = {}
    for n, p in model.named_parameters():
        part, layer, nd = key = group_of(n, p)
        scale = 1.0 if layer is None else o["layer_decay"] ** (L + 1 - layer)
        lr = {"tower": o["lr"], "adapter": o["adapter_lr"] or o["lr"]}.get(part, o["head_lr"] or o["lr"])
        groups.setdefault(key, {"params": [], "lr": lr * scale, "weight_decay": 0.0 if nd else o["weight_decay"]})
        groups[key]["params"].append(p)
    opt = torch.optim.AdamW(list(groups.values()), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                            weight_decay=o["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o["warmup_steps"], cfg["train"]["max_steps"],
                                                             o["schedule"], o["min_lr_ratio"]))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    B, workers = cfg["train"]["micro_batch_size"], d["num_workers"]
    buffer = BL.matched_buffer(d["shuffle_buffer"], spec["samples"], workers)
    loader = BL.bare_loader(shards, str(Path(spec["root"], "emb")), B, workers, buffer, size, tuple(d["crop_scale"]),
                            d["dense_ratio"], True, seed=0)
    it = iter(loader)
    times, losses, waits, cpu = [], [], [], []
    t_prev, c_prev = time.perf_counter(), time.process_time()
    for _ in range(spec["warmup"] + spec["steps"]):
        b = next(it)
        waits.append(time.perf_counter() - t_prev)
        px = torch.as_tensor(b["pixels"])
        x = (px.to(torch.float32) / 255.0 - mean) / std
        img, txt, scale = engine(x, torch.as_tensor(b["emb"]).float())
        logits = scale * img @ txt.t()
        labels = torch.arange(logits.shape[0])
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        losses.append(float(loss.detach()))
        t, c = time.perf_counter(), time.process_time()
        times.append(t - t_prev)
        cpu.append(c - c_prev)
        t_prev, c_prev = t, c
    del it  # joins the loader workers: their CPU time is in RUSAGE_CHILDREN now
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert_bare()
    W = spec["warmup"]
    return {"step_s": times[W:], "wait_s": waits[W:], "cpu_s": cpu[W:], "loss_first": losses[0],
            "loader_cpu_s_per_step": (ch.ru_utime + ch.ru_stime) / len(times), "threads": torch.get_num_threads(),
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0), "batch": B, "workers": workers,
            "bare_buffer": buffer}


# ==== bare stage 1 =======================================================================================
def bare_pairs(shards: list[str], fields: list[str], batch: int, buffer: int, seed: int = 0):
    """Endless micro-batches of (query, positive, hard negative) captions: the shards' caption members read
    in turn (shard_captions), a shuffle buffer of `buffer` samples, each sample giving two distinct caption
    fields in random order, the negative being the positive's field of another sample of the micro-batch."""
    rng = random.Random(seed)

    def samples():
        pool: list = []
        while True:
            for sh in shards:
                for _, caps in shard_captions(sh, fields):
                    if len(caps) < 2:
                        continue
                    if len(pool) < buffer:
                        pool.append(caps)
                        continue
                    i = rng.randrange(buffer)
                    yield pool[i]
                    pool[i] = caps

    it = samples()
    while True:
        group = [next(it) for _ in range(batch)]
        out = []
        for i, caps in enumerate(group):
            (_, q), (fp, p) = rng.sample(caps, 2)
            other = dict(group[(i + 1 + rng.randrange(batch - 1)) % batch])
            out.append((q, p, other.get(fp) or next(iter(other.values()))))
        yield out


def bare_stage1(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.set_num_threads(spec["threads"])
    cfg, ds = spec["config"], spec["ds_config"]
    t, d, o, lo = cfg["text"], cfg["data"], cfg["optim"], cfg["lora"]
    deepspeed = single_process_deepspeed()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(t["model_path"])
    hf = AutoConfig.from_pretrained(t["model_path"])
    hf.is_causal = False  # bidirectional: transformers' public switch
    model = AutoModel.from_pretrained(t["model_path"], config=hf, attn_implementation="sdpa", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"], bias="none",
                                             target_modules=lo["target_modules"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": o["weight_decay"]}], lr=o["lr"], betas=tuple(o["betas"]),
                            eps=o["eps"], weight_decay=o["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o["warmup_steps"], cfg["train"]["max_steps"],
                                                             o["schedule"], o["min_lr_ratio"]))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    B, T, max_len = cfg["train"]["micro_batch_size"], cfg["loss"]["temperature"], t["max_length"]
    pre = tok("", add_special_tokens=True)["input_ids"]  # BOS: in the row, not pooled
    heads = [pre + (tok(s, add_special_tokens=False)["input_ids"] if s else [])
             for s in (d["query_instruction"], d["doc_instruction"])]
    src = d["sources"][0]
    shards = sorted(str(p) for p in Path(src["path"]).parent.glob(Path(src["path"]).name))
    batches = bare_pairs(shards, src["fields"], B, d["shuffle_buffer"])
    pad = tok.pad_token_id
    times, losses, waits, cpu = [], [], [], []
    t_prev, c_prev = time.perf_counter(), time.process_time()
    for _ in range(spec["warmup"] + spec["steps"]):
        ex = next(batches)
        waits.append(time.perf_counter() - t_prev)
        texts = [e[0] for e in ex] + [e[1] for e in ex] + [e[2] for e in ex]
        bodies = tok(texts, add_special_tokens=False)["input_ids"]  # one tokenizer call per micro-batch
        hs = [heads[0]] * B + [heads[1]] * 2 * B
        rows = [h + b[:max_len - len(h)] for h, b in zip(hs, bodies)]
        W = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (W - len(r)) + r for r in rows])  # left padding
        attn = torch.tensor([[0] * (W - len(r)) + [1] * len(r) for r in rows])
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        pool = (attn.bool() & (pos >= torch.tensor([len(h) for h in hs])[:, None])).float()
        h = engine(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
        e = (h * pool[..., None]).sum(1) / pool.sum(1, keepdim=True).clamp_min(1)
        q = F.normalize(e[:B].float(), dim=-1)
        keys = F.normalize(e[B:].float(), dim=-1)
        logits = q @ keys.T / T
        labels = torch.arange(B)
        if cfg["loss"]["mask_identical"]:  # an identical caption of another sample is not a negative
            idx: dict[str, int] = {}
            col = torch.tensor([idx.setdefault(s, len(idx)) for s in texts[B:]])
            same = col[None, :] == col[labels][:, None]
            same[labels, labels] = False
            logits = logits.masked_fill(same, float("-inf"))
        loss = F.cross_entropy(logits, labels)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        now, c = time.perf_counter(), time.process_time()
        times.append(now - t_prev)
        cpu.append(c - c_prev)
        t_prev, c_prev = now, c
    assert_bare()
    W = spec["warmup"]
    return {"step_s": times[W:], "wait_s": waits[W:], "cpu_s": cpu[W:], "loss_first": losses[0],
            "threads": torch.get_num_threads(),
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0), "batch": B}


# ==== bare embed =========================================================================================
def shard_captions(shard: str, fields: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(key, [(field name, caption), ...])] in shard order, from the .txt / .json members only (tarfile
    seeks past the images)."""
    samples: dict[str, dict] = {}
    with tarfile.open(shard) as tf:
        for m in tf:
            key, _, ext = os.path.basename(m.name).partition(".")
            if m.isfile() and ext in ("txt", "json"):
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    out = []
    for k, s in samples.items():
        meta = json.loads(s["json"]) if "json" in s else {}
        caps = []
        for f in fields:
            v = s.get("txt", b"").decode("utf-8", "replace") if f == "txt" else meta.get(f[5:])
            v = (v[0] if v else None) if isinstance(v, list) else v
            if isinstance(v, str) and v.strip():
                caps.append((f[5:] if f.startswith("json:") else f, v.strip()))
        out.append((k, caps))
    return out


def read_captions(shard: str, fields: list[str]) -> tuple[list[str], list[tuple[str, str]], list[str]]:
    """(every key in order, [(key, field name)], the captions) of one shard."""
    per = shard_captions(shard, fields)
    items = [(k, f) for k, caps in per for f, _ in caps]
    return [k for k, _ in per], items, [c for _, caps in per for _, c in caps]


def bare_embed(shards: list[str], model_dir: str, out_dir: Path, fields: list[str], token_budget: int, max_batch: int,
               max_length: int, naive_batch: int = 0) -> int:
    """Captions of `shards` -> out_dir/<shard name> (one float16 .npy per caption); returns the caption count.
    Batches: length-sorted under the token budget (one tokenizer call per shard), or with `naive_batch`
    that many captions in file order (one tokenizer call per batch)."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoConfig.from_pretrained(model_dir)
    hf.is_causal = False
    model = AutoModel.from_pretrained(model_dir, config=hf, attn_implementation="sdpa", dtype=torch.float32).eval()
    n = 0
    for shard in shards:
        keys, items, caps = read_captions(shard, fields)
        if naive_batch:
            ids = [None] * len(caps)
            batches = [list(range(i, min(i + naive_batch, len(caps)))) for i in range(0, len(caps), naive_batch)]
        else:
            ids = tok(caps, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
            batches, cur = [], []
            for i in order:  # longest first, rows x longest <= token budget
                if cur and ((len(cur) + 1) * len(ids[cur[0]]) > token_budget or len(cur) >= max_batch):
                    batches.append(cur)
                    cur = []
                cur.append(i)
            batches += [cur] if cur else []
        out = np.empty((len(ids), hf.hidden_size), dtype=np.float16)
        with torch.no_grad():
            for b in batches:
                if naive_batch:
                    for i, x in zip(b, tok([caps[i] for i in b], truncation=True, max_length=max_length)["input_ids"]):
                        ids[i] = x
                W = max(len(ids[i]) for i in b)
                x = torch.tensor([[tok.pad_token_id] * (W - len(ids[i])) + ids[i] for i in b])
                attn = torch.tensor([[0] * (W - len(ids[i])) + [1] * len(ids[i]) for i in b])
                pos = (attn.cumsum(1) - 1).clamp(min=0)
                pool = (attn.bool() & (pos > 0)).float()  # position 0 is BOS: not pooled
                h = model(input_ids=x, attention_mask=attn, position_ids=pos).last_hidden_state
                out[b] = ((h * pool[..., None]).sum(1) / pool.sum(1, keepdim=True).clamp_min(1)).numpy()
        by_key: dict[str, list] = {}
        for (k, f), row in zip(items, out):
            by_key.setdefault(k, []).append((f, row))
        out_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out_dir / Path(shard).name, "w") as tf:
            for k in keys:
                for f, row in by_key.get(k, []):
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, row, allow_pickle=False)
                    ti = tarfile.TarInfo(f"{k}.{f}.npy")
                    ti.size = buf.tell()
                    buf.seek(0)
                    tf.addfile(ti, buf)
        n += len(caps)
    return n


def max_abs_diff(a: Path, b: Path, limit: int = 400) -> float:
    """Largest difference between same-named .npy members of two tars (the first `limit` of `a`)."""
    import numpy as np

    def read(p):
        with tarfile.open(p) as tf:
            return {m.name: np.lib.format.read_array(io.BytesIO(tf.extractfile(m).read())) for m in tf
                    if m.name.endswith(".npy")}
    x, y = read(a), read(b)
    names = [k for k in x if k in y][:limit]
    assert names, (a, b)
    return max(float(np.abs(x[k].astype(np.float32) - y[k].astype(np.float32)).max()) for k in names)


# ==== workers (one process each) =========================================================================
def worker_prepare(spec: dict) -> dict:
    from llm2clip.config import load_config
    from llm2clip.data.synthetic import generate
    from llm2clip.schema_embed import EmbedConfig
    from llm2clip.tasks.embed import run_embed
    from llm2clip.testing.tiny_models import make_tiny_models

    root = Path(spec["root"])
    t0 = time.perf_counter()
    generate(root / "data", n_train=spec["samples"], n_val=0, seed=0, image_size=64, shard_size=spec["samples"] // 4,
             cls_per_class=0)
    models = make_tiny_models(root / "data" / "tokenizer", root / "models", families=("llama", "clip"))
    # sidecars flat in <root>/emb (what bench_loader.our_loader / bare_loader expect), by our embed step
    run_embed(load_config(EmbedConfig, str(ROOT / "configs/tiny/embed.yaml"), [
        f"text.model_path={models['llama']}", f"data.shards={root}/data/train/shard-*.tar", f"output.out_dir={root}/emb",
        "output.image_root=", "run.progress_bar=false"]))
    return {"seconds": time.perf_counter() - t0, **{k: str(v) for k, v in models.items()}}


def worker_loader(spec: dict) -> dict:
    import torch

    import bench_loader as BL

    torch.set_num_threads(spec["threads"])
    root = Path(spec["root"])
    ours, bare, info = BL.loader_pair(root, spec["batch"], spec["workers"], spec["buffer"], spec["image_size"],
                                      spec["samples"])
    n_batches = max(1, spec["images"] // spec["batch"])
    rates: dict[str, list[float]] = {"ours": [], "bare": []}
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}  # ms per image, main process + its workers
    for _ in range(spec["repeats"]):
        for name, loader in (("ours", ours), ("bare", bare)):
            dt, _, c = BL.timed(loader, n_batches)
            rates[name].append(n_batches * spec["batch"] / dt)
            cpu[name].append(1e3 * c / (n_batches * spec["batch"]))
    return {"rates": rates, "cpu_ms": cpu, "images_per_run": n_batches * spec["batch"], **info}


def worker_embed(spec: dict) -> dict:
    import torch

    from llm2clip.config import load_config
    from llm2clip.schema_embed import EmbedConfig
    from llm2clip.tasks.embed import run_embed

    torch.set_num_threads(spec["threads"])
    root, tmp = Path(spec["root"]), Path(tempfile.mkdtemp(prefix="embed_", dir=spec["root"]))
    shards = sorted(str(p) for p in (root / "data/train").glob("shard-*.tar"))
    base = ["run.progress_bar=false", f"text.model_path={spec['llama']}", f"data.shards={root}/data/train/shard-*.tar",
            "output.image_root="]
    cfg0 = load_config(EmbedConfig, str(ROOT / "configs/tiny/embed.yaml"), [*base, "output.out_dir=x"])
    b, fields = cfg0.batch, list(cfg0.data.fields)
    assert cfg0.data.instruction == "" and cfg0.text.template == "none" and cfg0.output.dtype == "float16"

    def run(name: str, out: Path) -> tuple[float, int, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        if name.startswith("bare"):
            n = bare_embed(shards, spec["llama"], out, fields, b.token_budget, b.max_batch_size, cfg0.text.max_length,
                           NAIVE_BATCH if name == "bare_naive" else 0)
        else:
            extra = ["text.packing=off"] if name == "ours_padded" else []
            n = run_embed(load_config(EmbedConfig, str(ROOT / "configs/tiny/embed.yaml"),
                                      [*base, f"output.out_dir={out}", *extra]))["captions"]
        return time.perf_counter() - t0, n, time.process_time() - c0

    order = ("ours_padded", "bare", "ours_packed", "bare_naive")
    counts = {k: run(k, tmp / f"warm_{k}")[1] for k in order}  # warm-up: lazy imports, caches, file cache
    assert len(set(counts.values())) == 1, counts
    first = Path(shards[0]).name
    diff = {k: max_abs_diff(tmp / "warm_ours_padded" / first, tmp / f"warm_{k}" / first) for k in order[1:]}
    rates: dict[str, list[float]] = {k: [] for k in order}
    cpu: dict[str, list[float]] = {k: [] for k in order}  # ms per caption, all threads of the process
    for r in range(spec["repeats"]):
        for k in order:
            dt, n, c = run(k, tmp / f"{k}_{r}")
            rates[k].append(n / dt)
            cpu[k].append(1e3 * c / n)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"rates": rates, "cpu_ms": cpu, "captions": counts["bare"], "max_abs_diff_vs_ours_padded": diff, "naive_batch": NAIVE_BATCH,
            "token_budget": b.token_budget, "max_batch_size": b.max_batch_size, "threads": torch.get_num_threads()}


WORKERS = {"prepare": worker_prepare, "loader": worker_loader, "embed": worker_embed, "stage2-bare": bare_stage2,
           "stage1-bare": bare_stage1}


# ==== orchestration (no torch in this process) ===========================================================
def env_for(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
            "LLM2CLIP_HASH_CACHE": "off", "PYTHONWARNINGS": "ignore"}


def run_proc(args: list[str], threads: int, timeout: int = 900) -> str:
    p = subprocess.run(args, cwd=ROOT, env=env_for(threads), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"failed ({p.returncode}): {' '.join(args)}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p.stdout


def run_worker(name: str, spec: dict, threads: int) -> dict:
    path = Path(spec["root"]) / f"spec_{name}.json"
    path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    out = run_proc([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", str(path)], threads)
    lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
    if not lines:
        raise RuntimeError(f"worker {name} printed no result:\n{out[-3000:]}")
    return {**json.loads(lines[-1][len(MARK):]), "process_s": time.perf_counter() - t0}


def ours_trainer(stage: int, root: Path, out: Path, a, extra: list[str]) -> dict:
    """One run of tools/train_stage{1,2}.py; per-step seconds from its perf rows after the warm-up."""
    if stage == 1:
        sets = [f"text.model_path={root}/models/tiny-llama",
                f"data.sources=[{{kind: shards, path: '{root}/data/train/shard-*.tar'}}]", "data.val_path="]
    else:
        sets = [f"vision.path={root}/models/tiny-clip", f"data.shards={root}/data/train/shard-*.tar",
                f"data.sidecar.out_dir={root}/emb", "data.sidecar.image_root=", "data.val_shards="]
    sets += [f"run.output_dir={out}", "run.log_every=1", f"train.stop_after={a.warmup + a.steps}", "train.eval_every=0",
             "train.save_every=0", "run.progress_bar=false", "run.tensorboard=false", *extra]
    args = [sys.executable, str(ROOT / f"tools/train_stage{stage}.py"), "--config", str(ROOT / f"configs/tiny/stage{stage}.yaml")]
    for s in sets:
        args += ["--set", s]
    t0 = time.perf_counter()
    run_proc(args, a.threads)
    process_s = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/items_per_s" in r]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    items = cfg["train"]["micro_batch_size"]
    timed = [r for r in rows if r["step"] > a.warmup]
    step_s = [items / r["perf/items_per_s"] for r in timed]
    wall = [b["time"] - p["time"] for p, b in zip(rows, rows[1:]) if b["step"] > a.warmup]
    # the loader workers' CPU over the whole run (start-up and shuffle-buffer fill included, as the bare's)
    loader = [r["perf/loader_cpu_s_per_step"] for r in rows if "perf/loader_cpu_s_per_step" in r]
    return {"step_s": step_s, "wait_s": [r["perf/data_wait_frac"] * s for r, s in zip(timed, step_s)],
            "loader_cpu_s_per_step": statistics.mean(loader) if len(loader) == len(rows) else None,
            "logging_s": statistics.median(wall) - statistics.median(step_s), "process_s": process_s,
            "loss_first": rows[0]["train/loss"], "config": cfg,
            "ds_config": json.loads((out / "deepspeed_config.json").read_text())}


def compare_trainer(stage: int, root: Path, a) -> dict:
    """Paired runs: ours (each variant), bare, ours, bare ... -> {comparison: record}."""
    variants = {"stage2": []} if stage == 2 else {"stage1_padded": ["text.packing=off"], "stage1_packed": []}
    runs: dict[str, list[dict]] = {k: [] for k in [*variants, "bare"]}
    spec = None
    for r in range(a.repeats):
        for name, extra in variants.items():
            res = ours_trainer(stage, root, root / "runs" / f"{name}_{r}", a, extra)
            if spec is None or (stage == 1 and name == "stage1_padded"):
                # the bare loop trains with what ours resolved (config.yaml + deepspeed_config.json)
                spec = {"root": str(root), "config": res.pop("config"), "ds_config": res.pop("ds_config"),
                        "threads": a.threads, "warmup": a.warmup, "steps": a.steps, "samples": a.samples,
                        "llm_dim": json.loads((root / "models/tiny-llama/config.json").read_text())["hidden_size"]}
            res.pop("config", None)
            res.pop("ds_config", None)
            runs[name].append(res)
            print(f"  {name} run {r + 1}: {1e3 * statistics.median(res['step_s']):.1f} ms/step", file=sys.stderr)
        res = run_worker(f"stage{stage}-bare", spec, a.threads)
        runs["bare"].append(res)
        print(f"  bare stage{stage} run {r + 1}: {1e3 * statistics.median(res['step_s']):.1f} ms/step", file=sys.stderr)
    bare = [statistics.median(x["step_s"]) for x in runs["bare"]]
    out = {}

    def med(side: str, key: str) -> float:  # ms: median over runs of each run's median
        return round(1e3 * statistics.median(statistics.median(x[key]) for x in runs[side]), 2)

    for name in variants:
        ours = [statistics.median(x["step_s"]) for x in runs[name]]
        out[name] = record(name, "ms/step", [1e3 * x for x in ours], [1e3 * x for x in bare], lower_is_better=True)
        if stage == 2:
            out[name]["loader_cpu_ms_per_step"] = {
                "ours": round(1e3 * statistics.median(x["loader_cpu_s_per_step"] for x in runs[name]), 1)
                if all(x["loader_cpu_s_per_step"] is not None for x in runs[name]) else None,
                "bare": round(1e3 * statistics.median(x["loader_cpu_s_per_step"] for x in runs["bare"]), 1)}
        out[name].update(data_wait_ms={"ours": med(name, "wait_s"), "bare": med("bare", "wait_s")},
                         bare_main_cpu_ms=med("bare", "cpu_s"),
                         logging_ms=round(1e3 * statistics.median(x["logging_s"] for x in runs[name]), 2),
                         process_s_ours=round(statistics.median(x["process_s"] for x in runs[name]), 1),
                         process_s_bare=round(statistics.median(x["process_s"] for x in runs["bare"]), 1),
                         loss_first_ours=runs[name][0]["loss_first"], loss_first_bare=runs["bare"][0]["loss_first"],
                         zero_stage=runs["bare"][0]["zero_stage"], batch=runs["bare"][0]["batch"],
                         threads_bare=runs["bare"][0]["threads"])
    return out


def record(name: str, unit: str, ours: list[float], bare: list[float], lower_is_better: bool) -> dict:
    """Medians over the runs, the ratio ours / bare, the target and whether it is met. The ratio is the
    median of the per-pair ratios: a pair's two runs are back to back, so a shared machine's slow drift
    (runs of one side moved 300 -> 400 ms/step within one bench) cancels in it but not in the ratio of
    the two sides' medians, which is kept as `ratio_of_medians`."""
    mo, mb = statistics.median(ours), statistics.median(bare)
    ratio = statistics.median(x / y for x, y in zip(ours, bare))
    what, sign, target = TARGETS[name]
    met = None if sign is None else (ratio <= target if sign == "<=" else ratio >= target)
    return {"unit": unit, "ours": round(mo, 3), "bare": round(mb, 3), "ratio": round(ratio, 4), "ratio_is": what,
            "target": None if sign is None else f"{sign} {target}", "met": met,
            "ours_runs": [round(x, 3) for x in ours], "bare_runs": [round(x, 3) for x in bare],
            "ratio_of_medians": round(mo / mb, 4), "pair_ratios": [round(x / y, 4) for x, y in zip(ours, bare)],
            "lower_is_better": lower_is_better}


def table(res: dict) -> str:
    names = {"stage2": "stage-2 step, real loader (Trainer + Stage2Task vs bare DeepSpeed + webdataset)",
             "stage1_padded": "stage-1 step, packing off (identical shapes)",
             "stage1_packed": "stage-1 step, packing on (default; info)",
             "loader": "stage-2 loader (our_loader vs bare_loader)",
             "embed_padded": "embed, packing off (identical shapes)",
             "embed_packed": "embed, packing on (default)",
             "embed_packed_vs_naive": "embed, packing on (default) vs file-order bare loop",
             "embed_padded_vs_naive": "embed, packing off vs file-order bare loop (info)"}
    lines = ["| comparison | ours | bare | ratio | target | met? |", "|---|---|---|---|---|---|"]
    for k, r in res.items():
        met = "n/a" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {names[k]} | {r['ours']:.1f} {r['unit']} | {r['bare']:.1f} {r['unit']} | "
                     f"{r['ratio']:.3f} ({r['ratio_is']}) | {r['target'] or '-'} | {met} |")
    lines.append("")
    lines.append("ratio = the median of the per-pair ratios (run k of ours / run k of bare, back to back); "
                 "[min, max] of the pairs and the ratio of the two medians: " + "; ".join(
                     f"{k} [{min(r['pair_ratios']):.3f}, {max(r['pair_ratios']):.3f}] {r['ratio_of_medians']:.3f}"
                     for k, r in res.items()))
    return "\n".join(lines)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "transformers", "peft", "webdataset", "tokenizers", "numpy", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
    ap.add_argument("--repeats", type=int, default=None, help="pairs per comparison (default 5; --quick 2; --smoke 1)")
    ap.add_argument("--quick", action="store_true", help="2 repeats, 2 + 6 steps per run: < 3 min on 2 cores")
    ap.add_argument("--smoke", action="store_true", help="1 repeat, 200 samples, few steps (the test's mode)")
    ap.add_argument("--warmup", type=int, default=None, help="steps per trainer run before timing (default 5)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per trainer run (default 25)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides (OMP_NUM_THREADS)")
    ap.add_argument("--loader-images", type=int, default=None, help="images per loader run (default 3072)")
    ap.add_argument("--work", default="", help="folder for data, models and runs (default: a temp dir, removed)")
    ap.add_argument("--json", default="", help="also write the JSON here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        emit(WORKERS[a.worker](json.loads(Path(a.spec).read_text())))
        return {}
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in only if x not in ALL]
    if bad:
        ap.error(f"--only: unknown {bad}; choose from {list(ALL)}")
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    dflt = {"smoke": (1, 2, 4, 400, 200), "quick": (2, 2, 6, 1536, 800), "full": (5, 5, 25, 3072, 800)}[mode]
    a.repeats = a.repeats or dflt[0]
    a.warmup = dflt[1] if a.warmup is None else a.warmup
    a.steps = a.steps or dflt[2]
    a.loader_images = a.loader_images or dflt[3]
    a.samples = dflt[4]
    t0, load0 = time.time(), os.getloadavg()
    root = Path(a.work or tempfile.mkdtemp(prefix="overhead_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    phase: dict[str, float] = {}
    try:
        prep = root / "prepared.json"
        if not prep.is_file() or json.loads(prep.read_text()).get("samples") != a.samples:
            shutil.rmtree(root / "data", ignore_errors=True)
            shutil.rmtree(root / "emb", ignore_errors=True)
            p = run_worker("prepare", {"root": str(root), "samples": a.samples}, a.threads)
            prep.write_text(json.dumps({**p, "samples": a.samples}))
            phase["prepare"] = p["seconds"]
            print(f"prepared data + models + sidecars in {p['seconds']:.1f} s", file=sys.stderr)
        models = json.loads(prep.read_text())
        shutil.rmtree(root / "runs", ignore_errors=True)
        res: dict[str, dict] = {}
        extra: dict[str, dict] = {}
        if "loader" in only:
            tp = time.time()
            s2 = yaml.safe_load((ROOT / "configs/tiny/stage2.yaml").read_text())
            lw = run_worker("loader", {"root": str(root), "batch": s2["train"]["micro_batch_size"],
                                       "workers": s2["data"]["num_workers"], "buffer": 2000, "image_size": 64,
                                       "samples": a.samples, "images": a.loader_images, "repeats": a.repeats,
                                       "threads": a.threads}, a.threads)
            res["loader"] = record("loader", "images/s", lw["rates"]["ours"], lw["rates"]["bare"], False)
            res["loader"]["cpu_ms_per_image"] = {k: round(statistics.median(v), 3) for k, v in lw["cpu_ms"].items()}
            extra["loader"] = {k: v for k, v in lw.items() if k not in ("rates", "cpu_ms")}
            phase["loader"] = time.time() - tp
        for stage in (2, 1):
            if f"stage{stage}" in only:
                tp = time.time()
                res.update(compare_trainer(stage, root, a))
                phase[f"stage{stage}"] = time.time() - tp
        if "embed" in only:
            tp = time.time()
            ew = run_worker("embed", {"root": str(root), "llama": models["llama"], "repeats": a.repeats,
                                      "threads": a.threads}, a.threads)
            for k in ("embed_padded", "embed_packed", "embed_packed_vs_naive", "embed_padded_vs_naive"):
                ours = "ours_packed" if "packed" in k else "ours_padded"
                bare = "bare_naive" if k.endswith("_vs_naive") else "bare"
                res[k] = record(k, "captions/s", ew["rates"][ours], ew["rates"][bare], False)
                res[k]["cpu_ms_per_caption"] = {"ours": round(statistics.median(ew["cpu_ms"][ours]), 4),
                                                "bare": round(statistics.median(ew["cpu_ms"][bare]), 4)}
            extra["embed"] = {k: v for k, v in ew.items() if k not in ("rates", "cpu_ms")}
            phase["embed"] = time.time() - tp
    finally:
        if not a.work:
            shutil.rmtree(root, ignore_errors=True)
    out = {"bench": "overhead", "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "bench/overhead.py",
                                                                                         *(argv or sys.argv[1:])]),
           "mode": mode, "machine": {"platform": platform.platform(), "machine": platform.machine(),
                                     "cores": os.cpu_count(), "load_avg_start": [round(x, 2) for x in load0],
                                     "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
           "versions": versions(), "threads": a.threads, "repeats": a.repeats, "warmup_steps": a.warmup,
           "timed_steps": a.steps, "samples": a.samples, "wall_s": round(time.time() - t0, 1),
           "phase_s": {k: round(v, 1) for k, v in phase.items()},
           "ratios": {k: r["ratio"] for k, r in res.items()}, "comparisons": res, "details": extra}
    print(json.dumps(out, indent=1))
    print()
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
