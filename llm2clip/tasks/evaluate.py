"""Zero-shot evaluation: models x datasets -> metrics JSON + a markdown table, sharded over ranks.

    python tools/eval_zero_shot.py --config configs/tiny/eval.yaml
    torchrun --nproc_per_node 8 tools/eval_zero_shot.py --model llm2clip:runs/stage2/export/model \\
        --model hf_clip:models/clip-vit-l-14 --dataset karpathy:data/dataset_coco.json,images_root=data/coco

Flow (every rank runs all of it; nobody waits while rank 0 works alone):
1. Read every dataset on rank 0 and broadcast it; fail before any model loads if a dataset has
   more missing images than allowed or a malformed annotation.
2. Per model: load it; text pass -- every caption / class prompt / CRA caption of every dataset,
   deduplicated, encoded once (sharded; cached LLM features reused); free the LLM; image pass per
   dataset (sharded, gathered in order); metrics (computed on every rank from identical gathered
   features: cheap, and an error surfaces on every rank instead of leaving some blocked).
3. Rank 0 writes the JSON (atomically) and the markdown table next to it, and prints the table.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm2clip import distributed as D
from llm2clip.config import atomic_write_text, config_to_dict
from llm2clip.eval import metrics as M
from llm2clip.eval.models import (EvalModel, build_model, check_model_folders, fixed_batches, normalize,
                                  on_rank0_then_broadcast, raise_if_any_failed, resolve_device, sharded_map)
from llm2clip.eval.readers import (READERS, AnnotationError, ClassificationSet, ImageLoader, MissingImagesError,
                                   RetrievalSet, check_missing, read_dataset)
from llm2clip.eval.templates import fill_template, load_templates
from llm2clip.schema_eval import EvalConfig, EvalCRAConfig, EvalDatasetConfig, EvalRunConfig

log = logging.getLogger("llm2clip")
RESULTS_FORMAT = "llm2clip-eval/1"
_MAX_LISTED_MISSING = 1000


# ----------------------------------------------------------------------------- datasets


@dataclass
class CaptionPairs:
    """Caption-only set for CRA: ``texts1[i]`` (query) and ``texts2[i]`` (answer) describe item i."""

    name: str
    texts1: list[str]
    texts2: list[str]
    # every further caption of the split (COCO captions 3-5; fields[2:]): distractors in the gallery, so
    # the gallery is every caption of the split (5N - 1 on COCO, the paper's protocol)
    extra: list[str] = field(default_factory=list)
    skipped: int = 0  # items without both captions
    skipped_examples: list[str] = field(default_factory=list)


@dataclass
class Prepared:
    """A dataset read and checked, ready to score."""

    name: str
    task: str  # "retrieval" | "zeroshot" | "cra"
    data: RetrievalSet | ClassificationSet | CaptionPairs
    info: dict[str, Any]
    template_sets: list[tuple[str, list[str]]] = field(default_factory=list)  # zeroshot: (label, templates)
    instruction: str | None = None  # cra: instruction override for LLM text sides

    def image_refs(self) -> list:
        if isinstance(self.data, RetrievalSet):
            return list(self.data.image_paths)
        if isinstance(self.data, ClassificationSet):
            return [ref for ref, _ in self.data.samples]
        return []


def read_cra(name: str, cfg: EvalCRAConfig) -> CaptionPairs:
    """Caption pairs for CRA from shards (two caption fields), JSONL (two keys) or a Karpathy JSON
    (first two sentences). Items lacking a caption are skipped and counted, never silently."""
    f1, f2 = (cfg.resolved_fields() + ["", ""])[:2]
    more = cfg.resolved_fields()[2:]
    out = CaptionPairs(name, [], [])
    limit = cfg.max_samples or None

    def add(item: str, a: Any, b: Any, extra: list = ()) -> bool:
        if isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip():
            out.texts1.append(a.strip())
            out.texts2.append(b.strip())
            out.extra.extend(e.strip() for e in extra if isinstance(e, str) and e.strip())
        else:
            out.skipped += 1
            if len(out.skipped_examples) < 20:
                out.skipped_examples.append(item)
        return limit is not None and len(out.texts1) >= limit

    if cfg.kind == "shards":
        from llm2clip.data.shards import expand_shards, field_extensions, get_caption, iter_tar_samples

        want = field_extensions([f1, f2, *more])
        done = False
        for shard in expand_shards(cfg.path):
            for s in iter_tar_samples(shard, want=want):
                if add(f"{shard}::{s['__key__']}", get_caption(s, f1), get_caption(s, f2),
                       [get_caption(s, f) for f in more]):
                    done = True
                    break
            if done:
                break
    elif cfg.kind == "jsonl":
        with open(cfg.path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AnnotationError(f"{cfg.path}:{lineno}: invalid JSON ({e.msg}: column {e.colno})") from e
                if not isinstance(row, dict):
                    raise AnnotationError(f"{cfg.path}:{lineno}: expected a JSON object with keys {f1!r}, {f2!r}")
                if add(f"{cfg.path}:{lineno}", row.get(f1), row.get(f2), [row.get(f) for f in more]):
                    break
    else:  # karpathy
        with open(cfg.path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{cfg.path}:{e.lineno}: invalid JSON ({e.msg})") from e
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise AnnotationError(f"{cfg.path}: expected {{'images': [...]}} (a Karpathy split file)")
        for i, img in enumerate(images):
            if not isinstance(img, dict) or "sentences" not in img:
                raise AnnotationError(f"{cfg.path}: images[{i}]: missing field 'sentences'")
            if img.get("split") != cfg.split:
                continue
            sents = [s.get("raw") if isinstance(s, dict) else None for s in img["sentences"]] + [None, None]
            if add(f"{cfg.path}: images[{i}]", sents[0], sents[1], sents[2:]):
                break
    if not out.texts1:
        raise AnnotationError(f"cra.{name}: no caption pairs found in {cfg.path} (fields {cfg.resolved_fields()}, "
                              f"{out.skipped} items lacked one; first: {out.skipped_examples[:3]})")
    return out


def _template_sets(spec: EvalDatasetConfig, ds: ClassificationSet) -> list[tuple[str, list[str]]]:
    sets = []
    for t in spec.templates or ["dataset"]:
        if t == "dataset":
            sets.append(("dataset", list(ds.templates)))
        else:
            sets.append((os.path.basename(t) if os.path.isfile(t) else t, load_templates(t)))
    return sets


def _read_one(name: str, spec: EvalDatasetConfig, run: EvalRunConfig) -> Prepared:
    opts = dict(spec.options)
    if "name" in inspect.signature(READERS[spec.kind]).parameters:
        opts.setdefault("name", name)
    ds = read_dataset(spec.kind, spec.path, **opts)
    allowed = run.max_missing_fraction if spec.max_missing_fraction is None else spec.max_missing_fraction
    frac = check_missing(ds, allowed)  # raises MissingImagesError naming the first paths
    info: dict[str, Any] = {"kind": spec.kind, "path": os.path.abspath(spec.path), "options": spec.options,
                            "missing": len(ds.missing), "missing_fraction": round(frac, 6),
                            "max_missing_fraction": allowed, "missing_files": ds.missing[:_MAX_LISTED_MISSING]}
    if ds.missing:
        log.warning(f"datasets.{name}: {len(ds.missing)} image(s) missing ({frac:.2%}, allowed {allowed:.2%}); "
                    f"scored without them, e.g. {ds.missing[:3]}")
    if isinstance(ds, RetrievalSet):
        info.update(task="retrieval", images=len(ds.image_paths), texts=len(ds.captions))
        return Prepared(name, "retrieval", ds, info)
    sets = _template_sets(spec, ds)
    info.update(task="zeroshot", images=len(ds.samples), classes=len(ds.classnames),
                templates={label: len(t) for label, t in sets}, dataset_templates_source=ds.templates_source)
    return Prepared(name, "zeroshot", ds, info, template_sets=sets)


def read_all(cfg: EvalConfig) -> dict[str, Prepared]:
    """Every dataset and CRA set, read once on rank 0 and broadcast. All problems are collected and
    reported together (e.g. three datasets with missing images), before any model is loaded."""

    def work() -> dict[str, Prepared]:
        out: dict[str, Prepared] = {}
        errors: list[Exception] = []
        for name, spec in cfg.datasets.items():
            try:
                out[name] = _read_one(name, spec, cfg.run)
            except (OSError, ValueError) as e:
                errors.append(e)
        for name, c in cfg.cra.items():
            if name in out:
                errors.append(ValueError(f"cra.{name}: the name is already used by datasets.{name}"))
                continue
            try:
                pairs = read_cra(name, c)
            except (OSError, ValueError) as e:
                errors.append(e)
                continue
            info = {"task": "cra", "kind": c.kind, "path": os.path.abspath(c.path), "fields": c.resolved_fields(),
                    "pairs": len(pairs.texts1),
                    "gallery": 2 * len(pairs.texts1) + len(pairs.extra) - 1, "skipped": pairs.skipped,
                    "skipped_examples": pairs.skipped_examples}
            if pairs.skipped:
                log.warning(f"cra.{name}: {pairs.skipped} item(s) lack one of the captions {c.resolved_fields()} "
                            f"and are not scored, e.g. {pairs.skipped_examples[:3]}")
            out[name] = Prepared(name, "cra", pairs, info, instruction=c.instruction)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            kind = MissingImagesError if all(isinstance(e, MissingImagesError) for e in errors) else ValueError
            raise kind(f"{len(errors)} dataset problems:\n  " + "\n  ".join(str(e) for e in errors))
        return out

    return on_rank0_then_broadcast(work, "reading the datasets")


# ----------------------------------------------------------------------------- encoding


class ImageList(torch.utils.data.Dataset):
    """Image references -> preprocessed tensors (one ImageLoader per worker process)."""

    def __init__(self, refs: list, transform):
        self.refs, self.transform = refs, transform
        self._loader: ImageLoader | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._loader is None:
            self._loader = ImageLoader()
        return self.transform(self._loader(self.refs[i]))


def encode_images(model: EvalModel, refs: list, run: EvalRunConfig, desc: str) -> torch.Tensor:
    """``[len(refs), D]`` image features on every rank; batches of ``run.batch_size`` split over ranks."""
    batches = fixed_batches(range(len(refs)), run.batch_size)
    pin = model.device.type == "cuda"

    def run_local(mine):
        if not mine:
            return
        loader = torch.utils.data.DataLoader(ImageList(refs, model.transform), batch_sampler=mine,
                                             num_workers=min(run.num_workers, len(mine)), pin_memory=pin)
        for pixels in loader:
            yield model.encode_image(pixels)

    return sharded_map(batches, len(refs), run_local, desc, run.progress)


def _text_requests(model: EvalModel, prepared: dict[str, Prepared]) -> list[tuple[str, list[str], str | None]]:
    """(key, texts, instruction) for everything this model must encode."""
    reqs = []
    for name, p in prepared.items():
        if p.task == "retrieval" and model.has_images:
            reqs.append((name, list(p.data.captions), None))
        elif p.task == "zeroshot" and model.has_images:
            for label, templates in p.template_sets:
                prompts = [fill_template(t, c) for c in p.data.classnames for t in templates]
                reqs.append((f"{name}\x00{label}", prompts, None))
        elif p.task == "cra":
            reqs.append((name, p.data.texts1 + p.data.texts2 + p.data.extra, p.instruction))
    return reqs


def text_pass(model: EvalModel, prepared: dict[str, Prepared]) -> dict[str, torch.Tensor]:
    """All texts of all datasets, one encoder call per instruction (shared captions encoded once)."""
    reqs = _text_requests(model, prepared)
    out: dict[str, torch.Tensor] = {}
    for instr in dict.fromkeys(r[2] for r in reqs):
        group = [r for r in reqs if r[2] == instr]
        texts = [t for r in group for t in r[1]]
        feats = model.text_features(texts, instr, desc=f"{model.name}: {len(texts)} texts")
        start = 0
        for key, ts, _ in group:
            out[key] = feats[start:start + len(ts)]
            start += len(ts)
    return out


# ----------------------------------------------------------------------------- metrics


def _check_dims(model: EvalModel, img: torch.Tensor, txt: torch.Tensor, name: str) -> None:
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"models.{model.name} on {name}: image features are {img.shape[1]}-wide but text "
                         f"features {txt.shape[1]}-wide")


def score(model: EvalModel, p: Prepared, img: torch.Tensor | None, text: dict[str, torch.Tensor],
          keep: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Metrics of one model on one dataset (percentages). ``keep`` receives the zero-shot classifiers."""
    if p.task == "retrieval":
        txt = text[p.name]
        _check_dims(model, img, txt, p.name)
        return M.retrieval_metrics(normalize(img) @ normalize(txt).T, p.data.txt_to_img)
    if p.task == "zeroshot":
        labels = [lab for _, lab in p.data.samples]
        out: dict[str, float] = {}
        for label, templates in p.template_sets:
            feats = text[f"{p.name}\x00{label}"]
            _check_dims(model, img, feats, p.name)
            w = M.zeroshot_classifier(feats.view(len(p.data.classnames), len(templates), -1))
            if keep is not None:
                keep[f"{p.name}/classifier/{label}"] = w
            acc = M.zeroshot_accuracy(100.0 * normalize(img) @ w.T, labels, ks=(1, 5))
            suffix = "" if len(p.template_sets) == 1 else f"/{label}"
            out.update({f"{k}{suffix}": v for k, v in acc.items()})
        return out
    n = len(p.data.texts1)
    feats = text[p.name]
    extra = p.data.extra or None
    return M.caption_retrieval_accuracy(feats[:n], feats[n:2 * n], p.data.texts1, p.data.texts2,
                                        extra_gallery=feats[2 * n:] if extra else None, extra_texts=extra)


def evaluate_model(model: EvalModel, prepared: dict[str, Prepared], run: EvalRunConfig,
                   keep: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """-> ({dataset: metrics, or None where the model does not apply}, timing) for one loaded model.

    ``keep`` (optional) receives every feature matrix: ``<dataset>/image``, ``<dataset>/text``,
    ``<dataset>/text/<template set>``, ``<dataset>/classifier/<template set>`` (float32, un-normalised
    except the unit-norm classifiers)."""
    t0 = time.perf_counter()
    text = text_pass(model, prepared)
    model.release_text_encoder()
    timing: dict[str, Any] = {"text_s": round(time.perf_counter() - t0, 3),
                              "texts": sum(len(v) for v in text.values()), "datasets": {}}
    if keep is not None:
        keep.update({"/text/".join(k.split("\x00")) if "\x00" in k else f"{k}/text": v for k, v in text.items()})
    results: dict[str, Any] = {}
    for name, p in prepared.items():
        if p.task != "cra" and not model.has_images:
            results[name] = None  # text-only models take part in CRA only
            continue
        dt: dict[str, float] = {}
        img = None
        if p.task != "cra":
            refs = p.image_refs()
            t = time.perf_counter()
            img = encode_images(model, refs, run, f"{model.name} · {name}: {len(refs)} images")
            dt["images_s"] = round(time.perf_counter() - t, 3)
            dt["images_per_s"] = round(len(refs) / max(dt["images_s"], 1e-9), 1)
            if keep is not None:
                keep[f"{name}/image"] = img
        t = time.perf_counter()
        err = None
        try:
            results[name] = score(model, p, img, text, keep)
        except Exception as e:  # identical on every rank, but checked collectively to be safe
            err = e
        raise_if_any_failed(err, f"scoring {model.name} on {name}")
        dt["metrics_s"] = round(time.perf_counter() - t, 3)
        timing["datasets"][name] = dt
    return results, timing


# ----------------------------------------------------------------------------- report


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def markdown_table(results: dict[str, dict[str, Any]], prepared: dict[str, Prepared], baseline: str | None) -> str:
    """Rows: dataset x metric; columns: models side by side (+ a delta column per model vs the baseline)."""
    models = list(results)
    others = [m for m in models if baseline is not None and m != baseline]
    head = ["dataset", "metric", *models, *[f"Δ {m} − {baseline}" for m in others]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for name, p in prepared.items():
        keys: list[str] = []
        for m in models:
            for k in (results[m].get(name) or {}):
                if k not in keys:
                    keys.append(k)
        for k in keys:
            vals = {m: (results[m].get(name) or {}).get(k) for m in models}
            row = [name, k, *[_fmt(vals[m]) for m in models]]
            for m in others:
                a, b = vals[m], vals[baseline]
                row.append("–" if a is None or b is None else f"{a - b:+.2f}")
            lines.append("| " + " | ".join(row) + " |")
    sizes = []
    for name, p in prepared.items():
        i = p.info
        if p.task == "retrieval":
            s = f"{i['images']} images, {i['texts']} captions"
        elif p.task == "zeroshot":
            s = f"{i['images']} images, {i['classes']} classes, templates " + \
                ", ".join(f"{k} ({v})" for k, v in i["templates"].items())
        else:
            s = f"{i['pairs']} caption pairs (gallery {i['gallery']}), fields {', '.join(i['fields'])}"
        extra = []
        if i.get("missing"):
            extra.append(f"{i['missing']} images missing")
        if i.get("skipped"):
            extra.append(f"{i['skipped']} items skipped")
        sizes.append(f"- **{name}** ({p.task}): {s}" + (f"; {'; '.join(extra)}" if extra else ""))
    return "\n".join(lines) + "\n\n" + "\n".join(sizes) + "\n"


def features_dir(output: str) -> Path:
    out = Path(output)
    return out.with_name(out.stem + "_features")


def save_features(tensors: dict[str, torch.Tensor], output: str, model_name: str) -> Path:
    """``<output stem>_features/<model>.safetensors`` (rank 0), written to a temporary name first."""
    from safetensors.torch import save_file

    d = features_dir(output)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{model_name}.safetensors"
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"model": model_name})
    os.replace(tmp, path)
    return path


def write_outputs(report: dict[str, Any], table: str, output: str) -> tuple[Path, Path]:
    out = Path(output)
    md = out.with_suffix(".md")
    atomic_write_text(out, json.dumps(report, indent=2, sort_keys=False) + "\n")
    title = f"# Zero-shot evaluation\n\n{report['created']}, world size {report['world_size']}\n\n"
    atomic_write_text(md, title + table)
    return out, md


def run_evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every model on every dataset; returns the report dict (on every rank)."""
    from llm2clip.logger import setup_logging

    setup_logging()
    info = D.init_distributed()
    t_start = time.perf_counter()
    world = D.get_world_size()
    device = resolve_device(cfg.run.device)
    on_rank0_then_broadcast(lambda: check_model_folders(cfg.models), "checking the model folders")
    t = time.perf_counter()
    prepared = read_all(cfg)
    timing: dict[str, Any] = {"read_datasets_s": round(time.perf_counter() - t, 3), "models": {}}
    log.info("datasets: " + ", ".join(f"{n} ({p.task})" for n, p in prepared.items()))
    results: dict[str, dict[str, Any]] = {}
    described: dict[str, Any] = {}
    feature_files: dict[str, str] = {}
    for name, spec in cfg.models.items():
        t = time.perf_counter()
        model = None
        err = None
        try:
            model = build_model(name, spec, cfg.run, device)
        except Exception as e:  # a missing folder on one node must not leave the others waiting
            err = e
        raise_if_any_failed(err, f"loading models.{name}")
        load_s = round(time.perf_counter() - t, 3)
        log.info(f"models.{name}: {spec.kind} {spec.path} loaded in {load_s:.1f}s")
        keep: dict[str, torch.Tensor] | None = {} if cfg.run.save_features and D.get_rank() == 0 else None
        results[name], mt = evaluate_model(model, prepared, cfg.run, keep)
        if keep:
            feature_files[name] = str(save_features(keep, cfg.run.output, name))
        described[name] = model.describe()
        timing["models"][name] = {"load_s": load_s, **mt, "total_s": round(time.perf_counter() - t, 3)}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    baseline = cfg.baseline_name()
    report = {
        "format": RESULTS_FORMAT,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
        "world_size": world, "launcher": info.launcher, "device": str(device),
        "baseline": baseline,
        "models": described,
        "datasets": {n: p.info for n, p in prepared.items()},
        "results": results,
        "timing": timing,
        "feature_files": feature_files,
        "config": config_to_dict(cfg),
    }
    table = markdown_table(results, prepared, baseline)
    if D.get_rank() == 0:
        out, md = write_outputs(report, table, cfg.run.output)
        print("\n" + table, flush=True)
        log.info(f"wrote {out} and {md}")
    # ranks leave together: a rank that tears down its gloo group while rank 0 still writes can
    # abort at exit ("terminate called without an active exception")
    D.barrier()
    return report
