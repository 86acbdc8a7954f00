"""Joining an image shard with its sidecar by key, while streaming both (see `llm2clip.data.sidecar` for
the sidecar format). Stage 2's training stream and validation loader read their samples through
`iter_joined`."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from llm2clip.data.shards import IMAGE_EXTS, ReadStats, iter_tar_samples
from llm2clip.data.sidecar import SidecarMismatchError, decode_npy, open_sidecar
from llm2clip.schema_embed import field_name

log = logging.getLogger("llm2clip")


@dataclass
class JoinStats:
    joined: int = 0
    image_only: int = 0  # image sample without any requested embedding (caption missing, dropped)
    sidecar_only: int = 0  # embeddings whose key the image shard does not have
    no_image: int = 0  # key on both sides but no image member
    missing_field: dict[str, int] = field(default_factory=dict)  # joined, but this field absent/bad
    bad_embedding: list[str] = field(default_factory=list)  # "sidecar:member" that failed to decode
    read_errors: list[str] = field(default_factory=list)
    bytes_read: int = 0  # image shard + sidecar bytes read
    samples_read: int = 0  # image samples read

    def as_dict(self) -> dict[str, Any]:
        return {"joined": self.joined, "image_only": self.image_only, "sidecar_only": self.sidecar_only,
                "no_image": self.no_image, "missing_field": dict(self.missing_field),
                "bad_embedding": len(self.bad_embedding), "read_errors": len(self.read_errors),
                "bytes_read": self.bytes_read, "samples_read": self.samples_read}


def iter_joined(image_shard: str, sidecar_shard: str, fields: list[str] | None = None,
                expected_fingerprint: str | None = None, stats: JoinStats | None = None,
                image_exts: tuple[str, ...] = IMAGE_EXTS, start: int = 0, count: int | None = None,
                decode: bool = True, choose: Callable[[str, list[str]], str | None] | None = None
                ) -> Iterator[dict[str, Any]]:
    """Stream {"__key__", "__shard__", "__index__", "jpg": image bytes (undecoded), "emb": {field: array
    [width]}} (decode=False: {field: the `.npy` member's bytes}, for `decode_npy` by the caller once it
    has chosen a field; then a member that does not decode is the caller's to count). `choose(key, the
    member names it has)` (with decode=False) picks the one field to read per sample, from the manifest's
    `missing` lists, so the other fields' members are seeked over, not read.

    A merge-join on key that holds one sample per side in memory. Keys on one side only are skipped
    and counted in `stats` (the first few named in the log); so are samples without an image member.
    An undecodable embedding member is skipped with a warning naming it; the sample is still yielded if
    another requested field decoded. `start`/`count`: only image samples [start, start + count) (the
    ones before are passed over by their headers, and so are their sidecar members).
    `fields`: specs ("json:dense") or member names ("dense"); None = all in the manifest.
    Raises SidecarError (incomplete/corrupt sidecar) or SidecarMismatchError (other encoder / field).
    """
    stats = stats if stats is not None else JoinStats()
    m = open_sidecar(sidecar_shard, expected_fingerprint)
    names = [field_name(f) for f in fields] if fields else list(m["fields"])
    absent = [n for n in names if n not in m["fields"]]
    if absent:
        raise SidecarMismatchError(f"sidecar {sidecar_shard} has fields {m['fields']}, not {absent}; embed them "
                                   "(data.fields in the embed config) or change the requested fields")
    width, dtype = m["width"], m["dtype"]
    by_order = bool(m.get("keys_sorted"))  # else: sidecar keys are a subsequence of image keys
    rs_img, rs_sc = ReadStats(), ReadStats()
    before: set[str] = set()  # image keys before `start`: their sidecar members are not ours
    imgs = iter_tar_samples(image_shard, rs_img, skip=start, count=count, want=set(image_exts), skipped_keys=before)
    img = next(imgs, None)
    want_for = None
    if choose is not None:
        lacking = {n: set(m.get("missing", {}).get(n, [])) for n in names}

        def want_for(key: str) -> set[str]:
            pick = choose(key, [n for n in names if key not in lacking[n]])
            return {f"{pick}.npy"} if pick is not None else set()
    embs = iter_tar_samples(sidecar_shard, rs_sc, want={f"{n}.npy" for n in names}, skip_keys=before,
                            want_for=want_for)
    sc = next(embs, None) if img is not None else None
    partial = count is not None  # the shard's later samples belong to another stream: do not drain it
    base_bytes, base_samples = stats.bytes_read, stats.samples_read

    def sync() -> None:  # read counters up to date before each yield, so callers can take deltas
        stats.bytes_read = base_bytes + rs_img.bytes_read + rs_sc.bytes_read
        stats.samples_read = base_samples + rs_img.samples

    def skip(kind: str, key: str) -> None:
        n = getattr(stats, kind) + 1
        setattr(stats, kind, n)
        if n <= _MAX_NAMED:
            log.warning(f"{image_shard}: sample '{key}' {_SKIP_REASON[kind]}; skipped (counted)")

    try:
        while img is not None and sc is not None:
            ki, ks = img["__key__"], sc["__key__"]
            if ki == ks:
                out = (_decode_sample(sc, names, width, dtype, sidecar_shard, stats) if decode else
                       {n: sc[f"{n}.npy"] for n in names if f"{n}.npy" in sc})
                image = next((img[e] for e in image_exts if e in img), None)
                if image is None:
                    skip("no_image", ki)
                elif not out:
                    skip("image_only", ki)
                else:
                    stats.joined += 1
                    sync()
                    yield {"__key__": ki, "__shard__": image_shard, "__index__": img["__index__"], "jpg": image,
                           "emb": out}
                img, sc = next(imgs, None), next(embs, None)
            elif by_order and ks < ki:
                skip("sidecar_only", ks)
                sc = next(embs, None)
            else:
                skip("image_only", ki)
                img = next(imgs, None)
        while img is not None:
            skip("image_only", img["__key__"])
            img = next(imgs, None)
        while sc is not None and not partial:
            skip("sidecar_only", sc["__key__"])
            sc = next(embs, None)
    finally:
        stats.read_errors.extend(rs_img.read_errors + rs_sc.read_errors)
        embs.close()
        imgs.close()
        sync()


_MAX_NAMED = 5
_SKIP_REASON = {"image_only": "has no embedding in the sidecar (caption missing when embedded?)",
                "sidecar_only": "is in the sidecar but not in the image shard",
                "no_image": "has no image member"}


def _decode_sample(sc: dict, names: list[str], width: int, dtype: str, path: str,
                   stats: JoinStats) -> dict[str, np.ndarray]:
    out = {}
    for n in names:
        data = sc.get(f"{n}.npy")
        if data is None:
            stats.missing_field[n] = stats.missing_field.get(n, 0) + 1
            continue
        try:
            out[n] = decode_npy(data, width, dtype)
        except (ValueError, OSError, EOFError) as e:
            member = f"{path}:{sc['__key__']}.{n}.npy"
            log.warning(f"undecodable embedding {member} ({e}); skipped")
            stats.bad_embedding.append(member)
            stats.missing_field[n] = stats.missing_field.get(n, 0) + 1
    return out
