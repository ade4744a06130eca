"""Data-parallel runs on torch.distributed (torchrun, ``--nproc``): one small wrapper.

Under ``torchrun --nproc-per-node N`` (or ``--nproc N``, which re-launches the command
through :mod:`torch.distributed.run`) every process runs the same command; the
data-driven stages split their work by rank and combine it with collectives, rank 0
alone measures and writes. This module is the only place that talks to
:mod:`torch.distributed`:

- :func:`session` initialises the process group from torchrun's environment (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when the torch
  side runs on CUDA (each process on the GPU of its ``LOCAL_RANK``), gloo on the CPU,
  with a timeout (``ONNXPRUNE_DIST_TIMEOUT`` seconds, default 1800) so that no process
  waits forever in a collective, and destroys it at the end.
- :func:`current` gives the :class:`DistContext` of the running process: rank, world
  size, and the collectives the stages use (sum all-reduce of tensors / arrays /
  numbers, broadcast of a picklable object from rank 0, barrier). Outside a process
  group it is :data:`LOCAL` (world 1): every helper returns its input unchanged, no
  process group is created and torch is not imported.
- :meth:`DistContext.on_main`: a function (a latency measurement, the held-out figure)
  evaluated by rank 0 alone, its result broadcast, so every rank takes the same decision.
  Inside it, and inside :func:`local`, :func:`current` is :data:`LOCAL`.

A collective that fails (another process died, or the timeout passed) raises
:class:`~onnxprune.errors.DistributedError` with one line naming the rank and the
collective, never a deep traceback.

Test hook (not a user option): ``ONNXPRUNE_FAIL_AT=<stage>:<rank>`` makes
:func:`fault_point` raise on that rank at that stage (``score``: after a criterion
scored; ``finetune``: at a fine-tuning step), to test that a failing rank stops them all.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from onnxprune.errors import DistributedError, OnnxPruneError, first_line

__all__ = ["ENV_FAIL_AT", "ENV_TIMEOUT", "LOCAL", "DistContext", "current", "fault_point", "launched_by_torchrun",
           "local", "relaunch", "session"]

#: environment variable: seconds a collective may wait for the other processes
ENV_TIMEOUT = "ONNXPRUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
#: environment variable of the test hook (:func:`fault_point`)
ENV_FAIL_AT = "ONNXPRUNE_FAIL_AT"
#: what torchrun sets in every worker's environment
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


class _Failed:
    """What rank 0 broadcasts instead of a result when its function raised."""

    def __init__(self, message: str) -> None:
        self.message = message


@dataclass(frozen=True)
class DistContext:
    """The running process's place in a data-parallel run.

    Attributes:
        rank: this process's rank, 0 <= rank < world.
        world: number of processes (1: no process group, every collective is a no-op).
        local_rank: rank on this machine (torchrun's ``LOCAL_RANK``): the CUDA device index.
        backend: ``"gloo"``, ``"nccl"`` or None (world 1).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0: the process that measures, decides and writes."""
        return self.rank == 0

    @property
    def comm_device(self) -> str:
        """Where collective buffers live: ``cuda:<local_rank>`` for NCCL, else ``cpu``."""
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"

    # ---- collectives ---------------------------------------------------------------------
    def all_reduce_sum(self, value: T) -> T:
        """The sum of ``value`` over all ranks, of the same type, shape, dtype and device.

        Args:
            value: a torch tensor, a numpy array (float or integer) or a Python number;
                every rank passes the same type and shape.

        Returns:
            A new tensor / array / number (``value`` itself at world 1).

        Raises:
            DistributedError: the collective failed (another process stopped or timed out).
        """
        if self.world == 1:
            return value
        import torch

        if isinstance(value, torch.Tensor):
            buf = value.detach().to(self.comm_device, copy=True).contiguous()
            self._collective("all_reduce", lambda d: d.all_reduce(buf))
            return buf.to(value.device)
        if isinstance(value, np.ndarray):
            buf = torch.from_numpy(np.array(value, copy=True)).to(self.comm_device)
            self._collective("all_reduce", lambda d: d.all_reduce(buf))
            return buf.cpu().numpy().astype(value.dtype, copy=False)
        if isinstance(value, (int, float, np.number)):
            kind = torch.int64 if isinstance(value, (int, np.integer)) else torch.float64
            buf = torch.tensor([value], dtype=kind, device=self.comm_device)
            self._collective("all_reduce", lambda d: d.all_reduce(buf))
            return type(value)(buf.item())
        raise TypeError(f"all_reduce_sum takes a tensor, an array or a number, got {type(value).__name__}")

    def all_reduce_sum_async(self, value: float) -> Callable[[], float]:
        """Start the sum of a number over all ranks; the returned function waits for it.

        For a figure needed a little later (a step's loss, checked after the optimizer
        step), so the collective overlaps the work in between. Every rank must start its
        collectives in the same order. At world 1 the function returns ``value``.

        Raises (from the returned function):
            DistributedError: the collective failed.
        """
        if self.world == 1:
            return lambda: value
        import torch

        buf = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        work = []
        self._collective("all_reduce", lambda d: work.append(d.all_reduce(buf, async_op=True)))

        def wait() -> float:
            self._collective("all_reduce", lambda d: work[0].wait())
            return float(buf.item())

        return wait

    def broadcast(self, obj: T, src: int = 0) -> T:
        """Rank ``src``'s ``obj`` (any picklable object) on every rank; ``obj`` at world 1.

        Raises:
            DistributedError: the collective failed.
        """
        if self.world == 1:
            return obj
        box = [obj if self.rank == src else None]
        self._collective("broadcast", lambda d: d.broadcast_object_list(box, src=src, device=self._obj_device()))
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank got here (a one-element all-reduce: no device guessing).

        Raises:
            DistributedError: the collective failed (a rank stopped before reaching it).
        """
        if self.world > 1:
            self.all_reduce_sum(np.zeros(1, dtype=np.int64))

    def on_main(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` evaluated on rank 0 only (inside :func:`local`), its result broadcast.

        Every rank calls the returned function with the same arguments at the same point;
        ranks other than 0 do not evaluate ``fn``. An exception on rank 0 is raised there
        and, as a DistributedError naming it, on every other rank. At world 1 (or inside
        another ``on_main`` / :func:`local`) the call is ``fn`` itself.
        """
        def wrapped(*args, **kwargs):
            ctx = current()
            if ctx.world == 1:
                return fn(*args, **kwargs)
            if ctx.is_main:
                try:
                    with local():
                        result = fn(*args, **kwargs)
                except BaseException as e:
                    ctx.broadcast(_Failed(f"{type(e).__name__}: {first_line(e)}"))
                    raise
                return ctx.broadcast(result)
            result = ctx.broadcast(None)
            if isinstance(result, _Failed):
                raise DistributedError(f"rank {ctx.rank} of {ctx.world}: rank 0 failed ({result.message})")
            return result

        wrapped.__wrapped__ = fn
        return wrapped

    @contextlib.contextmanager
    def collectives(self, what: str) -> Iterator[None]:
        """Within the block, a collective that torch runs itself (DDP's gradient all-reduce
        inside ``backward``, its parameter check at construction) and that fails raises
        DistributedError naming ``what``; other errors pass unchanged."""
        try:
            yield
        except Exception as e:
            if self.world > 1 and _is_comm_error(e):
                raise DistributedError(self._failure(what, e)) from None
            raise

    # ---- how work is split ---------------------------------------------------------------
    def split(self, idx: np.ndarray) -> np.ndarray:
        """This rank's part of one global batch's sample indices: ``idx[rank::world]``."""
        return idx if self.world == 1 else idx[self.rank::self.world]

    def batch_shard(self, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Whole batches for this rank: the batches ``b = rank, rank + world, ...`` of
        ``range(n)`` cut into consecutive batches of ``batch_size``.

        Returns:
            ``(indices, batch_ids)``: int64 sample indices (batch after batch, in order;
            batching them by ``batch_size`` again gives exactly these batches, the short
            last batch included) and the int64 global index of each batch.
        """
        bs = max(int(batch_size), 1)
        n_batches = -(-int(n) // bs)
        ids = np.arange(self.rank, n_batches, self.world, dtype=np.int64)
        parts = [np.arange(b * bs, min(int(n), (b + 1) * bs), dtype=np.int64) for b in ids]
        return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), ids

    # ---- internals -----------------------------------------------------------------------
    def _obj_device(self):
        import torch

        return torch.device(self.comm_device)

    def _collective(self, what: str, call: Callable[[Any], Any]) -> None:
        import torch.distributed as dist

        try:
            call(dist)
        except Exception as e:  # gloo / NCCL raise RuntimeError subclasses with multi-line messages
            raise DistributedError(self._failure(what, e)) from None

    def _failure(self, what: str, exc: BaseException) -> str:
        return (f"rank {self.rank} of {self.world}: {what} failed ({_short(exc)}); another process stopped "
                f"or did not reach it within the timeout (see that process's error; {ENV_TIMEOUT} sets the "
                "timeout in seconds)")


def _is_comm_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the communication backend (a torch DistError, or the
    RuntimeError autograd re-raises for a gloo / NCCL failure in a backward hook)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(k in text for k in ("gloo", "NCCL", "Connection closed by peer", "Connection reset by peer"))


def _short(exc: BaseException) -> str:
    """The gist of a gloo / NCCL error: its first line without the ``[source.cc:123]``
    prefix and the advice that follows the first sentence."""
    line = first_line(exc)
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". This is typically")[0].rstrip(". ")


#: the context of a process outside any process group
LOCAL = DistContext()

_override: contextvars.ContextVar[DistContext | None] = contextvars.ContextVar("onnxprune_dist", default=None)


def current() -> DistContext:
    """The running process's :class:`DistContext`: from the initialised default process
    group (whoever initialised it: :func:`session`, or the caller's own code), else
    :data:`LOCAL`. Never imports torch (without torch loaded, no group can exist)."""
    forced = _override.get()
    if forced is not None:
        return forced
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return LOCAL
    world = dist.get_world_size()
    if world == 1:
        return LOCAL
    rank = dist.get_rank()
    return DistContext(rank, world, int(os.environ.get("LOCAL_RANK", rank)), str(dist.get_backend()))


@contextlib.contextmanager
def local() -> Iterator[DistContext]:
    """Within the block, :func:`current` is :data:`LOCAL` (world 1): for work one rank does
    alone (measurements, verification, writing), where a collective would wait forever."""
    token = _override.set(LOCAL)
    try:
        yield LOCAL
    finally:
        _override.reset(token)


def launched_by_torchrun(env: dict | None = None) -> bool:
    """True when the environment is a torchrun worker's (every variable of :data:`TORCHRUN_ENV`)."""
    env = os.environ if env is None else env
    return all(k in env for k in TORCHRUN_ENV)


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(ENV_TIMEOUT, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise OnnxPruneError(f"{ENV_TIMEOUT}={raw!r}: expected a number of seconds") from None
    if not seconds > 0:
        raise OnnxPruneError(f"{ENV_TIMEOUT}={raw!r}: must be > 0")
    return datetime.timedelta(seconds=seconds)


def _backend_for(device: str, local_rank: int) -> str:
    """``nccl`` when ``device`` puts the torch side on CUDA (and selects this rank's GPU), else ``gloo``.

    Raises:
        OnnxPruneError: CUDA asked for but absent, a single ``cuda:N`` for several
            processes, fewer GPUs than local ranks, or NCCL missing from this torch build.
    """
    import torch

    if device.startswith("cuda:"):
        raise OnnxPruneError(f"--device {device} names one GPU; under torchrun each process takes the GPU of its "
                             "LOCAL_RANK: give --device cuda (or auto)")
    if device not in ("auto", "cpu", "cuda"):
        raise OnnxPruneError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not cuda:
        return "gloo"
    if not torch.cuda.is_available():
        raise OnnxPruneError(f"--device {device}: torch sees no CUDA device (torch {torch.__version__})")
    if local_rank >= torch.cuda.device_count():
        raise OnnxPruneError(f"LOCAL_RANK {local_rank} but torch sees {torch.cuda.device_count()} CUDA device(s): "
                             "start at most one process per GPU")
    import torch.distributed as dist

    if not dist.is_nccl_available():
        raise OnnxPruneError("this torch build has no NCCL: run with --device cpu (gloo) or install a CUDA build")
    torch.cuda.set_device(local_rank)
    return "nccl"


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistContext]:
    """The process group of a torchrun worker for the duration of the block.

    Outside torchrun, or with ``WORLD_SIZE`` 1, nothing is initialised and the block gets
    :data:`LOCAL`. A group that already exists (initialised by the caller) is used as it
    is and left alone. Otherwise the group is created (NCCL for a CUDA ``device``, gloo
    for the CPU; timeout from ``ONNXPRUNE_DIST_TIMEOUT``) and destroyed at the end of the
    block, on errors too (so the other processes see this one leave instead of waiting).

    Args:
        device: the torch side's ``--device``: ``auto`` (CUDA when present), ``cpu`` or
            ``cuda`` (each process uses the GPU of its ``LOCAL_RANK``).

    Raises:
        OnnxPruneError: see :func:`_backend_for`; DistributedError: the group cannot be
            formed (rendezvous failed or timed out).
    """
    if not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield LOCAL
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise OnnxPruneError("this torch build has no torch.distributed: run one process")
    if dist.is_initialized():
        yield current()
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = _backend_for(device, local_rank)
    if backend == "gloo" and not dist.is_gloo_available():
        raise OnnxPruneError("this torch build has no gloo backend: multi-process runs on the CPU need it")
    try:
        dist.init_process_group(backend, timeout=_timeout(), rank=rank, world_size=world)
    except Exception as e:
        raise DistributedError(f"rank {rank} of {world}: cannot join the process group ({first_line(e)})") from None
    try:
        yield current()
    except BaseException as e:
        import traceback

        traceback.clear_frames(e.__traceback__)  # the failed frames' locals (a DDP model) must not outlive the group
        raise
    finally:
        import gc

        gc.collect()  # objects that hold the group (a DDP reducer in a reference cycle) go first
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def fault_point(stage: str) -> None:
    """Test hook: raise on the rank and stage that ``ONNXPRUNE_FAIL_AT=<stage>:<rank>`` names.

    Raises:
        OnnxPruneError: ``injected failure at <stage> on rank <rank>`` when named.
    """
    spec = os.environ.get(ENV_FAIL_AT)
    if not spec:
        return
    want_stage, _, want_rank = spec.partition(":")
    ctx = current()
    if want_stage == stage and want_rank.strip() == str(ctx.rank):
        raise OnnxPruneError(f"injected failure at {stage} on rank {ctx.rank} ({ENV_FAIL_AT}={spec})")


def relaunch(nproc: int, module_args: Sequence[str]) -> None:
    """Run ``python -m onnxprune <module_args>`` in ``nproc`` local processes through
    torch's launcher (:mod:`torch.distributed.run`, standalone rendezvous on a free port)
    and wait for them.

    Each process gets ``OMP_NUM_THREADS`` = CPU cores // ``nproc`` (at least 1) unless
    the variable is set already.

    Raises:
        OnnxPruneError: a process failed (its own error was printed by it; the message
            names the failed ranks and exit codes) or the launcher cannot start.
        KeyboardInterrupt: the launcher was stopped by SIGINT / SIGTERM.
    """
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import get_args_parser, run
    except ImportError as e:  # pragma: no cover - torch builds without distributed
        raise OnnxPruneError(f"--nproc needs torch.distributed ({first_line(e)})") from None
    import logging

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc))))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the failed ranks print their errors
    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={int(nproc)}", "-m", "onnxprune",
                                         *module_args])
    try:
        run(args)
    except ChildFailedError as e:
        failed = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in sorted(e.failures.items()))
        raise OnnxPruneError(f"{len(e.failures)} of {nproc} processes failed ({failed}); nothing written") from None
    except SignalException:
        raise KeyboardInterrupt from None
