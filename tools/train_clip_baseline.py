#!/usr/bin/env python
"""Train the CLIP baseline: a CLIPModel with its own text tower (77 tokens, CLIP loss) on the same image
shards as stage 2, so LLM2CLIP can be compared with CLIP trained on the same data and budget.

    python tools/train_clip_baseline.py --config configs/tiny/clip_baseline.yaml
    # -> <run>/export/model: a HF CLIPModel folder; evaluate with tools/eval_zero_shot.py --model name=hf_clip:DIR
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm2clip.config import cli_config  # noqa: E402
from llm2clip.schema_baseline import ClipBaselineConfig  # noqa: E402


def main(argv=None):
    cfg, _ = cli_config(ClipBaselineConfig, argv, description=__doc__)
    from llm2clip.tasks import run_cli
    from llm2clip.tasks.clip_baseline import run_clip_baseline  # heavy imports only after the config validated

    run_cli(run_clip_baseline, cfg)


if __name__ == "__main__":
    main()
