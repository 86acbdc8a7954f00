"""Readers for evaluation datasets in the layouts people already have on disk.

Every reader returns a ``RetrievalSet`` or a ``ClassificationSet``; ``read_dataset(kind,
path, **opts)`` dispatches by name (see ``READERS``). The exact layout each reader assumes
is documented on the reader and in docs/EVALUATION.md.

Image references (``ImageRef``) are either a file path (``str``) or a
``(container_path, member)`` tuple: a ``.tar`` file and a member name (WebDataset), or a
``.tsv`` file of ``id<TAB>base64`` lines and an image id (Chinese-CLIP). ``load_image`` /
``ImageLoader`` open all three.

Bad input policy:
- A missing image file is not fatal in a reader: the image (and its captions) is left out
  and its path is listed in ``.missing``. ``check_missing`` then raises if more than the
  allowed fraction is missing, so evaluation never silently scores a subset.
- A malformed annotation (bad JSON, missing field, wrong type) raises ``AnnotationError``
  naming the file and line number (or JSON index).
- A corrupt image raises ``CorruptImageError`` naming the file (and tar member) when loaded.
"""

from __future__ import annotations

import base64
import csv
import inspect
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Union

from PIL import Image

from llm2clip.eval.templates import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, load_templates

ImageRef = Union[str, tuple[str, str]]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_WDS_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's preference order


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and line/index."""


class CorruptImageError(OSError):
    """An image that exists but cannot be decoded; the message names file and member."""


class MissingImagesError(ValueError):
    """More images are missing than ``check_missing`` allows."""


@dataclass
class RetrievalSet:
    """Image-text retrieval set: ``captions[j]`` describes ``image_paths[txt_to_img[j]]``."""

    name: str
    image_paths: list[ImageRef]
    captions: list[str]
    txt_to_img: list[int]
    missing: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.captions) != len(self.txt_to_img):
            raise ValueError(f"{self.name}: {len(self.captions)} captions but "
                             f"{len(self.txt_to_img)} txt_to_img entries")
        if self.txt_to_img and (min(self.txt_to_img) < 0 or max(self.txt_to_img) >= len(self.image_paths)):
            raise ValueError(f"{self.name}: txt_to_img refers to images outside [0, {len(self.image_paths)})")


@dataclass
class ClassificationSet:
    """Zero-shot classification set: ``samples[i] = (image_ref, label index)``."""

    name: str
    samples: list[tuple[ImageRef, int]]
    classnames: list[str]
    templates: list[str]
    missing: list[str] = field(default_factory=list)
    templates_source: str = ""

    def __post_init__(self) -> None:
        bad = [lab for _, lab in self.samples if not 0 <= lab < len(self.classnames)]
        if bad:
            raise ValueError(f"{self.name}: label {bad[0]} outside [0, {len(self.classnames)}) ({len(bad)} samples)")


# ----------------------------------------------------------------------------- images


def describe_ref(ref: ImageRef) -> str:
    """Human-readable location of an image reference (for error messages)."""
    return ref if isinstance(ref, str) else f"{ref[0]}::{ref[1]}"


class ImageLoader:
    """Opens ``ImageRef``s as RGB PIL images.

    Keeps, per instance, an index of the tar / tsv containers it has opened (member ->
    byte range), so reading N members of one tar costs one header scan, not N.
    """

    def __init__(self) -> None:
        self._index: dict[str, dict[str, tuple[int, int]]] = {}

    def _container_index(self, path: str) -> dict[str, tuple[int, int]]:
        if path not in self._index:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image container not found: {path}")
            if path.endswith(".tsv"):
                self._index[path] = _index_tsv(path)
            else:
                with tarfile.open(path, "r:") as tar:
                    self._index[path] = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
        return self._index[path]

    def read_bytes(self, ref: ImageRef) -> bytes:
        if isinstance(ref, str):
            if not os.path.isfile(ref):
                raise FileNotFoundError(f"image not found: {ref}")
            with open(ref, "rb") as f:
                return f.read()
        path, member = ref
        index = self._container_index(path)
        if member not in index:
            raise FileNotFoundError(f"no member {member!r} in {path}")
        offset, size = index[member]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if path.endswith(".tsv"):
            try:
                return base64.b64decode(data.split(b"\t", 1)[1].strip(), validate=False)
            except (IndexError, ValueError) as e:
                raise CorruptImageError(f"bad base64 line for image {member!r} in {path}: {e}") from e
        return data

    def __call__(self, ref: ImageRef) -> Image.Image:
        data = self.read_bytes(ref)
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
            return img.convert("RGB")
        except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
            raise CorruptImageError(f"cannot decode image {describe_ref(ref)}: {type(e).__name__}: {e}") from e


def load_image(ref: ImageRef) -> Image.Image:
    """Open one image reference as an RGB PIL image.

    Raises ``FileNotFoundError`` or ``CorruptImageError`` naming the file / tar member.
    For many members of the same tar use one ``ImageLoader`` instead.
    """
    return ImageLoader()(ref)


def _index_tsv(path: str) -> dict[str, tuple[int, int]]:
    index: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            if line.strip():
                key, sep, _ = line.partition(b"\t")
                if not sep:
                    raise AnnotationError(f"{path}:{lineno}: expected 'image_id<TAB>base64'")
                index[key.decode("utf-8").strip()] = (offset, len(line))
            offset += len(line)
    return index


# ----------------------------------------------------------------------------- helpers


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _iter_jsonl(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}:{lineno}: invalid JSON ({e.msg}: column {e.colno})") from e


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{e.lineno}: invalid JSON ({e.msg}: column {e.colno})") from e


def _iter_json_array(path: str, chunk_chars: int = 1 << 20) -> Iterator[tuple[int, int, Any]]:
    """Stream a top-level JSON array: yields (index, line number, element). Stops early if
    the caller stops, so taking the first 1000 of a 1.5 GB file stays cheap."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, line_base, index, started = "", 0, 1, 0, False
        while True:
            while True:  # skip whitespace and separators
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf):
                    break
                line_base += buf.count("\n")
                buf, pos = f.read(chunk_chars), 0
                if not buf:
                    raise AnnotationError(f"{path}: unexpected end of file inside the JSON array "
                                          f"(after element {index})")
            if not started:
                if buf[pos] != "[":
                    raise AnnotationError(f"{path}:{line_base + buf.count(chr(10), 0, pos)}: expected a JSON list")
                started, pos = True, pos + 1
                continue
            if buf[pos] == "]":
                return
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    more = f.read(chunk_chars)
                    if not more:
                        line = line_base + buf.count("\n", 0, e.pos)
                        raise AnnotationError(f"{path}:{line}: invalid JSON in element [{index}] ({e.msg})") from e
                    buf += more
            yield index, line_base + buf.count("\n", 0, pos), obj
            index += 1
            line_base += buf.count("\n", 0, end)
            buf, pos = buf[end:], 0


def _get(obj: Any, key: str, where: str, typ: type | tuple = str) -> Any:
    if not isinstance(obj, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise AnnotationError(f"{where}: missing field {key!r} (fields present: {sorted(obj)[:10]})")
    val = obj[key]
    if not isinstance(val, typ):
        want = getattr(typ, "__name__", typ)
        raise AnnotationError(f"{where}: field {key!r} should be {want}, got {type(val).__name__}")
    return val


def _join(root: str, rel: str) -> str:
    return rel if os.path.isabs(rel) else os.path.join(root, rel)


def _build_retrieval(name: str, items: list[tuple[ImageRef, list[str]]], check_files: bool = True) -> RetrievalSet:
    """items: (image ref, captions) in order; repeated refs are merged; missing files dropped."""
    merged: dict[Any, list[str]] = {}
    for ref, caps in items:
        merged.setdefault(ref, []).extend(caps)
    images, captions, t2i, missing = [], [], [], []
    for ref, caps in merged.items():
        if check_files and isinstance(ref, str) and not os.path.isfile(ref):
            missing.append(ref)
            continue
        t2i.extend([len(images)] * len(caps))
        captions.extend(caps)
        images.append(ref)
    if not images and not missing:
        raise AnnotationError(f"{name}: no image-caption pairs found")
    return RetrievalSet(name, images, captions, t2i, missing)


def check_missing(ds: RetrievalSet | ClassificationSet, max_missing_fraction: float = 0.0) -> float:
    """Raise ``MissingImagesError`` if more than ``max_missing_fraction`` of the images are
    missing; return the missing fraction otherwise."""
    present = len(ds.image_paths) if isinstance(ds, RetrievalSet) else len(ds.samples)
    n = len(ds.missing)
    total = n + present
    frac = n / total if total else 1.0
    if frac > max_missing_fraction or total == 0:
        first = ", ".join(ds.missing[:5])
        raise MissingImagesError(
            f"{ds.name}: {n} of {total} images are missing ({frac:.2%}, allowed {max_missing_fraction:.2%}); "
            f"first: {first}. Check the images root; scoring the rest would not be comparable to published numbers."
        )
    return frac


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip()]


def _find_file(names: list[str], dirs: list[str]) -> str | None:
    for d in dirs:
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p):
                return p
    return None


def _resolve_templates(templates: Any, search_dirs: list[str]) -> tuple[list[str], str]:
    if templates is not None:
        return load_templates(templates), str(templates) if isinstance(templates, str) else "given"
    found = _find_file(["zeroshot_classification_templates.txt"], search_dirs)
    if found:
        return load_templates(found), found
    return list(OPENAI_IMAGENET_TEMPLATES), "openai80 (default)"


# ----------------------------------------------------------------------------- classification


def _parse_classnames(path: str, keys: list[str] | None) -> list[str]:
    """classnames.txt: one name per line in label order, or lines mapping folder names (or
    string labels) to class names: ``key<TAB>name``, or ``key name`` when the keys are
    WordNet ids (``n01440764 tench``, as in ImageNet's LOC_synset_mapping.txt). A plain
    space is not a separator otherwise: "golden retriever" is a class name, not a mapping."""
    lines = _read_lines(path)
    if keys is not None:
        if all("\t" in ln for ln in lines):
            pairs = [tuple(x.strip() for x in ln.split("\t", 1)) for ln in lines]
        elif all(re.fullmatch(r"n\d{8}", k) for k in keys) and all(len(ln.split(None, 1)) == 2 for ln in lines):
            pairs = [tuple(ln.split(None, 1)) for ln in lines]
        else:
            pairs = []
        mapping = dict(pairs)
        if pairs and set(mapping) == set(keys) and all(mapping.values()):
            return [mapping[k] for k in keys]
        if len(lines) != len(keys):
            raise AnnotationError(
                f"{path}: {len(lines)} lines but {len(keys)} classes; write one name per class in sorted "
                "folder order, or 'folder<TAB>name' lines covering every folder"
            )
    return lines


def _resolve_classnames(classnames: Any, keys: list[str] | None, search_dirs: list[str], n_min: int = 0) -> list[str]:
    source = "classnames option"
    if isinstance(classnames, (list, tuple)):
        names = list(classnames)
    elif classnames in ("imagenet", "openai_imagenet"):
        names = list(IMAGENET_CLASSNAMES)
    elif isinstance(classnames, str):
        if not os.path.isfile(classnames):
            raise FileNotFoundError(f"classnames file not found: {classnames}")
        names, source = _parse_classnames(classnames, keys), classnames
    else:
        found = _find_file(["classnames.txt"], search_dirs)
        if found:
            names, source = _parse_classnames(found, keys), found
        elif keys is not None and len(keys) == 1000 and all(re.fullmatch(r"n\d{8}", k) for k in keys):
            names = list(IMAGENET_CLASSNAMES)  # ImageNet-1k wnid folders, sorted = OpenAI order
        elif keys is not None and not all(re.fullmatch(r"n\d{8}", k) for k in keys):
            names, source = list(keys), "folder names"
        else:
            raise AnnotationError(
                f"no class names found (looked for classnames.txt in {search_dirs}); pass classnames= a list, "
                "a file, or 'imagenet'"
            )
    if keys is not None and len(names) != len(keys):
        raise AnnotationError(f"{source}: {len(names)} class names for {len(keys)} classes")
    if len(names) < n_min:
        raise AnnotationError(f"{source}: {len(names)} class names but labels go up to {n_min - 1}")
    return names


def read_imagefolder(path: str, classnames: Any = None, templates: Any = None, labels_file: str | None = None,
                     name: str | None = None) -> ClassificationSet:
    """ImageNet-style folder ``path/<class>/<image>`` (class order = sorted folder names), or
    a flat ``path/<image>`` folder with ``labels_file`` lines ``"filename label"``.

    Class names: ``classnames`` (list, file, or ``"imagenet"``), else ``classnames.txt`` in
    ``path`` or its parent (one name per class in label order, or ``folder<TAB>name``), else
    the OpenAI ImageNet names for exactly 1000 ``nXXXXXXXX`` folders, else the folder names.
    Templates: ``templates`` spec, else ``zeroshot_classification_templates.txt`` next to the
    data, else the 80 OpenAI templates. Integer labels in a labels file index the class list;
    string labels are mapped like folder names.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder not found: {path}")
    search = [path, os.path.dirname(os.path.abspath(path))]
    if labels_file is None and not any(os.path.isdir(os.path.join(path, d)) for d in os.listdir(path)):
        labels_file = _find_file(["labels.txt"], [path])
    samples: list[tuple[ImageRef, int]] = []
    missing: list[str] = []
    if labels_file is not None:
        if not os.path.isfile(labels_file):
            labels_file = _join(path, labels_file)
        rows = []
        with open(labels_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.strip().rsplit(None, 1)
                if len(parts) != 2:
                    raise AnnotationError(f"{labels_file}:{lineno}: expected 'filename label', got {line.strip()!r}")
                rows.append((lineno, parts[0], parts[1]))
        int_labels = all(re.fullmatch(r"-?\d+", lab) for _, _, lab in rows)
        keys = None if int_labels else sorted({lab for _, _, lab in rows})
        top = max((int(lab) for _, _, lab in rows), default=-1) + 1 if int_labels else 0
        names = _resolve_classnames(classnames, keys, search + [os.path.dirname(os.path.abspath(labels_file))], top)
        key_idx = {k: i for i, k in enumerate(keys or [])}
        for lineno, fname, lab in rows:
            label = int(lab) if int_labels else key_idx[lab]
            if label < 0:
                raise AnnotationError(f"{labels_file}:{lineno}: negative label {label}")
            ref = _join(path, fname)
            if os.path.isfile(ref):
                samples.append((ref, label))
            else:
                missing.append(ref)
    else:
        keys = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        names = _resolve_classnames(classnames, keys, search)
        for label, key in enumerate(keys):
            for root, dirs, files in os.walk(os.path.join(path, key)):
                dirs.sort()
                for fn in sorted(files):
                    if fn.lower().endswith(IMAGE_EXTENSIONS):
                        samples.append((os.path.join(root, fn), label))
    if not samples and not missing:
        raise AnnotationError(f"{path}: no images found")
    tmpl, src = _resolve_templates(templates, search)
    return ClassificationSet(name or os.path.basename(os.path.normpath(path)), samples, names, tmpl, missing, src)


def _wds_shards(path: str, split: str) -> tuple[list[str], list[str]]:
    """Tar shards and metadata dirs for clip_benchmark's layout:
    ``root/<split>/{0..n-1}.tar`` (+ ``nshards.txt``), metadata files in ``root``."""
    if os.path.isfile(path) and path.endswith(".tar"):
        d = os.path.dirname(os.path.abspath(path))
        return [path], [d, os.path.dirname(d)]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"WebDataset folder not found: {path}")
    tar_dir = os.path.join(path, split) if os.path.isdir(os.path.join(path, split)) else path
    meta = [tar_dir, os.path.dirname(os.path.abspath(tar_dir))]
    nshards_file = os.path.join(tar_dir, "nshards.txt")
    if os.path.isfile(nshards_file):
        text = open(nshards_file, encoding="utf-8").read().strip()
        if not text.isdigit():
            raise AnnotationError(f"{nshards_file}:1: expected the number of shards, got {text!r}")
        shards = [os.path.join(tar_dir, f"{i}.tar") for i in range(int(text))]
        absent = [s for s in shards if not os.path.isfile(s)]
        if absent:
            raise FileNotFoundError(f"{len(absent)} of {len(shards)} shards listed by {nshards_file} "
                                    f"are missing: {absent[:5]}")
    else:
        shards = sorted((os.path.join(tar_dir, f) for f in os.listdir(tar_dir) if f.endswith(".tar")), key=_natural_key)
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {tar_dir} (split {split!r})")
    return shards, meta


def _wds_samples(shard: str, need: str) -> Iterator[tuple[str, str, bytes]]:
    """Yield (key, image member name, payload of the ``need`` member) per sample, grouping
    files by key like webdataset (key = member path up to the first dot of its basename)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(shard, "r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            d, base = os.path.split(m.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            groups.setdefault(os.path.join(d, stem), {})[ext.lower()] = m
        for key, files in groups.items():
            img = next((files[e] for e in _WDS_IMAGE_EXTS if e in files), None)
            if img is None or need not in files:
                what = "an image (.webp/.png/.jpg/.jpeg)" if img is None else f"a .{need} file"
                raise AnnotationError(f"{shard}: sample {key!r} has no {what} (members: {sorted(files)})")
            yield key, img.name, tar.extractfile(files[need]).read()


def read_wds_classification(path: str, split: str = "test", classnames: Any = None, templates: Any = None,
                            name: str | None = None) -> ClassificationSet:
    """clip_benchmark WebDataset classification export (``clip_benchmark_export_wds``):
    ``path/<split>/{0..n-1}.tar`` with ``nshards.txt``; per sample ``<key>.webp|png|jpg``
    + ``<key>.cls`` (integer label as text); ``classnames.txt`` and
    ``zeroshot_classification_templates.txt`` (``{c}`` placeholder) in ``path`` (or next to
    the tars). ``path`` may also be a folder of tars or a single tar."""
    shards, meta = _wds_shards(path, split)
    dtype_file = _find_file(["dataset_type.txt"], meta)
    if dtype_file:
        dtype = open(dtype_file, encoding="utf-8").read().strip().lower()
        if dtype == "retrieval":
            raise AnnotationError(f"{dtype_file} says 'retrieval': read this dataset with kind 'wds_retrieval'")
        if dtype not in ("", "classification"):
            raise AnnotationError(f"{dtype_file}: dataset type {dtype!r} is not supported (single-label only)")
    samples: list[tuple[ImageRef, int]] = []
    for shard in shards:
        for key, img_member, payload in _wds_samples(shard, "cls"):
            text = payload.decode("utf-8", "replace").strip()
            if not re.fullmatch(r"\d+", text):
                raise AnnotationError(f"{shard}::{key}.cls: expected an integer label, got {text[:40]!r}")
            samples.append(((shard, img_member), int(text)))
    top = max(lab for _, lab in samples) + 1 if samples else 0
    names = _resolve_classnames(classnames, None, meta, top)
    tmpl, src = _resolve_templates(templates, meta)
    default_name = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path)))
    return ClassificationSet(name or default_name, samples, names, tmpl, [], src)


# ----------------------------------------------------------------------------- retrieval


def read_wds_retrieval(path: str, split: str = "test", name: str | None = None) -> RetrievalSet:
    """clip_benchmark WebDataset retrieval export: tars as for ``wds_classification`` with
    ``<key>.txt`` holding the image's captions, one per line."""
    shards, _ = _wds_shards(path, split)
    items = []
    for shard in shards:
        for key, img_member, payload in _wds_samples(shard, "txt"):
            caps = [c.strip() for c in payload.decode("utf-8").splitlines() if c.strip()]
            if not caps:
                raise AnnotationError(f"{shard}::{key}.txt: no captions")
            items.append(((shard, img_member), caps))
    default_name = os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path)))
    return _build_retrieval(name or default_name, items, check_files=False)


def read_karpathy(path: str, split: str = "test", images_root: str | None = None,
                  max_captions_per_image: int | None = None, name: str | None = None) -> RetrievalSet:
    """Karpathy split JSON (``dataset_flickr30k.json`` / ``dataset_coco.json``):
    ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``.
    Image = ``images_root/filepath/filename`` (``filepath`` is e.g. ``val2014`` for COCO and
    absent for Flickr30k). ``images_root`` defaults to the JSON's folder. All captions are kept
    (COCO test: 25,010 for 5,000 images) unless ``max_captions_per_image`` is set."""
    data = _load_json(path)
    root = images_root if images_root is not None else os.path.dirname(os.path.abspath(path))
    images = _get(data, "images", path, list)
    items, splits = [], set()
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        s = _get(img, "split", where)
        splits.add(s)
        if s != split:
            continue
        rel = _get(img, "filename", where)
        if img.get("filepath"):
            rel = os.path.join(img["filepath"], rel)
        sents = _get(img, "sentences", where, list)
        caps = [_get(snt, "raw", f"{where}.sentences[{j}]").strip() for j, snt in enumerate(sents)]
        if max_captions_per_image is not None:
            caps = caps[:max_captions_per_image]
        if not caps:
            raise AnnotationError(f"{where}: no sentences")
        items.append((_join(root, rel), caps))
    if not items:
        raise AnnotationError(f"{path}: no images with split {split!r}; splits present: {sorted(splits)}")
    return _build_retrieval(name or f"{data.get('dataset', 'karpathy')}_{split}", items)


def read_sharegpt4v(path: str, images_root: str | None = None, limit: int | None = 1000, start: int = 0,
                    name: str | None = None) -> RetrievalSet:
    """ShareGPT4V-1k: the first ``limit`` (1000) entries of
    ``share-captioner_coco_lcs_sam_1246k_1107.json`` (a JSON list of ``{"image": rel_path,
    "conversations": [{"from": "human", ...}, {"from": "gpt", "value": caption}]}``), as in
    Long-CLIP's evaluation. Caption = the first ``gpt`` turn with newlines replaced by spaces.
    Image = ``images_root/image`` (default: the JSON's folder). 1:1 pairs. The file is
    streamed, so the 1.5 GB original is fine."""
    root = images_root if images_root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    for index, lineno, entry in _iter_json_array(path):
        if index < start:
            continue
        if limit is not None and len(items) >= limit:
            break
        where = f"{path}:{lineno}: element [{index}]"
        rel = _get(entry, "image", where)
        convs = _get(entry, "conversations", where, list)
        gpt = [c for c in convs if isinstance(c, dict) and c.get("from") == "gpt"]
        if not gpt:
            raise AnnotationError(f"{where}: no conversation turn with from='gpt'")
        cap = _get(gpt[0], "value", f"{where}.conversations").replace("\n", " ")
        items.append((_join(root, rel), [cap]))
    if limit is not None and len(items) < limit:
        raise AnnotationError(f"{path}: only {len(items)} entries after start={start}, expected {limit}")
    return _build_retrieval(name or "sharegpt4v_1k", items)


def read_urban1k(path: str, name: str | None = None) -> RetrievalSet:
    """Urban-1k: ``path/image/<N>.jpg`` + ``path/caption/<N>.txt`` (caption = first line of
    the text file, as in Long-CLIP's evaluation). 1:1 pairs."""
    cap_dir, img_dir = os.path.join(path, "caption"), os.path.join(path, "image")
    if not os.path.isdir(cap_dir):
        raise FileNotFoundError(f"Urban-1k caption folder not found: {cap_dir}")
    items = []
    for fn in sorted((f for f in os.listdir(cap_dir) if f.endswith(".txt")), key=_natural_key):
        with open(os.path.join(cap_dir, fn), encoding="utf-8") as f:
            first = f.readline().strip()
        if not first:
            raise AnnotationError(f"{os.path.join(cap_dir, fn)}:1: empty caption")
        stem = fn[: -len(".txt")]
        img = os.path.join(img_dir, stem + ".jpg")
        if not os.path.isfile(img):
            alt = [p for p in (os.path.join(img_dir, stem + e) for e in IMAGE_EXTENSIONS) if os.path.isfile(p)]
            img = alt[0] if alt else img
        items.append((img, [first]))
    return _build_retrieval(name or "urban1k", items)


def read_docci(path: str, split: str = "test", images_root: str | None = None, name: str | None = None) -> RetrievalSet:
    """DOCCI: ``docci_descriptions.jsonlines`` (``{"image_file", "description", "split"}`` per
    line; ``path`` is the file or its folder) + images in ``images_root`` (default: the
    ``images`` folder next to it, as unpacked from ``docci_images.tar.gz``). 1:1 pairs."""
    file = os.path.join(path, "docci_descriptions.jsonlines") if os.path.isdir(path) else path
    d = os.path.dirname(os.path.abspath(file))
    root = images_root or (os.path.join(d, "images") if os.path.isdir(os.path.join(d, "images")) else d)
    items, splits = [], set()
    for lineno, obj in _iter_jsonl(file):
        where = f"{file}:{lineno}"
        s = _get(obj, "split", where)
        splits.add(s)
        if s == split:
            items.append((_join(root, _get(obj, "image_file", where)), [_get(obj, "description", where)]))
    if not items:
        raise AnnotationError(f"{file}: no entries with split {split!r}; splits present: {sorted(splits)}")
    return _build_retrieval(name or f"docci_{split}", items)


def read_xm3600(path: str, lang: str = "en", images_root: str | None = None, captions: str = "all",
                name: str | None = None) -> RetrievalSet:
    """Crossmodal-3600: ``captions.jsonl`` lines ``{"image/key": K, "<lang>": {"caption":
    [...]}, ...}`` (``path`` is the file or its folder) + ``images_root/K.jpg`` (default: the
    ``images`` folder next to it). ``captions="all"`` keeps every caption of the language
    (SigLIP-style any-caption recall); ``"first"`` keeps one per image (clip_benchmark)."""
    if captions not in ("all", "first"):
        raise ValueError(f"captions must be 'all' or 'first', got {captions!r}")
    file = os.path.join(path, "captions.jsonl") if os.path.isdir(path) else path
    d = os.path.dirname(os.path.abspath(file))
    root = images_root or (os.path.join(d, "images") if os.path.isdir(os.path.join(d, "images")) else d)
    items = []
    for lineno, obj in _iter_jsonl(file):
        where = f"{file}:{lineno}"
        key = _get(obj, "image/key", where)
        if lang not in obj:
            langs = sorted(k for k in obj if k != "image/key")
            raise AnnotationError(f"{where}: no captions for language {lang!r}; languages present: {langs}")
        caps = _get(obj[lang], "caption", f"{where}.{lang}", list)
        caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
        if not caps:
            raise AnnotationError(f"{where}: empty caption list for language {lang!r}")
        items.append((os.path.join(root, f"{key}.jpg"), caps[:1] if captions == "first" else caps))
    return _build_retrieval(name or f"xm3600_{lang}", items)


def _read_chinese_clip(path: str, split: str, name: str) -> RetrievalSet:
    """Chinese-CLIP layout: ``<split>_imgs.tsv`` (``image_id<TAB>base64``) and
    ``<split>_texts.jsonl`` (``{"text_id", "text", "image_ids": [id]}``)."""
    tsv, texts = os.path.join(path, f"{split}_imgs.tsv"), os.path.join(path, f"{split}_texts.jsonl")
    index = _index_tsv(tsv)
    items, missing = [], []
    for lineno, obj in _iter_jsonl(texts):
        where = f"{texts}:{lineno}"
        text = _get(obj, "text", where)
        ids = _get(obj, "image_ids", where, list)
        if len(ids) != 1:
            raise AnnotationError(f"{where}: expected exactly one image id per text, got {ids}")
        iid = str(ids[0])
        if iid in index:
            items.append(((tsv, iid), [text]))
        else:
            missing.append(f"{tsv}::{iid}")
    ds = _build_retrieval(name, items, check_files=False)
    ds.missing = sorted(set(missing))
    return ds


def _detect_cn_layout(path: str, split: str, layout: str, candidates: dict[str, Callable[[], bool]]) -> str:
    if layout != "auto":
        if layout not in candidates:
            raise ValueError(f"layout must be one of {['auto', *candidates]}, got {layout!r}")
        return layout
    for lay, present in candidates.items():
        if present():
            return lay
    raise FileNotFoundError(f"{path}: no known layout for split {split!r} (looked for: {list(candidates)}); "
                            "see docs/EVALUATION.md")


def read_flickr_cn(path: str, split: str = "test", images_root: str | None = None, layout: str = "auto",
                   name: str | None = None) -> RetrievalSet:
    """Flickr30k-CN, two layouts:
    ``clip_benchmark``: ``flickr30k_<split>_zh.txt`` (header line, then ``<image>.jpg,<caption>``
    lines; ``path`` is the file or its folder), images in ``images_root`` (default: that folder).
    ``chinese_clip``: ``path/<split>_imgs.tsv`` + ``path/<split>_texts.jsonl`` (splits
    train/valid/test)."""
    d = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    ann = path if os.path.isfile(path) else os.path.join(path, f"flickr30k_{split}_zh.txt")
    lay = _detect_cn_layout(path, split, layout, {
        "clip_benchmark": lambda: os.path.isfile(ann),
        "chinese_clip": lambda: os.path.isfile(os.path.join(d, f"{split}_texts.jsonl")),
    })
    if lay == "chinese_clip":
        return _read_chinese_clip(d, split, name or f"flickr30k_cn_{split}")
    root = images_root or os.path.dirname(os.path.abspath(ann))
    items = []
    with open(ann, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if lineno == 1 or not line:  # header line ("image,caption")
                continue
            img, sep, cap = line.partition(".jpg,")
            if not sep:
                raise AnnotationError(f"{ann}:{lineno}: expected '<image>.jpg,<caption>', got {line[:60]!r}")
            items.append((_join(root, img + ".jpg"), [cap]))
    return _build_retrieval(name or f"flickr30k_cn_{split}", items)


def read_coco_cn(path: str, split: str = "test", images_root: str | None = None, layout: str = "auto",
                 name: str | None = None) -> RetrievalSet:
    """COCO-CN, two layouts:
    ``original`` (coco-cn-version1805v1.1 release): ``path/coco-cn_<split>.txt`` (image ids such
    as ``COCO_val2014_000000000139``) and ``path/imageid.human-written-caption.txt``
    (``<id>#<n><TAB><caption>``; test = 1,000 images / 1,053 captions); images at
    ``images_root/{train2014|val2014}/<id>.jpg`` or ``images_root/<id>.jpg`` (default root: ``path``).
    ``chinese_clip``: ``path/<split>_imgs.tsv`` + ``path/<split>_texts.jsonl``."""
    lay = _detect_cn_layout(path, split, layout, {
        "original": lambda: os.path.isfile(os.path.join(path, f"coco-cn_{split}.txt")),
        "chinese_clip": lambda: os.path.isfile(os.path.join(path, f"{split}_texts.jsonl")),
    })
    if lay == "chinese_clip":
        return _read_chinese_clip(path, split, name or f"coco_cn_{split}")
    ids = _read_lines(os.path.join(path, f"coco-cn_{split}.txt"))
    wanted = set(ids)
    cap_file = os.path.join(path, "imageid.human-written-caption.txt")
    caps: dict[str, list[str]] = {}
    with open(cap_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, sep, cap = line.rstrip("\n").partition("\t")
            if not sep or "#" not in key:
                raise AnnotationError(f"{cap_file}:{lineno}: expected '<image_id>#<n><TAB><caption>'")
            iid = key.split("#", 1)[0]
            if iid in wanted:
                caps.setdefault(iid, []).append(cap.strip())
    root = images_root or path
    items = []
    for iid in ids:
        if iid not in caps:
            continue  # images without a human-written caption are not part of the benchmark
        sub = "train2014" if "train2014" in iid else "val2014"
        img = os.path.join(root, sub, iid + ".jpg")
        if not os.path.isfile(img) and os.path.isfile(os.path.join(root, iid + ".jpg")):
            img = os.path.join(root, iid + ".jpg")
        items.append((img, caps[iid]))
    return _build_retrieval(name or f"coco_cn_{split}", items)


def _row_captions(row: dict, where: str, caption_key: str | None, from_csv: bool) -> list[str]:
    keys = [caption_key] if caption_key else ["caption", "captions"]
    key = next((k for k in keys if k in row and row[k] not in (None, "")), None)
    if key is None:
        raise AnnotationError(f"{where}: missing field {' or '.join(map(repr, keys))}")
    val = row[key]
    if from_csv and key == "captions":
        try:
            val = json.loads(val)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{where}: 'captions' must be a JSON list of strings ({e.msg})") from e
    if isinstance(val, str):
        return [val]
    if isinstance(val, list) and val and all(isinstance(c, str) for c in val):
        return list(val)
    raise AnnotationError(f"{where}: field {key!r} must be a string or a non-empty list of strings")


def read_jsonl(path: str, images_root: str | None = None, image_key: str = "image", caption_key: str | None = None,
               name: str | None = None) -> RetrievalSet:
    """Generic JSON lines: ``{"image": path, "caption": str}`` or ``{"image": path,
    "captions": [str, ...]}``; paths relative to ``images_root`` (default: the file's folder).
    Lines repeating an image add captions to it."""
    root = images_root if images_root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    for lineno, obj in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        items.append((_join(root, _get(obj, image_key, where)), _row_captions(obj, where, caption_key, False)))
    return _build_retrieval(name or os.path.splitext(os.path.basename(path))[0], items)


def read_csv(path: str, images_root: str | None = None, image_key: str = "image", caption_key: str | None = None,
             delimiter: str = ",", name: str | None = None) -> RetrievalSet:
    """Generic CSV with a header: ``image`` column + ``caption`` (one string) or ``captions``
    (a JSON list) column; paths relative to ``images_root`` (default: the file's folder).
    Rows repeating an image add captions to it."""
    root = images_root if images_root is not None else os.path.dirname(os.path.abspath(path))
    items = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None or image_key not in reader.fieldnames:
            raise AnnotationError(f"{path}:1: header must contain {image_key!r}, got {reader.fieldnames}")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or not row.get(image_key):
                raise AnnotationError(f"{where}: malformed row (wrong number of fields or empty {image_key!r})")
            items.append((_join(root, row[image_key]), _row_captions(row, where, caption_key, True)))
    return _build_retrieval(name or os.path.splitext(os.path.basename(path))[0], items)


READERS: dict[str, Callable[..., RetrievalSet | ClassificationSet]] = {
    "imagefolder": read_imagefolder,
    "wds_classification": read_wds_classification,
    "wds_retrieval": read_wds_retrieval,
    "karpathy": read_karpathy,
    "sharegpt4v": read_sharegpt4v,
    "urban1k": read_urban1k,
    "docci": read_docci,
    "xm3600": read_xm3600,
    "flickr_cn": read_flickr_cn,
    "coco_cn": read_coco_cn,
    "jsonl": read_jsonl,
    "csv": read_csv,
}


def read_dataset(kind: str, path: str, **opts: Any) -> RetrievalSet | ClassificationSet:
    """Read ``path`` with the reader registered as ``kind`` (see ``READERS``)."""
    if kind not in READERS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(sorted(READERS))}")
    fn = READERS[kind]
    valid = [p for p in inspect.signature(fn).parameters if p != "path"]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"dataset kind {kind!r} has no option(s) {unknown}; valid options: {valid}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} dataset path not found: {path}")
    return fn(path, **opts)
