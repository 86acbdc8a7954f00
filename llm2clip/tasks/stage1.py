"""Stage 1: caption-contrastive LoRA fine-tuning of an LLM (bidirectional, mean-pooled) under DeepSpeed."""
from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from llm2clip import distributed as D
from llm2clip.config import atomic_write_text
from llm2clip.data.pairs import PairStream, load_caption_pairs
from llm2clip.data.streams import check_topology
from llm2clip.engine import build_ds_config, ensure_deepspeed_comm, read_ds_json, resolve_precision, run_training
from llm2clip.losses.infonce import infonce_loss, text_ids
from llm2clip.schema import Stage1Config
from llm2clip.text.encoder import TextEncoder, build_text_encoder, default_lora_targets, load_backbone
from llm2clip.text.embedder import TextEmbedder
from llm2clip.text.tokenize import check_captions

log = logging.getLogger("llm2clip")


@dataclass
class Stage1Batch:
    """One micro-batch as the prefetch thread hands it to the step. chunks: {first example index:
    (TextBatch, inverse order)} per GradCache chunk (one entry, key 0, without chunking); ids: the
    identical-caption ids (CPU); state / skipped: the stream's resume state and skipped count after it."""
    examples: list
    use_neg: bool
    chunks: dict
    ids: dict
    n_empty: int
    state: dict
    skipped: int


def zero_stage(cfg: Stage1Config) -> int:
    ds = read_ds_json(cfg.train.deepspeed_config)
    return cfg.train.zero_stage if cfg.train.zero_stage is not None else ds.get("zero_optimization", {}).get("stage", 0)


class Stage1Task:
    name = "stage1"

    def __init__(self, cfg: Stage1Config):
        self.cfg = cfg
        self._hf_ds = None
        self.world, self.rank = D.get_world_size(), D.get_rank()
        self._resolve_strategy()
        self.zero = zero_stage(cfg)
        self.stream = PairStream(cfg.data, cfg.train.micro_batch_size, cfg.run.seed, self.rank, self.world)
        self.val = load_caption_pairs(cfg.data.val_path, cfg.data.val_fields, cfg.data.val_max_samples) \
            if cfg.data.val_path else None
        self.empty_skipped = 0  # examples left out for an empty caption (text.empty_captions=skip), consumed batches
        self._prefetch = None  # the batch producer (llm2clip/data/prefetch.py), once batches() runs

    def _resolve_strategy(self) -> None:
        """train.strategy -> train.zero_stage, decided on rank 0 (from the memory plan) for every rank."""
        from llm2clip.memory_plan import device_memory_gib, resolve_strategy

        self._plan = None  # rank 0: (world, GiB, plan) when auto's plan is this run's plan (see memory_plan)
        if self.rank == 0:
            mem = device_memory_gib()
            stage, why, plan = resolve_strategy(self.cfg, self.world, mem)
            self._plan = (self.world, mem, plan) if plan is not None else None
        stage, why = D.broadcast_object((stage, why) if self.rank == 0 else None)
        self.cfg.train.zero_stage = stage
        log.info(f"ZeRO-{stage}: {why}")

    # --- model ---------------------------------------------------------------------------------
    def module(self) -> nn.Module:
        cfg = self.cfg
        dtype = torch.bfloat16 if resolve_precision(cfg.train) == "bf16" else torch.float32
        if self.zero == 3:
            # Keeps a 12B model from materialising whole on one rank: from_pretrained partitions
            # each parameter as it loads (the object must stay alive while the model loads).
            from transformers.integrations import HfDeepSpeedConfig

            ensure_deepspeed_comm()
            self._hf_ds = HfDeepSpeedConfig(build_ds_config(cfg.train, cfg.optim, self.world))
        enc, self.ptok = build_text_encoder(cfg.text, dtype=dtype)
        backbone = enc.backbone
        if self.zero == 3:
            # proof that zero.Init partitioned the weights while loading: this rank holds ~1/world of them
            # (a partitioned parameter's own tensor is empty; its share on this rank is ds_tensor)
            local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in backbone.parameters())
            full = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.parameters())
            log.info(f"ZeRO-3 load: rank {self.rank} materialised {local:,} of {full:,} parameters "
                     f"({100 * local / max(full, 1):.1f}%): its partition, the rest live on the other ranks")
        if cfg.lora.enabled:
            from peft import LoraConfig, get_peft_model

            targets = default_lora_targets(backbone, cfg.lora.target_modules)
            backbone = get_peft_model(backbone, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                           lora_dropout=cfg.lora.dropout, bias="none",
                                                           target_modules=targets))
        if cfg.text.gradient_checkpointing:
            # Reentrant checkpointing: the non-reentrant default breaks with PEFT + ZeRO-3
            # (transformers #47254); reentrant needs inputs that require grad.
            # GradCache's re-run under ZeRO-0/2 differentiates with torch.autograd.grad, which reentrant
            # checkpointing refuses (there the non-reentrant form works); under ZeRO-3 it uses engine.backward
            reentrant = not cfg.train.contrastive_chunk or self.zero == 3
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if cfg.lora.enabled:
                backbone.enable_input_require_grads()
        self.encoder = TextEncoder(backbone, cfg.text.pooling)
        bs = cfg.train.micro_batch_size * 2
        # training batches (packed) and CRA evaluation (sharded, ranks in lockstep for ZeRO-3)
        self.embedder = TextEmbedder(cfg.text, token_budget=bs * cfg.text.max_length, max_batch_size=bs,
                                     encoder=self.encoder, ptok=self.ptok, lockstep=True)
        return self.encoder

    def memory_plan(self, world: int, gpu_mem_gib: float):  # logged by the engine before the model loads
        from llm2clip.memory_plan import plan_stage1

        if self._plan is not None and self._plan[:2] == (world, gpu_mem_gib):
            return self._plan[2]  # train.strategy=auto already planned this very config (replicated)
        return plan_stage1(self.cfg, world, gpu_mem_gib)

    def param_groups(self, module: nn.Module) -> list[dict]:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("stage 1 has no trainable parameters (lora.enabled=false and a frozen model?)")
        return [{"params": params, "weight_decay": self.cfg.optim.weight_decay}]

    # --- data ----------------------------------------------------------------------------------
    def batch_keys(self, batch: "Stage1Batch") -> list[str]:  # named by the engine when a step is non-finite
        return [e.key for e in batch.examples]

    def batches(self, data_state: dict | None) -> Iterator[Any]:
        """Micro-batches read, filtered, tokenised and packed `data.prefetch` ahead in a thread (the stream
        runs in order, so the batches are those of the inline loop); `data_state()` is the stream's state
        after the last batch handed to the trainer, not after the prefetched ones."""
        # rank 0's saved topology decides for all ranks (a rank added since the checkpoint has no state)
        saved = D.broadcast_object(data_state if self.rank == 0 else None)
        if check_topology(saved, self.world, 1, self.cfg.run.reset_data_position) and data_state:
            self.stream.load_state_dict(data_state)
        self._state, self._skipped = self.stream.state_dict(), self.stream.skipped
        from llm2clip.data.prefetch import Prefetcher

        self._prefetch = Prefetcher(self._next_batch, self.cfg.data.prefetch, name="stage1-batches")

        def consumed():
            for b in self._prefetch:
                self._state, self._skipped = b.state, b.skipped
                self.empty_skipped += b.n_empty
                yield b
        return consumed()

    def data_state(self) -> dict:
        return self._state if self._prefetch is not None else self.stream.state_dict()

    def loader_cpu_s(self) -> float:  # the engine logs its rate (perf/loader_*): the prefetch thread's CPU
        return self._prefetch.cpu_s if self._prefetch is not None else 0.0

    def _next_batch(self) -> "Stage1Batch":
        """The stream's next micro-batch, made ready for the step on the host (runs in the prefetch thread):
        empty captions handled, one tokenizer call per chunk (the whole micro-batch unless
        train.contrastive_chunk), packed rows, the identical-caption ids."""
        examples, use_neg = self.stream.next_batch()
        examples, n_empty = self._non_empty(examples, use_neg)
        n = len(examples)
        chunk = self.cfg.train.contrastive_chunk or n
        ids = {}
        if self.cfg.loss.mask_identical:
            ids = {"p_ids": text_ids([e.positive for e in examples]),
                   "n_ids": text_ids([e.negative for e in examples]) if use_neg else None}
        chunks = {i: self._tokenize(examples[i:i + chunk], use_neg) for i in range(0, n, chunk)}
        # a snapshot: the stream moves on while this batch waits in the queue
        state = copy.deepcopy(self.stream.state_dict())
        return Stage1Batch(examples, use_neg, chunks, ids, n_empty, state, self.stream.skipped)

    def _tokenize(self, examples: list, use_neg: bool) -> tuple:
        """Examples -> (TextBatch of packed rows, inverse order): queries, positives[, negatives]."""
        d = self.cfg.data
        docs = [e.positive for e in examples] + ([e.negative for e in examples] if use_neg else [])
        texts = [e.query for e in examples] + docs
        # each source's own query instruction (one per E5 dataset, as llm2vec), else the default
        instr = [d.query_instruction if e.instruction is None else e.instruction for e in examples] \
            + [d.doc_instruction] * len(docs)
        return self.embedder.train_batch(texts, instr)  # packed rows: no pad tokens to speak of

    # --- step ----------------------------------------------------------------------------------
    def loss(self, engine, batch: "Stage1Batch") -> tuple[torch.Tensor, dict, int]:
        n, use_neg, dev = len(batch.examples), batch.use_neg, engine.device
        ids = {k: None if v is None else v.to(dev) for k, v in batch.ids.items()}

        def loss_of(embs) -> tuple[torch.Tensor, dict]:  # embs: (q, p[, neg]), each [n, H]
            return infonce_loss(embs[0], embs[1], embs[2] if use_neg else None, self.cfg.loss.temperature, **ids)

        chunk = self.cfg.train.contrastive_chunk
        if chunk:  # GradCache: exact global-batch loss and gradients, one chunk's activations at a time
            from llm2clip.gradcache import chunked_loss

            loss, m = chunked_loss(engine, n, chunk, lambda i, j, fwd: self._embed(fwd, dev, batch.chunks[i], j - i,
                                                                                   use_neg),
                                   lambda per: loss_of([torch.cat(x) for x in zip(*per)]))
        else:
            loss, m = loss_of(self._embed(engine, dev, batch.chunks[0], n, use_neg))
        m["n_items"] = n
        return loss, m, sum(tb.n_tokens for tb, _ in batch.chunks.values())

    @staticmethod
    def _embed(forward, device, tokenized: tuple, n: int, use_neg: bool) -> tuple[torch.Tensor, ...]:
        """(query [n, H], positive [n, H][, negative [n, H]]) of n examples' packed rows, one forward through
        `forward` (the engine, or its bare module for GradCache's early chunks)."""
        tb, inverse = tokenized
        tb = tb.to(device)
        emb = forward(tb.input_ids, tb.attention_mask, tb.embed_mask, tb.seg_ids)[inverse.to(device)]
        return tuple(emb[k * n:(k + 1) * n] for k in range(3 if use_neg else 2))

    def _non_empty(self, examples: list, use_neg: bool) -> tuple[list, int]:
        """(examples whose captions are all non-empty, how many were left out); an empty caption raises
        naming it, or (text.empty_captions=skip) its example is left out."""
        texts = [t for e in examples for t in (e.query, e.positive, e.negative if use_neg else "x")]
        labels = [f"example {i} {k} {t!r}" for i, e in enumerate(examples)
                  for k, t in (("query", e.query), ("positive", e.positive), ("negative", e.negative))]
        keep = check_captions(texts, labels, self.cfg.text.empty_captions, "stage-1 batch")
        if len(keep) == len(texts):
            return examples, 0
        kept = set(keep)
        ok = [i for i in range(len(examples)) if all(3 * i + j in kept for j in range(3))]
        if not ok:
            raise ValueError("stage 1: every example of a micro-batch has an empty caption; check the data")
        return [examples[i] for i in ok], len(examples) - len(ok)

    def counters(self) -> dict[str, float]:  # the engine sums these over ranks per log step
        skipped = self._skipped if self._prefetch is not None else self.stream.skipped
        return {"data/skipped_samples": float(skipped), "data/empty_captions": float(self.empty_skipped)}

    def after_optimizer_step(self, module: nn.Module) -> None:
        pass

    # --- eval ----------------------------------------------------------------------------------
    def evaluate(self, engine, step: int) -> dict[str, float]:
        if self.val is None:
            return {}
        from llm2clip.eval.metrics import caption_retrieval_accuracy

        _, c1, c2, more = self.val
        was_training = engine.module.training
        engine.module.eval()
        e1 = self.embedder.embed(c1, "", sharded=True, desc="CRA captions 1")
        e2 = self.embedder.embed(c2, "", sharded=True, desc="CRA captions 2")
        e3 = self.embedder.embed(more, "", sharded=True, desc="CRA further captions") if more else None
        engine.module.train(was_training)
        # the same function and gallery as tools/eval_zero_shot.py's CRA (every val caption; see metrics.py)
        r = caption_retrieval_accuracy(e1, e2, c1, c2, extra_gallery=e3, extra_texts=more or None)
        return {f"eval/{k}": float(v) for k, v in r.items()}

    # --- export --------------------------------------------------------------------------------
    def export(self, engine, out_dir: Path) -> None:
        """LoRA adapter alone (`adapter/`) and the merged encoder in HF format (`merged/`)."""
        module = engine.module
        named = list(module.backbone.named_parameters())
        sd: dict[str, torch.Tensor] = {}
        want = [(n, p) for n, p in named if p.requires_grad] if self.cfg.lora.enabled else named
        if self.zero == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in want], modifier_rank=None):
                if self.rank == 0:
                    sd = {n: p.detach().float().cpu().clone() for n, p in want}
        elif self.rank == 0:
            sd = {n: p.detach().float().cpu().clone() for n, p in want}
        if self.rank == 0:
            tmp = out_dir.parent / f".{out_dir.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._write_export(module, sd, tmp)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
        D.barrier()

    def _write_export(self, module, sd: dict[str, torch.Tensor], tmp: Path) -> None:
        cfg = self.cfg
        tok = self.ptok.tok
        if cfg.lora.enabled:
            from peft import get_peft_model_state_dict

            adapter_sd = get_peft_model_state_dict(module.backbone, state_dict=sd)
            if not adapter_sd or all(t.numel() == 0 for t in adapter_sd.values()):
                raise RuntimeError("the gathered LoRA adapter is empty; refusing to write it")
            module.backbone.save_pretrained(str(tmp / "adapter"), state_dict=adapter_sd)
            # merged = base (+ text.lora_path) + adapter, streamed tensor by tensor from the base's safetensors
            # in its own dtype: no copy of the base in memory (llm2clip/lora_merge.py)
            from llm2clip.lora_merge import write_merged

            adapters = ([cfg.text.lora_path] if cfg.text.lora_path else []) + [tmp / "adapter"]
            write_merged(cfg.text.model_path, adapters, tmp / "merged",
                         {"is_causal": cfg.text.attention == "causal"})
            hidden = int(module.backbone.config.hidden_size)
        else:
            if self._hf_ds is not None:  # a fresh, whole model: no zero.Init partitioning while it loads
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config

                unset_hf_deepspeed_config()
                self._hf_ds = None
            merged = load_backbone(cfg.text, dtype=torch.float32)
            merged.load_state_dict(sd, strict=False)
            merged.config.is_causal = cfg.text.attention == "causal"
            merged.save_pretrained(str(tmp / "merged"))
            hidden = int(merged.config.hidden_size)
        tok.save_pretrained(str(tmp / "merged"))
        from llm2clip.text.settings import RECORD_FILE, encoder_settings

        info = {"base_model": str(Path(cfg.text.model_path).resolve()), "lora": cfg.lora.enabled,
                **encoder_settings(cfg.text), "query_instruction": cfg.data.query_instruction,
                "padding_side": cfg.text.padding_side, "hidden_size": hidden}
        atomic_write_text(tmp / "merged" / RECORD_FILE, json.dumps(info, indent=1))


def run_stage1(cfg: Stage1Config) -> dict:
    from llm2clip.preflight import check_training_paths

    return run_training(cfg, Stage1Task, preflight=check_training_paths)
