"""Splitting a merge across processes with accelerate / torch.distributed.

``accelerate launch -m surgeon run RECIPE`` (or ``torchrun --nproc_per_node N
-m surgeon run RECIPE``, or ``surgeon run --distributed`` under either) starts
N processes that each plan the same recipe. Every output tensor gets an owner
rank (greedy by bytes, largest first, so ranks get similar work whatever the
shard count); all ranks ``pwrite`` into the same pre-laid-out shard files at
disjoint offsets, rank 0 writes the index, config and card once every rank has
finished, and renames the checkpoint into place. The shard layout does not
depend on the number of processes, so the output is byte-identical to a
single-process run. No launcher or socket protocol of our own: process groups
come from accelerate's ``PartialState`` (gloo on CPU, NCCL on GPUs).
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass
class Coordinator:
    """Rank, world size and a barrier; a single process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce_sum(self, tensor: Any) -> Any:
        """Sum a tensor over ranks in place (for whole-model statistics)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        if self.world <= 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = Coordinator()


def launched_distributed() -> bool:
    """Whether this process was started by accelerate launch / torchrun with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def coordinator_from_environment(device: str = "cpu", force: bool = False) -> Coordinator:
    """The process group set up by the launcher, through accelerate."""
    if not (force or launched_distributed()):
        return SINGLE
    from accelerate import PartialState

    state = PartialState(cpu=str(device).startswith("cpu"))
    return Coordinator(state.process_index, state.num_processes, state)


def assign_owners(sizes: Sequence[int], world: int) -> list[int]:
    """Owner rank of each item: largest first to the least-loaded rank (ties to the lower rank)."""
    if world <= 1:
        return [0] * len(sizes)
    heap = [(0, r) for r in range(world)]
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + sizes[i], r))
    return owners
