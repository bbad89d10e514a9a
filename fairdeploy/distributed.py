"""torchrun / DistributedDataParallel: the process group from torchrun's environment, rank-0-only writes,
sharded sampling and scoring, and gathering the whole split's predictions back on every rank.

Outside torchrun (or with one process) every helper is a no-op: rank 0 of a world of 1.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from fairdeploy.errors import FairdeployError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TIMEOUT_ENV = "FAIRDEPLOY_DIST_TIMEOUT"  # seconds a collective waits for a silent peer before the run fails
DEFAULT_TIMEOUT_S = 600
RANK_SEED_STRIDE = 1_000_003  # rank r's private seed is seed + r * stride (rank 0 keeps the run's seed)


class DistributedError(FairdeployError):
    """A peer process of the torchrun job died or stopped answering, or the job could not be joined; nothing was
    written by this process. Exit 2 (not 4, "a bug"): the run can be continued, and the CLI prints what was kept
    and the command that continues it (fairdeploy.cli.main, `resumable`)."""

    resumable = True


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARS)


def _env_int(name: str, low: int, high: int | None = None) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise FairdeployError(f"{name}={raw!r} is not an integer {span} (torchrun sets it; check the environment "
                              "of this job)")
    return value


def check_torchrun_env() -> None:
    """The variables torchrun sets, checked before any is used: RANK < WORLD_SIZE, LOCAL_RANK, and (a job of
    more than one process) MASTER_PORT 1..65535 and a MASTER_ADDR; each wrong one is one line naming it."""
    size = _env_int("WORLD_SIZE", 1)
    _env_int("RANK", 0, size - 1)
    _env_int("LOCAL_RANK", 0)
    if size > 1:
        if not os.environ.get("MASTER_ADDR", "").strip():
            raise FairdeployError("MASTER_ADDR is not set: a torchrun job of more than one process needs the "
                                  "address of rank 0 (torchrun sets it; --master-addr)")
        _env_int("MASTER_PORT", 1, 65535)


def world() -> World:
    """This process's place in the job: from the initialised process group, else rank 0 of 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: str) -> str:
    """The device string this rank uses: under torchrun, 'auto'/'cuda' mean this node's GPU LOCAL_RANK."""
    if not launched_by_torchrun():
        return device
    name = device.strip().lower()
    if name.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FairdeployError(f"--device {device} would put every torchrun process on the same GPU: use --device cuda "
                              "(or auto); each process takes the GPU of its LOCAL_RANK (restrict the GPUs with "
                              "CUDA_VISIBLE_DEVICES)")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise FairdeployError(f"torchrun started local rank {local} but this node has only "
                                  f"{torch.cuda.device_count()} CUDA device(s): lower --nproc-per-node")
        return f"cuda:{local}"
    return device


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise FairdeployError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise FairdeployError(f"{TIMEOUT_ENV} must be > 0 seconds, got {raw}")
    return datetime.timedelta(seconds=seconds)


def _first_sentence(exc: BaseException) -> str:
    """'Connection closed by peer [127.0.0.1]:4296' from gloo's '[.../pair.cc:561] Connection closed ... GLHF!'."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return f"{type(exc).__name__}: {text.split('. ')[0].rstrip('.')}"


def peer_failure(exc: BaseException) -> DistributedError:
    w = world()
    return DistributedError(
        f"rank {w.rank} of {w.size}: another process of this torchrun job died or stopped answering "
        f"({_first_sentence(exc)}); this process wrote nothing after its last complete checkpoint")


def _is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
        "NCCL", "Gloo", "gloo"))


@contextlib.contextmanager
def distributed_run(device: str = "auto") -> Iterator[str]:
    """Around a whole command: under torchrun with more than one process, join the process group (NCCL on
    CUDA, gloo on the CPU; a timeout from FAIRDEPLOY_DIST_TIMEOUT) and yield this rank's device string; a peer
    that dies becomes one DistributedError line. Outside torchrun it only yields `device`."""
    if launched_by_torchrun():
        check_torchrun_env()
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        yield device
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise FairdeployError("this PyTorch build has no torch.distributed: run without torchrun")
    dev_name = rank_device(device)
    dev = torch.device("cuda", int(dev_name.split(":")[1])) if dev_name.startswith("cuda:") else torch.device(
        "cuda" if dev_name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    try:
        dist.init_process_group(backend_for(dev), timeout=_timeout(),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    except (RuntimeError, ValueError, dist.DistError) as exc:  # a peer or the master address is unreachable
        raise DistributedError(f"could not join the torchrun job ({_first_sentence(exc)})") from None
    ok = False
    previous = signal.signal(signal.SIGTERM, _stopped_by_launcher)
    try:
        yield dev_name
        ok = True
    except FairdeployError:
        raise
    except Exception as exc:
        if _is_peer_failure(exc):
            raise peer_failure(exc) from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ok:
            with contextlib.suppress(Exception):
                dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _stopped_by_launcher(signum: int, frame: object) -> None:
    """torchrun sends SIGTERM to the surviving ranks when one fails: unwind (temporaries are removed) and
    say why in one line instead of dying silently."""
    w = world()
    raise DistributedError(f"rank {w.rank} of {w.size}: stopped by torchrun (SIGTERM) because another process of "
                           "the job failed; nothing half-written is left (complete checkpoints from earlier epochs "
                           "stay)")


@contextlib.contextmanager
def main_writes(writer: Callable[[], contextlib.AbstractContextManager[Path]], unused: Path) -> Iterator[Path]:
    """Rank 0 enters `writer()` (an atomic_dir / atomic_path); the other ranks get `unused`, a path they must
    not write (library writes under torchrun are gated on `world().is_main`). All ranks meet at a barrier after
    the block, so that the output exists when any rank goes on."""
    if world().is_main:
        with writer() as tmp:
            yield tmp
    else:
        yield unused
    barrier()


@contextlib.contextmanager
def main_scratch(out: Path) -> Iterator[Path]:
    """A scratch folder beside `out` (`.NAME.scratch.XXXXXXXX`, removed afterwards) on rank 0; the other ranks
    get a path they must not write (their fine-tuning and final writes are gated on rank 0)."""
    import tempfile

    if world().is_main:
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.scratch.", dir=out.parent) as name:
            yield Path(name)
    else:
        yield out.parent / f".{out.name}.scratch.rank{world().rank}"


def barrier() -> None:
    if world().active:
        import torch.distributed as dist

        dist.barrier()


def rank_seed(seed: int) -> int:
    """This rank's private seed (augmentation, dropout): the run's seed on rank 0, a fixed offset elsewhere."""
    return seed + world().rank * RANK_SEED_STRIDE


def _tensor_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (pickled between the job's own processes, never from a file)."""
    if not world().active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_tensor_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def broadcast_module(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Overwrite every parameter and buffer (or only the buffers: BatchNorm statistics) with rank 0's; the
    modules must have the same shapes."""
    if not world().active:
        return
    import torch.distributed as dist

    tensors = [b for b in module.buffers()] if buffers_only else list(module.state_dict().values())
    with torch.no_grad():
        for t in tensors:
            if dist.get_backend() == "nccl" and t.device.type != "cuda":
                buf = t.to(_tensor_device())
                dist.broadcast(buf, src=0)
                t.copy_(buf.cpu())
            else:
                dist.broadcast(t, src=0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all ranks (a new tensor on `t`'s device; `t` unchanged)."""
    if not world().active:
        return t.clone()
    import torch.distributed as dist

    buf = t.to(_tensor_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def gather_rows(a: np.ndarray) -> list[np.ndarray]:
    """Every rank's `a` (rows may differ in count by rank), in rank order; padding rows are dropped."""
    w = world()
    if not w.active:
        return [a]
    import torch.distributed as dist

    dev = _tensor_device()
    n = torch.tensor([a.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(n) for _ in range(w.size)]
    dist.all_gather(counts, n)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    t = torch.from_numpy(np.ascontiguousarray(a))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype)
    padded[: t.shape[0]] = t
    padded = padded.to(dev)
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(parts, padded)
    return [p[:s].cpu().numpy() for p, s in zip(parts, sizes)]


def interleave(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Undo a round-robin shard: parts[r] holds positions r, r + R, r + 2R, ... of the whole."""
    total = sum(len(p) for p in parts)
    out = np.empty((total, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, p in enumerate(parts):
        out[r::len(parts)] = p
    return out


def gather_interleaved(a: np.ndarray) -> np.ndarray:
    """The whole array from each rank's round-robin share (see `shard_indices`)."""
    return a if not world().active else interleave(gather_rows(a))


def shard_indices(n: int) -> list[int]:
    """This rank's round-robin share of range(n): r, r + R, ... (shares differ in length by at most one)."""
    w = world()
    return list(range(w.rank, n, w.size))


class ShardSampler(Sampler[int]):
    """This rank's share of one epoch's index sequence, drawn from a generator every rank seeds alike.

    The whole sequence is what one process would draw (randperm when shuffling, multinomial with replacement
    under `weights`, range(n) otherwise), cut to `total` samples (whole global batches, as drop_last does) or
    padded by wrapping to a multiple of the world size; rank r takes positions r, r + R, ... so that the R
    ranks' b-th local batches together are the one-process b-th batch.
    """

    def __init__(self, n: int, rank: int, size: int, shuffle: bool = False, weights: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, total: int | None = None):
        self.n, self.rank, self.size = n, rank, size
        self.shuffle, self.weights, self.generator, self.total = shuffle, weights, generator, total

    def _sequence(self) -> torch.Tensor:
        if self.weights is not None:
            seq = torch.multinomial(self.weights, self.n, True, generator=self.generator)
        elif self.shuffle:
            seq = torch.randperm(self.n, generator=self.generator)
        else:
            seq = torch.arange(self.n)
        if self.total is not None:
            return seq[: self.total]
        pad = (-len(seq)) % self.size
        return torch.cat([seq, seq[:pad]]) if pad else seq

    def __iter__(self) -> Iterator[int]:
        return iter(self._sequence()[self.rank::self.size].tolist())

    def __len__(self) -> int:
        total = self.total if self.total is not None else self.n + (-self.n) % self.size
        return len(range(self.rank, total, self.size))
