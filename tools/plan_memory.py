#!/usr/bin/env python
"""Per-GPU memory plan of a stage-1, embed or stage-2 config, before launching it (no weights loaded).

    python tools/plan_memory.py --config configs/paper/stage1_llama3_8b.yaml --world 16 --gpu-mem 80
    python tools/plan_memory.py --config configs/tiny/stage1.yaml --world 2 --set train.zero_stage=2 --json

Exit status 0 when the plan fits in --gpu-mem GiB per GPU, 3 when it does not, 2 on a config error.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--world", type=int, required=True, help="number of GPUs (data-parallel ranks)")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    ap.add_argument("--task", default="auto", choices=["auto", "stage1", "embed", "stage2"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--tokens-per-caption", type=int, default=None,
                    help="stage 1: mean caption length in tokens (default text.max_length, the worst case)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)
    from llm2clip.config import ConfigError
    from llm2clip.memory_plan import PlanError, dump, plan_from_config

    if a.world < 1:
        print("plan_memory: --world must be >= 1 (the number of GPUs)", file=sys.stderr)
        return 2
    try:
        plan = plan_from_config(a.config, a.world, a.gpu_mem, a.task, a.set, a.tokens_per_caption)
    except (PlanError, ConfigError, FileNotFoundError) as e:
        print(f"plan_memory: {e}", file=sys.stderr)
        return 2
    print(dump(plan) if a.json else plan.table())
    return 0 if plan.fits else 3


if __name__ == "__main__":
    sys.exit(main())
