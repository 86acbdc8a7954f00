#!/usr/bin/env python
"""Stage 1: caption-contrastive LoRA fine-tuning of an LLM text encoder.

    python tools/train_stage1.py --config configs/tiny/stage1.yaml --set optim.lr=2e-4
    torchrun --nproc_per_node 8 tools/train_stage1.py --config configs/llama3_8b/stage1.yaml
    sbatch slurm/stage1.sh configs/llama3_8b/stage1.yaml
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm2clip.config import cli_config  # noqa: E402
from llm2clip.schema import Stage1Config  # noqa: E402


def main(argv=None):
    cfg, _ = cli_config(Stage1Config, argv, description=__doc__)
    from llm2clip.tasks import run_cli
    from llm2clip.tasks.stage1 import run_stage1  # heavy imports only after the config validated

    run_cli(run_stage1, cfg)


if __name__ == "__main__":
    main()
