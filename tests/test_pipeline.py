"""The README's main job (tools/run_pipeline.py) end to end, at a reduced size."""
import json
import sys

import pytest

from tests.helpers import ROOT, run_cmd


@pytest.mark.slow
def test_pipeline_runs_end_to_end_and_reports(tmp_path):
    out = tmp_path / "p"
    p = run_cmd([sys.executable, str(ROOT / "tools/run_pipeline.py"), "--out", str(out), "--train", "400",
                 "--val", "100", "--stage1-steps", "10", "--stage2-steps", "40"], timeout=600)
    assert "CRA after stage 1" in p.stdout and "| colors | top1 |" in p.stdout
    s = json.loads((out / "pipeline_summary.json").read_text())
    assert s["stage1"]["eval_end"]["eval/cra"] > s["stage1"]["eval_start"]["eval/cra"]
    res = s["eval"]
    assert set(res) == {"llm2clip", "untrained", "clip_baseline"}
    assert set(res["clip_baseline"]) == {"short", "long", "colors"}  # the trained baseline, every column
    assert res["llm2clip"]["long"]["t2i_R@1"] > res["untrained"]["long"]["t2i_R@1"]
    assert (out / "stage1/tb").is_dir() and (out / "stage2/tb").is_dir() and (out / "clip_baseline/tb").is_dir()
    # the exported models are named in the table and exist: the HF vision folder, the trained baseline
    assert (out / "stage2/export/hf_vision/config.json").is_file() and str(out / "stage2/export/hf_vision") in p.stdout
    assert (out / "clip_baseline/export/model/model.safetensors").is_file()
    assert "tensorboard --logdir" in p.stdout
    # a portable model folder: the card names encoder, data, steps, eval; the encoder can move
    card = (out / "stage2/export/model/MODEL_CARD.md").read_text()
    assert "fingerprint" in card and "dense_ratio" in card and "| steps | 40 |" in card and "eval/t2i_R@1" in card
    import shutil

    import llm2clip
    import torch
    moved = shutil.copytree(out / "stage1/export/merged", tmp_path / "elsewhere" / "encoder")
    caps = ["a red circle on the left", "two blue squares"]
    here = llm2clip.load_model(str(out / "stage2/export/model")).encode_text(caps)
    there = llm2clip.load_model(str(out / "stage2/export/model"), text_model_path=str(moved)).encode_text(caps)
    torch.testing.assert_close(there, here)
    with pytest.raises(ValueError, match="fingerprint"):
        llm2clip.load_model(str(out / "stage2/export/model"), text_model_path=str(out / "models/tiny-llama"))
    # rerun with --skip-done: nothing is recomputed, the same table comes out
    p2 = run_cmd([sys.executable, str(ROOT / "tools/run_pipeline.py"), "--out", str(out), "--train", "400",
                  "--val", "100", "--stage1-steps", "10", "--stage2-steps", "40", "--skip-done"], timeout=300)
    assert p2.stdout.count("(skip, done:") == 6
