#!/usr/bin/env python
"""Embed the captions of image shards with the frozen stage-1 encoder into sidecar shards.

    python tools/embed_captions.py --config configs/tiny/embed.yaml
    torchrun --nproc_per_node 8 tools/embed_captions.py --config CFG --set batch.token_budget=65536
    srun --ntasks-per-node 8 python tools/embed_captions.py --config CFG

A rerun skips shards whose manifest validates; see docs/EMBED.md. Exit code 2: existing sidecars
come from another encoder (set output.overwrite=true to replace them).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm2clip.config import cli_config  # noqa: E402
from llm2clip.schema_embed import EmbedConfig  # noqa: E402


def main(argv=None):
    cfg, _ = cli_config(EmbedConfig, argv, description=__doc__)
    from llm2clip.tasks.embed import EmbedConflictError, run_embed  # heavy imports only after the config validated

    try:
        return run_embed(cfg)
    except EmbedConflictError as e:
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
