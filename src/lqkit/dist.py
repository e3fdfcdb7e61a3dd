"""Several processes compressing one model (``torchrun --nproc-per-node N -m lqkit compress ...``).

Every rank reads each block and runs the same calibration (cheap next to the rest, and it keeps every
rank's inputs bit-identical); the per-matrix work — cost-table rows and decompositions — is split
over the ranks by size (:meth:`Group.owners`) and the results are exchanged, so the plan and the
checkpoint equal the single-process run's. NCCL on GPUs (rank r uses cuda:LOCAL_RANK), gloo on CPUs.
Rank 0 writes the checkpoint and the caches and shows progress.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owners(self, sizes: Sequence[int]) -> list[int]:
        """The rank that computes each item: largest first, each to the least loaded rank (ties to
        the lowest rank). Deterministic, so every rank agrees without talking."""
        load = [0] * self.world
        owner = [0] * len(sizes)
        for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[i] = r
            load[r] += sizes[i]
        return owner

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small, JSON-like data), in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        """Overwrite ``t`` on every rank with rank ``src``'s (any dtype: sent as bytes)."""
        if self.world > 1 and t.numel():
            view = t.view(-1).view(torch.uint8) if t.is_contiguous() else None
            if view is None:
                raise ValueError("broadcast_ needs a contiguous tensor")
            torch.distributed.broadcast(view, src=src)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


SINGLE = Group()


def default_device(device: str | None) -> str:
    """``device`` when given, else the GPU when one is present, else the CPU: every verb's default."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def from_env(device: str | None) -> tuple[Group, str | None]:
    """(the process group torchrun set up, this rank's device), or (SINGLE, device) when not under
    torchrun. Initialises torch.distributed once: NCCL when the device is CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, device
    import torch.distributed as td

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = default_device(device).startswith("cuda")
    if cuda:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    else:
        device = "cpu"
    if not td.is_initialized():
        td.init_process_group("nccl" if cuda else "gloo")
    log.info("rank %d of %d on %s", rank, world, device)
    return Group(rank, world), device
