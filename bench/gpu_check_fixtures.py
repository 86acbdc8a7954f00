"""Fixtures and helpers of bench/gpu_check.py: shape presets, time budgets, the context that writes
the synthetic shards, sidecars and random-weight model folders once (through the project's own
writers), and the single-step entry into the trainer's engine."""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench_train_step import LLM_SHAPES, VIT_SHAPES

SHAPES: dict[str, dict[str, Any]] = {
    "full": dict(llm="llama3-8b", attn_shapes=["tiny", "llama3.2-1b"], attn_len=256, vit="vit-l14-336",
                 timm_arch="eva02_large_patch14_clip_336", n_images=384, shard_size=48, workers=8,
                 stage1_micro_batch=32, embed_captions=4096, stage2_batches=[64, 128, 256, 512, 1024],
                 timm_batch=64, warmup=1, iters=3, stage2_iters=4),
    "tiny": dict(llm="tiny", attn_shapes=["tiny", "small"], attn_len=32, vit="tiny",
                 timm_arch="eva02_tiny_patch14_224", n_images=32, shard_size=16, workers=1,
                 stage1_micro_batch=4, embed_captions=64, stage2_batches=[4, 8], timm_batch=4,
                 warmup=1, iters=2, stage2_iters=2),
}
EXTRA_LLM = {"small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000)}
PAPER = {"stage1": "configs/paper/stage1_llama3_8b.yaml", "embed": "configs/paper/embed_llama3_8b.yaml",
         "stage2": "configs/paper/stage2_clip_l14_336.yaml", "timm": "configs/paper/stage2_eva02_l14_336.yaml"}
CAPTION_FIELDS = ["txt", "json:short_alt", "json:dense", "json:dense_alt"]  # of the synthetic shards
PLANNER_NOTE = ("llm2clip.memory_plan's total for the same config (world 1), given the measured real tokens per "
                "caption: packed rows hold exactly those, padded rows more, so padded variants may exceed it")


def planned_gib(plan_fn, *args, **kw) -> float | str:
    """The memory planner's total in GiB for one measured variant, or its error as text (a planner bug must
    not cost the section its measurements)."""
    try:
        return round(plan_fn(*args, **kw).total / 1024 ** 3, 3)
    except Exception as e:  # noqa: BLE001
        return f"planner error: {type(e).__name__}: {e}"


class Budget:
    """A section's soft time budget: sections check `allows(estimate)` before each costly piece."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


class Ctx:
    """Device, shape preset, peak FLOP/s and the lazily written fixtures under `work`."""

    def __init__(self, shape: str, work: Path, peak_tflops: float | None, repo: Path):
        self.shape_name, self.shape = shape, SHAPES[shape]
        self.work, self.repo = work, repo
        self.cuda = torch.cuda.is_available()
        self.dev = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.peak_flops = peak_tflops * 1e12 if peak_tflops else None
        self.precision = "auto"  # train.precision for the stage-1/2 configs (auto: bf16 on GPU, fp32 on CPU)
        self.setup_seconds: dict[str, float] = {}
        self._cache: dict[str, Any] = {}

    # --- measuring ----------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        """torch.cuda.max_memory_allocated since the last reset; None on CPU (no per-phase figure)."""
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def mfu(self, flops_per_s: float) -> float | None:
        return round(flops_per_s / self.peak_flops, 4) if self.peak_flops else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = make()
            self.setup_seconds[key] = round(time.perf_counter() - t0, 2)
        return self._cache[key]

    # --- fixtures -----------------------------------------------------------------------------
    def vit_shape(self) -> dict:
        return VIT_SHAPES[self.shape["vit"]]

    def data(self) -> Path:
        """Synthetic image shards (tools/make_synthetic_data.py's generator) at the tower's resolution."""
        def make():
            from llm2clip.data.synthetic import generate

            out = self.work / "data"
            generate(out, n_train=self.shape["n_images"], n_val=2, image_size=self.vit_shape()["image_size"],
                     shard_size=self.shape["shard_size"], cls_per_class=0)
            return out
        return self._once("data", make)

    @property
    def train_spec(self) -> str:
        return str(self.data() / "train" / "shard-*.tar")

    def captions(self) -> list[str]:
        from llm2clip.data.shards import expand_shards, get_caption, iter_tar_samples

        def make():
            caps = [c for shard in expand_shards(self.train_spec) for s in iter_tar_samples(shard, want={"txt", "json"})
                    for c in (get_caption(s, f) for f in CAPTION_FIELDS) if c]
            return caps
        return self._once("captions", make)

    def llm_shape(self, name: str) -> dict:
        return dict(LLM_SHAPES.get(name) or EXTRA_LLM[name])

    def llm_folder(self) -> Path:
        """A random-weight decoder at the preset's LLM shape, saved like a hub checkpoint (config.json +
        safetensors + the synthetic tokenizer), so the real loaders (load_backbone, zero.Init) read it."""
        def make():
            from transformers import AutoModel, LlamaConfig

            from llm2clip.data.synthetic import build_tokenizer

            tok = build_tokenizer()
            shape = self.llm_shape(self.shape["llm"])
            shape["vocab_size"] = max(shape["vocab_size"], len(tok))
            cfg = LlamaConfig(**shape, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
            torch.manual_seed(0)
            with torch.device(self.dev):
                model = AutoModel.from_config(cfg, dtype=torch.bfloat16 if self.cuda else torch.float32)
            out = self.work / "llm"
            model.save_pretrained(str(out))
            tok.save_pretrained(str(out))
            del model
            self.free()
            return out
        return self._once("llm_folder", make)

    def vit_folder(self) -> Path:
        """A random CLIPVisionModel at the preset's ViT shape (hf_clip kind, OpenAI mean/std)."""
        def make():
            from transformers import CLIPVisionConfig, CLIPVisionModel

            torch.manual_seed(0)
            with torch.device(self.dev):
                model = CLIPVisionModel(CLIPVisionConfig(**self.vit_shape()))
            out = self.work / "vit"
            model.save_pretrained(str(out))
            del model
            self.free()
            return out
        return self._once("vit_folder", make)

    def timm_folder(self) -> Path:
        """A timm folder (config.json with "architecture" + model.safetensors), as towers.py reads it."""
        def make():
            import timm
            from safetensors.torch import save_file

            arch = self.shape["timm_arch"]
            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            out = self.work / "timm"
            out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
            (out / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 0}))
            del model
            return out
        return self._once("timm_folder", make)

    def sidecars(self, width: int) -> Path:
        """Sidecars of random `width`-wide embeddings for every train shard, through write_sidecar (what
        the embed step writes; stage 2 throughput does not depend on the values)."""
        def make():
            import numpy as np

            from llm2clip.data.shards import expand_shards, iter_tar_samples
            from llm2clip.data.sidecar import sidecar_path_for, write_sidecar
            from llm2clip.schema_embed import SidecarConfig, field_name

            out = self.work / f"sidecars{width}"
            sc = SidecarConfig(out_dir=str(out))
            names = [field_name(f) for f in CAPTION_FIELDS]
            rng = np.random.default_rng(0)
            for shard in expand_shards(self.train_spec):
                keys = [s["__key__"] for s in iter_tar_samples(shard, want={"txt"})]
                samples = [(k, {n: rng.standard_normal(width).astype(np.float16) for n in names}) for k in keys]
                write_sidecar(sidecar_path_for(shard, sc), samples, names, width, "float16", "gpu-check-random")
            return out
        return self._once(f"sidecars{width}", make)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all, non-embedding) base parameters, LoRA excluded, ZeRO-3 partitions counted whole."""
    tot = nonemb = 0
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        k = int(getattr(p, "ds_numel", p.numel()))
        tot += k
        nonemb += 0 if "embed_tokens" in n else k
    return tot, nonemb


def train_step(trainer, engine, batches) -> tuple:
    """One optimizer step exactly as Trainer.run() takes it (grad accumulation, finite checks, the task's
    loss): (loss, metrics, real tokens, items, data-wait s)."""
    trainer._gpu_check_step = getattr(trainer, "_gpu_check_step", 0) + 1
    out = trainer.train_step(engine, batches, trainer._gpu_check_step)
    if not isinstance(out, tuple):  # a discarded (non-finite) step
        raise RuntimeError(f"training step discarded: {getattr(out, 'message', out)}")
    return out


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
