#!/usr/bin/env python
"""Embed the captions of image shards with the frozen stage-1 encoder into sidecar shards.

    python tools/embed_captions.py --config configs/tiny/embed.yaml
    torchrun --nproc_per_node 8 tools/embed_captions.py --config CFG --set batch.token_budget=65536
    srun --ntasks-per-node 8 python tools/embed_captions.py --config CFG

A rerun skips shards whose manifest validates; see docs/EMBED.md. Exit code 2: existing sidecars
come from another encoder (set output.overwrite=true to replace them).

    python tools/embed_captions.py --verify --config CFG          # hash every sidecar, embed nothing
    torchrun --nproc_per_node 8 tools/embed_captions.py --verify --config CFG   # each rank a share

--verify reads every sidecar tar (sha256 + key count against its manifest), names the bad shards and
exits 1 if any is bad; stage 2 itself only reads manifests and sizes at start-up.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm2clip.config import cli_config  # noqa: E402
from llm2clip.schema_embed import EmbedConfig  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    verify = "--verify" in argv
    cfg, _ = cli_config(EmbedConfig, [a for a in argv if a != "--verify"], description=__doc__)
    if verify:
        from llm2clip.tasks.verify_sidecars import run_verify

        report = run_verify(cfg)
        if not report["ok"]:
            raise SystemExit(1)
        return report
    from llm2clip.tasks.embed import EmbedConflictError, run_embed  # heavy imports only after the config validated

    try:
        return run_embed(cfg)
    except EmbedConflictError as e:
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
