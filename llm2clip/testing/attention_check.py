"""Do flash-attn, sdpa and eager give the same bidirectional embeddings? (GPU acceptance check)

Bidirectionality reaches the kernels by different routes in transformers (flash-attn: the
`is_causal` kwarg copied from the config; eager/sdpa: the mask builder; packed rows: our 4D float
mask, or flash-attn's varlen kwargs), so each route is checked against eager:

    from llm2clip.testing.attention_check import check_attention_backends
    report = check_attention_backends()            # CUDA + bf16 when available, else CPU fp32
    # {"device", "dtype", "impls", "max_abs_diff": {impl/packed|padded: float}, "causal_gap": float, "ok": bool}

For each implementation the same mixed-length captions (with an instruction and the llama3
template) are embedded padded and packed; every result must match eager padded within `tol`
(relative to the embedding scale; bf16 ~ 2e-2) and bidirectional embeddings must differ from causal
ones by far more than that (else the kernel silently ran causal). A tiny random Llama is built in a
temporary folder when `model_dir` is not given (no downloads). Raises AssertionError when not ok.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import torch

CAPTIONS = ["a cat", "a red circle on the left of a big green square above a small blue star",
            "two", "a small blue square on a white background", "red",
            "the quick brown fox jumps over the lazy dog near the river bank"]
INSTRUCTION = "Given a caption, retrieve a similar relevant caption: "


def _tiny_llama(root: Path) -> Path:
    from llm2clip.data.synthetic import write_tokenizer
    from llm2clip.testing.tiny_models import make_tiny_llm

    tok = write_tokenizer(root / "tokenizer")
    return make_tiny_llm(root / "llama", tok, family="llama", hidden=64, layers=2, heads=4, kv_heads=2)


def check_attention_backends(model_dir: str | None = None, device: str | None = None,
                             dtype: torch.dtype | None = None, tol: float | None = None) -> dict[str, Any]:
    from llm2clip.schema import TextEncoderConfig
    from llm2clip.text.embedder import TextEmbedder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    tol = tol if tol is not None else (2e-2 if dtype != torch.float32 else 1e-5)
    impls = ["eager", "sdpa"]
    if device.startswith("cuda") and dtype != torch.float32 and importlib.util.find_spec("flash_attn") is not None:
        impls.append("flash_attention_2")
    dtype_name = str(dtype).replace("torch.", "")
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir or str(_tiny_llama(Path(tmp)))
        out: dict[str, torch.Tensor] = {}
        for impl in impls:
            for packing in ("off", "on"):
                for attention in (["bidirectional", "causal"] if impl == "eager" and packing == "off"
                                  else ["bidirectional"]):
                    cfg = TextEncoderConfig(model_path=path, attn_implementation=impl, packing=packing,
                                            attention=attention, template="llama3", max_length=64, dtype=dtype_name)
                    emb = TextEmbedder(cfg, device, token_budget=256, max_batch_size=64)
                    out[f"{impl}/{'packed' if packing == 'on' else 'padded'}/{attention}"] = \
                        emb.embed(CAPTIONS, INSTRUCTION).float()
    ref = out["eager/padded/bidirectional"]
    scale = float(ref.abs().max().clamp_min(1e-6))
    diffs = {k.rsplit("/", 1)[0]: float((v - ref).abs().max()) / scale
             for k, v in out.items() if k.endswith("bidirectional")}
    causal_gap = float((out["eager/padded/causal"] - ref).abs().max()) / scale
    ok = all(d <= tol for d in diffs.values()) and causal_gap > 10 * tol
    report = {"device": device, "dtype": dtype_name, "impls": impls, "tol": tol, "max_abs_diff": diffs,
              "causal_gap": causal_gap, "ok": ok}
    if not ok:
        raise AssertionError(f"attention backends disagree on bidirectional embeddings: {report}")
    return report
