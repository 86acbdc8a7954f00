"""CLIP baseline: a CLIPModel trained end to end with its own text transformer (77 tokens, CLIP loss) on the
same image shards and stream as stage 2 -- what LLM2CLIP's LLM text side is compared against.

The model is the stage-2 machinery with the adapter swapped for CLIP's text tower: a VisionTower (with
the folder's visual projection) + the folder's CLIP text transformer and projection + its logit scale. Batches come
from the stage-2 stream in caption mode; the export is a plain HF CLIPModel folder (`export/model`,
tokenizer and preprocessor included) that tools/eval_zero_shot.py reads as `hf_clip:`.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llm2clip import distributed as D
from llm2clip.data.stage2_stream import dataset_shards, shard_sizes, stream_count
from llm2clip.data.streams import check_streams
from llm2clip.engine import resolve_precision, run_training
from llm2clip.losses.clip import ClipLoss
from llm2clip.model.clip_model import MAX_LOGIT_SCALE, initial_logit_scale
from llm2clip.optim_groups import build_param_groups
from llm2clip.schema_baseline import ClipBaselineConfig
from llm2clip.tasks.stage2 import Stage2Task
from llm2clip.vision.towers import build_vision_tower

log = logging.getLogger("llm2clip")


class ClipBaselineModel(nn.Module):
    """forward(pixels [B,3,H,W], input_ids [B,T], attention_mask [B,T]) -> (image [B,E], text [B,E]
    L2-normalised, exp(logit_scale))."""

    def __init__(self, path: str):
        super().__init__()
        import transformers as tf

        self.path = path
        self.tower = build_vision_tower("hf_clip", path, use_pretrained_proj=True)
        if self.tower.proj is None:
            raise ValueError(f"{path} has no visual projection: the CLIP baseline needs a CLIPModel folder")
        full = tf.CLIPModel.from_pretrained(path, local_files_only=True)
        self.text_model, self.text_projection = full.text_model, full.text_projection  # the folder's text tower
        del full
        self.logit_scale = nn.Parameter(torch.tensor([initial_logit_scale(self.tower.logit_scale_init, None)]))

    def forward(self, pixels, input_ids, attention_mask):
        img = F.normalize(self.tower(pixels), dim=-1)
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        txt = F.normalize(self.text_projection(pooled), dim=-1)
        return img, txt, self.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def save_hf(self, out_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
        """The trained weights as a CLIPModel folder (+ the source folder's tokenizer and preprocessor)."""
        import transformers as tf

        clip = tf.CLIPModel.from_pretrained(self.path, local_files_only=True)
        mine = {"vision_model.": "tower.model.", "visual_projection.": "tower.proj.", "text_model.": "text_model.",
                "text_projection.": "text_projection."}
        sd = {}
        for k in clip.state_dict():
            if k == "logit_scale":
                sd[k] = state_dict["logit_scale"].reshape(())
                continue
            pre = next(p for p in mine if k.startswith(p))
            sd[k] = state_dict[mine[pre] + k[len(pre):]]
        clip.load_state_dict(sd, strict=True)
        clip.save_pretrained(str(out_dir))
        tf.AutoTokenizer.from_pretrained(self.path, local_files_only=True).save_pretrained(str(out_dir))
        pp = Path(self.path) / "preprocessor_config.json"
        if pp.is_file():
            shutil.copy(pp, out_dir / pp.name)


class ClipBaselineTask(Stage2Task):
    """Stage 2's stream, schedule, checkpointing and logging; CLIP's own text tower instead of LLM embeddings."""
    name = "clip_baseline"

    def __init__(self, cfg: ClipBaselineConfig):  # noqa: super().__init__ would look for sidecars / an encoder
        import transformers as tf

        self.cfg = cfg
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.online, self.embedder, self.sidecar_info = True, None, {}
        datasets = dataset_shards(cfg.data.shards)
        self.shard_sizes = D.broadcast_object([shard_sizes(sh) for sh in datasets] if self.rank == 0 else None)
        check_streams(datasets, self.shard_sizes, stream_count(self.world, cfg.data.num_workers))
        self.tokenizer = tf.AutoTokenizer.from_pretrained(cfg.model.path, local_files_only=True)
        self.states: dict[int, dict] = {}
        self.consumed = 0
        self.loss_fn = ClipLoss(cfg.model.local_loss, cfg.model.gather_with_grad)
        self._val = None

    def module(self) -> nn.Module:
        torch.manual_seed(self.cfg.run.seed)
        self.model = ClipBaselineModel(self.cfg.model.path)
        return self.model

    def param_groups(self, module: nn.Module) -> list[dict]:
        """As stage 2: the tower layer-decayed at optim.lr, the text side (here CLIP's text tower, there
        the adapter) at optim.adapter_lr, the logit scale at optim.head_lr."""
        o = self.cfg.optim
        tower = module.tower
        parts = {"tower": [(n, p) for n, p in tower.named_parameters()],
                 "text": [(n, p) for n, p in module.named_parameters() if n.startswith("text_")],
                 "logit_scale": [("logit_scale", module.logit_scale)]}
        lrs = {"tower": o.lr, "text": o.adapter_lr or o.lr, "logit_scale": o.head_lr or o.lr}
        return build_param_groups(parts, lrs, o.weight_decay, o.layer_decay,
                                  lambda part, name: tower.layer_id(name) if part == "tower" else None,
                                  num_layers=tower.num_layers)

    def loss(self, engine, batch):
        device = engine.device
        dtype = torch.bfloat16 if resolve_precision(self.cfg.train) == "bf16" else torch.float32
        tok = self.tokenizer(list(batch["captions"]), padding=True, truncation=True,
                             max_length=self.cfg.model.max_length, return_tensors="pt")
        pixels = self.device_pixels(batch["pixels"], device, dtype)  # uint8 from the loader, normalised here
        out = engine(pixels, tok["input_ids"].to(device), tok["attention_mask"].to(device))
        return self.loss_fn(*out), {"n_items": pixels.shape[0], "logit_scale": float(out[2].detach())}, \
            pixels.shape[0]

    def evaluate(self, engine, step: int) -> dict[str, float]:
        return {}  # retrieval / zero-shot: tools/eval_zero_shot.py on the exported CLIPModel folder

    def export(self, engine, out_dir: Path) -> None:
        stats = D.sum_counters(self._data_counters())
        if self.rank == 0:
            sd = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
            self.model.save_hf(out_dir / "model", sd)
            (out_dir / "data_stats.json").write_text(__import__("json").dumps(stats, indent=1))
        D.barrier()


def run_clip_baseline(cfg: ClipBaselineConfig) -> dict:
    from llm2clip.preflight import check_training_paths

    return run_training(cfg, ClipBaselineTask, preflight=check_training_paths)
