"""bench/overhead.py keeps working: its smallest piece (loader + embed, --smoke: 200 samples, 1 pair) runs
end to end and reports finite, positive ratios with the keys docs/PERFORMANCE.md relies on (~20 s)."""
import json
import math
import sys

from tests.helpers import ROOT, run_cmd


def test_overhead_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    p = run_cmd([sys.executable, str(ROOT / "bench/overhead.py"), "--smoke", "--only", "loader,embed",
                 "--json", str(out)], timeout=300)
    d = json.loads(out.read_text())
    want = {"loader", "embed_padded", "embed_packed", "embed_packed_vs_naive", "embed_padded_vs_naive"}
    assert set(d["ratios"]) == want and set(d["comparisons"]) == want
    for name, r in d["comparisons"].items():
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, (name, r)
        assert r["ours"] > 0 and r["bare"] > 0 and len(r["ours_runs"]) == len(r["bare_runs"]) == d["repeats"] == 1
        assert {"unit", "ratio_is", "target", "met", "pair_ratios"} <= set(r)
    m = d["machine"]
    assert m["cores"] >= 1 and len(m["load_avg_start"]) == 3 and len(m["load_avg_end"]) == 3
    assert d["versions"]["torch"] and d["versions"]["transformers"] and d["versions"]["deepspeed"]
    assert d["threads"] == 1 and d["date"] and "--smoke" in d["command"]
    # the bare embed loop computes what ours computes: same captions, same vectors (float16)
    assert d["details"]["embed"]["max_abs_diff_vs_ours_padded"]["bare"] < 1e-2
    assert "| comparison | ours | bare | ratio | target | met? |" in p.stdout
