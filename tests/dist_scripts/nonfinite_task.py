"""Run under torchrun: the shared engine with a toy task whose input (so its loss) turns NaN on rank 1.

argv: run_dir mode, where mode is
  fail         NaN at step 3 only; train.on_nonfinite=fail (the default)
  skip         NaN at step 3, and at step 5 finite inputs and losses but a NaN gradient on rank 1;
               on_nonfinite=skip: steps 3 and 5 are discarded, training goes on
  skip_always  NaN from step 3 on; on_nonfinite=skip with max_consecutive_skips=2: fails at step 5
Each rank prints the weights it saw before every step ("weights <step> <values>") and its counters go
through the engine's per-log-step sum (rank r counts r + 1 per batch).
"""
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from llm2clip import distributed as D
from llm2clip.engine import NonFiniteError, run_training
from llm2clip.schema import OptimConfig, RunConfig, TrainConfig

MODE = sys.argv[2] if len(sys.argv) > 2 else "fail"


@dataclass
class Cfg:
    run: RunConfig
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=7, micro_batch_size=4, eval_every=0, save_every=0, deepspeed_config="ds_configs/zero1_bf16.json",
        precision="fp32", on_nonfinite="fail" if MODE == "fail" else "skip", max_consecutive_skips=2))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=0))


class ToyTask:
    name = "toy"

    def __init__(self):
        self.calls = 0

    def module(self):
        torch.manual_seed(0)
        return nn.Linear(4, 1)

    def param_groups(self, m):
        return [{"params": list(m.parameters())}]

    def batches(self, state):
        g = torch.Generator().manual_seed(D.get_rank())
        i = 0
        while True:
            i += 1
            x = torch.randn(4, 4, generator=g)
            step = i  # grad_accum=1: batch i is step i
            if D.get_rank() == 1 and (step == 3 or (MODE == "skip_always" and step >= 3)):
                x[0, 0] = float("nan")
            yield {"x": x, "keys": [f"r{D.get_rank()}-b{i}-{j}" for j in range(4)]}

    def data_state(self):
        return {}

    def counters(self):
        return {"data/toy_count": self.calls * (D.get_rank() + 1)}

    def loss(self, engine, batch):
        self.calls += 1
        w = engine.module.weight.detach().flatten().tolist()
        print(f"rank {D.get_rank()}: weights {self.calls} {w}", flush=True)
        y = engine(batch["x"])
        loss = y.pow(2).mean()
        if MODE == "skip" and D.get_rank() == 1 and self.calls == 5:
            loss = loss + torch.sqrt(y.sum() * 0.0)  # adds 0 to the loss, NaN (inf * 0) to the gradient
        return loss, {"n_items": 4}, 4

    def evaluate(self, engine, step):
        return {}

    def after_optimizer_step(self, m):
        pass

    def export(self, engine, out):
        pass


try:
    run_training(Cfg(RunConfig(output_dir=sys.argv[1], tensorboard=False, progress_bar=False, log_every=1)),
                 lambda cfg: ToyTask())
    print(f"rank {D.get_rank()}: finished", flush=True)
except NonFiniteError as e:
    print(f"rank {D.get_rank()}: NonFiniteError: {e}", flush=True)
    sys.exit(3)
