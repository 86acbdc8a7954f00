"""What DeepSpeed actually allocates for a LoRA model (1 process, fp32, CPU), per ZeRO stage, beside the
memory plan's figures. Prints one JSON line per stage: {"stage", "measured": {...}, "planned": {...}}.

    python tests/dist_scripts/memory_alloc.py MODEL_DIR 0 2 3
"""
import json
import os
import sys

import torch

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29633")
for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
    os.environ.setdefault(k, v)

import deepspeed  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoConfig, AutoModel  # noqa: E402

from llm2clip.memory_plan import count_params, meta_model, read_model_config, zero_state  # noqa: E402
from llm2clip.schema import LoraConfig as LoraCfg  # noqa: E402


def storages(ts) -> int:
    seen = {}
    for t in ts:
        if torch.is_tensor(t) and t.numel() > 0:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measure(stage: int, model_dir: str) -> dict:
    lora = LoraCfg(r=4, alpha=8, dropout=0.0)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "gradient_clipping": 1.0, "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 1000}}
    torch.manual_seed(0)
    if stage == 3:  # as stage 1 builds it: under zero.Init, each weight partitioned as it is created
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = AutoModel.from_config(AutoConfig.from_pretrained(model_dir))
    else:
        model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    zo = eng.optimizer
    eng.backward(eng(input_ids=torch.randint(0, 100, (2, 16))).last_hidden_state.float().pow(2).mean())
    if stage == 0:
        grads = storages(p.grad for p in eng.module.parameters())
    elif stage == 3:
        grads = storages([zo.grad_partitions_flat_buffer])
    else:
        grads = storages(zo.averaged_gradients.get(0, []) if isinstance(zo.averaged_gradients, dict)
                         else zo.averaged_gradients)
    eng.step()
    inner = getattr(zo, "optimizer", zo)
    module = [t for p in eng.module.parameters() for t in (p.data, getattr(p, "ds_tensor", None))]
    master = {0: [], 3: getattr(zo, "fp32_partitioned_groups_flat", [])}.get(
        stage, getattr(zo, "single_partition_of_fp32_groups", []))
    measured = {"model params": storages(module), "fp32 master": storages(master), "gradients": grads,
                "optimizer states": storages(v for s in inner.state.values() for v in s.values())}
    counts = count_params(meta_model(read_model_config(model_dir), lora))
    real = count_params(model)
    comp = {c.name: c.bytes for c in zero_state(counts, stage, int(os.environ['WORLD_SIZE']), 4, ds)}
    planned = {"model params": comp["base weights"] + comp["trainable params"], "fp32 master": comp["fp32 master"],
               "gradients": comp["gradients"], "optimizer states": comp["optimizer states"]}
    return {"stage": stage, "measured": measured, "planned": planned,
            "meta_counts": [counts.n_frozen, counts.n_trainable], "real_counts": [real.n_frozen, real.n_trainable]}


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist

    for st in sys.argv[2:]:
        row = measure(int(st), sys.argv[1])
        # Rank 0 prints every rank's row: two ranks printing to one pipe can interleave lines (seen in CI).
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        if dist.get_rank() == 0:
            for r, x in enumerate(rows):
                print(json.dumps({**x, "rank": r}), flush=True)
