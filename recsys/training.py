"""What recall and rank training share: threads, device and precision, data-parallel processes,
and when (and why) training stops.

Budgets are work, not time: a trainer runs at most ``max_epochs`` epochs and stops early when
validation has not improved for ``patience`` epochs; the wall-clock ``time_guard_s`` (hours) only
protects a shared host from a runaway run, and is logged as a warning when it fires. Every run
records what stopped it (:data:`STOP_REASONS`), epochs run, best epoch, seconds, threads, seed,
processes and device (:meth:`TrainingRun.record`), which the trainers put in their bundle
manifests.

Several processes (``torchrun --nproc_per_node N [--nnodes M ...]``) train as one
DistributedDataParallel job: :func:`init_distributed` reads torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) and joins
the process group (gloo on CPU, NCCL on GPU). Without those variables it is one process and no
process group. torch is imported inside the functions that need it: the stop bookkeeping is plain
Python.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EARLY_STOP = "early_stop"
MAX_EPOCHS = "max_epochs"
TIME_GUARD = "time_guard"
STOP_REASONS = (EARLY_STOP, MAX_EPOCHS, TIME_GUARD)
# Wall-clock guard of a training run: far beyond what early stopping needs on any log the defaults
# are meant for (Beauty stops in minutes; 3x Beauty well within an hour on 2 cores).
DEFAULT_TIME_GUARD_S = 6 * 3600.0
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


def quiet_exporter_logs() -> None:
    """The ONNX exporter and its optimiser log every graph pass at INFO: keep training, export and
    `make run` output readable (their warnings still show)."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_world_size() -> int:
    """Training processes on this host (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_threads() -> int:
    """Every core this process may use, shared evenly by the training processes on this host."""
    return max(1, available_cores() // local_world_size())


def resolve_threads(threads: int) -> int:
    """``threads`` when positive, else :func:`default_threads` (0 = use the machine)."""
    return threads if threads > 0 else default_threads()


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a (possibly single-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "" = no process group (one process)
    device: str = "cpu"  # "cpu" or "cuda:<local rank>"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The process that logs, exports and writes files."""
        return self.rank == 0

    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str, local_rank: int = 0) -> str:
    """``auto``: the GPU of this local rank when CUDA is available, else the CPU."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    if device == "cpu" or (device == "auto" and not cuda_available()):
        return "cpu"
    if not cuda_available():
        raise RuntimeError("device 'cuda' asked for but torch sees no CUDA device")
    import torch

    return f"cuda:{local_rank % max(1, torch.cuda.device_count())}"


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` > 1), else one process.

    Backend: NCCL when training on GPUs, gloo on CPU. Reuses a group that is already initialised
    (the ranker builds its held-out recall bundle inside the same job).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistributedContext(device=resolved)
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if resolved.startswith("cuda") else "gloo"
        if resolved.startswith("cuda"):
            torch.cuda.set_device(torch.device(resolved))
        dist.init_process_group(backend=backend)
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=dist.get_backend(),
        device=resolved,
    )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 matmuls pay."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers: absent in some builds, then assume no
        return False


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: bf16 on a GPU that supports it or a CPU with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    import torch

    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: str, precision: str) -> AbstractContextManager:
    """Mixed precision for a whole training step on a GPU (bf16 autocast); a no-op on the CPU,
    where the trainers cast only their largest matmul (small ones lose more to casts than they
    gain)."""
    if precision != "bf16" or not device.startswith("cuda"):
        return nullcontext()
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16)


# How torch's OpenMP threads wait between parallel regions (libgomp reads this once, when torch
# loads, so the trainer modules set it before importing torch, unless the environment already
# says). A CPU step opens hundreds of regions: sleeping at once (OMP_WAIT_POLICY=PASSIVE, spin 0)
# pays a futex wake-up for each (Beauty recall step ~45-50 ms on 2 idle cores), spinning for good
# (ACTIVE) starves the other processes of a busy host. A short spin (GOMP_SPINCOUNT 10,000, about
# 0.1 ms) then sleep: ~31 ms on an idle host; on a busy one the spinning threads lose their turn
# (~130 ms), which :class:`ThreadGovernor` sees and answers with fewer threads (docs/EXPERIMENTS.md).
TRAINING_OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}


def openmp_threads_spin() -> bool:
    """Whether this process's OpenMP threads spin between parallel regions (libgomp's reading of
    the environment: everything but ``OMP_WAIT_POLICY=PASSIVE`` without a ``GOMP_SPINCOUNT``)."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    spin = os.environ.get("GOMP_SPINCOUNT", "").strip()
    return policy != "PASSIVE" or spin not in ("", "0")


def run_queue_wait_seconds() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (the kernel's
    schedstat, summed over threads); None where the kernel does not report it."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as stats:
                total += int(stats.read().split()[1])
        except FileNotFoundError:  # a thread that ended while we read
            continue
        except (OSError, IndexError, ValueError):
            return None
    return total / 1e9


class ThreadGovernor:
    """Runs training steps on the configured intra-op threads while the host gives them their
    cores, and on fewer while other processes hold some.

    Every ``every`` steps (the first included) the next ``probe_steps`` run on all threads; if the
    process's threads waited on the run queue for more than ``max_wait_share`` of that time, the
    steps up to the next probe run on the share of the threads that did get a CPU (at least one).
    With threads that spin between parallel regions (:data:`TRAINING_OPENMP_ENV`, or ACTIVE) one
    thread of a pair waiting for a core holds the other back at every region, so a busy host is
    better served by fewer threads; threads that sleep at once (plain PASSIVE) lose little there,
    and the governor stays off for them. Results of a step depend slightly on the thread count (the
    order of sums), so a seed reproduces a run exactly only when no step was moved:
    :attr:`reduced_steps` counts those that were, and the bundle manifest records it."""

    def __init__(self, threads: int, probe_steps: int = 8, every: int = 200, max_wait_share: float = 0.15):
        self.threads = threads
        self.current = 0  # torch's count is set at the first probe (whatever it was before)
        self.probe_steps = probe_steps
        self.every = max(every, probe_steps + 1)
        self.max_wait_share = max_wait_share
        self.steps = 0
        self.reduced_steps = 0
        self.enabled = threads > 1 and openmp_threads_spin() and run_queue_wait_seconds() is not None
        self._probe: tuple[float, float] | None = None

    def run(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield each batch; the caller's step for it runs on the thread count chosen here."""
        for batch in batches:
            self._before_step()
            yield batch
            self._after_step()

    def _set(self, threads: int) -> None:
        import torch

        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads

    def _before_step(self) -> None:
        if self.enabled and self.steps % self.every == 0:
            self._set(self.threads)
            wait = run_queue_wait_seconds()
            self._probe = None if wait is None else (time.perf_counter(), wait)

    def _after_step(self) -> None:
        self.steps += 1
        if self.enabled and self.current < self.threads:
            self.reduced_steps += 1
        if self._probe is None or self.steps % self.every != self.probe_steps:
            return
        started, waited = self._probe
        self._probe = None
        wait = run_queue_wait_seconds()
        if wait is None:
            return
        share = (wait - waited) / max((time.perf_counter() - started) * self.threads, 1e-9)
        if share > self.max_wait_share:
            threads = max(1, int(self.threads * (1.0 - share)))
            if threads < self.threads:
                log.info(
                    "training threads waited %.0f%% of the time for a CPU: %d thread(s) until the next probe",
                    100.0 * share,
                    threads,
                )
            self._set(threads)

    def record(self) -> dict[str, int]:
        """Steps run, and how many of them on fewer threads than configured."""
        return {"steps": self.steps, "reduced_thread_steps": self.reduced_steps}


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads (``threads`` or, when 0, :func:`default_threads`) and keep large
    freed buffers for reuse (:func:`reuse_freed_memory`); returns the thread count."""
    import torch

    resolved = resolve_threads(threads)
    torch.set_num_threads(resolved)
    reuse_freed_memory()
    return resolved


# glibc serves allocations above its mmap threshold (at most 32 MiB when it adapts) with fresh
# pages and returns them on free: a step's [positions x catalog] logits (20-50 MB) then page-fault
# in on every allocation, a large share of a CPU step. Trainers raise the threshold so those
# buffers are reused from the heap, and keep freed memory up to twice that.
MMAP_THRESHOLD_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory() -> bool:
    """Keep large freed buffers for reuse (glibc ``mallopt``); False where that is unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)
    )


def adamw(parameters: Iterable[Any], learning_rate: float, weight_decay: float) -> Any:
    """AdamW over the parameters that train, with the fused kernel (one pass per step on CPU and
    GPU) where this torch has it."""
    import torch

    trainable = [p for p in parameters if p.requires_grad]
    try:
        return torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # a device or build without the fused kernel
        return torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)


def data_parallel(module: Any, context: DistributedContext) -> Any:
    """``module`` as DistributedDataParallel over the processes when there are several, else
    itself. Buffers are not re-broadcast each step: the trainers' buffers (item attributes,
    popularity) never change."""
    if not context.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.torch_device()] if context.device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


class WeightAverage:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.shadow = {k: v.detach().clone() for k, v in live.items()}
        # The optimizer and load_state_dict update these tensors in place: keep them, so that each
        # step is one fused lerp instead of rebuilding the state dict.
        self._live = list(live.values())
        self._averaged = list(self.shadow.values())

    def update(self) -> None:
        """One step of the average towards the model's current weights."""
        import torch

        with torch.no_grad():
            torch._foreach_lerp_(self._averaged, self._live, 1.0 - self.decay)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state with the averaged weights in place of the live ones."""
        return {k: self.shadow.get(k, v).clone() for k, v in model.state_dict().items()}


@contextmanager
def averaged_weights(model: torch.nn.Module, average: WeightAverage | None) -> Iterator[None]:
    """``model`` holds the averaged weights inside the block (validation, keeping the best) and its
    live ones again after it; nothing changes when ``average`` is None."""
    if average is None:
        yield
        return
    live_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(average.state_dict(model))
    try:
        yield
    finally:
        model.load_state_dict(live_state)


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """True on every rank when ``flag`` is true on any (so that all ranks stop together)."""
    if not context.distributed:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=context.torch_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def merge_metrics(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Metrics of the union of user sets from per-set means weighted by their ``users`` counts."""
    parts = [p for p in parts if p.get("users", 0) > 0]
    total = sum(int(p["users"]) for p in parts)
    if not total:
        raise ValueError("no users to evaluate")
    merged = {
        key: sum(float(p[key]) * int(p["users"]) for p in parts) / total for key in parts[0] if key != "users"
    }
    merged["users"] = total
    return merged


def gather_metrics(metrics: dict[str, float], context: DistributedContext) -> dict[str, float]:
    """Every rank's validation metrics over its share of users, merged (identical on all ranks)."""
    if not context.distributed:
        return metrics
    import torch.distributed as dist

    parts: list[Any] = [None] * context.world_size
    dist.all_gather_object(parts, metrics)
    return merge_metrics(parts)


def barrier(context: DistributedContext) -> None:
    if context.distributed:
        import torch.distributed as dist

        dist.barrier()


def main_first(context: DistributedContext, prepare: Any) -> Any:
    """``prepare()`` on the first process before the others (which then find what it wrote, e.g.
    generated synthetic data, instead of racing to write it too); returns its result."""
    if not context.is_main:
        barrier(context)
    result = prepare()
    if context.is_main:
        barrier(context)
    return result


def shard(global_batch: Sequence[int] | Any, context: DistributedContext) -> Any:
    """This rank's share of a global batch (interleaved, so length-sorted batches stay balanced)."""
    return global_batch[context.rank :: context.world_size] if context.distributed else global_batch


@dataclass
class TrainingRun:
    """Work budget and stop bookkeeping of one training run (epochs with early stopping).

    ``update(epoch, metric)`` after each validation returns whether it is the best so far;
    ``should_stop(epoch)`` says whether to stop after that epoch and records why.
    """

    max_epochs: int
    patience: int
    time_guard_s: float = DEFAULT_TIME_GUARD_S
    seed: int = 0
    threads: int = 1
    context: DistributedContext = field(default_factory=DistributedContext)
    precision: str = "fp32"
    started: float = field(default_factory=time.perf_counter)
    best_metric: float = float("-inf")
    best_epoch: int = 0
    epochs_run: int = 0
    stop_reason: str = MAX_EPOCHS
    # Steps on fewer threads while the host is busy (CPU training; see ThreadGovernor).
    governor: ThreadGovernor = field(init=False)

    def __post_init__(self) -> None:
        self.governor = ThreadGovernor(self.threads if self.context.device == "cpu" else 1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def update(self, epoch: int, metric: float) -> bool:
        """Record the validation ``metric`` of ``epoch``; True when it is the best so far."""
        self.epochs_run = epoch
        if metric > self.best_metric:
            self.best_metric, self.best_epoch = metric, epoch
            return True
        return False

    def should_stop(self, epoch: int) -> bool:
        """Whether to stop after ``epoch``: patience exhausted, budget spent, or the guard fired
        (agreed across ranks, so that every process stops after the same epoch)."""
        if epoch - self.best_epoch >= self.patience:
            self.stop_reason = EARLY_STOP
            log.info(
                "early stop: no validation gain for %d epochs (best epoch %d)", self.patience, self.best_epoch
            )
            return True
        if any_rank(self.elapsed() > self.time_guard_s, self.context):
            self.stop_reason = TIME_GUARD
            log.warning(
                "TIME GUARD: training stopped by the %.1f h wall-clock guard after epoch %d with validation "
                "still improving %d epoch(s) ago: the model may be undertrained (raise time_guard_s)",
                self.time_guard_s / 3600.0,
                epoch,
                epoch - self.best_epoch,
            )
            return True
        if epoch >= self.max_epochs:
            self.stop_reason = MAX_EPOCHS
            log.warning(
                "reached max_epochs=%d with the best epoch %d: validation may still be improving",
                self.max_epochs,
                self.best_epoch,
            )
            return True
        return False

    def record(self, **extra: Any) -> dict[str, Any]:
        """What the bundle manifest and the eval JSON record about this run."""
        return {
            "stop_reason": self.stop_reason,
            "epochs_run": self.epochs_run,
            "best_epoch": self.best_epoch,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "time_guard_s": self.time_guard_s,
            "train_seconds": round(self.elapsed(), 1),
            "threads": self.threads,
            "processes": self.context.world_size,
            "device": self.context.device.split(":")[0],
            "precision": self.precision,
            "seed": self.seed,
            **self.governor.record(),
            **extra,
        }
