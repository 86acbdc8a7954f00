"""Write the deterministic synthetic WebDataset (+ eval copies + tokenizer); see llm2clip.data.synthetic.

    python tools/make_synthetic_data.py --out data/synthetic --train 2000 --val 500 --seed 0
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llm2clip.data.synthetic import generate  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--train", type=int, default=2000, help="number of training samples")
    p.add_argument("--val", type=int, default=500, help="number of validation samples (also the eval sets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=500, help="samples per tar shard")
    p.add_argument("--cls-per-class", type=int, default=20, help="zero-shot classification images per class")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--cls-attr", choices=["shape", "color"], default="shape",
                   help="what the zero-shot classes are: the single object's shape or its colour")
    a = p.parse_args(argv)
    summary = generate(a.out, n_train=a.train, n_val=a.val, seed=a.seed, image_size=a.image_size,
                       shard_size=a.shard_size, cls_per_class=a.cls_per_class, jpeg_quality=a.jpeg_quality,
                       cls_attr=a.cls_attr)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
