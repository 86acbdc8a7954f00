"""Distributed local loss (2 gloo ranks) == single-process global-batch loss, values and gradients."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm2clip.losses import ClipLoss, SigLipLoss

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "clip_loss_equiv.py"
ATOL = 1e-6
WORLD = 2


def _script_module():
    spec = importlib.util.spec_from_file_location("clip_loss_equiv", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_img": rng.normal(size=(8, 6)), "x_txt": rng.normal(size=(8, 6)), "w": rng.normal(size=(5, 6)),
            "b": rng.normal(size=(5,)), "log_scale": np.array(math.log(10.0)), "bias": np.array(-2.0)}


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    inp, out = tmp / "in.npz", tmp / "out.npz"
    np.savez(inp, **_inputs())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(SCRIPT), str(inp), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return dict(np.load(out))


@pytest.mark.parametrize("case", list(_script_module().CASES))
def test_distributed_matches_single_process(dist_results, case):
    mod = _script_module()
    kind, local_loss, sizes = mod.CASES[case]
    inp = _inputs()
    ref = mod.forward_backward(kind, local_loss, inp["x_img"], inp["x_txt"], inp)  # one process, global batch
    got = {k.split("/", 1)[1]: v for k, v in dist_results.items() if k.startswith(case + "/")}
    # The mean over ranks of the per-rank loss is the global loss (what DDP optimises and what to log).
    np.testing.assert_allclose(got["loss_mean"], ref["loss"], atol=ATOL, rtol=0)
    if sizes[0] == sizes[1] and local_loss:
        assert not np.allclose(got["loss_per_rank"][0], got["loss_per_rank"][1])  # truly local values
    # Parameter grads averaged over ranks (DDP/DeepSpeed) equal the single-process ones.
    for k in [k for k in ref if k.startswith("g_") and k not in ("g_img", "g_txt")]:
        np.testing.assert_allclose(got[k], ref[k], atol=ATOL, rtol=0, err_msg=f"{case} {k}")
    # Feature/input grads: each rank holds W x the global gradient of its rows (gather_with_grad sums all
    # ranks' contributions; the engine's 1/W average then gives the exact parameter gradient above).
    for k in ("g_img", "g_txt"):
        np.testing.assert_allclose(got[k] / WORLD, ref[k], atol=ATOL, rtol=0, err_msg=f"{case} {k}")


def test_single_process_clip_loss_matches_reference():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    logits = scale * img @ txt.t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6)))
    torch.testing.assert_close(ClipLoss()(img, txt, scale), ref)
    torch.testing.assert_close(ClipLoss(local_loss=False)(img, txt, scale), ref)
    # bf16 features are upcast: the loss comes back in fp32
    assert ClipLoss()(img.bfloat16(), txt.bfloat16(), scale.bfloat16()).dtype == torch.float32


def test_single_process_siglip_matches_reference():
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    logits = t * img @ txt.t() + b
    z = 2 * torch.eye(5) - 1
    ref = -F.logsigmoid(z * logits).sum() / 5
    torch.testing.assert_close(SigLipLoss()(img, txt, t, b), ref)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, txt, t)
