"""One tensor-parallel rank: its device, torch.distributed, the model shard and the KV cache.

The same class runs in-process (uniproc executor) and inside a Ray actor (ray executor). Control
calls happen once each, in this order: init_distributed_environment, init_model,
determine_num_available_blocks, init_kv_cache; then launch and collect for every step.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import socket
import time
import urllib.parse
from typing import Optional

import torch
import torch.distributed as dist
from fairscale.nn.model_parallel import initialize as fs_init

from zllm.architecture import ModelArchitecture
from zllm.config import EngineConfig
from zllm.protocol import ModelRunnerOutput, SchedulerOutput
from zllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Worker:
    def __init__(self, config: EngineConfig, rank: int, distributed_init_method: Optional[str],
                 local_rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.local_rank = local_rank
        self.tp_size = config.parallel.tensor_parallel_size
        self.distributed_init_method = distributed_init_method
        self.arch = ModelArchitecture.from_model_dir(config.model.model)
        self.device = self._pick_device()
        self.dtype = self._pick_dtype()
        self.model_runner: Optional[ModelRunner] = None
        self.host_times: collections.deque = collections.deque(maxlen=8192)

    def _pick_device(self) -> torch.device:
        want = self.config.device.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("config key 'device' = 'cuda' but no CUDA device is visible")
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def _pick_dtype(self) -> torch.dtype:
        name = self.config.model.dtype
        if name == "auto":
            if self.device.type == "cpu":
                return torch.float32
            ckpt = self.arch.torch_dtype
            return _DTYPES[ckpt] if ckpt in ("bfloat16", "float16") else torch.bfloat16
        return _DTYPES[name]

    def init_distributed_environment(self) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if dist.is_initialized():
            # An in-process worker left behind by an earlier engine in this process.
            if dist.get_world_size() != self.tp_size:
                raise RuntimeError("torch.distributed is already initialised with another size")
        elif self.distributed_init_method is None:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, store=self._rendezvous_store(), rank=self.rank,
                                    world_size=self.tp_size)
        if not fs_init.model_parallel_is_initialized():
            with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes
                fs_init.initialize_model_parallel(self.tp_size)

    def _rendezvous_store(self) -> dist.TCPStore:
        """The TCPStore of `tcp://host:port`. torch's own tcp:// rendezvous listens on every
        interface; here rank 0 listens on `host` only (loopback on one node, the chosen interface
        across nodes), through a socket it binds itself."""
        url = urllib.parse.urlsplit(self.distributed_init_method)
        if url.scheme != "tcp":
            raise ValueError(f"distributed_init_method must be tcp://host:port, got "
                             f"{self.distributed_init_method!r}")
        if self.rank != 0:
            return dist.TCPStore(url.hostname, url.port, self.tp_size, is_master=False)
        listener = socket.create_server((url.hostname, url.port), backlog=128)
        # The store owns the descriptor from here (detach: Python must not close it too).
        return dist.TCPStore(url.hostname, url.port, self.tp_size, is_master=True,
                             wait_for_workers=False, master_listen_fd=listener.detach())

    def init_model(self) -> None:
        t0 = time.perf_counter()
        torch.manual_seed(self.config.model.seed)
        self.model_runner = ModelRunner(self.config, self.arch, self.rank, self.tp_size,
                                        self.device, self.dtype)
        self.model_runner.load_weights()
        logger.info("rank %d: loaded %s weights (%s, %s) in %.1f s", self.rank,
                    self.config.model.load_format, self.dtype, self.device, time.perf_counter() - t0)

    def determine_num_available_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        block_bytes = self.model_runner.kv_block_bytes()
        if self.device.type == "cpu":
            return max(1, int(cache.cpu_kv_cache_gib * 2**30) // block_bytes)
        return self._profile_gpu_blocks(block_bytes)

    def _profile_gpu_blocks(self, block_bytes: int) -> int:
        """Blocks that fit in gpu_memory_utilization of the device after the weights and the
        activations of a forward at the largest token budget."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.model_runner.profile_run(self.config.scheduler.max_num_batched_tokens)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.cache.gpu_memory_utilization
        available = budget - used_by_others - torch.cuda.max_memory_allocated()
        torch.cuda.empty_cache()
        num_blocks = int(available // block_bytes)
        if num_blocks < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache: {available / 2**30:.2f} GiB "
                               f"after weights and activations; raise gpu_memory_utilization")
        return num_blocks

    def determine_num_swap_blocks(self) -> int:
        """CPU blocks for swapped-out requests (none unless preemption_mode is swap)."""
        cache = self.config.cache
        if cache.preemption_mode != "swap":
            return 0
        return int(cache.swap_space_gib * 2**30) // self.model_runner.kv_block_bytes()

    def init_kv_cache(self, num_blocks: int, num_swap_blocks: int = 0) -> None:
        self.model_runner.init_kv_cache(num_blocks, num_swap_blocks)

    def launch(self, scheduler_output: SchedulerOutput) -> None:
        """Queue a step on the device; `collect` returns its result (steps in order)."""
        staging = self.model_runner.staging
        t0, waited = time.perf_counter(), staging.waited_s
        self.model_runner.launch(scheduler_output)
        waited = staging.waited_s - waited
        num_reqs = len(scheduler_output.num_scheduled_tokens)
        self.host_times.append((time.perf_counter() - t0 - waited, num_reqs,
                                scheduler_output.total_num_scheduled_tokens == num_reqs, waited))

    def take_host_times(self) -> dict[str, list]:
        """Since the last call: host time of each launch, (seconds of the host's own work,
        requests, all decodes, seconds it waited for the GPU inside the launch); the
        grammar's per constrained step, (fill seconds, accept seconds, rows); and with
        record_steps on CUDA, the GPU's per step, (idle seconds before it, busy seconds,
        requests, all decodes)."""
        times = list(self.host_times)
        self.host_times.clear()
        runner = self.model_runner
        return {"launch": times, "grammar": runner.grammar.take_step_times() if runner.grammar else [],
                "gpu": runner.gpu_timer.take()}

    def collect(self) -> ModelRunnerOutput:
        return self.model_runner.collect()

    def step_done(self) -> bool:
        """Whether the oldest launched step has finished on the device (collect won't wait)."""
        return self.model_runner.step_done()

    def get_pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        if self.model_runner is not None and self.model_runner.grammar is not None:
            self.model_runner.grammar.shutdown()
        self.model_runner = None
        if fs_init.model_parallel_is_initialized():
            fs_init.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
