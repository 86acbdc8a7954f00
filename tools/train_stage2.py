#!/usr/bin/env python
"""Stage 2: train the CLIP vision tower + adapter on precomputed LLM caption embeddings.

    python tools/train_stage2.py --config configs/tiny/stage2.yaml --set optim.lr=1e-5
    torchrun --nproc_per_node 8 tools/train_stage2.py --config configs/paper/stage2_eva02_l14_336.yaml
    sbatch slurm/stage2.sh configs/paper/stage2_eva02_l14_336.yaml
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm2clip.config import cli_config  # noqa: E402
from llm2clip.schema_stage2 import Stage2Config  # noqa: E402


def main(argv=None):
    cfg, _ = cli_config(Stage2Config, argv, description=__doc__)
    from llm2clip.tasks import run_cli
    from llm2clip.tasks.stage2 import run_stage2  # heavy imports only after the config validated

    run_cli(run_stage2, cfg)


if __name__ == "__main__":
    main()
