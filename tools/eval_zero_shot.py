#!/usr/bin/env python
"""Zero-shot evaluation of LLM2CLIP models next to the CLIP they started from.

    python tools/eval_zero_shot.py --config configs/tiny/eval.yaml [--set run.batch_size=128 ...]
    python tools/eval_zero_shot.py \\
        --model ours=llm2clip:runs/stage2/export/model --model hf_clip:models/clip-vit-l-14 \\
        --dataset karpathy:data/coco/dataset_coco.json,images_root=data/coco,name=coco \\
        --dataset imagefolder:data/imagenet/val,templates=openai80+simple \\
        --cra karpathy:data/coco/dataset_coco.json,name=coco_cra --model text:runs/stage1/export/merged \\
        --output results/eval.json
    torchrun --nproc_per_node 8 tools/eval_zero_shot.py --config ...      (or srun; same flags)

Quick specs (repeatable; they add entries to the config's models / datasets / cra):
  --model   [NAME=]KIND:PATH[,name=N][,instruction=S][,check_fingerprint=false][,text.FIELD=V...]
            KIND: llm2clip (stage-2 export) | hf_clip (baseline CLIP folder) | text (LLM / stage-1 encoder, CRA only)
  --dataset [NAME=]KIND:PATH[,name=N][,templates=A+B][,max_missing_fraction=F][,READER_OPTION=V...]
            KIND: a reader of llm2clip/eval/readers.py (karpathy, imagefolder, wds_retrieval, docci, ...)
  --cra     [NAME=]KIND:PATH[,name=N][,fields=A+B][,split=S][,max_samples=N][,instruction=S]
            KIND: shards (glob / brace list) | jsonl | karpathy
Options are comma-separated (commas inside {..} brace lists belong to the path); list values are
joined with '+' (or '|', quoted for the shell), or the key is repeated: templates=openai80,templates=simple.
Every entry is also reachable with --set, e.g. --set models.ours.text.model_path=/x/merged.
Outputs: the JSON at --output / run.output and a markdown table next to it (.md), printed at the end.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from llm2clip.config import ConfigError, config_to_dict, load_config  # noqa: E402
from llm2clip.schema_eval import EvalConfig  # noqa: E402

# path components that make poor table headings
_GENERIC = {"models": {"model", "merged", "export", "final", "hf", "checkpoint", "latest", "adapter"},
            "datasets": {"eval", "images", "data"}, "cra": {"eval", "images", "data"}}


def split_options(text: str) -> list[str]:
    """Split on commas that are not inside {...} or [...] (brace lists of shard paths)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def parse_spec(spec: str, flag: str) -> tuple[str | None, str, str, list[tuple[str, str]]]:
    """'[NAME=]KIND:PATH[,k=v...]' -> (name or None, kind, path, [(k, v)])."""
    name = None
    head = spec.split(":", 1)[0]
    if "=" in head:  # NAME=KIND:PATH
        name, spec = spec.split("=", 1)
    kind, sep, rest = spec.partition(":")
    if not sep or not kind or not rest:
        raise ConfigError(f"{flag} {spec!r}: expected [NAME=]KIND:PATH[,key=value...] (see --help)")
    path, *opts = split_options(rest)
    pairs = []
    for o in opts:
        if "=" not in o:
            raise ConfigError(f"{flag} {spec!r}: option {o!r} must look like key=value")
        k, v = o.split("=", 1)
        pairs.append((k.strip(), v))
    for k, v in pairs:
        if k == "name":
            name = v
    return name, kind.strip(), path, [(k, v) for k, v in pairs if k != "name"]


def default_name(kind: str, path: str, taken: set[str], section: str = "models") -> str:
    """A readable table heading from a path: the last component that is not generic
    (runs/x/stage2/export/model -> stage2), the file stem for files."""
    parts = [p for p in os.path.normpath(path.split("::")[0]).split(os.sep) if p and p not in (".", "..")]
    stems = [os.path.splitext(p)[0] if i == len(parts) - 1 and "." in p else p for i, p in enumerate(parts)]
    stems = [s for s in stems if "*" not in s and "{" not in s and not s.startswith("shard")]
    name = next((s for s in reversed(stems) if s.lower() not in _GENERIC[section]), stems[-1] if stems else kind)
    base, i = name, 2
    if name in taken:
        base = name = f"{name}-{kind}"
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    return name


def _q(v) -> str:
    return json.dumps(v)  # a JSON scalar / list is valid YAML: the value arrives exactly as typed


def _list(v: str) -> list[str]:
    return [x for x in re.split(r"[+|]", v) if x]


def _typed(v: str):
    try:
        return yaml.safe_load(v) if v.strip() else ""
    except yaml.YAMLError:
        return v


def _reader_option_is_text(kind: str, key: str) -> bool:
    from llm2clip.eval.readers import READERS

    fn = READERS.get(kind)
    if fn is None:
        return True
    p = inspect.signature(fn).parameters.get(key)
    ann = str(p.annotation) if p is not None else ""
    return not any(t in ann for t in ("int", "float", "bool"))


def quick_overrides(models: list[str], datasets: list[str], cras: list[str], output: str | None) -> list[str]:
    """Translate the quick flags into dotted overrides of EvalConfig."""
    out: list[str] = []
    taken: dict[str, set[str]] = {"models": set(), "datasets": set(), "cra": set()}
    for section, specs, flag in (("models", models, "--model"), ("datasets", datasets, "--dataset"),
                                 ("cra", cras, "--cra")):
        for spec in specs:
            name, kind, path, opts = parse_spec(spec, flag)
            name = name or default_name(kind, path, taken[section] | (taken["datasets"] if section == "cra" else set()),
                                        section)
            if name in taken[section]:
                raise ConfigError(f"{flag} {spec!r}: the name {name!r} is used twice; add name=...")
            taken[section].add(name)
            pre = f"{section}.{name}"
            out += [f"{pre}.kind={_q(kind)}", f"{pre}.path={_q(path)}"]
            lists: dict[str, list[str]] = {}
            for k, v in opts:
                if section == "models":
                    if k.startswith("text."):
                        out.append(f"{pre}.{k}={_q(v) if k.endswith('_path') else v}")
                    elif k == "instruction":
                        out.append(f"{pre}.instruction={_q(v)}")
                    else:
                        out.append(f"{pre}.{k}={v}")
                elif section == "datasets":
                    if k == "templates":
                        lists.setdefault(k, []).extend(_list(v))
                    elif k == "max_missing_fraction":
                        out.append(f"{pre}.{k}={v}")
                    else:
                        val = v if _reader_option_is_text(kind, k) else _typed(v)
                        out.append(f"{pre}.options.{k}={_q(val)}")
                else:
                    if k == "fields":
                        lists.setdefault(k, []).extend(_list(v))
                    elif k in ("instruction", "split"):
                        out.append(f"{pre}.{k}={_q(v)}")
                    else:
                        out.append(f"{pre}.{k}={v}")
            out += [f"{pre}.{k}={_q(v)}" for k, v in lists.items()]
    if output:
        out.append(f"run.output={_q(output)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (see configs/tiny/eval.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted override, repeatable; applied after the quick flags")
    ap.add_argument("--model", action="append", default=[], metavar="SPEC", help="[NAME=]KIND:PATH[,k=v...]")
    ap.add_argument("--dataset", action="append", default=[], metavar="SPEC", help="[NAME=]KIND:PATH[,k=v...]")
    ap.add_argument("--cra", action="append", default=[], metavar="SPEC", help="[NAME=]KIND:PATH[,k=v...]")
    ap.add_argument("--output", help="results JSON (the .md table goes next to it); = --set run.output=...")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return ap


def parse_config(argv=None) -> EvalConfig:
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    bad = [r for r in rest if r not in extra]
    if bad:
        ap.error(f"unrecognised arguments: {' '.join(bad)}")
    overrides = quick_overrides(args.model, args.dataset, args.cra, args.output) + args.overrides + extra
    cfg = load_config(EvalConfig, args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        raise SystemExit(0)
    return cfg


def main(argv=None) -> dict:
    from llm2clip import distributed as D
    from llm2clip.eval.readers import AnnotationError, CorruptImageError, MissingImagesError

    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from llm2clip.tasks.evaluate import run_evaluate  # heavy imports only after the config validated

    try:
        return run_evaluate(cfg)
    except (ConfigError, MissingImagesError, AnnotationError, CorruptImageError, FileNotFoundError) as e:
        # input problems: one clear line (every rank raised the same error; rank 0 reports it)
        if D.world_info().rank == 0:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        D.cleanup()  # a live process group at exit aborts the process (SIGABRT) instead of exiting


if __name__ == "__main__":
    main()
