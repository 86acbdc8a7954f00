"""img2dataset's output as it comes (keys out of order, failed samples absent, `_stats.json` + `.parquet`
beside each tar, a shard where every download failed, a 1-sample tail shard) through stage 1, embed,
stage 2 and eval, unmodified."""
import json
import sys

import pytest

from tests.helpers import ROOT, read_metrics, run_cmd
from tests.img2dataset_shards import synthetic_samples, write_img2dataset_shards

# (input rows, failed rows) per shard: 3 of 80 fail; all 10 fail (an empty tar); none fail; a tail of 3, 2 failed
LAYOUT = [(80, 3), (10, 10), (80, 0), (3, 2)]


@pytest.fixture(scope="module")
def i2d(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("i2d")
    w = tiny_world
    n_ok = sum(r - f for r, f in LAYOUT)
    write_img2dataset_shards(synthetic_samples(f"{w['data']}/train/shard-*.tar", n_ok), root / "train", LAYOUT)
    write_img2dataset_shards(synthetic_samples(f"{w['data']}/val/shard-*.tar", 60), root / "val", [(64, 4)], seed=1)
    return root


def test_fixture_is_shaped_like_img2dataset(i2d):
    import tarfile
    names = sorted(p.name for p in (i2d / "train").iterdir())
    assert names[:3] == ["00000.parquet", "00000.tar", "00000_stats.json"] and len(names) == 12
    with tarfile.open(i2d / "train/00000.tar") as tf:
        keys = [m.name.split(".")[0] for m in tf.getmembers()][::3]
    assert len(keys) == 77 and keys != sorted(keys)  # out of order, 3 absent
    with tarfile.open(i2d / "train/00001.tar") as tf:
        assert tf.getmembers() == []
    assert json.loads((i2d / "train/00001_stats.json").read_text())["successes"] == 0
    assert json.loads((i2d / "train/00003_stats.json").read_text())["successes"] == 1


@pytest.mark.parametrize("hard_negatives", [True, False])
def test_stage1_pairs_pass_the_empty_and_the_1_sample_shard(i2d, hard_negatives):
    """Two epochs of stage-1 pairs over the shards (one empty, one with a single sample), with and without
    hard negatives: every usable sample comes up, each pair from one sample, negatives from another."""
    from llm2clip.config import load_config
    from llm2clip.data.pairs import PairStream
    from llm2clip.schema import Stage1Config
    cfg = load_config(Stage1Config, None, [
        "text.model_path=/m", f"data.sources=[{{path: '{i2d}/train/*.tar', fields: [txt, 'json:dense']}}]",
        f"data.hard_negatives={str(hard_negatives).lower()}"])
    stream = iter(PairStream(cfg.data, 16, 0, 0, 1))
    n_ok = sum(r - f for r, f in LAYOUT)
    seen = []
    for _ in range(-(-2 * n_ok // 16)):
        examples, use_neg = next(stream)
        assert use_neg == hard_negatives
        assert all((e.negative is not None) == hard_negatives for e in examples)
        seen += [e.key for e in examples]
    assert len(set(seen)) == n_ok and any(k.startswith("00003.tar/") for k in seen)


@pytest.mark.slow
def test_img2dataset_shards_run_through_every_stage(tiny_world, i2d, tmp_path):
    w = tiny_world
    train, val = f"{i2d}/train/*.tar", f"{i2d}/val/*.tar"
    fields = "[txt, 'json:dense']"  # img2dataset writes the caption column as .txt and json "caption"
    s1 = tmp_path / "stage1"
    run_cmd([sys.executable, str(ROOT / "tools/train_stage1.py"), "--set", f"run.output_dir={s1}",
             "--set", f"text.model_path={w['llama']}", "--set", "text.max_length=64",
             "--set", "text.attn_implementation=sdpa", "--set", f"data.sources=[{{path: '{train}', fields: {fields}}}]",
             "--set", f"data.val_path={val}", "--set", f"data.val_fields={fields}", "--set", "train.micro_batch_size=16",
             "--set", "train.max_steps=12", "--set", "train.eval_every=0", "--set", "train.save_every=0",
             "--set", "train.deepspeed_config=ds_configs/zero1_bf16.json",
             "--set", "run.progress_bar=false", "--set", "run.log_every=4"], timeout=400)
    losses = [r["train/loss"] for r in read_metrics(s1) if "train/loss" in r]
    assert len(losses) == 3 and all(l == l for l in losses)
    assert "eval/cra" in json.loads((s1 / "summary.json").read_text())["eval_end"]
    emb = tmp_path / "emb"
    run_cmd([sys.executable, str(ROOT / "tools/embed_captions.py"), "--set", f"text.model_path={s1 / 'export/merged'}",
             "--set", "text.attn_implementation=sdpa", "--set", f"data.shards={train}::{val}",
             "--set", f"data.fields={fields}", "--set", f"output.out_dir={emb}", "--set", f"output.image_root={i2d}",
             "--set", "output.dtype=float32", "--set", "run.progress_bar=false"], timeout=300)
    s2 = tmp_path / "stage2"
    run_cmd([sys.executable, str(ROOT / "tools/train_stage2.py"), "--set", f"run.output_dir={s2}",
             "--set", f"vision.path={w['clip']}", "--set", "model.embed_dim=64", "--set", "model.adapter_blocks=2",
             "--set", f"data.shards={train}", "--set", f"data.sidecar.out_dir={emb}",
             "--set", f"data.sidecar.image_root={i2d}", "--set", "data.original_fields=[txt]",
             "--set", "data.dense_fields=['json:dense']", "--set", f"data.val_shards={val}",
             "--set", "data.val_field=json:dense", "--set", "data.num_workers=2",
             "--set", "train.deepspeed_config=ds_configs/zero1_bf16.json", "--set", "train.micro_batch_size=16",
             "--set", "train.max_steps=12", "--set", "train.eval_every=0", "--set", "train.save_every=0",
             "--set", "run.progress_bar=false", "--set", "run.log_every=4"], timeout=400)
    stats = json.loads((s2 / "export/data_stats.json").read_text())
    assert json.loads((s2 / "summary.json").read_text())["eval_end"]["eval/i2t_R@1"] >= 0  # val loaded
    ev = tmp_path / "eval/results.json"
    run_cmd([sys.executable, str(ROOT / "tools/eval_zero_shot.py"), "--model", f"enc=text:{s1 / 'export/merged'}",
             "--cra", f"i2d=shards:{val},fields=txt|json:dense", "--output", str(ev)], timeout=300)
    res = json.loads(ev.read_text())["results"]["enc"]
    assert "i2d" in res, res
    # 12 steps x 16 samples from 158 usable ones (epochs roll over), read by 2 workers, summed over both
    assert stats["data/samples_read"] >= 12 * 16, stats
