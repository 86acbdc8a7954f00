"""One text embedder for every path that turns captions into LLM embeddings.

    emb = TextEmbedder(cfg.text).embed(captions, instruction)          # [N, H] float32, input order
    emb = TextEmbedder(cfg.text).features(captions, cache_dir=...)       # from the feature cache first

The embed step, stage-1 evaluation (CRA) and its training step, stage-2 online mode and its
validation, evaluation (`LLMText`) and `llm2clip.load_model().encode_text` all call it, so the same
caption gets the same embedding everywhere. It owns:
- loading: one dtype policy (text.dtype auto = bf16 on GPU, fp32 on CPU) and attention policy
  (flash-attn only for bf16/fp16; an fp32 + flash-attn request is a clear error);
- tokenising with instructions, one tokenizer call per batch; empty captions are an error naming
  them (or skipped and counted, text.empty_captions=skip, where the caller can say which);
- batching under a token budget, padded (length-sorted) or packed (text.packing, several captions
  per row, no padding; see TextEncoder);
- sharding the batches over ranks and gathering the rows back in input order; with `lockstep`
  every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively);
- the optional on-disk feature cache (keyed by the encoder fingerprint).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from llm2clip import distributed as D
from llm2clip.config import ConfigError
from llm2clip.schema import TextEncoderConfig
from llm2clip.text.batching import EncodeStats, Plan, plan_packed, plan_padded
from llm2clip.text.tokenize import Encoded, PromptTokenizer, TextBatch, check_captions, collate, collate_packed

log = logging.getLogger("llm2clip")

# encoder-only model types whose forward takes explicit position ids (packing and left padding are safe)
_POSITIONED_ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert"}


def packing_enabled(cfg: TextEncoderConfig, encoder=None) -> bool:
    """text.packing resolved: auto = on wherever the model takes explicit position ids."""
    from llm2clip.text.encoder import ENCODER_ONLY, model_type

    if cfg.packing == "off":
        return False
    if encoder is not None:
        ok = encoder.can_pack
    else:
        mtype = model_type(cfg.model_path)
        ok = mtype not in ENCODER_ONLY or mtype in _POSITIONED_ENCODERS
    if cfg.packing == "on" and not ok:
        raise ConfigError(f"text.packing=on but the model at {cfg.model_path} cannot take packed rows (its forward "
                          "has no position_ids, or an encoder-only model under flash-attn); use text.packing=auto")
    return ok


def layout(encoded: Sequence[Encoded], rows: Sequence[Sequence[int]], pad_id: int, padding_side: str,
           packed: bool) -> tuple[TextBatch, list[int]]:
    """(batch, caption index of each output row): the encoder returns captions in row order."""
    order = [i for r in rows for i in r]
    if packed and any(len(r) > 1 for r in rows):
        return collate_packed(encoded, rows, pad_id), order
    return collate([encoded[i] for i in order], pad_id, padding_side), order


class TextEmbedder:
    """Captions -> pooled embeddings [N, H] (float32, not normalised), see the module docstring.

    `encoder`/`ptok`: an already-built TextEncoder (e.g. stage 1's engine module) and its tokenizer;
    otherwise `loader()` or `build_text_encoder(cfg)` runs on first use (not at all when every text
    comes from the cache). `lockstep`: every rank runs the same number of forward passes.
    """

    def __init__(self, cfg: TextEncoderConfig, device: torch.device | str | None = None,
                 token_budget: int = 16384, max_batch_size: int = 1024, encoder=None,
                 ptok: PromptTokenizer | None = None, loader: Callable[[], Any] | None = None,
                 lockstep: bool = False, progress: bool = False):
        self.cfg, self.token_budget, self.max_batch_size = cfg, token_budget, max_batch_size
        self._device = torch.device(device) if device is not None else None
        self._enc, self._ptok, self._loader = encoder, ptok, loader
        self._owned = encoder is None  # loaded here (so release() may drop it)
        self.cache_hits = self.cache_misses = 0
        self.lockstep, self.progress = lockstep, progress
        self._packing: bool | None = None
        self._caches: dict[tuple[str, str], Any] = {}
        self.stats = EncodeStats()

    # -- loading ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self._device is None:
            if self._enc is not None:
                self._device = next(self._enc.parameters()).device
            else:
                self._device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                else torch.device("cpu"))
        return self._device

    def tokenizer(self) -> PromptTokenizer:
        if self._ptok is None:
            if self._loader is None:
                from llm2clip.text.encoder import ENCODER_ONLY, check_model_folder, model_type, prompt_tokenizer

                check_model_folder(self.cfg.model_path, "text model")
                self._ptok = prompt_tokenizer(self.cfg, model_type(self.cfg.model_path) in ENCODER_ONLY)
            else:
                self.encoder()
        return self._ptok

    def encoder(self):
        if self._enc is None:
            if self._loader is not None:
                enc, ptok = self._loader()
            else:
                from llm2clip.text.encoder import build_text_encoder, resolve_dtype

                enc, ptok = build_text_encoder(self.cfg, dtype=resolve_dtype(self.cfg.dtype))
            self._enc = enc.to(self.device).eval().requires_grad_(False)
            self._ptok = self._ptok or ptok
        return self._enc

    @property
    def compute_dtype(self) -> str:
        return str(next(self.encoder().parameters()).dtype).replace("torch.", "")

    @property
    def hidden_size(self) -> int:
        return int(self.encoder().hidden_size)

    def release(self) -> None:
        """Drop the loaded model (when it was loaded here), keeping the tokenizer."""
        if not self._owned or self._enc is None:
            return
        self._enc = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def packing(self) -> bool:
        if self._packing is None:
            self._packing = packing_enabled(self.cfg, self._enc)
        return self._packing

    # -- planning -----------------------------------------------------------------------------
    def encode(self, texts: Sequence[str], instruction: str | Sequence[str] = "",
               labels: Sequence[str] | None = None, where: str = "") -> list[Encoded]:
        """Token ids + pooling masks; an empty caption raises (naming `labels[i]`)."""
        check_captions(texts, labels, "error", where)
        return self.tokenizer().encode(texts, instruction)

    def plan(self, lengths: Sequence[int]) -> Plan:
        if self.packing:
            return plan_packed(lengths, self.token_budget, self.max_batch_size)
        return plan_padded(lengths, self.token_budget, self.max_batch_size)

    def _batch(self, encoded: Sequence[Encoded], rows: Sequence[Sequence[int]]) -> tuple[TextBatch, list[int]]:
        tok = self.tokenizer().tok
        return layout(encoded, rows, tok.pad_token_id, tok.padding_side, self.packing)

    # -- running ------------------------------------------------------------------------------
    def _run(self, encoded: Sequence[Encoded], rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """One forward pass: [captions of `rows` in row order, H] float32."""
        enc = self.encoder()
        batch, _ = self._batch(encoded, rows)
        try:
            with torch.no_grad():
                return enc.encode(batch.to(self.device)).float()
        except torch.cuda.OutOfMemoryError:
            if len(rows) == 1:
                raise
            batch = None
            torch.cuda.empty_cache()
            log.warning(f"CUDA OOM on a batch of {len(rows)} rows; splitting it (lower the token budget)")
            h = len(rows) // 2
            return torch.cat([self._run(encoded, rows[:h]), self._run(encoded, rows[h:])])

    def embed_encoded(self, encoded: Sequence[Encoded], sharded: bool = False, desc: str = "text",
                      on_batch: Callable[[EncodeStats], None] | None = None) -> tuple[torch.Tensor, EncodeStats]:
        """Pre-tokenised captions -> ([N, H] float32 on CPU in input order, stats of this rank's work).
        `sharded`: the batches split over ranks (round robin), every rank gets all rows."""
        from llm2clip.sharding import sharded_map

        t0 = time.perf_counter()
        lengths = [len(e[0]) for e in encoded]
        plan = self.plan(lengths)
        stats = EncodeStats()

        def run_local(mine_idx):
            by_first = {tuple(sum(b, [])): b for b in plan}  # flat index list -> rows
            for flat in mine_idx:
                rows = by_first[tuple(flat)]
                out = self._run(encoded, rows)
                w = max(sum(lengths[i] for i in r) for r in rows) if self.packing else max(lengths[i] for i in flat)
                b = EncodeStats(len(flat), sum(lengths[i] for i in flat), (len(rows) if self.packing else len(flat)) * w, 1)
                stats.add(b)
                if on_batch is not None:
                    on_batch(b)
                yield out
            if self.lockstep and sharded and plan:  # ZeRO-3: as many forward passes as the busiest rank
                extra = -(-len(plan) // D.get_world_size()) - len(mine_idx)
                for _ in range(extra):
                    self._run(encoded, plan[0])

        flat_plan = [sum(b, []) for b in plan]
        if not sharded or D.get_world_size() == 1:
            outs = list(run_local(flat_plan))
            result = torch.empty(len(encoded), outs[0].shape[1] if outs else 0)
            if outs:
                result[torch.tensor(sum(flat_plan, []))] = torch.cat(outs).cpu()
        else:
            result = sharded_map(flat_plan, len(encoded), run_local, desc, self.progress)
            if not len(encoded):
                result = torch.zeros(0, 0)
        stats.seconds = time.perf_counter() - t0
        self.stats.add(stats)
        return result, stats

    def embed(self, texts: Sequence[str], instruction: str | Sequence[str] = "", sharded: bool = False,
              labels: Sequence[str] | None = None, desc: str = "text") -> torch.Tensor:
        """Captions -> [N, H] float32 on CPU, in input order."""
        return self.embed_encoded(self.encode(texts, instruction, labels, desc), sharded, desc)[0]

    # -- training (stage 1) ---------------------------------------------------------------------
    def train_batch(self, texts: Sequence[str], instructions: Sequence[str] | str) -> tuple[TextBatch, torch.Tensor]:
        """One micro-batch for a training step: (batch, inverse order). The encoder's output `out`
        ([n, H], row order) gives the captions in input order as `out[inverse]` (differentiable).
        Packed: rows as wide as the longest caption; else one caption per row, padded."""
        encoded = self.encode(texts, instructions, where="stage-1 batch")
        if self.packing:
            from llm2clip.text.tokenize import pack_rows

            rows = pack_rows([len(e[0]) for e in encoded], max(len(e[0]) for e in encoded))
        else:
            rows = [[i] for i in range(len(encoded))]
        batch, order = self._batch(encoded, rows)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return batch, inverse

    # -- the feature cache ----------------------------------------------------------------------
    def features(self, texts: Sequence[str], instruction: str = "", cache_dir: str = "",
                 fingerprint: str | None = None, desc: str = "text") -> torch.Tensor:
        """[len(texts), H] float32, identical on every rank: from the cache (when `cache_dir`) where
        possible, the rest embedded sharded over ranks and added to the cache (rank 0 writes it).
        The model is loaded only when some text is not cached."""
        if not cache_dir:
            return self.embed(texts, instruction, sharded=True, desc=desc)
        if fingerprint is None:
            from llm2clip.text.feature_cache import encoder_fingerprint

            fingerprint = D.broadcast_object(encoder_fingerprint(self.cfg, instruction) if D.get_rank() == 0 else None)
        cache = self._cache(cache_dir, fingerprint)
        missing = list(dict.fromkeys(t for t, r in zip(texts, cache.lookup(texts)) if r is None))
        self.cache_misses += len(missing)
        self.cache_hits += len(texts) - len(missing)
        if missing:
            cache.add(missing, self.embed(missing, instruction, sharded=True, desc=desc).numpy())
            if D.get_rank() == 0:
                cache.save()
        if not len(texts):
            return torch.zeros(0, 0)
        rows = cache.lookup(texts)
        return torch.from_numpy(cache.features[np.asarray(rows, dtype=np.int64)].copy())

    def _cache(self, cache_dir: str, fingerprint: str):
        """The cache of one fingerprint, loaded once and kept in memory: every rank adds the same rows,
        so all ranks agree on what is cached (which decides the plan). If the ranks read different
        versions of the file (another job writing it), rank 0's wins."""
        key = (str(cache_dir), fingerprint)
        if key not in self._caches:
            import hashlib

            from llm2clip.text.feature_cache import TextFeatureCache

            cache = TextFeatureCache(cache_dir, fingerprint)
            if D.get_world_size() > 1:
                sig = hashlib.sha256("".join(cache.keys).encode()).hexdigest()
                if len(set(D.all_gather_object(sig))) > 1:
                    keys, feats = D.broadcast_object((cache.keys, cache.features) if D.get_rank() == 0 else None)
                    cache.keys, cache.features = list(keys), feats
                    cache.row = {k: i for i, k in enumerate(cache.keys)}
            self._caches[key] = cache
        return self._caches[key]
