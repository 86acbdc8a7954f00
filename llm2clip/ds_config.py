"""The DeepSpeed JSON a run uses: found, read, and completed with the values our config owns."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llm2clip.config import ConfigError
from llm2clip.schema import OptimConfig, TrainConfig

# DeepSpeed keys whose values our config owns: the JSON file must say "auto" (or agree).
_OWNED = {
    "train_micro_batch_size_per_gpu": lambda t, o, w: t.micro_batch_size,
    "gradient_accumulation_steps": lambda t, o, w: t.grad_accum,
    "train_batch_size": lambda t, o, w: t.micro_batch_size * t.grad_accum * w,
    "gradient_clipping": lambda t, o, w: o.grad_clip,
}


def ensure_deepspeed_comm() -> None:
    """deepspeed.comm wraps the process group torch.distributed already has; DeepSpeedConfig (also
    HfDeepSpeedConfig) reads the world size from it, so call this before building either."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def resolve_precision(train: TrainConfig) -> str:
    if train.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return train.precision


REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_ds_config_path(name: str) -> Path:
    """A DeepSpeed JSON path: as given (absolute or relative to the working directory), else relative to
    the llm2clip checkout, so `ds_configs/zero3_bf16.json` works from any job directory."""
    p = Path(name)
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise ConfigError(f"train.deepspeed_config: file not found: {name} (looked in {Path.cwd()} and {REPO_ROOT})")


def read_ds_json(name: str) -> dict:
    path = resolve_ds_config_path(name)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None


def build_ds_config(train: TrainConfig, optim: OptimConfig, world: int) -> dict:
    """Read the DeepSpeed JSON and fill in the values our config owns (they must be "auto" there)."""
    path = resolve_ds_config_path(train.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    for key, fn in _OWNED.items():
        want = fn(train, optim, world)
        have = ds.get(key, "auto")
        if have != "auto" and have != want:
            raise ConfigError(f"{path}: '{key}' is {have} but the llm2clip config gives {want}; set it to \"auto\" "
                              "in the DeepSpeed file (llm2clip fills it in) and change the llm2clip config instead")
        ds[key] = want
    prec = resolve_precision(train)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": prec == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": False}
    if train.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = train.zero_stage
    if train.on_nonfinite == "skip":
        # the skip is DeepSpeed's own overflow discard (grads zeroed, no update, ranks agree), which ZeRO 1/2
        # do for bf16 (check_grad_overflow) and fp32 (non-finite norm); ZeRO 0/3 would apply NaN updates
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (1, 2):
            raise ConfigError(f"train.on_nonfinite=skip needs ZeRO stage 1 or 2 ({path} / train.zero_stage give "
                              f"{stage}); use train.on_nonfinite=fail with this stage")
        if prec == "bf16":
            if ds["bf16"].get("check_grad_overflow") is False:
                raise ConfigError(f"{path}: bf16.check_grad_overflow=false, but train.on_nonfinite=skip needs it")
            ds["bf16"]["check_grad_overflow"] = True
    ds.setdefault("zero_allow_untested_optimizer", True)  # we bring torch's AdamW (no JIT-compiled op on CPU)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    for section in ds.values():  # any "auto" left is a key we do not own
        if isinstance(section, dict):
            for k, v in section.items():
                if v == "auto":
                    raise ConfigError(f"{path}: '{k}' is \"auto\" but llm2clip does not fill it; give a value")
    return ds
