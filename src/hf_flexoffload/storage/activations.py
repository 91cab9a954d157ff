"""Hidden states between stages, kept per (stage, micro-batch) unit on the policy's tier.

The output of stage ``j`` for micro-batch ``k`` is the input of stage ``j + 1`` for the same
micro-batch. Device-tier units (and host-tier ones on a CPU machine, where host is the device's
own memory) are kept as they are; host units on CUDA go to pinned RAM; disk units go to one file
per micro-batch, overwritten stage after stage (a unit is read before the next one of its
micro-batch is written, so one file per micro-batch is enough).
"""

from __future__ import annotations

import os

import torch

from ..config.counters import Counters
from ..config.policy import Split
from .disk_file import DiskFile
from .placement import assign_units
from .transfer import Mover, Pending, host_empty, shares_host_memory, to_compute, to_host


class ActivationStore:
    """Hidden states of one forward pass.

    Args:
        num_stages: Stage boundaries that produce hidden states (embedding + decoder layers).
        num_micro_batches: Micro-batches in the block.
        split: The policy's activation split, realized over (stage, micro-batch) units.
        device: The compute device.
        directory: Where disk units put their files.
        counters: Byte counters.
        mover: Runs writes and reads in the background when overlapping.
    """

    def __init__(
        self,
        *,
        num_stages: int,
        num_micro_batches: int,
        split: Split,
        device: torch.device,
        directory: str,
        counters: Counters,
        mover: Mover,
    ) -> None:
        self.tiers = assign_units(num_stages * num_micro_batches, split)
        self.k = num_micro_batches
        self.device = device
        self.directory = directory
        self.counters = counters
        self.mover = mover
        self._held: dict[tuple[int, int], Pending] = {}
        self._files: dict[int, DiskFile] = {}

    def tier(self, stage: int, micro_batch: int) -> str:
        return self.tiers[stage * self.k + micro_batch]

    def resident(self, stage: int, micro_batch: int) -> bool:
        """Whether the output of ``stage`` for ``micro_batch`` stays in compute memory (so
        getting it moves nothing)."""
        tier = self.tier(stage, micro_batch)
        return tier == "device" or (tier == "host" and shares_host_memory(self.device))

    def put(self, stage: int, micro_batch: int, x: torch.Tensor) -> None:
        """Keep the (b, s, h) output of ``stage`` for ``micro_batch``."""
        if self.resident(stage, micro_batch):
            self._held[stage, micro_batch] = Pending(value=x)
        elif self.tier(stage, micro_batch) == "host":
            self._held[stage, micro_batch] = self.mover.write(self._to_host, x)
        else:
            self._held[stage, micro_batch] = self.mover.write(self._to_disk, micro_batch, x)

    def get(self, stage: int, micro_batch: int) -> torch.Tensor:
        """The output of ``stage`` for ``micro_batch`` on the compute device (read thread)."""
        held = self._held.pop((stage, micro_batch)).wait()
        if isinstance(held, torch.Tensor):
            if held.device != self.device:
                self.counters.add_moved("host_to_device", held.numel() * held.element_size())
            return to_compute(held, self.device)
        shape, dtype = held
        x = host_empty(shape, dtype, self.device, pin=True)
        self.counters.add_moved("disk_to_host", self._files[micro_batch].read_into(0, x))
        if not shares_host_memory(self.device):
            self.counters.add_moved("host_to_device", x.numel() * x.element_size())
        return to_compute(x, self.device)

    def _to_host(self, x: torch.Tensor) -> torch.Tensor:
        self.counters.add_moved("device_to_host", x.numel() * x.element_size())
        return to_host(x, self.device)

    def _to_disk(self, micro_batch: int, x: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
        host = x.to("cpu").contiguous()
        if not shares_host_memory(self.device):
            self.counters.add_moved("device_to_host", host.numel() * host.element_size())
        f = self._files.get(micro_batch)
        if f is None:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"act-{id(self):x}-{micro_batch}.bin")
            f = self._files[micro_batch] = DiskFile(path, create=True)
        self.counters.add_moved("host_to_disk", f.write(0, host))
        return tuple(host.shape), host.dtype

    def close(self) -> None:
        for pending in self._held.values():
            pending.wait()
        self._held.clear()
        for f in self._files.values():
            f.close()
            os.remove(f.path)
        self._files.clear()
