"""Text features computed once: encoder fingerprints, token-budget batching, an on-disk feature cache.

- `encoder_fingerprint(text_cfg, instruction)`: a content hash of everything that determines a
  caption's embedding (model config + weight files, tokenizer files, LoRA adapter, pooling, template,
  instruction, max_length, attention). File hashes are memoised by (path, size, mtime, inode), in
  memory and in a small JSON file, so an 8B model is read once, not once per job or per rank.
- `TextFeatureCache`: embeddings keyed by the fingerprint and the text's sha256 (used by
  `TextEmbedder.features`, which computes only the missing ones and never loads the LLM when
  nothing is missing).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from llm2clip.config import atomic_write_text
from llm2clip.schema import TEMPLATES, TextEncoderConfig

log = logging.getLogger("llm2clip")

# config.json keys that do not change the math (or are covered by the weight hashes)
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                         "use_cache", "is_causal", "_commit_hash", "base_model_name_or_path", "revision"}
_WEIGHTS_PRIMARY = (".safetensors",)
_WEIGHTS_FALLBACK = (".bin", ".pt", ".pth", ".gguf")
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model")


# --- fingerprints ----------------------------------------------------------------------------
class FileHashCache:
    """sha256 of files, memoised by (real path, size, mtime_ns, inode).

    `path`: a JSON file that persists the memo across jobs; default $LLM2CLIP_HASH_CACHE or
    ~/.cache/llm2clip/file_sha256.json; "off" (or an unwritable place) keeps it in memory only.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        path = path if path is not None else os.environ.get(
            "LLM2CLIP_HASH_CACHE", str(Path.home() / ".cache" / "llm2clip" / "file_sha256.json"))
        self.path = None if str(path) in ("", "off") else Path(path)
        self.memo: dict[str, str] = {}
        self.hashed_bytes = 0  # bytes actually read (0 when everything came from the memo)
        if self.path is not None and self.path.is_file():
            try:
                self.memo = dict(json.loads(self.path.read_text()))
            except (OSError, ValueError, TypeError):
                self.memo = {}

    @staticmethod
    def _key(p: Path) -> str:
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"

    def sha256(self, path: str | os.PathLike) -> str:
        p = Path(path)
        key = self._key(p)
        if key not in self.memo:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 23):
                    h.update(chunk)
                    self.hashed_bytes += len(chunk)
            self.memo[key] = h.hexdigest()
            self._save()
        return self.memo[key]

    def _save(self) -> None:
        if self.path is None:
            return
        try:  # merge with what other jobs wrote meanwhile; losing a race only costs a re-hash
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
            atomic_write_text(self.path, json.dumps({**on_disk, **self.memo}))
        except (OSError, ValueError, TypeError):
            pass


def _canonical_json_sha(path: Path) -> str:
    d = json.loads(path.read_text())
    d = {k: v for k, v in d.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(_NOT_WEIGHTS))
    primary = [p for p in files if p.name.endswith(_WEIGHTS_PRIMARY)]
    return primary or [p for p in files if p.name.endswith(_WEIGHTS_FALLBACK)]


def fingerprint_record(cfg: TextEncoderConfig, instruction: str = "",
                       hashes: FileHashCache | None = None) -> dict[str, Any]:
    """What the fingerprint hashes: contents only (no paths), so a copied model keeps its fingerprint."""
    hashes = hashes or FileHashCache()
    model = Path(cfg.model_path)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"text.model_path={model} is not a HuggingFace model folder (no config.json)")
    weights = _weight_files(model)
    if not weights:
        raise FileNotFoundError(f"no weight files (*.safetensors / *.bin) in text.model_path={model}")
    tok = Path(cfg.tokenizer_path or cfg.model_path)
    from llm2clip.text.settings import resolved_special_tokens

    rec: dict[str, Any] = {
        "version": 1,
        "model": {"config": _canonical_json_sha(model / "config.json"),
                  "weights": {p.name: hashes.sha256(p) for p in weights}},
        "tokenizer": {n: hashes.sha256(tok / n) for n in _TOKENIZER_FILES if (tok / n).is_file()},
        "lora": None,
        "pooling": cfg.pooling, "attention": cfg.attention, "template": TEMPLATES.get(cfg.template, cfg.template),
        # which tokens are averaged: changing it changes every embedding, so old sidecars are refused
        "pool_scope": cfg.pool_scope, "pool_special_tokens": resolved_special_tokens(cfg),
        "instruction": instruction, "max_length": cfg.max_length,
    }
    if cfg.lora_path:
        lora = Path(cfg.lora_path)
        if not (lora / "adapter_config.json").is_file():
            raise FileNotFoundError(f"text.lora_path={lora} has no adapter_config.json")
        rec["lora"] = {"config": _canonical_json_sha(lora / "adapter_config.json"),
                       "weights": {p.name: hashes.sha256(p) for p in _weight_files(lora)}}
    return rec


def fingerprint_of(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def encoder_location(cfg: TextEncoderConfig) -> dict[str, str]:
    """Where the encoder is on disk and how it pads: not part of the fingerprint (a copied model keeps its
    fingerprint), recorded beside it so stage 2 and evaluation can find the encoder again."""
    def absp(p: str) -> str:
        return str(Path(p).resolve()) if p else ""

    return {"model_path": absp(cfg.model_path), "tokenizer_path": absp(cfg.tokenizer_path),
            "lora_path": absp(cfg.lora_path), "padding_side": cfg.padding_side, "pad_token": cfg.pad_token}


def encoder_fingerprint(cfg: TextEncoderConfig, instruction: str = "", hashes: FileHashCache | None = None) -> str:
    """64-hex content fingerprint of (encoder, instruction); see `fingerprint_record`."""
    return fingerprint_of(fingerprint_record(cfg, instruction, hashes))


# --- the cache -------------------------------------------------------------------------------
CACHE_FORMAT = "llm2clip-text-features/1"


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextFeatureCache:
    """Append-only features of one fingerprint: `<dir>/text_features-<fp[:16]>.safetensors` holding
    "features" [N, H] float32 and "keys" [N, 32] uint8 (sha256 of each text), plus a `.json` summary.

    Rows and their keys live in one file replaced by one rename, so two jobs sharing a cache folder (or a
    crash) can lose an update but never pair a row with another text's key.
    """

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str):
        self.dir = Path(cache_dir)
        self.fingerprint = fingerprint
        stem = f"text_features-{fingerprint[:16]}"
        self.tensor_path, self.meta_path = self.dir / f"{stem}.safetensors", self.dir / f"{stem}.json"
        self.keys: list[str] = []
        self.features = np.zeros((0, 0), dtype=np.float32)
        self._load()
        self.row = {k: i for i, k in enumerate(self.keys)}

    def _load(self) -> None:
        if not self.meta_path.is_file():
            return
        try:
            from safetensors.numpy import load_file

            meta = json.loads(self.meta_path.read_text())
            if meta.get("format") != CACHE_FORMAT or meta["fingerprint"] != self.fingerprint:
                raise ValueError("written for another fingerprint")
            tensors = load_file(str(self.tensor_path))
            feats, keys = tensors["features"], tensors["keys"]
            if keys.shape != (feats.shape[0], 32):
                raise ValueError(f"{feats.shape[0]} rows for {keys.shape[0]} keys")
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(f"text feature cache {self.meta_path} unusable ({e}); starting it afresh")
            return
        self.keys = [bytes(k).hex() for k in keys]
        self.features = np.ascontiguousarray(feats, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, texts: Sequence[str]) -> list[int | None]:
        """Row of each text in the cache, or None."""
        return [self.row.get(text_key(t)) for t in texts]

    def add(self, texts: Sequence[str], feats: np.ndarray) -> None:
        feats = np.asarray(feats, dtype=np.float32)
        if len(texts) != feats.shape[0]:
            raise ValueError(f"{len(texts)} texts but {feats.shape[0]} feature rows")
        if len(self) and feats.shape[1] != self.features.shape[1]:
            raise ValueError(f"width {feats.shape[1]} != cached width {self.features.shape[1]}")
        new = [(text_key(t), i) for i, t in enumerate(texts) if text_key(t) not in self.row]
        if not new:
            return
        rows = feats[[i for _, i in new]]
        self.features = rows if not len(self) else np.concatenate([self.features, rows])
        for k, _ in new:
            self.row.setdefault(k, len(self.keys))
            self.keys.append(k)

    def save(self) -> None:
        from safetensors.numpy import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tensor_path.with_name(f".{self.tensor_path.name}.tmp.{os.getpid()}")
        keys = np.array([np.frombuffer(bytes.fromhex(k), dtype=np.uint8) for k in self.keys], dtype=np.uint8)
        save_file({"features": np.ascontiguousarray(self.features), "keys": keys.reshape(len(self.keys), 32)},
                  str(tmp))
        os.replace(tmp, self.tensor_path)
        atomic_write_text(self.meta_path, json.dumps({
            "format": CACHE_FORMAT, "fingerprint": self.fingerprint, "width": int(self.features.shape[1]),
            "dtype": "float32", "count": len(self.keys)}))
