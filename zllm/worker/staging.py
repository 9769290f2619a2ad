"""Host-to-device copies that do not stall the host.

Copying from ordinary (pageable) host memory makes CUDA synchronise with the stream, so a copy
issued while the GPU still runs the previous step waits for that step to end, and the host's
preparation of the next step no longer overlaps the GPU. A step's small index arrays are
therefore staged in pinned memory: two buffers alternate by step, and before a buffer is
reused, the host waits for the event recorded after the copies that last read from it (two
steps back, so in practice long done). Off CUDA, arrays are wrapped as they are.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

STAGING_BYTES = 32 * 2**20
_ALIGN = 64


class PinnedStaging:
    def __init__(self, device: torch.device, nbytes: int = STAGING_BYTES) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffers = ([torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                        if self.pinned else [])
        self.events: list[Optional[torch.cuda.Event]] = [None, None]
        self.current, self.offset = 0, 0

    def next_step(self) -> None:
        """Start a step's copies in the other buffer, once it is free."""
        if not self.pinned:
            return
        self.events[self.current] = torch.cuda.Event()
        self.events[self.current].record()
        self.current ^= 1
        self.offset = 0
        if self.events[self.current] is not None:
            self.events[self.current].synchronize()

    def host(self, array: np.ndarray) -> torch.Tensor:
        """A CPU tensor holding `array`, pinned on CUDA (an ordinary one if the buffer is full)."""
        array = np.ascontiguousarray(array)
        start = -(-self.offset // _ALIGN) * _ALIGN
        if not self.pinned or start + array.nbytes > len(self.buffers[self.current]):
            return torch.from_numpy(array)
        self.offset = start + array.nbytes
        out = self.buffers[self.current][start:self.offset].view(
            torch.from_numpy(array[:0]).dtype).view(array.shape)
        out.numpy()[...] = array
        return out

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        return self.host(array).to(self.device, non_blocking=True)
