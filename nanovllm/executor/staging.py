"""One host-to-device copy per step: a step's small arrays packed into a reused pinned buffer.

A dozen separate copies cost a dozen launches, and each fresh pinned allocation (cudaHostAlloc) can synchronise
the device, which would stall the host behind the step in flight and undo overlap scheduling. So a few slots of
pinned host memory and matching device memory are allocated once and used in turn. Before a slot is refilled, the
host waits for the event recorded after its last copy: normally long done, but a later pipeline stage may run several
steps behind the driver, with its copies queued behind receives from the stage before.
"""
from __future__ import annotations

import numpy as np
import torch

_TORCH_DTYPES = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.bool_): torch.bool,
}


class HostStager:
    def __init__(self, device: torch.device, num_slots: int = 3, initial_bytes: int = 1 << 20) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.slots = [self._allocate(initial_bytes) for _ in range(num_slots)]
        # recorded after each slot's last copy (waiting on one never recorded returns at once)
        self.copied = [torch.cuda.Event() for _ in range(num_slots)] if self.pinned else []
        self.next_slot = 0

    def _allocate(self, num_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
        host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=self.pinned)
        device = torch.empty(num_bytes, dtype=torch.uint8, device=self.device)
        return host, device

    def transfer(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Copy every array to the device at once; returns device views with the same names, dtypes and shapes."""
        layout: list[tuple[str, int, np.ndarray]] = []
        total = 0
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            layout.append((name, total, array))
            # 16-byte aligned: Triton specialises kernels on whether a pointer is, so an alignment that varied
            # from step to step would compile a new variant of a kernel mid-run (about a second each)
            total += -(-array.nbytes // 16) * 16
        slot = self.next_slot
        self.next_slot = (slot + 1) % len(self.slots)
        if self.pinned:
            self.copied[slot].synchronize()  # its previous copy has left the pinned buffer
        host, device = self.slots[slot]
        if total > host.numel():  # rare: a larger batch than seen so far
            host, device = self._allocate(2 * total)
            self.slots[slot] = (host, device)
        host_bytes = host.numpy()
        for _, offset, array in layout:
            host_bytes[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        device[:total].copy_(host[:total], non_blocking=self.pinned)
        if self.pinned:
            self.copied[slot].record()
        return {
            name: device[offset : offset + array.nbytes].view(_TORCH_DTYPES[array.dtype]).view(array.shape)
            for name, offset, array in layout
        }
