import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LLM2CLIP_HASH_CACHE", "off")  # tests never write weight hashes to ~/.cache


@pytest.fixture(autouse=True)
def _llm2clip_logs_reach_caplog(monkeypatch):
    """setup_logging() (called by in-process runs) stops 'llm2clip' propagating to the root logger, which
    would hide warnings from caplog in every later test: whatever the test order, they propagate here."""
    monkeypatch.setattr(logging.getLogger("llm2clip"), "propagate", True)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Small synthetic dataset + tiny models, built once per test session.

    Returns a dict of paths: data, tokenizer, llama, qwen2, mistral, bert, clip, siglip.
    """
    from llm2clip.data.synthetic import generate
    from llm2clip.testing.tiny_models import make_tiny_models

    root = tmp_path_factory.mktemp("tiny_world")
    generate(root / "data", n_train=800, n_val=200, seed=0, image_size=64, shard_size=200, cls_per_class=10)
    paths = make_tiny_models(root / "data" / "tokenizer", root / "models")
    return {"root": root, "data": root / "data", "tokenizer": root / "data" / "tokenizer",
            **{k: v for k, v in paths.items()}}

# the session fixture `slurm` (a real single-node Slurm: munge + slurmctld + slurmd), see tests/slurm_cluster.py
pytest_plugins = ["tests.slurm_cluster"]
