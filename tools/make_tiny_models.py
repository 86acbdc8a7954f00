"""Write tiny random models (saved via save_pretrained) for tests and CPU smoke runs.

    python tools/make_tiny_models.py --tokenizer data/synthetic/tokenizer --out models/
    -> models/tiny-llama, tiny-mistral, tiny-qwen2, tiny-bert, tiny-clip, tiny-siglip
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm2clip.testing.tiny_models import ALL_FAMILIES, make_tiny_models  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (e.g. DIR/tokenizer from make_synthetic_data)")
    p.add_argument("--out", required=True, help="folder to write tiny-<family>/ into")
    p.add_argument("--families", default=",".join(ALL_FAMILIES),
                   help=f"comma-separated subset of {','.join(ALL_FAMILIES)}")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in ALL_FAMILIES]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {','.join(ALL_FAMILIES)}")
    paths = {k: str(v) for k, v in make_tiny_models(a.tokenizer, a.out, families, seed=a.seed).items()}
    print(json.dumps(paths, indent=2))
    return paths


if __name__ == "__main__":
    main()
