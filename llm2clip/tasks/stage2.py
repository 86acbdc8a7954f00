"""Stage 2: train the vision tower + adapter against frozen-LLM caption embeddings (the LLM never runs
in offline mode; in online mode a small frozen encoder runs in the loop)."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from llm2clip import distributed as D
from llm2clip.config import ConfigError
from llm2clip.data.shards import IMAGE_EXTS, expand_shards, get_caption, image_member, iter_tar_samples
from llm2clip.data.sidecar import JoinStats, index_path_for, iter_joined, load_index, scan_sidecars, sidecar_path_for
from llm2clip.data.stage2_stream import (Stage2Stream, check_topology, dataset_shards, make_loader, shard_sizes,
                                         steps_for_epochs, stream_count)
from llm2clip.data.streams import check_streams
from llm2clip.data.transforms import eval_transform, normalize
from llm2clip.engine import resolve_precision, run_training
from llm2clip.losses.clip import ClipLoss, SigLipLoss
from llm2clip.model.clip_model import LLM2CLIPModel
from llm2clip.optim_groups import param_groups_for_llm2clip
from llm2clip.schema_embed import field_name
from llm2clip.schema_stage2 import Stage2Config
from llm2clip.vision.towers import build_vision_tower

log = logging.getLogger("llm2clip")


class MissingSidecarsError(FileNotFoundError):
    pass


def _inspect_sidecars(shards: list[str], cfg: Stage2Config, fields: list[str]) -> dict[str, Any]:
    """Rank 0's look at the sidecars (manifests and sizes, or a current index.json; no tar is read or
    hashed: that is `tools/embed_captions.py --verify`): missing/invalid ones, else the encoder they
    agree on (or not)."""
    scan = scan_sidecars(shards, cfg.data.sidecar, cfg.data.fingerprint or None, fields)
    if scan.missing or scan.invalid:
        return {"missing": scan.missing, "invalid": scan.invalid}
    manifests = list(scan.manifests.values())
    fps = sorted({m["fingerprint"] for m in manifests})
    widths = sorted({m["width"] for m in manifests})
    if len(fps) > 1 or len(widths) > 1:
        return {"missing": [], "invalid": [], "mixed": (fps, widths)}
    idx = load_index(index_path_for(sidecar_path_for(shards[0], cfg.data.sidecar), cfg.data.sidecar)) or {}
    return {"missing": [], "invalid": [], "summary": {
        "fingerprint": fps[0], "width": widths[0],
        "encoder": {**idx.get("encoder", {}), **idx.get("encoder_location", {})}}}


def preflight_sidecars(cfg: Stage2Config) -> dict[str, Any]:
    """Before any model loads: every image shard has a valid sidecar from one encoder with the fields we
    need. Returns {"fingerprint", "width", "encoder"}. Runs the embed step when configured to.
    Rank 0 reads the sidecars and manifests once; the other ranks get its answer."""
    fields = list(dict.fromkeys(cfg.data.dense_fields + cfg.data.original_fields))
    shards = [s for ds in dataset_shards(cfg.data.shards) for s in ds]

    def inspect() -> dict[str, Any]:
        return D.broadcast_object(_inspect_sidecars(shards, cfg, fields) if D.get_rank() == 0 else None)

    st = inspect()
    if (st["missing"] or st["invalid"]) and cfg.data.missing_sidecars == "embed":
        log.info(f"{len(st['missing'])} sidecars missing, {len(st['invalid'])} invalid: running the embed step "
                 f"({cfg.data.embed_config}) first")
        from llm2clip.config import load_config
        from llm2clip.schema_embed import EmbedConfig
        from llm2clip.tasks.embed import run_embed

        run_embed(load_config(EmbedConfig, cfg.data.embed_config))
        st = inspect()
    missing, invalid = st["missing"], st["invalid"]
    if missing or invalid:
        lines = [f"  missing: {sidecar_path_for(s, cfg.data.sidecar)} (for {s})" for s in missing[:5]]
        lines += [f"  invalid: {r}" for _, r in invalid[:5]]
        raise MissingSidecarsError(
            f"{len(missing)} of {len(shards)} image shards have no complete sidecar and {len(invalid)} have an "
            f"invalid one:\n" + "\n".join(lines) + "\nRun the embed step first (python tools/embed_captions.py "
            "--config <embed.yaml>, or sbatch slurm/embed.sh), or set data.missing_sidecars=embed with "
            "data.embed_config=<embed.yaml>.")
    if "mixed" in st:
        fps, widths = st["mixed"]
        raise ConfigError(f"data.shards: the sidecars come from {len(fps)} different encoders (fingerprints "
                          f"{fps[:3]}) / widths {widths}; re-embed or set data.fingerprint")
    return st["summary"]


class Stage2Task:
    name = "stage2"

    def __init__(self, cfg: Stage2Config):
        self.cfg = cfg
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.online = cfg.text.mode == "online"
        self.embedder = None
        if self.online:
            from llm2clip.text.embedder import TextEmbedder
            from llm2clip.text.feature_cache import encoder_location, fingerprint_of, fingerprint_record

            # the embed step's embedder (dtype policy: bf16 on GPU, fp32 on CPU), loaded and placed once
            self.embedder = TextEmbedder(cfg.text.encoder)
            record = fingerprint_record(cfg.text.encoder, "")  # what the embed step would record for this encoder
            self.sidecar_info = {"fingerprint": fingerprint_of(record), "width": self.embedder.hidden_size,
                                 "encoder": {**record, **encoder_location(cfg.text.encoder)}}
        else:
            self.sidecar_info = preflight_sidecars(cfg)
        width = self.sidecar_info["width"]
        if cfg.model.llm_dim is not None and cfg.model.llm_dim != width:
            raise ConfigError(f"model.llm_dim={cfg.model.llm_dim} but the LLM embeddings are {width} wide "
                              f"(sidecars of {cfg.data.shards}); drop model.llm_dim or re-embed with the right LLM")
        self.llm_dim = width
        # before any model loads: every data stream (rank x worker) owns samples of every dataset
        datasets = dataset_shards(cfg.data.shards)
        # rank 0 reads the counts (manifests / _stats.json) once; every rank and loader worker uses its answer
        sizes = D.broadcast_object([shard_sizes(sh, None if self.online else cfg.data.sidecar) for sh in datasets]
                                   if self.rank == 0 else None)
        self.shard_sizes = sizes
        check_streams(datasets, sizes, stream_count(self.world, cfg.data.num_workers))
        if cfg.data.epochs is not None:
            steps, warn = steps_for_epochs(datasets, cfg.data.epochs, cfg.train.micro_batch_size,
                                           self.world, cfg.data.num_workers, cfg.train.grad_accum, sizes)
            log.info(f"data.epochs={cfg.data.epochs}: train.max_steps={steps}")
            if warn:
                log.warning(warn)
            cfg.train.max_steps = steps
        self.states: dict[int, dict] = {}
        self.consumed = 0
        self.worker_cpu: dict[int, float] = {}  # loader worker id -> its CPU seconds, as of its latest batch
        self.loss_fn = (ClipLoss(cfg.model.local_loss, cfg.model.gather_with_grad) if cfg.model.loss == "clip"
                        else SigLipLoss())
        self._val = None

    # --- model ---------------------------------------------------------------------------------
    def module(self) -> nn.Module:
        c = self.cfg
        tower = build_vision_tower(c.vision.kind, c.vision.path, image_size=c.vision.image_size,
                                   grad_checkpointing=c.vision.gradient_checkpointing, freeze=c.vision.freeze,
                                   freeze_first_k=c.vision.freeze_first_k,
                                   use_pretrained_proj=c.vision.use_pretrained_proj)
        info = dict(self.sidecar_info.get("encoder") or {})
        info.setdefault("fingerprint", self.sidecar_info.get("fingerprint"))
        torch.manual_seed(c.run.seed)  # identical fresh heads on every rank
        self.model = LLM2CLIPModel(tower, self.llm_dim, c.model.embed_dim, c.model.adapter_blocks,
                                   c.model.adapter_expansion, c.model.adapter_dropout,
                                   logit_bias=c.model.loss == "siglip", logit_scale_init=c.model.logit_scale_init,
                                   text_encoder_info=info)
        if c.model.save_initial and self.rank == 0:
            self.model.save_pretrained(Path(c.run.output_dir) / "export" / "initial_model")
        return self.model

    def memory_plan(self, world: int, gpu_mem_gib: float):  # logged by the engine before the model loads
        from llm2clip.memory_plan import plan_stage2

        return plan_stage2(self.cfg, world, gpu_mem_gib, llm_dim=self.llm_dim)

    def param_groups(self, module: nn.Module) -> list[dict]:
        o = self.cfg.optim
        return param_groups_for_llm2clip(module, o.lr, o.head_lr or o.lr, o.adapter_lr or o.lr, o.weight_decay,
                                         o.layer_decay)

    # --- data ----------------------------------------------------------------------------------
    def batches(self, data_state: dict | None) -> Iterator[Any]:
        c = self.cfg
        tower = self.model.tower
        # rank 0's saved topology decides for all ranks (a rank added since the checkpoint has no state)
        saved = D.broadcast_object(data_state if self.rank == 0 else None)
        ok = check_topology(saved, self.world, c.data.num_workers, c.run.reset_data_position)
        start = (data_state or {}) if ok else {}
        self.states = {int(k): v for k, v in start.get("workers", {}).items()}
        self.consumed = int(start.get("batches", 0))
        ds = Stage2Stream(c.data, c.train.micro_batch_size, c.run.seed, self.rank, self.world, tower.image_size,
                          tower.mean, tower.std, self.online, start, self.sidecar_info.get("fingerprint"),
                          sizes=self.shard_sizes)
        loader = make_loader(ds, c.data.num_workers)
        self.worker_cpu = {}

        def gen():
            for b in loader:
                self.states[b["_worker"]] = b["_state"]
                if "_loader_cpu" in b:
                    w, cpu = b.pop("_loader_cpu")
                    self.worker_cpu[w] = cpu
                self.consumed += 1
                yield b
        return gen()

    def data_state(self) -> dict:
        return {"workers": {str(k): v for k, v in self.states.items()}, "batches": self.consumed,
                "topology": [self.world, max(self.cfg.data.num_workers, 1)]}

    def _data_counters(self) -> dict[str, float]:
        """This rank's counters, summed over its loader workers (numbers only, whatever keys they carry)."""
        tot: dict[str, float] = {}
        for st in self.states.values():
            for k, v in st.get("stats", {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tot[f"data/{k}"] = tot.get(f"data/{k}", 0) + v
        return tot

    def counters(self) -> dict[str, float]:  # the engine sums these over ranks per log step
        return self._data_counters()

    def loader_cpu_s(self) -> float:
        """CPU seconds this rank's loader workers spent so far (the engine's perf/loader_*), as of the batches
        consumed; 0 with data.num_workers=0, where loading runs in the training thread."""
        return float(sum(self.worker_cpu.values()))

    # --- step ----------------------------------------------------------------------------------
    def _text_emb(self, batch, device) -> torch.Tensor:
        if not self.online:
            return batch["emb"].to(device)
        return self.embedder.embed(batch["captions"], desc="stage-2 online captions").to(device)

    def loss(self, engine, batch) -> tuple[torch.Tensor, dict, int]:
        device = engine.device
        dtype = torch.bfloat16 if resolve_precision(self.cfg.train) == "bf16" else torch.float32
        pixels = self.device_pixels(batch["pixels"], device, dtype)
        emb = self._text_emb(batch, device).to(dtype)
        chunk = self.cfg.train.contrastive_chunk
        if chunk:  # GradCache: exact global-batch loss and gradients, one chunk's activations at a time
            from llm2clip.gradcache import chunked_loss

            out = []

            def loss_of(per):  # per chunk (image, text, scale[, bias]); the scale and bias are chunk 0's
                out[:] = [torch.cat([o[0] for o in per]), torch.cat([o[1] for o in per]), *per[0][2:]]
                return self.loss_fn(*out), {}

            loss, _ = chunked_loss(engine, pixels.shape[0], chunk, lambda i, j, fwd: fwd(pixels[i:j], emb[i:j]),
                                   loss_of)
        else:
            out = engine(pixels, emb)
            loss = self.loss_fn(*out)
        m = {"n_items": pixels.shape[0], "logit_scale": float(out[2].detach())}
        return loss, m, pixels.shape[0]

    def device_pixels(self, pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """uint8 [B, 3, H, W] from the loader (pinned under CUDA) -> normalised `dtype` on `device`: the
        transfer moves bytes, the mean/std arithmetic runs on the device."""
        tower = self.model.tower
        return normalize(pixels.to(device, non_blocking=True), tower.mean, tower.std, dtype)

    def after_optimizer_step(self, module: nn.Module) -> None:
        module.clamp_logit_scale()

    # --- eval ----------------------------------------------------------------------------------
    def _load_val(self):
        """This rank's share of the held-out set: (uint8 pixels [n_r, 3, H, W], text embeddings [n_r, d]).

        The first val_max_samples samples with an image and a caption are candidates; candidate k goes
        to rank k % world (pairs stay together, so the gathered features are one permutation of the
        set and the retrieval metrics are the same); an image that does not decode is skipped."""
        c = self.cfg
        tower = self.model.tower
        tf = eval_transform(tower.image_size, tower.mean, tower.std, normalize=False)
        px, embs = [], []
        fname = field_name(c.data.val_field)
        k = 0
        for shard in expand_shards(c.data.val_shards):
            if self.online:
                it = ({"jpg": image_member(s), "t": get_caption(s, c.data.val_field)} for s in
                      iter_tar_samples(shard, want={*IMAGE_EXTS, "txt", "json"}))
            else:
                it = ({"jpg": s["jpg"], "t": s["emb"].get(fname)} for s in
                      iter_joined(shard, sidecar_path_for(shard, c.data.sidecar), [c.data.val_field],
                                  self.sidecar_info.get("fingerprint"), JoinStats()))
            for s in it:
                if s["jpg"] is None or s["t"] is None:
                    continue
                if k >= c.data.val_max_samples:
                    break
                k += 1
                if (k - 1) % self.world != self.rank:
                    continue
                try:
                    with Image.open(io.BytesIO(s["jpg"])) as im:
                        px.append(tf(im))
                except Exception:  # noqa: BLE001 - counted by the eval tool; here just skipped
                    continue
                embs.append(s["t"])
            if k >= c.data.val_max_samples:
                break
        size = (0, 3, tower.image_size, tower.image_size)
        pixels = torch.stack(px) if px else torch.zeros(size, dtype=torch.uint8)
        if self.online:  # captions -> embeddings with the frozen encoder, as in training
            return pixels, (self.embedder.embed(embs, desc="stage-2 val captions") if embs else
                            torch.zeros(0, self.llm_dim))
        return pixels, torch.as_tensor(np.stack(embs) if embs else np.zeros((0, self.llm_dim)), dtype=torch.float32)

    def evaluate(self, engine, step: int) -> dict[str, float]:
        if not self.cfg.data.val_shards:
            return {}
        from llm2clip.eval.metrics import retrieval_metrics

        if self._val is None:
            self._val = self._load_val()
        px, emb = self._val  # this rank's share
        module = engine.module
        was = module.training
        module.eval()
        dtype = next(module.parameters()).dtype
        img_f, txt_f = [], []
        with torch.no_grad():
            for i in range(0, px.shape[0], 128):
                j = min(px.shape[0], i + 128)
                img_f.append(F.normalize(module.encode_image(self.device_pixels(px[i:j], engine.device, dtype)).float(),
                                         dim=-1))
                txt_f.append(F.normalize(module.encode_text_embedding(emb[i:j].to(engine.device, dtype)).float(),
                                         dim=-1))
        module.train(was)
        E = self.model.embed_dim
        img = D.gather_no_grad(torch.cat(img_f) if img_f else torch.zeros(0, E, device=engine.device)).cpu()
        txt = D.gather_no_grad(torch.cat(txt_f) if txt_f else torch.zeros(0, E, device=engine.device)).cpu()
        r = retrieval_metrics(img @ txt.T, torch.arange(img.shape[0]), ks=(1, 5))
        self.last_eval = {f"eval/{k}": float(v) for k, v in r.items()}  # for the model card
        return self.last_eval

    # --- export --------------------------------------------------------------------------------
    def export(self, engine, out_dir: Path) -> None:
        """The trained model (tower + projection + adapter) as safetensors + config, for evaluation."""
        module = engine.module
        stats = D.sum_counters(self._data_counters())  # every rank's, not rank 0's alone
        if self.rank == 0:
            sd = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
            module.save_pretrained(out_dir / "model", state_dict=sd)
            _export_hf_vision(out_dir)
            (out_dir / "data_stats.json").write_text(json.dumps(stats, indent=1))
            self._write_model_card(out_dir, stats)
        D.barrier()


    def _write_model_card(self, out_dir: Path, stats: dict) -> None:
        from llm2clip.model_card import write_model_card

        c = self.cfg
        info = dict(self.model.text_encoder_info)
        hf = out_dir / "hf_vision"
        write_model_card(
            out_dir / "model", encoder=info,
            data={"shards": c.data.shards, "original_fields": c.data.original_fields,
                  "dense_fields": c.data.dense_fields, "dense_ratio": c.data.dense_ratio,
                  "text_mode": c.text.mode, **stats},  # stats: samples/bytes read, skips per reason
            training={"steps": c.train.max_steps, "global_batch": c.train.micro_batch_size * self.world
                      * c.train.grad_accum, "lr": c.optim.lr, "vision_tower": c.vision.path,
                      "image_size": self.model.tower.image_size, "embed_dim": c.model.embed_dim,
                      "adapter_blocks": c.model.adapter_blocks, "loss": c.model.loss},
            evaluation=getattr(self, "last_eval", {}),
            extra_exports={"hf_vision (transformers, for LLaVA-style models)": str(hf)} if hf.is_dir() else None)


def _export_hf_vision(out_dir: Path) -> None:
    """<export>/hf_vision: the trained tower as a transformers folder (what LLaVA-style models load),
    rebuilt from the saved model so it holds exactly what `llm2clip.load_model` serves."""
    from llm2clip.export_hf import HFExportError, export_hf_vision

    try:
        export_hf_vision(out_dir / "model", out_dir / "hf_vision")
    except HFExportError as e:  # e.g. timm towers: the llm2clip export above is complete on its own
        log.warning(f"no Hugging Face vision export: {e}")


def run_stage2(cfg: Stage2Config) -> dict:
    from llm2clip.preflight import check_training_paths

    return run_training(cfg, Stage2Task, preflight=check_training_paths)
