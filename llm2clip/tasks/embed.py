"""Embed step: captions of image shards -> frozen stage-1 encoder -> one sidecar shard per image shard.

    run_embed(load_config(EmbedConfig, "configs/tiny/embed.yaml"))

1. Plan: expand the shard spec, map every image shard to its sidecar, fingerprint the encoder
   (rank 0, broadcast). Every rank validates a slice of the existing manifests (sha256 + count);
   a shard whose manifest validates for this encoder is skipped, one from another encoder stops the
   job (unless output.overwrite), everything else is (re)done.
2. Balance: the shards are cut into windows of batch.window_shards consecutive shards in the plan's
   (global) order, the same whatever the world size; the windows still to do go to ranks by greedy
   longest-processing-time on their sample counts (or file sizes), the same on every rank. A window
   is embedded by exactly one rank, so its batches, and the bytes written, do not depend on the
   number of ranks.
3. Encode: per window, read only the text members, tokenise (one call per window), and
   embed with the TextEmbedder: captions packed into rows up to batch.token_budget (or length-sorted
   padded batches with text.packing=off), the frozen encoder under no_grad.
4. Write: sidecar tar then manifest (see llm2clip/data/sidecar.py); rank 0 writes index.json per
   sidecar folder and a summary (captions, tokens, padding fraction, seconds, skipped).
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm2clip import distributed as D
from llm2clip.config import ConfigError, atomic_write_text, save_config
from llm2clip.data import sidecar as S
from llm2clip.data.io import is_url
from llm2clip.data.prefetch import Prefetcher
from llm2clip.data.shards import ReadStats, expand_shards, field_extensions, get_caption, iter_tar_samples, shard_size
from llm2clip.schema_embed import EmbedConfig, field_name
from llm2clip.text.batching import EncodeStats
from llm2clip.text.feature_cache import FileHashCache, encoder_location, fingerprint_of, fingerprint_record
from llm2clip.text.tokenize import empty_caption_error

log = logging.getLogger("llm2clip")


class EmbedConflictError(RuntimeError):
    """Existing sidecars come from another encoder or layout; the job refuses to mix them."""


@dataclass
class ShardJob:
    image: str
    sidecar: str
    weight: int  # balancing weight: sample count, or file bytes when some count is unknown
    samples: int | None  # known sample count (progress bar total)


# --- planning --------------------------------------------------------------------------------
def plan_jobs(cfg: EmbedConfig) -> list[ShardJob]:
    """Image shards of the spec (in spec order) with their sidecar paths; raises ConfigError on clashes."""
    images: list[str] = []
    for part in [p for p in cfg.data.shards.split("::") if p.strip()]:
        images.extend(expand_shards(part))
    out = cfg.output
    if not out.out_dir:  # a glob like dir/*.tar also matches our own X_emb.tar sidecars
        own = [p for p in images if p.endswith(f"{out.suffix}.tar")]
        if own:
            log.info(f"ignoring {len(own)} shard(s) named like sidecars (*{out.suffix}.tar), e.g. {own[0]}")
        images = [p for p in images if p not in own]
    seen: set[str] = set()
    images = [p for p in images if not (os.path.abspath(p) in seen or seen.add(os.path.abspath(p)))]
    if not images:
        raise ConfigError(f"data.shards={cfg.data.shards!r} matched no image shard")
    image_set = {os.path.abspath(p) for p in images}
    by_sidecar: dict[str, str] = {}
    jobs = []
    for img in images:
        sc = S.sidecar_path_for(img, out)
        key = os.path.abspath(sc)
        if key in image_set:
            raise ConfigError(f"the sidecar of {img} would be {sc}, which is an image shard of this job")
        if key in by_sidecar:
            raise ConfigError(f"image shards {by_sidecar[key]} and {img} would share the sidecar {sc}; set "
                              "output.image_root to a folder above both so sidecars mirror the image tree")
        by_sidecar[key] = img
        jobs.append(ShardJob(img, sc, 0, shard_size(img)))
    known = all(j.samples is not None for j in jobs)
    for j in jobs:
        j.weight = int(j.samples) if known else (1 if is_url(j.image) else os.path.getsize(j.image))
    return jobs


def assign_lpt(weights: list[int], world: int) -> list[list[int]]:
    """Greedy longest-processing-time: heaviest shard first to the least-loaded rank (ties: lowest
    index / rank), so every rank computes the same assignment."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += weights[i]
    return out


def plan_windows(n_jobs: int, todo: list[int], window_shards: int) -> list[list[int]]:
    """Job indices grouped into windows: the plan's shards cut every `window_shards` positions (global
    order, fixed by the data alone), each window keeping the shards still to do; empty ones dropped.
    Cutting at fixed positions (not every `window_shards` remaining shards) keeps a rerun's untouched
    windows, and so their batches, those of the first run."""
    left = set(todo)
    windows = [[i for i in range(s, min(s + window_shards, n_jobs)) if i in left]
               for s in range(0, n_jobs, window_shards)]
    return [w for w in windows if w]


def assign_windows(windows: list[list[int]], weights: list[int], world: int) -> list[list[list[int]]]:
    """Whole windows to ranks, greedy LPT on the window's summed weight: [rank][window][job index]."""
    a = assign_lpt([sum(weights[i] for i in w) for w in windows], world)
    return [[windows[k] for k in ks] for ks in a]


def check_export_settings(cfg: EmbedConfig) -> None:
    """A stage-1 export records how it was trained; embedding it another way is a silent bug."""
    from llm2clip.text.settings import check_against_export

    check_against_export(cfg.text)


def _status(job: ShardJob, fp: str, names: list[str], dtype: str, overwrite: bool,
            verify: bool = True) -> tuple[str, str, dict | None]:
    """("done" | "todo" | "conflict", reason, manifest) for one shard."""
    try:
        return _status_unsafe(job, fp, names, dtype, overwrite, verify)
    except OSError as e:  # unreadable sidecar: redo it rather than leave the other ranks waiting
        return "todo", f"unreadable ({e})", None


def _status_unsafe(job: ShardJob, fp: str, names: list[str], dtype: str, overwrite: bool,
                   verify: bool) -> tuple[str, str, dict | None]:
    m = S.read_manifest(job.sidecar)
    if m is None:
        return "todo", ("tar without manifest" if Path(job.sidecar).exists() else "new"), None
    if overwrite:
        return "todo", "overwrite", None
    mismatch = S.manifest_mismatch(m, fp, names, dtype, exact_fields=True)
    if mismatch:
        return "conflict", f"{job.sidecar}: {mismatch}", m
    reason = S.validate_sidecar(job.sidecar, m, verify=verify)
    if reason:
        return "todo", reason, None
    if not is_url(job.image) and m.get("image_shard_bytes") not in (None, os.path.getsize(job.image)):
        return "todo", "image shard changed since it was embedded", None
    return "done", "", m


# --- one window of shards --------------------------------------------------------------------
@dataclass
class Window:
    jobs: list[ShardJob]
    keys: list[list[str]] = field(default_factory=list)  # per shard, every image key in order
    items: list[tuple[int, str, str]] = field(default_factory=list)  # (shard, key, field name)
    encoded: list[tuple[list[int], list[int]]] = field(default_factory=list)
    read_errors: list[list[str]] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    empty: int = 0  # empty / whitespace-only captions skipped (text.empty_captions=skip)


def load_window(jobs: list[ShardJob], fields: list[str], ptok, instruction: str, empty_policy: str = "error") -> Window:
    """Read the text members of each shard (images are never read into memory) and tokenise them
    (one tokenizer call per window). An empty caption raises naming its shard and key, or is
    skipped (left out of the sidecar like a missing one) and counted."""
    w = Window(jobs)
    caps: list[str] = []
    empties: list[str] = []
    want = field_extensions(fields)
    for si, job in enumerate(jobs):
        rs, keys, seen, dup = ReadStats(), [], set(), 0
        for s in iter_tar_samples(job.image, rs, want=want):
            key = s["__key__"]
            if key in seen:  # a key split across the tar: the first group wins
                dup += 1
                continue
            seen.add(key)
            keys.append(key)
            for spec in fields:
                cap = get_caption(s, spec)
                if cap is not None:
                    w.items.append((si, key, field_name(spec)))
                    caps.append(cap)
                elif _present_but_empty(s, spec):
                    empties.append(f"{job.image} key {key} field {spec}")
        w.keys.append(keys)
        w.read_errors.append(rs.read_errors)
        w.duplicates.append(dup)
    if empties and empty_policy == "error":
        raise empty_caption_error(empties, "embed")
    w.empty = len(empties)
    w.encoded = ptok.encode(caps, instruction)
    return w


def _present_but_empty(sample: dict, spec: str) -> bool:
    """The field is there but holds only whitespace (get_caption returns None for it as for an absent one)."""
    if spec.startswith("json:"):
        try:
            meta = json.loads(sample["json"]) if isinstance(sample.get("json"), (bytes, str)) else sample.get("json")
        except ValueError:
            return False
        val = meta.get(spec[5:]) if isinstance(meta, dict) else None
        val = val[0] if isinstance(val, list) and val else val
    else:
        val = sample.get(spec)
        val = val.decode("utf-8", errors="replace") if isinstance(val, bytes) else val
    return isinstance(val, str) and not val.strip()


def _write_window(w: Window, emb: np.ndarray, cfg: EmbedConfig, fp: str, compute_dtype: str) -> list[tuple[str, dict]]:
    """Write the window's sidecars; [(sidecar path, manifest)]."""
    names = [field_name(f) for f in cfg.data.fields]
    sources = {field_name(f): f for f in cfg.data.fields}
    finite = np.isfinite(emb).all(axis=1)
    per_shard: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in w.jobs]
    tokens = [0] * len(w.jobs)
    nonfinite: list[dict[str, list[str]]] = [{} for _ in w.jobs]
    for row, ((si, key, name), enc) in enumerate(zip(w.items, w.encoded)):
        tokens[si] += len(enc[0])
        if finite[row]:
            per_shard[si].setdefault(key, {})[name] = emb[row]
        else:
            nonfinite[si].setdefault(name, []).append(key)
    manifests = []
    for si, job in enumerate(w.jobs):
        bad = sum(len(v) for v in nonfinite[si].values())
        if bad:
            log.warning(f"{job.image}: {bad} non-finite embedding(s) dropped (fp16 overflow? try "
                        f"output.dtype=float32), e.g. {next(iter(nonfinite[si].values()))[0]}")
        extra = {"sources": sources, "image_shard": job.image,
                 "image_shard_bytes": None if is_url(job.image) else os.path.getsize(job.image),
                 "tokens": tokens[si], "nonfinite": nonfinite[si], "read_errors": w.read_errors[si],
                 "duplicate_keys": w.duplicates[si], "compute_dtype": compute_dtype}
        S.remove_stale_temps(job.sidecar)
        samples = ((k, per_shard[si].get(k, {})) for k in w.keys[si])
        manifests.append((job.sidecar, S.write_sidecar(job.sidecar, samples, names, emb.shape[1],
                                                       cfg.output.dtype, fp, extra)))
    return manifests


# --- the job ---------------------------------------------------------------------------------
class _Progress:
    """tqdm on rank 0 (captions, tokens/s, padding); plain log lines when the bar is off."""

    def __init__(self, enabled: bool, bar: bool, total: int | None, every_s: float):
        self.enabled, self.stats, self.t0, self.last, self.every = enabled, EncodeStats(), time.perf_counter(), 0.0, every_s
        self.bar = None
        if enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="cap", desc="embed", dynamic_ncols=True, smoothing=0.1)

    def __call__(self, b: EncodeStats) -> None:
        if not self.enabled:
            return
        self.stats.add(b)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(b.captions)
            self.bar.set_postfix_str(f"{self.stats.tokens / dt:,.0f} tok/s, pad {self.stats.padding_fraction:.1%}",
                                     refresh=False)
        elif dt - self.last >= self.every:
            self.last = dt
            log.info(f"embed: {self.stats.captions:,} captions, {self.stats.captions / dt:,.1f} cap/s, "
                     f"{self.stats.tokens / dt:,.0f} tok/s, pad {self.stats.padding_fraction:.1%}")

    def shrink(self, n: int) -> None:  # captions that turned out missing
        if self.bar is not None and self.bar.total is not None:
            self.bar.total = max(self.bar.total - n, self.bar.n)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _work(cfg: EmbedConfig, windows: list[list[ShardJob]], fp: str, rank: int) -> dict[str, Any]:
    """Encode and write this rank's windows of shards; never raises (errors are reported to every rank)."""
    res: dict[str, Any] = {"manifests": [], "stats": EncodeStats().as_dict(), "missing_captions": 0, "empty_captions": 0,
                           "nonfinite": 0, "read_errors": 0, "error": None}
    jobs = [j for w in windows for j in w]
    if not jobs:
        return res
    stats = EncodeStats()
    n_fields = len(cfg.data.fields)
    total = sum(j.samples for j in jobs) * n_fields if all(j.samples is not None for j in jobs) else None
    prog, loaded = None, None
    try:
        from llm2clip.text.embedder import TextEmbedder

        embedder = TextEmbedder(cfg.text, token_budget=cfg.batch.token_budget, max_batch_size=cfg.batch.max_batch_size)
        ptok, compute_dtype = embedder.tokenizer(), embedder.compute_dtype
        prog = _Progress(rank == 0, cfg.run.progress_bar, total, cfg.run.log_every_s)  # after the (slow) load
        load = lambda js: load_window(js, cfg.data.fields, ptok, cfg.data.instruction,  # noqa: E731
                                      cfg.text.empty_captions)
        ahead = iter(windows)
        # read + tokenise the next window in a thread while the model runs (batch.prefetch)
        loaded = Prefetcher(lambda: load(next(ahead)), 1 if cfg.batch.prefetch else 0, name="embed-windows")
        for wjobs, w in zip(windows, loaded):
            n_keys = sum(len(k) for k in w.keys)
            res["missing_captions"] += n_keys * n_fields - len(w.items)
            res["read_errors"] += sum(len(r) for r in w.read_errors)
            if total is not None:
                prog.shrink(sum(j.samples for j in wjobs) * n_fields - len(w.items))
            res["empty_captions"] += w.empty
            out, st = embedder.embed_encoded(w.encoded, on_batch=prog)
            stats.add(st)
            emb = out.numpy().astype(cfg.output.dtype)
            if not len(w.items):  # no caption at all: width still has to be known
                emb = np.zeros((0, embedder.hidden_size), dtype=cfg.output.dtype)
            for sc, m in _write_window(w, emb, cfg, fp, compute_dtype):
                res["nonfinite"] += sum(len(v) for v in m["nonfinite"].values())
                res["manifests"].append((sc, m))
    except Exception as e:  # noqa: BLE001 - reported on every rank after the gather
        res["error"] = f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
        log.error(res["error"])
    finally:
        if prog is not None:
            prog.close()
        if loaded is not None:
            loaded.close()
    res["stats"] = stats.as_dict()
    return res


def _write_indexes(cfg: EmbedConfig, jobs: list[ShardJob], manifests: dict[str, dict], fp: str,
                   encoder: dict, location: dict) -> list[str]:
    """Rank 0: index.json per sidecar folder = this job's manifests + older ones of the same encoder."""
    names = [field_name(f) for f in cfg.data.fields]
    groups: dict[Path, list[ShardJob]] = {}
    for j in jobs:
        groups.setdefault(S.index_path_for(j.sidecar, cfg.output), []).append(j)
    written = []
    for path, js in groups.items():
        ms = {Path(j.sidecar).name: manifests[j.sidecar] for j in js if j.sidecar in manifests}
        old = S.load_index(path)
        for e in (old or {}).get("entries", []):
            if e["sidecar"] in ms:
                continue
            m = S.read_manifest(path.parent / e["sidecar"])
            if m is not None and not S.manifest_mismatch(m, fp, names, cfg.output.dtype, exact_fields=True):
                ms[e["sidecar"]] = m
            else:
                log.warning(f"{path}: dropping {e['sidecar']} from the index (gone, or from another encoder)")
        if ms:
            S.write_index(path, list(ms.values()), encoder, location)
            written.append(str(path))
    return written


def run_embed(cfg: EmbedConfig) -> dict[str, Any]:
    """Run the embed job on this rank (any world size); returns the summary on every rank."""
    from llm2clip.logger import setup_logging

    setup_logging()
    t0 = time.perf_counter()
    info = D.init_distributed()
    rank, world = D.get_rank(), D.get_world_size()
    check_export_settings(cfg)
    names = [field_name(f) for f in cfg.data.fields]
    # rank 0 plans and fingerprints (hashing an 8B model once), everyone receives
    plan = None
    if rank == 0:
        try:
            jobs = plan_jobs(cfg)
            record = fingerprint_record(cfg.text, cfg.data.instruction, FileHashCache())
            plan = (jobs, record, None)
        except Exception as e:  # noqa: BLE001 - every rank must hear about it, not wait in the broadcast
            plan = ([], {}, f"{type(e).__name__}: {e}")
    jobs, record, err = D.broadcast_object(plan)
    if err:
        raise ConfigError(err)
    fp = fingerprint_of(record)
    log.info(f"embed: {len(jobs)} image shard(s), fields {names}, encoder fingerprint {fp[:16]}…, "
             f"world {world} ({info.launcher})")

    # existing outputs: every rank validates a slice (sha256 reads the tars), then all agree
    mine = {i: _status(jobs[i], fp, names, cfg.output.dtype, cfg.output.overwrite, cfg.output.verify == "sha256")
            for i in range(rank, len(jobs), world)}
    status: dict[int, tuple[str, str, dict | None]] = {}
    for part in D.all_gather_object(mine):
        status.update(part)
    conflicts = [r for s, r, _ in status.values() if s == "conflict"]
    if rank == 0 and not cfg.output.overwrite:
        for ip in sorted({S.index_path_for(j.sidecar, cfg.output) for j in jobs}):
            idx = S.load_index(ip)
            if idx is not None and S.manifest_mismatch(idx, fp, names, cfg.output.dtype, exact_fields=True):
                conflicts.insert(0, f"{ip}: {S.manifest_mismatch(idx, fp, names, cfg.output.dtype, exact_fields=True)}")
    conflicts = D.broadcast_object(conflicts)
    if conflicts:
        raise EmbedConflictError(
            f"{len(conflicts)} existing sidecar output(s) were written by another encoder or with other "
            f"fields/dtype, refusing to mix them (this encoder: {fp}):\n  " + "\n  ".join(conflicts[:10]) +
            "\nWrite to another output.out_dir / output.suffix, or set output.overwrite=true to replace them.")
    done = [i for i in range(len(jobs)) if status[i][0] == "done"]
    todo = [i for i in range(len(jobs)) if status[i][0] == "todo"]
    redo = [i for i in todo if status[i][1] not in ("new",)]
    if redo and rank == 0:
        log.info(f"redoing {len(redo)} shard(s), e.g. {jobs[redo[0]].sidecar}: {status[redo[0]][1]}")
    windows = plan_windows(len(jobs), todo, cfg.batch.window_shards)
    my_windows = [[jobs[i] for i in w] for w in assign_windows(windows, [j.weight for j in jobs], world)[rank]]
    if rank == 0 and len(windows) < min(world, len(todo)):
        log.warning(f"{len(todo)} shard(s) to do in {len(windows)} window(s) of batch.window_shards="
                    f"{cfg.batch.window_shards} for {world} ranks: {world - len(windows)} rank(s) get no work "
                    "(lower batch.window_shards)")
    if rank == 0 and cfg.output.out_dir:
        save_config(cfg, Path(cfg.output.out_dir) / "embed_config.yaml")

    res = _work(cfg, my_windows, fp, rank)

    results = D.all_gather_object(res)
    manifests = {jobs[i].sidecar: status[i][2] for i in done}
    for r in results:
        manifests.update(dict(r["manifests"]))
    errors = [r["error"] for r in results if r["error"]]
    st = EncodeStats()
    for r in results:
        s = r["stats"]
        st.add(EncodeStats(s["captions"], s["tokens"], s["padded_tokens"], s["batches"], 0.0))
    seconds = time.perf_counter() - t0
    summary = {"shards": len(jobs), "skipped": len(done), "written": sum(len(r["manifests"]) for r in results),
               "redone": len(redo), "failed": len(todo) - sum(len(r["manifests"]) for r in results),
               "captions": st.captions, "tokens": st.tokens, "padded_tokens": st.padded_tokens,
               "padding_fraction": round(st.padding_fraction, 4), "batches": st.batches,
               "missing_captions": sum(r["missing_captions"] for r in results),
               "empty_captions": sum(r["empty_captions"] for r in results),
               "nonfinite": sum(r["nonfinite"] for r in results), "read_errors": sum(r["read_errors"] for r in results),
               "seconds": round(seconds, 3), "captions_per_s": round(st.captions / seconds, 2),
               "tokens_per_s": round(st.tokens / seconds, 1), "world_size": world, "fingerprint": fp,
               "encode_seconds_per_rank": [r["stats"]["seconds"] for r in results], "indexes": []}
    if rank == 0:
        summary["indexes"] = _write_indexes(cfg, jobs, manifests, fp, record, encoder_location(cfg.text))
        path = cfg.run.summary_path or (str(Path(cfg.output.out_dir) / "embed_summary.json") if cfg.output.out_dir else "")
        if path:
            atomic_write_text(path, json.dumps({**summary, "errors": errors}, indent=1))
        log.info("embed summary: " + json.dumps(summary))
    D.barrier()
    if errors:
        raise RuntimeError(f"embed failed on {len(errors)} rank(s); finished shards are kept and a rerun "
                           f"skips them:\n" + "\n".join(errors))
    return summary
