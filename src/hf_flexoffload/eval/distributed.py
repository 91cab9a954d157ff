"""Data parallelism over processes launched by an existing engine (``accelerate launch``,
``torchrun``): each rank evaluates a disjoint shard with its own model, then rank 0 merges.

Only torch.distributed's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``) and a barrier are used; the gloo backend works on every machine, and the
data exchanged is only "done", since every rank writes its records to the shared run directory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")
# Ranks finish their shards at different times; a multi-day evaluation must not time out at the
# final barrier (gloo's default is 30 minutes).
_BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the evaluation's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        """Read the launcher's environment; a plain ``python`` run is rank 0 of 1."""

        def env(name: str, default: int) -> int:
            return int(os.environ.get(name, default))

        world = env("WORLD_SIZE", 1)
        return cls(
            rank=env("RANK", 0),
            world_size=world,
            local_rank=env("LOCAL_RANK", 0),
            local_world_size=env("LOCAL_WORLD_SIZE", world),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share: every ``world_size``-th item, so shards are disjoint and cover
        all items, and each gets a similar mix of lengths."""
        return list(items[self.rank :: self.world_size])

    def barrier(self) -> None:
        """Wait for every rank (a no-op for a single process)."""
        if self.world_size == 1:
            return
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo", rank=self.rank, world_size=self.world_size, timeout=_BARRIER_TIMEOUT
            )
        dist.barrier()
