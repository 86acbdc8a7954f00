"""The one training loop shared by stage 1 and stage 2.

A task supplies the module to train, its parameter groups, a resumable batch iterator, the loss,
an evaluation and the final export; the engine owns DeepSpeed, the lr schedule, the finite checks,
checkpoint cadence and resume, preemption, and logging. One step, top to bottom, is `train_step`;
`build_engine` + `train_step` are public so benches and acceptance checks time exactly the trainer's step.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from llm2clip import checkpoint as C
from llm2clip import distributed as D
from llm2clip.config import atomic_write_text, config_to_dict, save_config
# the DeepSpeed JSON side lives in ds_config.py; re-exported here for the tasks
from llm2clip.ds_config import (build_ds_config, ensure_deepspeed_comm, read_ds_json,  # noqa: F401
                                resolve_ds_config_path, resolve_precision)
from llm2clip.logger import (MetricLogger, loader_cpu_metrics, peak_memory_gib, progress, rank_cores,
                             setup_logging)
from llm2clip.schema import OptimConfig, RunConfig, TrainConfig

class TrainTask(Protocol):
    name: str

    def module(self) -> nn.Module: ...
    def param_groups(self, module: nn.Module) -> list[dict]: ...
    def batches(self, data_state: dict | None) -> Iterator[Any]: ...  # yields batches; .state_dict() after each
    def data_state(self) -> dict: ...
    def loss(self, engine, batch) -> tuple[torch.Tensor, dict[str, float], int]: ...  # (loss, metrics, n tokens/items)
    def evaluate(self, engine, step: int) -> dict[str, float]: ...
    def after_optimizer_step(self, module: nn.Module) -> None: ...
    def export(self, engine, out_dir: Path) -> None: ...
    # Optional: this rank's cumulative counters ({"data/corrupt_images": 3, ...}, summed over its loader
    # workers); the engine sums them over ranks once per log step.
    # def counters(self) -> dict[str, float]: ...
    # Optional: this rank's cumulative CPU seconds spent making batches outside the training thread (sum of
    # its DataLoader workers' process CPU time, or a helper thread's own time.thread_time()); loading in the
    # training thread counts 0 (it is in the step time and data_wait). Logged as perf/loader_* per window.
    # def loader_cpu_s(self) -> float: ...
    # Optional: the sample keys of a batch, named when its loss is non-finite (default: batch["keys"]).
    # def batch_keys(self, batch) -> list[str]: ...


class NonFiniteError(RuntimeError):
    pass


_KEYS_NAMED = 5  # sample keys named per rank when a step is non-finite


@dataclass
class NonFiniteStep:
    """A step whose loss or gradient was non-finite and that DeepSpeed discarded (on_nonfinite=skip)."""
    message: str
    n_tok: int
    n_items: int
    wait: float


def _nonfinite_inputs(batch) -> list[str]:
    """Names of the floating-point tensors in a batch (dict values or tuple items) holding nan/inf.
    Only called once a loss was non-finite, so its cost does not matter."""
    items = batch.items() if isinstance(batch, dict) else enumerate(batch if isinstance(batch, (list, tuple)) else [])
    return [str(k) for k, v in items if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def lr_multiplier(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Warmup (linear from 0) then cosine/linear decay to min_lr_ratio, or constant."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(1, max_steps - optim.warmup_steps)
    t = min(1.0, (step - optim.warmup_steps) / span)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if optim.schedule == "cosine" else 1.0 - t
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay


class _PreemptFlag:
    """SIGUSR1/SIGTERM set a flag; the loop checkpoints at the next step boundary and exits 42."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handle(self, signum, frame):
        self.flag = True


class Trainer:
    def __init__(self, run: RunConfig, train: TrainConfig, optim: OptimConfig, task: TrainTask, full_config: Any):
        self.run_cfg, self.train_cfg, self.optim_cfg, self.task = run, train, optim, task
        self.full_config = full_config
        self.stop_after = train.stop_after
        self.log = setup_logging()
        self.out = Path(run.output_dir)
        self.skipped_steps = 0  # optimizer steps discarded for a non-finite loss/gradient (on_nonfinite=skip)

    def build_engine(self):
        """(DeepSpeed engine, its config dict) for the task's module, optimizer and lr schedule."""
        import deepspeed

        module = self.task.module()
        groups = self.task.param_groups(module)
        for g in groups:
            # a group's own lr (already scaled) wins; else the base lr times its optional lr_scale
            scale = g.pop("lr_scale", 1.0)
            g.setdefault("lr", self.optim_cfg.lr * scale)
        opt = torch.optim.AdamW(groups, lr=self.optim_cfg.lr, betas=tuple(self.optim_cfg.betas),
                                eps=self.optim_cfg.eps, weight_decay=self.optim_cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_multiplier(s, self.optim_cfg, self.train_cfg.max_steps))
        ds_cfg = build_ds_config(self.train_cfg, self.optim_cfg, D.get_world_size())
        ensure_deepspeed_comm()
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_cfg)
        C.install_safe_loader(engine)
        return engine, ds_cfg

    def run(self) -> dict[str, Any]:
        torch.manual_seed(self.run_cfg.seed + D.get_rank())
        if self.run_cfg.deterministic:
            # bit-reproducible kernels (cuBLAS needs a fixed workspace); an op without a deterministic
            # implementation then raises instead of silently differing between runs
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if D.get_rank() == 0:
            save_config(self.full_config, self.out / "config.yaml")
            self._log_memory_plan()
        engine, ds_cfg = self.build_engine()
        if D.get_rank() == 0:
            atomic_write_text(self.out / "deepspeed_config.json", json.dumps(ds_cfg, indent=1))
        step, samples_seen, data_state = 0, 0, None
        ckpt = C.resolve_resume(self.run_cfg.resume, str(self.out))
        if ckpt is not None:
            engine.load_checkpoint(str(ckpt / "engine"), tag="ds", load_module_strict=False)
            st = C.read_trainer_state(ckpt)
            step, samples_seen = st["step"], st["samples_seen"]
            self.skipped_steps = st.get("skipped_steps", 0)
            data_state = C.load_rank_state(ckpt, D.get_rank())
            self.log.info(f"resumed from {ckpt} at step {step}")
        # rows logged after the checkpoint by the interrupted run are replayed now: the logger drops them
        metrics = MetricLogger(str(self.out), self.run_cfg.tensorboard, resume_step=step)
        preempt = _PreemptFlag()
        batches = self.task.batches(data_state or None)
        self._loader_window(step)
        summary: dict[str, Any] = {}
        if step == 0 and self.train_cfg.eval_every > 0:
            ev = self.task.evaluate(engine, 0)
            metrics.log(0, ev)
            summary["eval_start"] = ev
            self.log.info(f"eval @0: {_fmt(ev)}")
        end = self.train_cfg.max_steps if self.stop_after is None else min(self.stop_after, self.train_cfg.max_steps)
        bar = progress(end, step, self.task.name, self.run_cfg.progress_bar)
        t_last, tok_acc, item_acc, wait_acc = time.perf_counter(), 0, 0, 0.0
        loss_val, m, consecutive = float("nan"), {}, 0
        while step < end:
            out = self.train_step(engine, batches, step + 1)
            step += 1
            if isinstance(out, NonFiniteStep):
                consecutive += 1
                self.skipped_steps += 1
                out = self._skipped(out, consecutive)
            else:
                consecutive = 0
            step_loss, step_m, n_tok, n_items, wait = out
            if step_m is not None:  # a skipped step keeps the last applied step's loss for the log
                loss_val, m = step_loss, step_m
            samples_seen += n_items * D.get_world_size()
            tok_acc += n_tok
            item_acc += n_items
            wait_acc += wait
            bar.update(1)
            if step % self.run_cfg.log_every == 0 or step == end:
                dt = time.perf_counter() - t_last
                gn = engine.get_global_grad_norm()
                loss_val = float(D.all_reduce_sum(torch.tensor([loss_val], device=D.collective_device()))) \
                    / D.get_world_size()  # the mean of the ranks' local losses is the global loss
                row = {"train/loss": loss_val, "train/lr": engine.get_lr()[0],
                       "train/grad_norm": float(gn) if gn is not None else float("nan"),
                       "perf/tokens_per_s": tok_acc * D.get_world_size() / dt,
                       "perf/items_per_s": item_acc * D.get_world_size() / dt,
                       "perf/data_wait_frac": wait_acc / dt, "perf/peak_mem_gib": peak_memory_gib(),
                       "train/skipped_steps": self.skipped_steps,
                       **{f"train/{k}": v for k, v in m.items()}, **self._counters(),
                       **self._loader_row(step, dt)}
                metrics.log(step, row)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{row['train/lr']:.2e}")
                t_last, tok_acc, item_acc, wait_acc = time.perf_counter(), 0, 0, 0.0
            if self.train_cfg.eval_every > 0 and step % self.train_cfg.eval_every == 0 and step != end:
                ev = self.task.evaluate(engine, step)
                metrics.log(step, ev)
                self.log.info(f"eval @{step}: {_fmt(ev)}")
            stop_now = D.all_reduce_max(1.0 if preempt.flag else 0.0) > 0
            if stop_now or (self.train_cfg.save_every > 0 and step % self.train_cfg.save_every == 0) or step == end:
                self._save(engine, step, samples_seen)
            if stop_now:
                bar.close()
                metrics.close()
                self.log.warning(f"preemption signal: checkpointed at step {step}, exiting {D.REQUEUE_EXIT_CODE} "
                                 "for requeue")
                raise SystemExit(D.REQUEUE_EXIT_CODE)
        bar.close()
        if step >= self.train_cfg.max_steps:
            ev = self.task.evaluate(engine, step) if self.train_cfg.eval_every >= 0 else {}
            metrics.log(step, ev)
            summary["eval_end"] = ev
            self.log.info(f"eval @{step} (final): {_fmt(ev)}")
            self.task.export(engine, self.out / "export")
        metrics.close()
        summary["step"] = step
        if D.get_rank() == 0:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        return summary

    def _log_memory_plan(self) -> None:
        """Rank 0 logs the task's memory plan (llm2clip/memory_plan.py) before the model loads, and warns
        when it will not fit this device. The plan informs; a failure to make one never stops the run."""
        fn = getattr(self.task, "memory_plan", None)
        if fn is None:
            return
        from llm2clip.memory_plan import device_memory_gib, log_plan

        try:
            plan = fn(D.get_world_size(), device_memory_gib())
        except Exception as e:  # noqa: BLE001
            self.log.warning(f"memory plan unavailable ({type(e).__name__}: {e})")
            return
        log_plan(plan, self.log)

    def _counters(self) -> dict[str, float]:
        """The task's counters summed over ranks (collective: every rank calls it at the same step)."""
        fn = getattr(self.task, "counters", None)
        return D.sum_counters(fn()) if fn else {}

    def _loader_window(self, step: int) -> None:
        """Start the loader-CPU accounting (tasks with `loader_cpu_s`; collective: rank_cores gathers)."""
        has = getattr(self.task, "loader_cpu_s", None) is not None
        self._lw = {"cpu": float(self.task.loader_cpu_s()), "step": step, "cores": rank_cores(), "warned": 0.0,
                    "windows": 0} if has else None

    def _loader_row(self, step: int, dt: float) -> dict[str, float]:
        """perf/loader_* of the log window ending at `step`. Rank 0 warns when the loader keeps more cores
        busy than the rank can spare: not in the first window (worker start-up), then once, and again only
        when it grows 1.25x over the last warning's figure."""
        w = self._lw
        if w is None:
            return {}
        cpu = float(self.task.loader_cpu_s())
        row, msg = loader_cpu_metrics(cpu - w["cpu"], step - w["step"], dt, w["cores"], w["warned"])
        w.update(cpu=cpu, step=step, windows=w["windows"] + 1)
        if msg and w["windows"] > 1 and D.get_rank() == 0:
            self.log.warning(f"step {step}: {msg}")
            w["warned"] = row["perf/loader_cores"]
        return row

    def train_step(self, engine, batches, step: int):
        """grad_accum micro-batches, finite checks, one optimizer step. Returns (loss, metrics, tokens,
        items, wait s), or a NonFiniteStep when the step was discarded (train.on_nonfinite=skip)."""
        tot_loss, n_tok, n_items, wait = 0.0, 0, 0, 0.0
        agg: dict[str, float] = {}
        keys: list[str] = []  # this rank's samples in this step, named if the step goes wrong
        bad: str | None = None
        for _ in range(self.train_cfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            keys += self._batch_keys(batch)
            loss, m, ntok = self.task.loss(engine, batch)
            # every rank must agree, or the healthy ones would wait forever in the next collective
            finite = bool(torch.isfinite(loss.detach()).all())
            if bad is None and D.all_reduce_max(0.0 if finite else 1.0) > 0:
                bad = self._culprits(step, "loss", keys, _nonfinite_inputs(batch), loss, finite)
                if self.train_cfg.on_nonfinite == "fail":
                    raise NonFiniteError(f"{bad}. No step was taken. Lower optim.lr, check those samples, or set "
                                         "train.on_nonfinite=skip to pass over such steps")
            if bad is not None:
                # NaN gradients on every rank for the rest of this step: DeepSpeed's overflow check (ZeRO 1/2,
                # see build_ds_config) then discards the whole step on all ranks together, grads zeroed
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()
            n_items += int(m.pop("n_items", 0))
            n_tok += ntok
            if bad is None:
                tot_loss += float(loss.detach()) / self.train_cfg.grad_accum
                for k, v in m.items():
                    agg[k] = agg.get(k, 0.0) + v / self.train_cfg.grad_accum
        gn = engine.get_global_grad_norm()
        grad_bad = (gn is not None and not math.isfinite(float(gn))) or not engine.was_step_applied()
        if bad is None and grad_bad:  # finite losses everywhere, yet the gradient is not
            bad = self._culprits(step, "gradient", keys, [], None, True)
            if self.train_cfg.on_nonfinite == "fail":
                raise NonFiniteError(f"{bad}. Lower optim.lr or optim.grad_clip, check those samples, or set "
                                     "train.on_nonfinite=skip to pass over such steps")
        if bad is not None:
            if engine.was_step_applied():
                raise NonFiniteError(f"{bad}; DeepSpeed applied the step anyway, so the weights are no longer "
                                     "finite (train.on_nonfinite=skip needs ZeRO stage 1 or 2)")
            return NonFiniteStep(bad, n_tok, n_items, wait)
        self.task.after_optimizer_step(engine.module)
        return tot_loss, agg, n_tok, n_items, wait

    def _batch_keys(self, batch) -> list[str]:
        fn = getattr(self.task, "batch_keys", None)
        if fn is not None:
            return [str(k) for k in fn(batch)]
        return [str(k) for k in batch.get("keys", [])] if isinstance(batch, dict) else []

    def _culprits(self, step: int, what: str, keys: list[str], bad_inputs: list[str], loss, finite: bool) -> str:
        """One message naming the step, the ranks whose local loss or inputs were non-finite and their first
        sample keys (every rank's keys when no rank stands out). Collective: every rank calls it."""
        mine = {"rank": D.get_rank(), "loss": None if loss is None else float(loss.detach().float().mean()),
                "finite": finite, "inputs": bad_inputs, "keys": keys[:_KEYS_NAMED], "n_keys": len(keys)}
        infos = D.all_gather_object(mine)
        culprits = [i for i in infos if not i["finite"] or i["inputs"]] or infos

        def one(i: dict) -> str:
            parts = [f"local loss {i['loss']}"] if i["loss"] is not None else []
            if i["inputs"]:
                parts.append(f"non-finite inputs: {', '.join(i['inputs'])}")
            more = f" (+{i['n_keys'] - len(i['keys'])} more)" if i["n_keys"] > len(i["keys"]) else ""
            parts.append(f"first sample keys: {', '.join(i['keys']) or '(batches carry no keys)'}{more}")
            return f"rank {i['rank']} ({'; '.join(parts)})"

        others = len(infos) - len(culprits)
        tail = f"; the other {others} rank(s) were finite" if others and what == "loss" else ""
        head = "" if what == "loss" else " (every rank's loss was finite)"
        return f"non-finite {what} at step {step}{head}: " + ", ".join(one(i) for i in culprits) + tail

    def _skipped(self, s: "NonFiniteStep", consecutive: int) -> tuple:
        limit = self.train_cfg.max_consecutive_skips
        if consecutive > limit:
            raise NonFiniteError(f"{s.message}. That is {consecutive} non-finite steps in a row (train."
                                 f"max_consecutive_skips={limit}); lower optim.lr or check the data")
        if D.get_rank() == 0:  # the message is the same on every rank
            self.log.warning(f"skipped (train.on_nonfinite=skip, {consecutive} in a row, {self.skipped_steps} in "
                             f"all): {s.message}")
        return 0.0, None, s.n_tok, s.n_items, s.wait

    def _save(self, engine, step: int, samples_seen: int) -> None:
        tmp = C.begin_save(str(self.out), step)
        # lean: frozen weights (the LLM base under LoRA, frozen tower blocks) are rebuilt from the model folder
        # at resume, so only trainable params + optimizer/scheduler state are written (load is non-strict)
        engine.save_checkpoint(str(tmp / "engine"), tag="ds", exclude_frozen_parameters=True)
        C.save_rank_state(tmp, D.get_rank(), self.task.data_state())
        state = {"step": step, "samples_seen": samples_seen, "world_size": D.get_world_size(),
                 "skipped_steps": self.skipped_steps,
                 "config": config_to_dict(self.full_config)}
        final = C.commit_save(tmp, state, self.train_cfg.keep_last)
        self.log.info(f"saved checkpoint {final}")


def run_training(cfg: Any, make_task, preflight=None) -> dict[str, Any]:
    """Initialise the process group, run the task's `preflight(cfg)` (every path checked before any model
    loads), take the run directory's lock, build the task (it may read data on every rank), train, and
    leave together: no rank exits while another still writes (gloo aborts at exit otherwise)."""
    D.init_distributed(single_process_group=True)
    setup_logging()
    if preflight is not None:
        preflight(cfg)
    lock = take_run_lock(cfg.run)
    try:
        summary = Trainer(cfg.run, cfg.train, cfg.optim, make_task(cfg), cfg).run()
    finally:
        if lock is not None:
            C.release_run_lock(lock)
    D.barrier()
    D.cleanup()
    return summary


def take_run_lock(run: RunConfig) -> Path | None:
    """Rank 0 takes `<output_dir>/run.lock` for the job (the directory is shared by all nodes); every rank
    raises the same RunDirLockedError when another live job holds it. Returns the lock path on rank 0."""
    got, err = None, None
    if D.get_rank() == 0:
        try:
            got = C.acquire_run_lock(run.output_dir, force=run.break_lock)
        except C.RunDirLockedError as e:
            err = str(e)
    err = D.broadcast_object(err)
    if err:
        raise C.RunDirLockedError(err)
    return got


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
