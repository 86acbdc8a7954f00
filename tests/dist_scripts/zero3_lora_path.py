"""Run under torchrun: load a text encoder with `text.lora_path` while ZeRO-3 partitions it (as stage 1
does when chaining on an LLM2Vec LoRA), then embed captions with it (ranks in lockstep).

argv: model_dir adapter_dir out_dir. Writes rank{r}.json: the fraction of parameters this rank
materialised, and the embeddings of a few captions (sharded over ranks, gathered in order)."""
import json
import sys

import torch

from llm2clip import distributed as D
from llm2clip.engine import ensure_deepspeed_comm
from llm2clip.schema import TextEncoderConfig
from llm2clip.text.embedder import TextEmbedder
from llm2clip.text.encoder import TextEncoder, load_backbone, prompt_tokenizer

model_dir, adapter_dir, out = sys.argv[1:4]
D.init_distributed()
ensure_deepspeed_comm()
import deepspeed  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
keep = HfDeepSpeedConfig(ds)  # zero.Init partitions every weight as from_pretrained loads it
cfg = TextEncoderConfig(model_path=model_dir, lora_path=adapter_dir, attn_implementation="sdpa", max_length=64)
backbone = load_backbone(cfg, dtype=torch.float32)
local = sum(p.numel() for p in backbone.parameters())
full = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.parameters())
engine, *_ = deepspeed.initialize(model=TextEncoder(backbone), config=ds)
caps = ["a cat", "a red circle on the left", "two blue squares", "a star", "a big green triangle"]
emb = TextEmbedder(cfg, "cpu", token_budget=64, max_batch_size=2, encoder=engine.module,
                   ptok=prompt_tokenizer(cfg, False), lockstep=True).embed(caps, sharded=True)
with open(f"{out}/rank{D.get_rank()}.json", "w") as f:
    json.dump({"local_fraction": local / full, "emb": emb.tolist()}, f)
