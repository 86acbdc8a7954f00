"""Run under torchrun: the shared engine with a toy task whose loss turns NaN on rank 1 at step 3."""
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from llm2clip import distributed as D
from llm2clip.engine import NonFiniteError, run_training
from llm2clip.schema import OptimConfig, RunConfig, TrainConfig


@dataclass
class Cfg:
    run: RunConfig
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=6, micro_batch_size=4, eval_every=0, save_every=0, deepspeed_config="ds_configs/zero1_bf16.json",
        precision="fp32"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=0))


class ToyTask:
    name = "toy"

    def module(self):
        torch.manual_seed(0)
        return nn.Linear(4, 1)

    def param_groups(self, m):
        return [{"params": list(m.parameters())}]

    def batches(self, state):
        while True:
            yield torch.randn(4, 4)

    def data_state(self):
        return {}

    def loss(self, engine, x):
        loss = engine(x).pow(2).mean()
        if D.get_rank() == 1 and engine.global_steps == 2:
            loss = loss * float("nan")
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
except NonFiniteError as e:
    print(f"rank {D.get_rank()}: NonFiniteError: {e}", flush=True)
    sys.exit(3)
