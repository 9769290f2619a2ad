"""The worker's own host time per step, stage by stage, beside the control path.

A real Worker (in this process: the built-in demo model on the CPU, or a benchmark shape such
as llama-3.2-1b with dummy weights on a GPU) is fed steady decode steps built the way the
scheduler builds them: every request cached, one token each, a new block when a request crosses
a block boundary (prompt lengths are staggered, so a few do each step), step N+1 launched before
step N is collected, as with async scheduling. Its model runner's HostTimer times each stage:

  update             apply the step's deltas to the persistent input batch
  prepare            flatten the step: token ids, positions, K/V slots, attention layout
  stage              copy those to the device (one copy)
  plan               the attention backend's plan
  forward            the model (on a GPU: launching it, or replaying its CUDA graph)
  logits             last-token logits
  sampling_metadata  the sampling settings of the sampled rows, on the device
  sample             sampling, and the copy of the tokens back
  read_back          (in collect, after the GPU is done) the tokens into the batch, the reply

"input prep" is update + prepare + stage + plan + sampling_metadata: the host work that, on a
GPU, the device waits for at every step. On a CPU, forward, logits and sample are compute.
"""

from __future__ import annotations

import statistics

import numpy as np

from zllm.config import EngineConfig
from zllm.model_files import resolve_model
from zllm.protocol import ContinuingRequestData, NewRequestData, SchedulerOutput
from zllm.sampling_params import SamplingParams

PREP_STAGES = ("update", "prepare", "stage", "plan", "sampling_metadata")
BLOCK_SIZE = 16
PREFILL_TOKENS = 8192  # per prefill step (the server's default max_num_batched_tokens)


class DecodeWorkload:
    """Requests 0..n-1 with prompts of context-15..context tokens (staggered block boundaries);
    request i owns blocks i * blocks_per_req + j, so the cache stays small."""

    def __init__(self, num_requests: int, num_steps: int, temperature: float,
                 context: int = BLOCK_SIZE) -> None:
        self.req_ids = [f"req-{i}" for i in range(num_requests)]
        self.prompt_lens = max(context, BLOCK_SIZE) - np.arange(num_requests) % BLOCK_SIZE
        self.blocks_per_req = -(-(int(self.prompt_lens.max()) + num_steps + 1) // BLOCK_SIZE)
        self.num_blocks = num_requests * self.blocks_per_req
        self.temperature = temperature

    def prefills(self) -> list[SchedulerOutput]:
        """The prompts, a few requests per step (at most PREFILL_TOKENS tokens each)."""
        steps, batch, num_tokens = [], [], 0
        for i, (req_id, n) in enumerate(zip(self.req_ids, self.prompt_lens.tolist())):
            if batch and num_tokens + n > PREFILL_TOKENS:
                steps.append(self._prefill(batch))
                batch, num_tokens = [], 0
            first = i * self.blocks_per_req
            batch.append(NewRequestData(
                req_id, np.arange(2, 2 + n, dtype=np.int32) % 300, np.zeros(0, np.int32),
                SamplingParams(temperature=self.temperature, seed=i), np.ones(1, np.int32),
                np.arange(first, first + -(-n // BLOCK_SIZE), dtype=np.int32), 0))
            num_tokens += n
        return steps + [self._prefill(batch)]

    @staticmethod
    def _prefill(new: list[NewRequestData]) -> SchedulerOutput:
        lens = np.asarray([len(r.prompt_token_ids) for r in new], np.int32)
        return SchedulerOutput(new, ContinuingRequestData(), lens, int(lens.sum()), [])

    def decode(self, step: int) -> SchedulerOutput:
        """Decode step `step` (0-based): request i computes position prompt_len + step."""
        position = self.prompt_lens + step
        owners = np.flatnonzero(position % BLOCK_SIZE == 0).astype(np.int32)
        blocks = owners * self.blocks_per_req + position[owners] // BLOCK_SIZE
        n = len(self.req_ids)
        return SchedulerOutput([], ContinuingRequestData(list(self.req_ids), owners,
                                                     blocks.astype(np.int32)),
                               np.ones(n, np.int32), n, [])


def make_worker(num_requests: int, num_blocks: int, model: str, piecewise_tokens: int = 0):
    """A Worker on the default device: the tiny random model (float32 on a CPU) or a shape from
    zllm.bench.throughput.MODEL_SHAPES with dummy weights. `piecewise_tokens` > 0 also captures
    piecewise CUDA graphs (a GPU only), which decode steps never replay: their host stages show
    what merely having them costs."""
    from zllm.worker.worker import Worker

    settings = dict(block_size=BLOCK_SIZE, max_num_seqs=num_requests, num_kv_blocks=num_blocks,
                    piecewise_cuda_graph_tokens=piecewise_tokens)
    if model == "tiny-random":
        settings.update(model="tiny-random", device="cpu", dtype="float32")
    else:
        from zllm.bench.throughput import model_dir_for

        settings.update(model=model_dir_for(model), load_format="dummy", max_model_len=8192)
    config, _ = resolve_model(EngineConfig.from_dict({}, **settings))
    worker = Worker(config, rank=0, distributed_init_method=None)
    worker.init_distributed_environment()
    worker.init_model()
    worker.init_kv_cache(num_blocks)
    return worker


def time_worker(num_requests: int, warmup: int, steps: int, temperature: float = 0.0,
                model: str = "tiny-random", context: int = BLOCK_SIZE,
                piecewise_tokens: int = 0) -> dict[str, float]:
    """Median microseconds per stage over `steps` decode steps, after `warmup`."""
    workload = DecodeWorkload(num_requests, warmup + steps, temperature, context)
    worker = make_worker(num_requests, workload.num_blocks, model, piecewise_tokens)
    try:
        for prefill in workload.prefills():
            worker.launch(prefill)
            worker.collect()
        timer = worker.model_runner.timer
        worker.launch(workload.decode(0))
        for step in range(1, warmup + steps + 1):
            timer.enabled = step > warmup
            worker.launch(workload.decode(step))
            worker.collect()  # the step before: step N+1 was launched before it was read
        worker.collect()
        laps = {stage: statistics.median(times) * 1e6 for stage, times in timer.laps.items()}
        graphs = worker.model_runner.graphs
        replays = graphs.num_replays if graphs is not None else 0
    finally:
        worker.shutdown()
    laps["input_prep"] = sum(laps.get(stage, 0.0) for stage in PREP_STAGES)
    laps["host_total"] = sum(v for k, v in laps.items() if k != "input_prep")
    laps["graph_steps"] = replays / (warmup + steps + 1)  # decode steps that replayed a graph
    return laps


def worker_rows(counts: list[int], warmup: int, steps: int, temperature: float,
                model: str = "tiny-random", context: int = BLOCK_SIZE,
                piecewise_tokens: int = 0) -> list[dict]:
    rows = []
    for n in counts:
        laps = time_worker(n, warmup, steps, temperature, model, context, piecewise_tokens)
        rows.append({"executor": f"worker ({model})", "num_requests": n,
                     "piecewise_tokens": piecewise_tokens,
                     "graph_steps": laps.pop("graph_steps"),
                     "input_prep_us": laps["input_prep"], "host_total_us": laps["host_total"],
                     **{f"{stage}_us": v for stage, v in laps.items()
                        if stage not in ("input_prep", "host_total")}})
        print(f"worker   {n:>4} requests, piecewise {piecewise_tokens}: input prep "
              f"{laps['input_prep']:7.0f} µs, all host stages "
              f"{laps['host_total']:7.0f} µs, graph steps {rows[-1]['graph_steps']:.0%} (" + ", ".join(
                  f"{stage} {v:.0f}" for stage, v in laps.items()
                  if stage not in ("input_prep", "host_total")) + ")")
    return rows
