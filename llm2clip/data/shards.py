"""WebDataset shards: expanding shard specs, reading samples out of tars robustly, caption fields.

A sample is a dict {"__key__": key, "__shard__": path, "jpg": bytes, "txt": bytes, "json": bytes, ...}
grouped from consecutive tar members that share a key (the basename up to its first dot), which is
the layout img2dataset and webdataset write. Read errors (truncated tar, bad header) end that shard
with a warning naming it; they never kill the job.
"""
from __future__ import annotations

import functools
import glob
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from llm2clip.data.io import is_url, local_path, open_shard, read_small, shard_location

log = logging.getLogger("llm2clip")


def expand_shards(spec: str) -> list[str]:
    """'a/{000..009}.tar', 'a/*.tar', 'x.tar::y/*.tar' (several datasets) -> sorted existing paths per part.

    URLs and `pipe:` commands (see data/io.py) are brace-expanded only: no glob and no existence check
    (a missing remote shard is a read error later: skipped, counted and named). Raises
    FileNotFoundError naming a local part that matched nothing.
    """
    import braceexpand

    out: list[str] = []
    for part in [p for p in spec.split("::") if p.strip()]:
        matched: list[str] = []
        for pat in braceexpand.braceexpand(part.strip()):
            matched.extend([pat] if is_url(pat) else sorted(glob.glob(local_path(pat))))
        if not matched:
            raise FileNotFoundError(f"no shard matches '{part}' (from '{spec}')")
        out.extend(matched)
    return out


def shard_size(path: str) -> int | None:
    """Sample count from img2dataset's `<shard>_stats.json` or open_clip's `sizes.json`, if present.

    For a URL only the folder's `sizes.json` is read (one small read per folder and process, cached);
    per-shard `_stats.json` would cost a request per shard, and a `pipe:` has no folder: None."""
    if is_url(path):
        if path.startswith("pipe:") or "/" not in path:
            return None
        folder, name = path.rsplit("/", 1)
        return _remote_sizes(folder).get(name)
    p = Path(local_path(path))
    stats = p.with_name(p.name[: -len(".tar")] + "_stats.json") if p.name.endswith(".tar") else None
    if stats is not None and stats.is_file():
        try:
            d = json.loads(stats.read_text())
            return int(d.get("successes", d.get("count")))
        except (ValueError, TypeError):
            pass
    sizes = p.parent / "sizes.json"
    if sizes.is_file():
        try:
            return int(json.loads(sizes.read_text())[p.name])
        except (KeyError, ValueError):
            pass
    return None


@functools.lru_cache(maxsize=256)
def _remote_sizes(folder: str) -> dict[str, int]:
    raw = read_small(f"{folder}/sizes.json")
    try:
        d = json.loads(raw) if raw else {}
        return {str(k): int(v) for k, v in d.items()} if isinstance(d, dict) else {}
    except (ValueError, TypeError):
        return {}


def split_key(member_name: str) -> tuple[str, str]:
    base = os.path.basename(member_name)
    prefix = os.path.dirname(member_name)
    key, _, ext = base.partition(".")
    return (f"{prefix}/{key}" if prefix else key), ext.lower()


@dataclass
class ReadStats:
    read_errors: list[str] = field(default_factory=list)
    bytes_read: int = 0  # bytes actually read from the file (headers of skipped members included)
    samples: int = 0  # samples yielded

    def as_dict(self) -> dict[str, Any]:
        return {"read_errors": len(self.read_errors), "bytes_read": self.bytes_read, "samples": self.samples}


def iter_tar_samples(path: str, stats: ReadStats | None = None, skip: int = 0,
                     want: set[str] | None = None, count: int | None = None,
                     skip_keys: set[str] | None = None, skipped_keys: set[str] | None = None,
                     want_for: Callable[[str], set[str]] | None = None) -> Iterator[dict[str, Any]]:
    """Yield samples of one tar in order, each with its "__index__" in the shard.

    `skip` samples are passed over and, after them, at most `count` yielded (then reading stops);
    members whose key is in `skip_keys` are passed over too; the keys of the skipped samples are added
    to `skipped_keys`. `want` limits which extensions are read (e.g. {"txt", "json"}); `want_for(key)`,
    when given, decides it per sample instead. An uncompressed
    local tar is read with seeks: the data of members passed over is never read (only their 512-byte
    headers); a compressed one is read through. Bytes read and samples yielded go into `stats`."""
    stats = stats if stats is not None else ReadStats()
    cur: dict[str, Any] | None = None
    index = yielded = 0
    fh = None
    counted = 0

    def account() -> None:
        nonlocal counted
        if fh is not None:
            stats.bytes_read += fh.bytes_read - counted
            counted = fh.bytes_read

    def take(sample) -> bool:  # yield this finished sample?
        if index < skip:
            if skipped_keys is not None:
                skipped_keys.add(sample["__key__"])
            return False
        return True

    try:
        # local: seekable; URL / pipe: a forward-only stream that retries (data/io.py). A shard that cannot
        # be opened (vanished, permissions) is a read error like any other: named, counted, skipped.
        fh = open_shard(path)
        seek = fh.seekable() and path.endswith(".tar")
        with tarfile.open(fileobj=fh, mode="r:" if seek else "r|*") as tf:
            while (m := tf.next()) is not None:
                tf.members.clear()  # tarfile keeps every header it has read; we need none of them
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if key.startswith("_") or not ext:  # e.g. __index__ members
                    continue
                if skip_keys is not None and key in skip_keys:
                    continue
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        if take(cur):
                            account()
                            stats.samples += 1
                            yield cur
                            yielded += 1
                        index += 1
                    if count is not None and index >= skip and yielded >= count:
                        cur = None
                        break
                    cur = {"__key__": key, "__shard__": path, "__index__": index}
                    if want_for is not None and index >= skip:
                        want = want_for(key)
                if index >= skip and (want is None or ext in want):
                    f = tf.extractfile(m)
                    data = f.read() if f is not None else b""
                    if len(data) != m.size:
                        raise EOFError(f"member {m.name} is truncated ({len(data)} of {m.size} bytes)")
                    cur[ext] = data
            else:
                if not _has_end_marker(fh, path, tf.offset):
                    # tarfile ends a cut-off archive silently; a complete one has two zero blocks here
                    raise EOFError(f"no end-of-archive marker after byte {tf.offset}: the file is truncated")
            if cur is not None and take(cur):
                account()
                stats.samples += 1
                yield cur
    except (tarfile.TarError, OSError, EOFError) as e:
        msg = f"{path}: read error after sample {index} ({e}); rest of the shard skipped"
        log.warning(msg)
        stats.read_errors.append(msg)
    finally:
        account()
        if fh is not None:
            fh.close()


def _has_end_marker(fh, path: str, offset: int) -> bool:
    """Whether the two zero blocks that end a tar follow `offset` (where tarfile stopped). A compressed
    shard is not checked here: its decompressor already fails on a cut-off stream."""
    try:
        if not shard_location(path).endswith(".tar"):  # `pipe:aws s3 cp s3://b/x.tar -`: x.tar
            return True
    except ValueError:  # a pipe command naming no tar
        return True
    if fh.seekable():
        fh.seek(offset)
        tail = fh.read(1024)
        return len(tail) == 1024 and not tail.strip(b"\0")
    while fh.read(1 << 16):  # a stream: read to its end (tarfile may have buffered the marker already)
        pass
    return fh.tell() >= offset + 1024


class CaptionFieldError(KeyError):
    pass


def get_caption(sample: dict[str, Any], spec: str) -> str | None:
    """Caption by field spec: "txt" (the .txt member) or "json:NAME" (a field of the .json member).

    Returns None when the field is absent or empty (callers count and skip such samples). The parsed
    .json member replaces the raw bytes in `sample`, so the sample's other json fields do not parse it
    again (3 parses a sample in the embed step before)."""
    if spec.startswith("json:"):
        raw = sample.get("json")
        if raw is None:
            return None
        try:
            meta = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        except json.JSONDecodeError:
            return None
        sample["json"] = meta
        val = meta.get(spec[5:]) if isinstance(meta, dict) else None
        if isinstance(val, list):
            val = val[0] if val else None
    else:
        val = sample.get(spec)
        if isinstance(val, bytes):
            val = val.decode("utf-8", errors="replace")
    if not isinstance(val, str) or not val.strip():
        return None
    return val.strip()


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def image_member(sample: dict[str, Any]) -> bytes | None:
    """The sample's image bytes (the first image extension present), or None."""
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def field_extensions(fields: list[str]) -> set[str]:
    return {"json" if f.startswith("json:") else f for f in fields}
