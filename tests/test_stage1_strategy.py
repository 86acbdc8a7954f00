"""train.strategy for stage 1: zero3 (base partitioned) and replicated (base whole, LoRA under ZeRO-2) give
the same losses on the same data (fp32, 2 processes); auto picks and logs; contradictions are errors."""
import pytest

from tests.helpers import read_metrics, torchrun
from tests.test_stage1_train import TRAIN, stage1_args


@pytest.mark.slow
def test_replicated_and_zero3_same_losses(tiny_world, tmp_path):
    common = ["--set", "train.max_steps=4", "--set", "train.eval_every=0", "--set", "train.save_every=0",
              "--set", "data.val_path=", "--set", "train.micro_batch_size=16", "--set", "train.precision=fp32",
              "--set", "lora.dropout=0.0"]
    losses, logs = {}, {}
    for strategy in ("zero3", "replicated", "auto"):
        out = tmp_path / strategy
        p = torchrun(TRAIN, stage1_args(tiny_world, out, *common, "--set", f"train.strategy={strategy}"), timeout=300)
        logs[strategy] = p.stdout + p.stderr
        losses[strategy] = [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]
    assert len(losses["zero3"]) == 4
    for a, b in zip(losses["zero3"], losses["replicated"]):
        assert abs(a - b) < 1e-5, (losses["zero3"], losses["replicated"])
    assert "ZeRO-3: train.strategy=zero3" in logs["zero3"]
    assert "ZeRO-2: train.strategy=replicated" in logs["replicated"]
    # the tiny model fits anywhere: auto takes the replicated base, says why, and logs the plan
    assert "ZeRO-2: train.strategy=auto: replicated base fits" in logs["auto"]
    assert "memory plan: stage1" in logs["auto"]
    assert losses["auto"] == pytest.approx(losses["replicated"], abs=1e-6)


def test_strategy_bad_input():
    from llm2clip.config import ConfigError, load_config
    from llm2clip.schema import Stage1Config

    base = ["text.model_path=x", "data.sources=[{path: x.tar}]"]
    with pytest.raises(ConfigError, match=r"train\.strategy.*not one of"):
        load_config(Stage1Config, None, base + ["train.strategy=zero2"])
    with pytest.raises(ConfigError, match=r"train\.strategy=replicated contradicts train\.zero_stage=3"):
        load_config(Stage1Config, None, base + ["train.strategy=replicated", "train.zero_stage=3"])
