"""bench/gpu_check.py must keep working between the rare runs on a real GPU: CI runs every section at
tiny shapes on CPU and checks that each one reports a status and sane numbers."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["attention", "stage2", "timm_eva02", "embed", "stage1"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # step counts fixed by the tiny preset; time budgets scaled out of the way (a busy CI box must not cut
    # a path short: tests use step budgets, not clocks)
    out = tmp_path_factory.mktemp("gpu_check")
    # one OpenMP thread: on a busy 2-core box, spinning OpenMP threads slowed DeepSpeed steps 10-40x
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OUT": "", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--shape", "tiny",
                           "--out", str(out), "--work", str(out / "work"), "--budget-scale", "20"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    rep["_seconds"], rep["_md"] = seconds, (out / "gpu_check.md").read_text()
    return rep


@pytest.mark.slow
def test_every_section_reports_ok_or_skip(report):
    assert list(report["sections"]) == SECTIONS
    for name, e in report["sections"].items():
        assert e["status"] in ("ok", "skip"), f"{name}: {e.get('error')}\n{e.get('traceback', '')}"
        assert e["seconds"] >= 0 and e["budget_s"] > 0
    timm = report["sections"]["timm_eva02"]
    if importlib.util.find_spec("timm") is None:
        assert timm["status"] == "skip" and "timm" in timm["reason"]
    meta = report["meta"]
    assert meta["shape"] == "tiny" and meta["device"] == "cpu"
    assert meta["peak_tflops"] is None and meta["env"]["gpu"] is None  # no MFU without a known peak
    assert meta["env"]["versions"]["torch"]
    # the markdown table has a row per section
    for name in SECTIONS:
        assert f"| {name} |" in report["_md"]


@pytest.mark.slow
def test_attention_kernels_agree_and_are_bidirectional(report):
    r = report["sections"]["attention"]["result"]
    ran = [s for s in r["shapes"] if "impls" in s]
    assert ran, r
    for s in ran:
        assert {"eager", "sdpa"} <= set(s["impls"])
        for impl, x in s["impls"].items():
            assert x["ok"] and x["first_token_sees_last"], (s["shape"], impl, x)
            assert 0 <= x["rel_err_padded_vs_fp32"] < r["tolerance_vs_fp32"]
            assert 0 <= x["rel_err_packed_vs_fp32"] < r["tolerance_vs_fp32"]
            assert x["rel_err_pad_id_change"] < r["tolerance_pad_leak"]
    assert "flash_attention_2" in r  # why flash-attn was not compared (not importable / no CUDA)


@pytest.mark.slow
def test_embed_and_stage1_numbers_are_sane(report):
    emb = report["sections"]["embed"]["result"]
    assert emb["n_params_nonemb"] > 0 and emb["captions"] > 0
    by = {v["packing"]: v for v in emb["variants"]}
    assert by["off"]["status"] == by["on"]["status"] == "ok"
    for v in by.values():
        assert v["tokens_per_s"] > 0 and v["tokens"] > 0 and v["mfu"] is None
        assert 0 <= v["padding_fraction"] < 1
    assert by["on"]["packed"] and by["on"]["padding_fraction"] < by["off"]["padding_fraction"]

    s1 = report["sections"]["stage1"]["result"]
    assert "memory_plan" in s1["memory_planner_note"]
    modes = {m["mode"]: m for m in s1["modes"]}
    assert set(modes) == {"replicated", "zero3"}
    for m in modes.values():
        assert m["status"] == "ok" and m["n_params_nonemb"] > 0
        for v in m["variants"]:
            assert v["status"] == "ok", v
            assert v["tokens_per_s"] > 0 and v["real_tokens"] > 0
            assert isinstance(v["planned_peak_gib"], float) and v["planned_peak_gib"] > 0, v  # the planner ran
    rep = modes["replicated"]["variants"]
    assert {(v["grad_ckpt"], v["packing"]) for v in rep} >= {(True, "off"), (False, "off")}


@pytest.mark.slow
def test_stage2_search_and_loader(report):
    r = report["sections"]["stage2"]["result"]
    assert r["tower_kind"] == "hf_clip" and r["tokens_per_image"] > 1
    assert any(x["status"] == "ok" for x in r["search"])
    ld = r["loader"]
    assert ld["status"] == "ok" and ld["images_per_s"] > 0 and 0 <= ld["data_wait_frac"] <= 1
    assert ld["batch"] == max(x["batch"] for x in r["search"] if x["status"] == "ok")


def test_a_failing_or_overrunning_section_is_recorded_and_the_run_goes_on():
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check as G

    class Ctx:
        def free(self):
            pass

    def boom(ctx, res, budget):
        res["measured"] = 1
        raise ValueError("boom")

    def hang(ctx, res, budget):
        res["measured"] = 2
        time.sleep(30)

    err = G.run_section("x", boom, Ctx(), 5, 10)
    assert err["status"] == "error" and "ValueError: boom" in err["error"] and "Traceback" in err["traceback"]
    assert err["result"] == {"measured": 1}  # what was measured before the failure is kept
    t0 = time.perf_counter()
    out = G.run_section("y", hang, Ctx(), 1, 1)  # hard limit: SIGALRM ends it
    assert out["status"] == "timeout" and out["result"] == {"measured": 2} and time.perf_counter() - t0 < 10
    report = {"meta": {"date": "d", "shape": "tiny", "peak_tflops": None, "command": "c", "total_s": 1,
                       "env": {"cpus": 2, "gpu": None, "versions": dict.fromkeys(
                           ["torch", "transformers", "peft", "deepspeed", "timm", "flash-attn"]), "version_notes": []}},
              "setup": {}, "sections": {"x": err, "y": out}}
    md = G.markdown(report)
    assert "| x |  | error |" in md and "| y |  | timeout |" in md
