"""Sidecar embedding shards: the contract between the embed step and stage 2.

For an image shard `X.tar` the sidecar `S.tar` (see `sidecar_path_for`) holds, in the image shard's
key order, one member per sample and caption field: `KEY.<field>.npy`, a `numpy.lib.format` array of
shape [width] (dtype and shape in its header; never pickled). A sample with no caption for a field
has no member for it. `S.manifest.json`, written after the tar is complete, records the sample
count, fields, width, dtype, the encoder fingerprint and the tar's sha256: a shard counts as done
only when its manifest exists and validates, so a killed writer never leaves a shard that looks
complete. Each sidecar directory also gets an `index.json` (see docs/EMBED.md).

`iter_joined` (data/join.py, re-exported here) merges an image shard with its sidecar by key while
streaming both.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from llm2clip.config import atomic_write_text
from llm2clip.data.io import is_url, open_shard, read_small, shard_location
from llm2clip.data.shards import split_key
from llm2clip.schema_embed import field_name

log = logging.getLogger("llm2clip")

FORMAT = "llm2clip-sidecar/1"
INDEX_FORMAT = "llm2clip-sidecar-index/1"


class SidecarError(RuntimeError):
    """A sidecar is missing, incomplete or corrupt; the message names it and says what to do."""


class SidecarMismatchError(SidecarError):
    """A sidecar was written by another encoder (or with other fields/dtype) than the config expects."""


# --- naming ----------------------------------------------------------------------------------
def sidecar_path_for(image_shard: str, cfg: Any) -> str:
    """Sidecar path of an image shard under a SidecarConfig-like `cfg` (out_dir, image_root, suffix).

    Image shards may be URLs or `pipe:` commands (data/io.py); their sidecars need `out_dir` (a local
    or mounted folder, or a URL to read them from), and `image_root` is then a URL prefix of the image
    shards (e.g. `s3://bucket/cc3m`) whose sub-folders are mirrored under out_dir."""
    loc = shard_location(image_shard)
    name = loc.rsplit("/", 1)[-1]
    stem = name[:-4] if name.endswith(".tar") else name
    fname = f"{stem}{cfg.suffix}.tar"
    remote = is_url(loc)
    if not cfg.out_dir:
        if remote:
            raise SidecarError(f"image shard {image_shard} is remote, so its sidecar cannot sit beside it: set "
                               "output.out_dir (data.sidecar.out_dir) to a local or mounted folder (and "
                               "image_root to the URL prefix of the image shards to mirror their folders)")
        if not cfg.suffix:
            raise SidecarError("a sidecar beside its image shard needs a suffix (e.g. output.suffix=_emb)")
        return os.path.join(os.path.dirname(loc), fname)
    if not cfg.image_root:
        rel = ""
    elif remote or is_url(cfg.image_root):
        root = cfg.image_root.rstrip("/") + "/"
        if not loc.startswith(root):
            raise SidecarError(f"image shard {image_shard} is not under output.image_root={cfg.image_root}; "
                               "set image_root to a URL prefix of every image shard")
        rel = loc[len(root):].rpartition("/")[0]
    else:
        rel = os.path.relpath(os.path.dirname(os.path.abspath(loc)), os.path.abspath(cfg.image_root))
        if rel == ".." or rel.startswith(".." + os.sep):
            raise SidecarError(f"image shard {image_shard} is not under output.image_root={cfg.image_root}; "
                               "set image_root to a folder that contains every image shard")
    if is_url(cfg.out_dir):
        return "/".join(p for p in (cfg.out_dir.rstrip("/"), rel.strip("/"), fname) if p)
    return os.path.normpath(os.path.join(cfg.out_dir, rel, fname))


def _sibling(path: str | os.PathLike, name: str) -> str | Path:
    """`name` in the folder of `path` (a local path or a URL)."""
    path = str(path)
    if is_url(path):
        return path.rpartition("/")[0] + "/" + name
    return Path(path).with_name(name)


def manifest_path(sidecar: str | os.PathLike) -> Path | str:
    """`S.manifest.json` beside sidecar `S.tar`: a Path, or a str for a URL."""
    m = _manifest_str(str(sidecar))
    return m if is_url(m) else Path(m)


def _manifest_str(sidecar: str) -> str:  # string ops only: the preflight calls this per shard
    return (sidecar[:-4] if sidecar.endswith(".tar") else sidecar) + ".manifest.json"


def index_path_for(sidecar: str | os.PathLike, cfg: Any) -> Path | str:
    """`index.json` in the sidecar's folder (`index<suffix>.json` when sidecars sit beside images)."""
    return _sibling(sidecar, "index.json" if cfg.out_dir else f"index{cfg.suffix}.json")


# --- arrays ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _npy_header(dtype: str, shape: tuple) -> bytes:
    """The .npy (format 1.0) header of a C-contiguous array of this dtype and shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def encode_npy(arr: np.ndarray) -> bytes:
    """The bytes np.save writes for `arr` (header + C-order data), with the header built once per
    dtype and shape: the embed step writes one member per caption, and write_array's per-call header
    work was a quarter of the sidecar writing time (issue 16)."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:
        raise ValueError("object arrays are not stored in sidecars")
    return _npy_header(arr.dtype.str, arr.shape) + arr.tobytes()


def decode_npy(data: bytes, width: int | None = None, dtype: str | None = None) -> np.ndarray:
    """Parse one `.npy` member (never unpickles); ValueError if it is not a [width] array of dtype."""
    arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != 1 or (width is not None and arr.shape[0] != width):
        raise ValueError(f"shape {arr.shape}, expected ({width},)")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise ValueError(f"dtype {arr.dtype}, expected {dtype}")
    return arr


# --- writing ---------------------------------------------------------------------------------
class _HashingFile(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def write_sidecar(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, np.ndarray]]],
                  fields: list[str], width: int, dtype: str, fingerprint: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write sidecar `path` + its manifest atomically; returns the manifest.

    `samples`: (key, {field name: array [width]}) for EVERY image key in shard order; a field absent
    from the dict gets no member and is listed under manifest["missing"][field]. The old manifest is
    removed first and the new one written last, so a crash leaves no shard that validates.
    """
    if is_url(str(path)):
        raise SidecarError(f"cannot write sidecar {path}: sidecars are written to a local or mounted filesystem "
                           "(set output.out_dir to one; copy the folder to object storage afterwards, see docs/EMBED.md)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    man_path = manifest_path(path)
    man_path.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    missing: dict[str, list[str]] = {f: [] for f in fields}
    count = image_samples = 0
    prev, keys_sorted = None, True
    try:
        with open(tmp, "wb") as raw:
            hf = _HashingFile(raw)
            with tarfile.open(fileobj=hf, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                for key, embs in samples:
                    image_samples += 1
                    keys_sorted = keys_sorted and (prev is None or key > prev)
                    prev = key
                    wrote = False
                    for f in fields:
                        arr = embs.get(f)
                        if arr is None:
                            missing[f].append(key)
                            continue
                        if arr.shape != (width,) or arr.dtype != np.dtype(dtype):
                            raise ValueError(f"{path}: {key}.{f} has shape {arr.shape} dtype {arr.dtype}, "
                                             f"expected ({width},) {dtype}")
                        data = encode_npy(arr)
                        tf.addfile(_tarinfo(f"{key}.{f}.npy", len(data)), io.BytesIO(data))
                        wrote = True
                    count += wrote
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    manifest = {"format": FORMAT, "sidecar": path.name, "members": "KEY.<field>.npy", "count": count,
                "image_samples": image_samples, "fields": list(fields), "width": int(width), "dtype": dtype,
                "fingerprint": fingerprint, "sha256": hf.h.hexdigest(), "bytes": hf.n,
                "keys_sorted": keys_sorted, "missing": missing, **(extra or {})}
    atomic_write_text(man_path, json.dumps(manifest, indent=1))
    return manifest


def remove_stale_temps(sidecar: str | os.PathLike) -> int:
    """Delete `.S.tar.tmp.*` files a killed writer left behind; returns how many."""
    p = Path(sidecar)
    n = 0
    for t in p.parent.glob(f".{p.name}.tmp.*"):
        t.unlink(missing_ok=True)
        n += 1
    return n


# --- validation ------------------------------------------------------------------------------
def read_manifest(sidecar: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a sidecar (local or URL), or None when absent or unreadable."""
    raw = read_small(str(manifest_path(sidecar)))
    try:
        m = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def _verify_tar(path: str) -> tuple[str, int]:
    """(sha256, key count) of a sidecar tar in one pass over its bytes (local or URL)."""
    h = hashlib.sha256()

    class _Hashing(io.RawIOBase):  # tarfile reads the stream through this: hash and count in one pass
        def __init__(self, f):
            self.f = f

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            n = self.f.readinto(b)
            h.update(memoryview(b)[:n])
            return n

    n, prev = 0, None
    with open_shard(path) as raw:
        buf = io.BufferedReader(_Hashing(raw), 1 << 22)
        with tarfile.open(fileobj=buf, mode="r|") as tf:
            for m in tf:
                key, _ = split_key(m.name)
                if key != prev:
                    n, prev = n + 1, key
        while buf.read(1 << 22):  # the padding after the end marker is part of the hash too
            pass
    return h.hexdigest(), n


def validate_sidecar(sidecar: str | os.PathLike, manifest: dict | None = None, verify: bool = True) -> str | None:
    """None if the sidecar is complete and intact, else the reason it is not.

    Always: manifest present, tar present with the recorded size (not checked for a URL: that would be
    a request per shard; a short remote tar is a read error when it is read). verify=True also checks
    the sha256 and the key count (reads the whole tar: `tools/embed_captions.py --verify`)."""
    p = str(sidecar)
    m = manifest if manifest is not None else read_manifest(p)
    if m is None:
        return f"no valid manifest {str(manifest_path(p)).rsplit('/', 1)[-1]} (unfinished, killed, or not a sidecar)"
    if not is_url(p):
        try:
            size = os.stat(p).st_size
        except OSError:
            return "manifest present but the tar is missing"
        if size != m.get("bytes"):
            return f"size {size} bytes != {m.get('bytes')} in the manifest (truncated or rewritten)"
    if verify:
        try:
            digest, n = _verify_tar(p)
        except (tarfile.TarError, OSError, EOFError) as e:
            return f"unreadable tar ({e})"
        if digest != m.get("sha256"):
            return "sha256 differs from the manifest (tampered or corrupt)"
        if n != m.get("count"):
            return f"{n} keys in the tar != count {m.get('count')} in the manifest"
    return None


def manifest_mismatch(m: dict, fingerprint: str | None = None, fields: list[str] | None = None,
                      dtype: str | None = None, exact_fields: bool = False) -> str | None:
    """Why a (valid) manifest does not belong to this encoder/layout, or None. `fields` are member
    names; they must all be present (and be exactly the manifest's fields if `exact_fields`)."""
    if fingerprint is not None and m.get("fingerprint") != fingerprint:
        return f"encoder fingerprint {m.get('fingerprint')} != expected {fingerprint}"
    if fields is not None:
        have = list(m.get("fields", []))
        if exact_fields and have != list(fields):
            return f"fields {have} != configured {list(fields)}"
        lack = [f for f in fields if f not in have]
        if lack:
            return f"fields {have} lack {lack}"
    if dtype is not None and m.get("dtype") != dtype:
        return f"dtype {m.get('dtype')} != configured {dtype}"
    return None


def open_sidecar(sidecar: str, expected_fingerprint: str | None = None, verify: bool = False) -> dict[str, Any]:
    """Manifest of a complete sidecar; raises SidecarError / SidecarMismatchError otherwise."""
    m = read_manifest(sidecar)
    reason = validate_sidecar(sidecar, m, verify=verify)
    if reason:
        raise SidecarError(f"sidecar {sidecar}: {reason}; re-run the embed step (tools/embed_captions.py) "
                           "to (re)write it")
    if expected_fingerprint and m["fingerprint"] != expected_fingerprint:
        raise SidecarMismatchError(
            f"sidecar {sidecar} was written by encoder fingerprint {m['fingerprint']}, but the config expects "
            f"{expected_fingerprint}: embed the captions with this encoder (tools/embed_captions.py) or point "
            "the config at the sidecars of the encoder it names")
    return m


@dataclass
class SidecarScan:
    """What the stage-2 preflight learns about the sidecars of a list of image shards."""
    missing: list[str] = field(default_factory=list)  # image shards without a complete sidecar
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (image shard, reason)
    # per image shard with a valid sidecar: {"fingerprint", "fields", "width", "dtype", "count", "image_samples"}
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    from_index: int = 0  # sidecars vouched for by an up-to-date index.json instead of their manifest


_SUMMARY_KEYS = ("fingerprint", "fields", "width", "dtype", "count", "image_samples")


class _IndexView:
    """The index.json of one sidecar folder, usable in place of the folder's manifests (see scan_sidecars)."""

    def __init__(self, path: str | Path):
        self.idx = load_index(path)
        self.remote = is_url(str(path))
        self.mtime_ns = None
        if self.idx is not None and not self.remote:
            try:
                self.mtime_ns = os.stat(path).st_mtime_ns
            except OSError:
                self.idx = None
        entries = (self.idx or {}).get("entries", [])
        self.by_name = {e["sidecar"]: e for e in entries if "bytes" in e}  # older indexes lack sizes: unused

    def summary(self, sc: str) -> dict[str, Any] | None:
        """The sidecar's manifest summary from the index, if the index is current for it: its manifest is
        not newer than the index and the tar has the indexed size (two stats, no reads). A remote
        folder's index is taken as is (a request per shard is what it saves)."""
        e = self.by_name.get(str(sc).rsplit("/", 1)[-1]) if self.idx is not None else None
        if e is None:
            return None
        if not self.remote:
            try:
                if os.stat(_manifest_str(sc)).st_mtime_ns > self.mtime_ns or os.stat(sc).st_size != e["bytes"]:
                    return None
            except OSError:
                return None
        return {"fingerprint": self.idx["fingerprint"], "fields": self.idx["fields"], "width": self.idx["width"],
                "dtype": self.idx["dtype"], "count": e["count"], "image_samples": e["image_samples"]}


def scan_sidecars(image_shards: list[str], cfg: Any, expected_fingerprint: str | None = None,
                  fields: list[str] | None = None, verify: bool = False, threads: int = 8) -> SidecarScan:
    """The sidecars of `image_shards`: missing, invalid (corrupt, another encoder, a field lacking) and
    the manifest summary of each valid one. Reads no tar unless `verify` (then: sha256 + key count of
    every tar, `tools/embed_captions.py --verify`). Where a folder's index.json is current (written
    after the manifests, sizes match) it stands in for the manifests: two stats per shard, no reads."""
    want = [field_name(f) for f in fields] if fields else None
    indexes: dict[str, _IndexView] = {}  # per sidecar folder
    lock = threading.Lock()

    def one(img: str) -> tuple[str, dict | None, str | None, bool, bool]:
        sc = sidecar_path_for(img, cfg)
        if not verify:
            folder = sc.rpartition("/")[0]
            view = indexes.get(folder)
            if view is None:
                with lock:  # one read of each folder's index, not one per thread
                    view = indexes.get(folder) or indexes.setdefault(folder, _IndexView(index_path_for(sc, cfg)))
            m = view.summary(sc)
            if m is not None:
                reason = manifest_mismatch(m, expected_fingerprint or None, want)
                return img, m, (f"{sc}: {reason}" if reason else None), False, True
        m = read_manifest(sc)
        if m is None or not (is_url(sc) or os.path.isfile(sc)):
            return img, None, None, True, False
        reason = validate_sidecar(sc, m, verify=verify) or manifest_mismatch(m, expected_fingerprint or None, want)
        return img, {k: m.get(k) for k in _SUMMARY_KEYS}, (f"{sc}: {reason}" if reason else None), False, False

    def chunk(part: list[str]) -> list[tuple]:
        return [one(img) for img in part]

    out = SidecarScan()
    n = max(1, min(threads, len(image_shards)))
    parts = [image_shards[k::n] for k in range(n)]  # a few long tasks: per-shard futures cost more than a stat
    with ThreadPoolExecutor(n) as ex:
        results = [r for part in ex.map(chunk, parts) for r in part]
    order = {img: k for k, img in enumerate(image_shards)}
    for img, m, reason, absent, from_index in sorted(results, key=lambda r: order[r[0]]):
        if absent:
            out.missing.append(img)
        elif reason:
            out.invalid.append((img, reason))
        else:
            out.manifests[img] = m
            out.from_index += from_index
    return out


def check_sidecars(image_shards: list[str], cfg: Any, expected_fingerprint: str | None = None,
                   fields: list[str] | None = None, verify: bool = False,
                   threads: int = 8) -> tuple[list[str], list[tuple[str, str]]]:
    """Before training: (image shards whose sidecar is missing/unfinished, [(image shard, reason)] for
    sidecars that exist but are corrupt or from another encoder / lack a field). Manifests and sizes
    only unless `verify` (see scan_sidecars)."""
    sc = scan_sidecars(image_shards, cfg, expected_fingerprint, fields, verify, threads)
    return sc.missing, sc.invalid


# --- index -----------------------------------------------------------------------------------
def load_index(path: str | os.PathLike) -> dict[str, Any] | None:
    raw = read_small(str(path))
    try:
        d = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return d if isinstance(d, dict) and d.get("format") == INDEX_FORMAT else None


def write_index(path: str | os.PathLike, manifests: list[dict[str, Any]], encoder: dict[str, Any] | None = None,
                location: dict[str, Any] | None = None) -> dict:
    """Dataset-level summary of the sidecars in one folder (all from one encoder and layout).

    `encoder` is the fingerprint record (it hashes to `fingerprint`); `location` says where that encoder
    was on disk (not part of the fingerprint), so stage 2 and evaluation can find it again."""
    manifests = sorted(manifests, key=lambda m: m["sidecar"])
    first = manifests[0]
    idx = {"format": INDEX_FORMAT, "fingerprint": first["fingerprint"], "fields": first["fields"],
           "sources": first.get("sources", {}), "width": first["width"], "dtype": first["dtype"],
           "shards": len(manifests), "samples": sum(m["count"] for m in manifests),
           "missing": {f: sum(len(m["missing"].get(f, [])) for m in manifests) for f in first["fields"]},
           "encoder": encoder or {}, "encoder_location": location or {},
           "entries": [{"sidecar": m["sidecar"], "image_shard": m.get("image_shard", ""), "count": m["count"],
                        "image_samples": m["image_samples"], "sha256": m["sha256"], "bytes": m["bytes"]}
                       for m in manifests]}
    atomic_write_text(path, json.dumps(idx, indent=1))
    return idx


# --- reading / joining: llm2clip/data/join.py ----------------------------------------------------
def __getattr__(name: str) -> Any:
    """`iter_joined` and `JoinStats` live in data/join.py (which imports this module); found here too."""
    if name in ("iter_joined", "JoinStats"):
        from llm2clip.data import join

        return getattr(join, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
