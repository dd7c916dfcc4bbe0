"""Process-group setup and teardown, and the few collectives the trainer needs.

Works with ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE in the environment) and
without a launcher (a single process). NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import MoatError, PeerFailedError, UserError

T = TypeVar("T")


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    # A gloo group for small host-side control messages (preemption flag): under NCCL a
    # CPU all-reduce on it never waits for the GPU stream.
    control_group: Optional[Any] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_device(name: str, local_rank: int) -> torch.device:
    """'auto' -> CUDA when available; 'cuda' without a GPU is a user error."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda was requested but CUDA is not available; use --device cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device_name: str, local_rank: int = 0) -> DistInfo:
    """Join the process group the launcher describes (if any) and pick this process's device.

    ``local_rank`` is the fallback for old launchers that pass ``--local-rank`` but do not set
    LOCAL_RANK in the environment.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(local_rank)))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = resolve_device(device_name, local_rank)

    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "LOCAL_WORLD_SIZE" in os.environ:
        # Under a launcher, share the cores between the processes of this node instead of every
        # process starting one thread per core (oversubscription makes CPU DDP crawl).
        torch.set_num_threads(max(1, _available_cores() // local_world_size))

    control_group = None
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return DistInfo(rank, world_size, local_rank, local_world_size, device, control_group)


def teardown(info: DistInfo, clean: bool = True) -> None:
    """Leave the process group; a barrier first on a clean exit so no rank exits mid-collective."""
    if info.distributed and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
        info.control_group = None  # nothing may use (or keep alive) a destroyed group


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` is set on any rank; a host-side all-reduce on the control group."""
    if not info.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control_group)
    return bool(t.item())


def gather_to_primary(obj: Any, info: DistInfo) -> List[Any]:
    """Every rank's ``obj`` on every rank, in rank order (used for the per-rank RNG states)."""
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.control_group)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=info.control_group)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier(group=info.control_group)


def on_every_rank(action: Callable[[], T], info: DistInfo) -> T:
    """Run ``action`` on every rank and agree on its failure (collective): when it raises a
    ``MoatError`` on any rank, the lowest such rank re-raises its error (and prints it) and every
    other rank raises ``PeerFailedError`` (and prints nothing), so a failure that every rank
    meets, such as a bad output folder or checkpoint, is reported once, not once per process."""
    error: Optional[MoatError] = None
    result = None
    try:
        result = action()
    except MoatError as e:
        error = e
    if not info.distributed:
        if error is not None:
            raise error
        return result
    failures = gather_to_primary(None if error is None else (type(error).__name__, error.exit_code), info)
    first = next((rank for rank, failure in enumerate(failures) if failure is not None), None)
    if first is None:
        return result
    name, code = failures[first]
    agreed = error if first == info.rank else PeerFailedError(f"rank {first} failed ({name})", exit_code=code)
    agreed.agreed_by_every_rank = True  # every rank stops here: they can still leave the group together
    raise agreed


def is_peer_failure(error: BaseException) -> bool:
    """True for the errors a collective raises when another process of the job died or left (gloo's
    closed connections, NCCL's aborted communicators): a consequence, reported by that process."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        needle in text for needle in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL")
    )
