"""Host-to-device copies that do not stall the host.

Copying from ordinary (pageable) host memory makes CUDA synchronise with the stream, so a copy
issued while the GPU still runs the previous step waits for that step to end, and the host's
preparation of the next step no longer overlaps the GPU. A step's small index arrays are
therefore staged in pinned memory: two buffers alternate by step, and before a buffer is
reused, the host waits for the event recorded after the copies that last read from it (two
steps back, so in practice long done). Off CUDA, arrays are wrapped as they are.

The worker's waits for the GPU in a step's launch go through `wait`, which adds them up
(`waited_s`): for a staging buffer, a flashinfer plan buffer, and a step's tokens read back
before the next step. The benchmarks report the host's own work per step apart from that time
(the GPU busy, not the host). Not counted (they stay in the host's figure): swaps, which copy
through pageable memory and wait for the whole queue.
"""

from __future__ import annotations

import time
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
        self.waited_s = 0.0  # the host's waits for the GPU, summed (see `wait`)

    def wait(self, event: Optional[torch.cuda.Event]) -> None:
        """Block until `event` has completed on the GPU, counting the wait in `waited_s`."""
        if event is not None and not event.query():
            start = time.perf_counter()
            event.synchronize()
            self.waited_s += time.perf_counter() - start

    def next_step(self) -> None:
        """Start a step's copies in the other buffer, once it is free."""
        if not self.pinned:
            return
        self.events[self.current] = torch.cuda.Event()
        self.events[self.current].record()
        self.current ^= 1
        self.offset = 0
        self.wait(self.events[self.current])

    def alloc(self, shape: int | tuple[int, ...], dtype) -> torch.Tensor:
        """An uninitialised CPU tensor to fill in place (through `.numpy()`) and then copy to the
        device: pinned on CUDA (an ordinary one if the buffer is full), so filling it costs the
        one write and the copy does not wait for the GPU."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else shape
        nbytes = int(np.prod(shape)) * dtype.itemsize
        start = -(-self.offset // _ALIGN) * _ALIGN
        if not self.pinned or start + nbytes > len(self.buffers[self.current]):
            return torch.from_numpy(np.empty(shape, dtype=dtype))
        self.offset = start + nbytes
        return self.buffers[self.current][start:self.offset].view(_TORCH_DTYPES[dtype]).view(shape)

    def host(self, array: np.ndarray) -> torch.Tensor:
        """A CPU tensor holding `array`, pinned on CUDA; off CUDA, `array` itself."""
        if not self.pinned:
            return torch.from_numpy(np.ascontiguousarray(array))
        out = self.alloc(array.shape, array.dtype)
        out.numpy()[...] = array
        return out

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        return self.host(array).to(self.device, non_blocking=True)

    def to_device_all(self, arrays: list[np.ndarray], dtype) -> list[torch.Tensor]:
        """Several arrays of one dtype on the device in one copy (views of one tensor); off
        CUDA, the arrays themselves, wrapped."""
        if not self.pinned:
            return [torch.from_numpy(np.ascontiguousarray(a, dtype=dtype)) for a in arrays]
        ends = np.cumsum([len(a) for a in arrays]).tolist()
        packed = self.alloc(ends[-1] if ends else 0, dtype)
        host = packed.numpy()
        for a, start, end in zip(arrays, [0] + ends, ends):
            host[start:end] = a
        device = packed.to(self.device, non_blocking=True)
        return [device[start:end] for start, end in zip([0] + ends, ends)]


_TORCH_DTYPES = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64,
                 np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}
