"""Model specs -> models for evaluation, and feature encoding sharded over ranks.

    model = build_model("ours", EvalModelConfig(kind="llm2clip", path="runs/stage2/export/model"), run_cfg)
    txt = model.text_features(captions)            # [N, D] on every rank; the work split over ranks
    img = sharded_map(batches, n, run_local)        # the same for any per-batch computation

Kinds (see llm2clip.schema_eval.MODEL_KINDS): ``llm2clip`` (our stage-2 export; text through the
stage-1 encoder + adapter, or from the text feature cache), ``hf_clip`` (the baseline), ``text``
(an LLM / stage-1 encoder alone, for CRA). The image-text kinds also satisfy the
``ImageTextModel`` protocol (``preprocess`` / ``encode_image`` / ``encode_text``) for direct use.

Determinism: work is planned as a list of batches that depends only on the inputs (never on the
world size); rank r runs batches r, r + W, ... and the results are gathered back in input order.
Every text and image is therefore computed in the same batch on 1 process and on 512, so the
features -- and the metrics -- are bit-identical. Identical strings are encoded once.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from llm2clip import distributed as D
from llm2clip.config import ConfigError
from llm2clip.schema import TextEncoderConfig
from llm2clip.schema_eval import MODEL_KINDS, EvalModelConfig, EvalRunConfig
from llm2clip.sharding import portable_error, sharded_map  # noqa: F401 - sharded_map re-exported
from llm2clip.text.settings import RECORD_FILE, recorded_settings, text_encoder_config

log = logging.getLogger("llm2clip")

# ----------------------------------------------------------------------------- distributed helpers

def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """Collective error check: every rank calls it once; if any rank failed, every rank raises
    (the failing rank's exception, same type and message), so none is left blocked in the next
    collective. ``what`` is logged with the failing rank."""
    errors = D.all_gather_object(portable_error(error))
    if error is not None:
        raise error
    for r, e in enumerate(errors):
        if e is not None:
            log.warning(f"{what} failed on rank {r}")
            raise e


def on_rank0_then_broadcast(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 only (e.g. reading annotations, hashing weights) and give everyone the
    result; an exception on rank 0 is raised on every rank (same type and message)."""
    result, err = None, None
    if D.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below on every rank
            err = e
    result, shared = D.broadcast_object((result, portable_error(err)))
    if err is not None:
        raise err
    if shared is not None:
        raise shared
    return result


def fixed_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    order = list(order)
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Batches of similar-length texts (less padding); depends only on the texts."""
    return fixed_batches(sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i)), batch_size)


def unique_texts(texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """(distinct texts in first-seen order, index of each input text into them)."""
    pos: dict[str, int] = {}
    inv = [pos.setdefault(t, len(pos)) for t in texts]
    return list(pos), torch.tensor(inv, dtype=torch.long)


# ----------------------------------------------------------------------------- devices


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", D.world_info().local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """Autocast context for the towers: auto = bf16 on GPU, fp32 (none) on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- LLM text side


class LLMText:
    """A text encoder (LLM or stage-1 export) that embeds captions as the embed step does:
    token-budget batches of length-sorted captions, pooled raw embeddings ``[N, H]``.

    Loads the model lazily (not at all when every text comes from the cache) and keeps the
    tokenizer only for planning. ``info`` is what the fingerprint was checked against.
    """

    def __init__(self, cfg: TextEncoderConfig, run: EvalRunConfig, device: torch.device, label: str,
                 expected_fingerprint: str | None = None, expected_record: dict | None = None,
                 check_fingerprint: bool = False, expected_instruction: str = ""):
        self.cfg, self.run, self.device, self.label = cfg, run, device, label
        self.expected_fingerprint, self.expected_record = expected_fingerprint, expected_record or {}
        self.expected_instruction = expected_instruction
        self.check_fingerprint = check_fingerprint
        self._embedder = None
        self._fingerprints: dict[str, str] = {}
        self._records: dict[str, dict] = {}
        self._verified = False
        self.stats: dict[str, Any] = {"encoded": 0, "from_cache": 0, "fingerprints": {}}

    # -- configuration --
    def _need_path(self) -> None:
        if not self.cfg.model_path:
            raise ConfigError(f"{self.label}: no text encoder path is recorded for this model and not every text is in "
                              f"the text feature cache; pass --set {self.label}.text.model_path=<the stage-1 merged "
                              "encoder it was trained with>")
        try:
            self.cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{self.label}: {e}") from None

    def fingerprint(self, instruction: str, collective: bool = True) -> str:
        """Content fingerprint of (encoder, instruction), computed on rank 0 and broadcast (every rank
        must call it), or here when not ``collective``. File hashes are memoised."""
        if instruction not in self._fingerprints:
            from llm2clip.text.feature_cache import FileHashCache, fingerprint_of, fingerprint_record

            if not self.cfg.model_path and self.expected_fingerprint and instruction == self.expected_instruction:
                fp = self.expected_fingerprint  # no folder to hash: trust the record (cache-only evaluation)
            else:
                self._need_path()
                work = lambda: fingerprint_record(self.cfg, instruction, FileHashCache())  # noqa: E731
                record = on_rank0_then_broadcast(work, f"{self.label}: fingerprinting {self.cfg.model_path}") \
                    if collective else work()
                fp = fingerprint_of(record)
                self._records[instruction] = record
            self._fingerprints[instruction] = fp
            self.stats["fingerprints"][instruction] = fp
        return self._fingerprints[instruction]

    def verify(self, collective: bool = True) -> None:
        """Refuse an encoder other than the one stage 2 trained on (when a fingerprint was recorded).

        Compares at the recorded instruction; names what differs (weights, tokenizer, pooling, ...)."""
        if self._verified or not (self.check_fingerprint and self.expected_fingerprint):
            return
        fp = self.fingerprint(self.expected_instruction, collective)
        if fp != self.expected_fingerprint:
            record = self._records.get(self.expected_instruction, {})
            diff = sorted(k for k in record if k in self.expected_record and record[k] != self.expected_record[k])
            raise ConfigError(
                f"{self.label}: the text encoder {self.cfg.model_path} has fingerprint {fp[:16]}…, but the model was "
                f"trained on embeddings from {self.expected_fingerprint[:16]}…"
                + (f" (they differ in: {', '.join(diff)})" if diff else "")
                + f". Point {self.label}.text.model_path (and text.lora_path / pooling / template / max_length) at "
                f"the encoder stage 2 used, or set {self.label}.check_fingerprint=false to evaluate anyway.")
        self._verified = True

    # -- encoding (the TextEmbedder: same batching, packing and pooling as the embed step) --
    def embedder(self):
        if self._embedder is None:
            from llm2clip.text.embedder import TextEmbedder

            def load():
                from llm2clip.text.encoder import build_text_encoder, resolve_dtype

                self._need_path()
                return build_text_encoder(self.cfg, dtype=resolve_dtype(self.cfg.dtype))

            self._embedder = TextEmbedder(self.cfg, self.device, self.run.text_token_budget, self.run.text_batch_size,
                                          loader=load, progress=self.run.progress)
            self._embedder._owned = True
        return self._embedder

    def release(self) -> None:
        if self._embedder is not None:
            self._embedder.release()

    def encode_direct(self, texts: list[str], instruction: str = "") -> torch.Tensor:
        """This process only: ``[B, H]`` raw pooled embeddings (for checks and small jobs)."""
        self.verify(collective=False)
        return self.embedder().embed(texts, instruction)

    def features(self, texts: list[str], instruction: str = "", desc: str = "") -> torch.Tensor:
        """Raw embeddings ``[len(texts), H]`` of distinct texts, from the cache where possible;
        the rest computed sharded over ranks (and added to the cache by rank 0)."""
        if self.cfg.model_path:
            self.verify()
        e = self.embedder()
        cache_dir = self.run.text_cache_dir
        fp = self.fingerprint(instruction) if cache_dir else None
        hits, misses = e.cache_hits, e.cache_misses
        out = e.features(texts, instruction, cache_dir, fp, desc or f"{self.label} text")
        if cache_dir:
            self.stats["from_cache"] += e.cache_hits - hits
            self.stats["encoded"] += e.cache_misses - misses
        else:
            self.stats["encoded"] += len(texts)
        return out


# ----------------------------------------------------------------------------- models


class EvalModel:
    """Base: ``name``, ``kind``; image side (``has_images``, ``transform``, ``encode_image``) and
    text side (``text_features``: sharded, deduplicated, all ranks get all rows)."""

    kind = ""
    has_images = True

    def __init__(self, name: str, spec: EvalModelConfig, run: EvalRunConfig, device: torch.device):
        self.name, self.spec, self.run, self.device = name, spec, run, device

    # ImageTextModel protocol
    def preprocess(self, pil_image) -> torch.Tensor:
        return self.transform(pil_image)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Direct (this process, one batch) text features ``[B, D]``."""
        raise NotImplementedError

    def text_features(self, texts: Sequence[str], instruction: str | None = None, desc: str = "") -> torch.Tensor:
        """``[len(texts), D]`` float32 on CPU, identical on every rank."""
        raise NotImplementedError

    def release_text_encoder(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": os.path.abspath(self.spec.path)}


class HFClipEval(EvalModel):
    kind = "hf_clip"

    def __init__(self, name, spec, run, device):
        super().__init__(name, spec, run, device)
        from llm2clip.eval.hf_clip import HFCLIPModel, clip_eval_transform

        self.clip = HFCLIPModel.from_pretrained(spec.path, device=device)
        self.transform = functools.partial(clip_eval_transform, processor=self.clip.processor)

    def encode_image(self, pixels):
        with autocast_for(self.device, self.run.precision):
            return self.clip.encode_image(pixels.to(self.device)).float()

    def encode_text(self, texts):
        with autocast_for(self.device, self.run.precision):
            return self.clip.encode_text(list(texts)).float()

    def text_features(self, texts, instruction=None, desc=""):
        uniq, inv = unique_texts(texts)
        batches = length_sorted_batches(uniq, self.run.text_batch_size)

        def run_local(mine):
            for b in mine:
                yield self.encode_text([uniq[i] for i in b])

        return sharded_map(batches, len(uniq), run_local, desc or f"{self.name} text", self.run.progress)[inv]

    def describe(self):
        c = self.clip.model.config
        return {**super().describe(), "embed_dim": int(c.projection_dim), "max_text_tokens": self.clip.max_length,
                "image_size": int(c.vision_config.image_size)}


class TextOnlyEval(EvalModel):
    """An LLM / stage-1 encoder alone: pooled embeddings, for CRA."""

    kind = "text"
    has_images = False

    def __init__(self, name, spec, run, device):
        super().__init__(name, spec, run, device)
        recorded: dict[str, Any] = {}
        info_path = Path(spec.path) / RECORD_FILE
        if info_path.is_file():
            info = json.loads(info_path.read_text())
            recorded = {k: v for k, v in recorded_settings(info).items() if k not in ("model_path", "lora_path")}
        self.recorded_from = str(info_path) if recorded else f"defaults (no {RECORD_FILE})"
        cfg = text_encoder_config({**recorded, "model_path": spec.path}, spec.text, f"models.{name}")
        self.llm = LLMText(cfg, run, device, f"models.{name}")
        self.default_instruction = spec.instruction or ""

    def encode_text(self, texts):
        return self.llm.encode_direct(list(texts), self.default_instruction)

    def text_features(self, texts, instruction=None, desc=""):
        uniq, inv = unique_texts(texts)
        instr = self.default_instruction if instruction is None else instruction
        return self.llm.features(uniq, instr, desc or f"{self.name} text")[inv]

    def release_text_encoder(self):
        self.llm.release()

    def describe(self):
        import dataclasses

        return {**super().describe(), "text_encoder": dataclasses.asdict(self.llm.cfg),
                "settings_from": self.recorded_from, "instruction": self.default_instruction,
                "text_stats": self.llm.stats}


class LLM2ClipEval(EvalModel):
    """Our stage-2 export: vision tower + projection; text = stage-1 encoder -> adapter."""

    kind = "llm2clip"

    def __init__(self, name, spec, run, device):
        super().__init__(name, spec, run, device)
        from llm2clip.data.transforms import eval_transform
        from llm2clip.model.clip_model import LLM2CLIPModel

        self.model = LLM2CLIPModel.from_pretrained(spec.path, map_location="cpu").to(device).eval()
        self.model.requires_grad_(False)
        t = self.model.tower
        self.transform = eval_transform(t.image_size, t.mean, t.std)
        info = dict(self.model.text_encoder_info or {})
        base = recorded_settings(info)
        if "model_path" not in base and info.get("path"):
            base["model_path"] = info["path"]
        cfg = text_encoder_config(base, spec.text, f"models.{name}")
        self.info = info
        recorded_instruction = str(info.get("instruction", ""))
        self.default_instruction = recorded_instruction if spec.instruction is None else spec.instruction
        self.llm = LLMText(cfg, run, device, f"models.{name}", expected_fingerprint=info.get("fingerprint"),
                           expected_record=info, check_fingerprint=spec.check_fingerprint,
                           expected_instruction=recorded_instruction)

    def encode_image(self, pixels):
        with torch.no_grad(), autocast_for(self.device, self.run.precision):
            return self.model.encode_image(pixels.to(self.device)).float()

    def adapt(self, llm_emb: torch.Tensor) -> torch.Tensor:
        """LLM embeddings ``[B, llm_dim]`` -> text features ``[B, embed_dim]``."""
        with torch.no_grad(), autocast_for(self.device, self.run.precision):
            return self.model.encode_text_embedding(llm_emb.to(self.device)).float()

    def encode_text(self, texts):
        return self.adapt(self.llm.encode_direct(list(texts), self.default_instruction))

    def text_features(self, texts, instruction=None, desc=""):
        uniq, inv = unique_texts(texts)
        instr = self.default_instruction if instruction is None else instruction
        label = desc or f"{self.name} text"
        raw = self.llm.features(uniq, instr, f"{label} (LLM)")
        if raw.shape[1] != self.model.llm_dim:
            raise ValueError(f"models.{self.name}: the text encoder gives {raw.shape[1]}-wide embeddings but the "
                             f"adapter expects {self.model.llm_dim}; text.model_path must be the encoder stage 2 used")
        batches = fixed_batches(range(len(uniq)), self.run.text_batch_size)

        def run_local(mine):
            for b in mine:
                yield self.adapt(raw[b])

        return sharded_map(batches, len(uniq), run_local, f"{label} (adapter)", self.run.progress)[inv]

    def release_text_encoder(self):
        self.llm.release()

    def describe(self):
        import dataclasses

        m = self.model
        return {**super().describe(), "embed_dim": m.embed_dim, "llm_dim": m.llm_dim, "image_size": m.tower.image_size,
                "vision_tower": m.tower.kind, "text_encoder": dataclasses.asdict(self.llm.cfg),
                "instruction": self.default_instruction,
                "recorded_fingerprint": self.info.get("fingerprint"), "text_stats": self.llm.stats}


MODEL_CLASSES: dict[str, type[EvalModel]] = {"llm2clip": LLM2ClipEval, "hf_clip": HFClipEval, "text": TextOnlyEval}
assert set(MODEL_CLASSES) == set(MODEL_KINDS)


_REQUIRED_FILES = {"llm2clip": ("llm2clip_config.json", "model.safetensors"),
                   "hf_clip": ("config.json", "preprocessor_config.json"), "text": ("config.json",)}


def check_model_folders(specs: dict[str, EvalModelConfig]) -> None:
    """Every model folder exists with the files its kind needs; all problems reported at once,
    before datasets are read or anything is loaded."""
    problems = []
    for name, spec in specs.items():
        if not os.path.isdir(spec.path):
            problems.append(f"models.{name}.path: folder not found: {spec.path}")
            continue
        lacking = [f for f in _REQUIRED_FILES.get(spec.kind, ()) if not os.path.isfile(os.path.join(spec.path, f))]
        if lacking:
            problems.append(f"models.{name}.path: {spec.path} is not a {spec.kind} folder (no {', '.join(lacking)}; "
                            f"{spec.kind}: {MODEL_KINDS[spec.kind]})")
    if problems:
        raise FileNotFoundError("\n  ".join([f"{len(problems)} model folder problem(s):"] + problems))


def build_model(name: str, spec: EvalModelConfig, run: EvalRunConfig, device: torch.device | None = None) -> EvalModel:
    """Load the model a spec names. Raises ConfigError for an unknown kind (listing the valid ones)
    and FileNotFoundError naming a missing folder."""
    if spec.kind not in MODEL_CLASSES:
        raise ConfigError(f"models.{name}.kind: {spec.kind!r} is not a model kind; valid: {', '.join(MODEL_CLASSES)}")
    if not os.path.isdir(spec.path):
        raise FileNotFoundError(f"models.{name}.path: model folder not found: {spec.path}")
    return MODEL_CLASSES[spec.kind](name, spec, run, device or resolve_device(run.device))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
