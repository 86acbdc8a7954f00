"""MODEL_CARD.md of a stage-2 export: what a user moving the folder needs to know, in one page.

Names the stage-1 text encoder (where it was, its content fingerprint and settings), the data
(shards, caption fields and mix, samples read), the training (steps, global batch, lr) and the last
held-out evaluation. Written next to `model.safetensors` so it travels with the model folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NAME = "MODEL_CARD.md"


def _table(d: dict[str, Any]) -> list[str]:
    rows = ["| key | value |", "|---|---|"]
    for k, v in d.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v)
        rows.append(f"| {k} | {str(v).replace('|', '/')} |")
    return rows


def write_model_card(model_dir: str | Path, *, encoder: dict[str, Any], data: dict[str, Any], training: dict[str, Any],
                     evaluation: dict[str, float], extra_exports: dict[str, str] | None = None) -> Path:
    """Write `<model_dir>/MODEL_CARD.md`; returns its path."""
    enc_keys = ("model_path", "lora_path", "fingerprint", "pooling", "attention", "pool_scope", "max_length",
                "instruction")
    lines = ["# LLM2CLIP model", "",
             "Vision tower + projection and the LLM adapter of an LLM2CLIP stage-2 run. Load it with",
             "", "```python", "import llm2clip", "m = llm2clip.load_model(\"<this folder>\", "
             "text_model_path=\"<where the stage-1 encoder is now>\")", "```", "",
             "`text_model_path` is needed when the stage-1 encoder moved; its fingerprint must match the one below.",
             "", "## Text encoder (stage 1, frozen)", "",
             *_table({k: encoder.get(k) for k in enc_keys if encoder.get(k) not in (None, "")}),
             "", "## Data", "", *_table(data), "", "## Training", "", *_table(training),
             "", "## Evaluation (held-out, at the last step)", "",
             *(_table(evaluation) if evaluation else ["(none: no data.val_shards)"])]
    if extra_exports:
        lines += ["", "## Other exports", "", *_table(extra_exports)]
    p = Path(model_dir) / NAME
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p
