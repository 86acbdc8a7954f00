"""Loader CPU metrics (issue 16 item 3): the stage-2 loader's workers report their CPU time with their
batches, the task sums it (`loader_cpu_s`), the engine turns window deltas into perf/loader_* and warns
when the loader keeps more cores busy than the rank can spare."""
import io
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_shard


def _jpeg(rng, size=96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _stage2_task(tmp_path, workers: int, n_shards=2, per_shard=24):
    """A Stage2Task over generated caption shards (online mode reads captions, no sidecars), built
    without its model: `batches()` and `loader_cpu_s()` are the code under test."""
    from llm2clip.schema_stage2 import Stage2Config
    from llm2clip.tasks.stage2 import Stage2Task

    rng = np.random.default_rng(0)
    for s in range(n_shards):
        write_shard(tmp_path / f"shard-{s}.tar",
                    [(f"s{s}_{i:03d}", {"jpg": _jpeg(rng), "txt": f"caption {s} {i}"}) for i in range(per_shard)])
    cfg = Stage2Config()
    cfg.data.shards = f"{tmp_path}/shard-{{0..{n_shards - 1}}}.tar"
    cfg.data.original_fields, cfg.data.dense_fields, cfg.data.dense_ratio = ["txt"], [], 0.0
    cfg.data.num_workers, cfg.data.shuffle_buffer = workers, 8
    cfg.train.micro_batch_size = 4
    t = Stage2Task.__new__(Stage2Task)
    t.cfg, t.rank, t.world, t.online, t.sidecar_info = cfg, 0, 1, True, {}
    t.shard_sizes = [[per_shard] * n_shards]
    t.model = SimpleNamespace(tower=SimpleNamespace(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3))
    return t


def test_stage2_loader_cpu_sums_over_workers_and_grows(tmp_path):
    t = _stage2_task(tmp_path, workers=2)
    it = t.batches(None)
    first = [next(it) for _ in range(4)]
    cpu1, per_worker1 = t.loader_cpu_s(), dict(t.worker_cpu)
    assert set(per_worker1) == {0, 1}  # both worker processes reported
    assert cpu1 > 0 and cpu1 == pytest.approx(sum(per_worker1.values()))
    rest = [next(it) for _ in range(8)]
    cpu2 = t.loader_cpu_s()
    assert cpu2 > cpu1 and all(t.worker_cpu[w] > per_worker1[w] for w in (0, 1))
    assert all("_loader_cpu" not in b for b in first + rest)  # popped before the batch reaches the loss
    assert all(b["pixels"].shape == (4, 3, 64, 64) for b in first + rest)
    del it


def test_stage2_loader_cpu_is_zero_without_workers(tmp_path):
    """num_workers=0: loading runs in the training thread (already in the step time and data_wait)."""
    t = _stage2_task(tmp_path, workers=0)
    it = t.batches(None)
    b = next(it)
    assert t.loader_cpu_s() == 0.0 and "_loader_cpu" not in b


def test_loader_cpu_metrics_and_warning():
    from llm2clip.logger import loader_cpu_metrics

    row, msg = loader_cpu_metrics(cpu_s=3.0, steps=10, wall_s=2.0, cores=4.0)
    assert row == pytest.approx({"perf/loader_cpu_s_per_step": 0.3, "perf/loader_cores": 1.5,
                                 "perf/loader_core_frac": 0.375})
    assert msg is None  # 1.5 cores <= 3 spare
    row, msg = loader_cpu_metrics(cpu_s=7.0, steps=10, wall_s=2.0, cores=4.0)
    assert row["perf/loader_cores"] == pytest.approx(3.5) and msg is not None
    assert "3.50 cores" in msg and "spare 3" in msg and "data.num_workers" in msg and "\n" not in msg
    assert loader_cpu_metrics(7.0, 10, 2.0, 4.0, warned_cores=3.0)[1] is None  # not 1.25x worse
    assert loader_cpu_metrics(8.0, 10, 2.0, 4.0, warned_cores=3.0)[1] is not None  # 4 > 3.75
    assert loader_cpu_metrics(-1.0, 10, 2.0, 4.0)[0]["perf/loader_cores"] == 0.0  # restarted loader
    assert loader_cpu_metrics(0.05, 1, 1.0, 1.0)[1] is None  # one core: a trickle is not worth a warning


def test_cores_per_rank_shared_and_bound_masks():
    from llm2clip.logger import cores_per_rank

    node = list(range(16))
    torchrun = [("a", node)] * 4 + [("b", node)] * 4  # every local rank inherits the node's mask
    assert cores_per_rank(("a", node), torchrun) == 4.0
    bound = [("a", list(range(4 * r, 4 * r + 4))) for r in range(4)]  # srun --cpus-per-task=4, bound
    assert cores_per_rank(bound[1], bound) == 4.0
    assert cores_per_rank(("a", node), [("a", node)]) == 16.0


class _FakeTask:
    name = "fake"

    def __init__(self):
        self.cpu = 0.0

    def loader_cpu_s(self) -> float:
        return self.cpu


def test_engine_logs_loader_metrics_and_warns_rate_limited(tmp_path, caplog, monkeypatch):
    from llm2clip.engine import Trainer
    from llm2clip.schema import OptimConfig, RunConfig, TrainConfig

    task = _FakeTask()
    tr = Trainer(RunConfig(output_dir=str(tmp_path)), TrainConfig(), OptimConfig(), task, None)
    monkeypatch.setattr(logging.getLogger("llm2clip"), "propagate", True)  # setup_logging turned it off
    tr._loader_window(0)
    assert tr._lw["cores"] > 0  # this machine's, from the affinity mask
    tr._lw["cores"] = 2.0  # a 2-core rank: it can spare 1 core for loading
    rows, warned = [], []
    for step, cpu in ((10, 3.0), (20, 6.0), (30, 9.0), (40, 13.0), (50, 13.2)):  # 1 s windows
        task.cpu = cpu
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llm2clip"):
            rows.append(tr._loader_row(step, 1.0))
        warned.append([r.getMessage() for r in caplog.records if "CPU-bound" in r.getMessage()])
    assert rows[1] == pytest.approx({"perf/loader_cpu_s_per_step": 0.3, "perf/loader_cores": 3.0,
                                     "perf/loader_core_frac": 1.5})
    assert rows[4]["perf/loader_cores"] == pytest.approx(0.2)
    # window 1 (worker start-up) never warns; then once; again only when 1.25x worse (4 > 3.75 cores)
    assert [bool(w) for w in warned] == [False, True, False, True, False]
    assert warned[1][0].startswith("step 20: data loader is CPU-bound: its workers kept 3.00 cores busy")

    plain = Trainer(RunConfig(output_dir=str(tmp_path)), TrainConfig(), OptimConfig(), object(), None)
    plain._loader_window(0)
    assert plain._loader_row(10, 1.0) == {}  # a task without the hook logs no perf/loader_*
