"""The frontend's engine for offline use: text in, text out, the engine core behind a client.

    engine = LLMEngine(config)
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step():   # outputs of requests that finished (or stream) this step
            ...

It tokenizes and validates (`Processor`), sends token ids to the engine core, and turns the
core's token ids into text and outputs (`OutputProcessor`), aborting in the core the samples
that a stop string ended. `LLM` is a thin batch API over it.
"""

from __future__ import annotations

from typing import Any, Optional

from zllm.config import EngineConfig
from zllm.frontend.core_client import CoreHandle, InprocClient, MPClient, launch_engine_core
from zllm.frontend.output_processor import OutputProcessor
from zllm.frontend.processor import Processor, Prompt
from zllm.model_files import resolve_model
from zllm.outputs import RequestOutput
from zllm.protocol import EngineStats
from zllm.sampling_params import SamplingParams
from zllm.tokenizer import load_tokenizer


def load_tokenizer_beside(core: CoreHandle, config: EngineConfig):
    """The frontend's tokenizer, loaded while the engine core starts: importing transformers and
    reading the tokenizer take seconds, which would otherwise come before the core's own. If it
    fails, a core this process started is stopped."""
    try:
        return load_tokenizer(config.model.tokenizer or config.model.model)
    except BaseException:
        if core.parent_pipe is not None:  # this process started the core
            core.stop(timeout=10)
        raise


class LLMEngine:
    def __init__(self, config: EngineConfig, core: Optional[CoreHandle] = None) -> None:
        """Start an engine core for `config` (a process, or in this process with
        engine_process: false), or talk to the running one `core` describes."""
        config, self.arch = resolve_model(config)
        self.config = config
        if core is None and config.parallel.engine_process:
            core = launch_engine_core(config)
        if core is not None:
            self.tokenizer = load_tokenizer_beside(core, config)
            self.client = MPClient(core.wait_ready())
        else:
            self.tokenizer = load_tokenizer(config.model.tokenizer or config.model.model)
            self.client = InprocClient(config)
        self.max_model_len: int = self.client.ready["max_model_len"]
        self.processor = Processor(self.tokenizer, self.arch, self.max_model_len,
                                   config.scheduler.max_n, config.scheduler.policy)
        self.output_processor = OutputProcessor(self.tokenizer)

    @property
    def eos_token_ids(self) -> list[int]:
        """The tokens that end a request unless it sets ignore_eos."""
        return self.processor.eos_token_ids.tolist()

    @property
    def engine_core(self):
        """The EngineCore object, when it runs in this process (engine_process: false)."""
        if not isinstance(self.client, InprocClient):
            raise AttributeError("the engine core runs in its own process; set engine_process: "
                                 "false to have it in this one")
        return self.client.core

    def check_request(self, prompt: Prompt, params: SamplingParams,
                      priority: int = 0) -> tuple[Optional[str], list[int]]:
        """Tokenize and validate; returns (text or None, token ids) or raises ValueError."""
        text, prompt_ids = self.processor.tokenize(prompt)
        self.processor.check(prompt_ids, params, priority)
        return text, prompt_ids

    def add_request(self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None,
                    stream: bool = False, priority: int = 0) -> None:
        """Validate and queue a prompt (text or token ids); raises ValueError on bad input.
        With stream=True, `step` returns a delta output for it after every step."""
        params = params or SamplingParams()
        text, prompt_ids = self.check_request(prompt, params, priority)
        self.add_checked_request(request_id, text, prompt_ids, params, stream, priority)

    def add_checked_request(self, request_id: str, text: Optional[str], prompt_ids: list[int],
                            params: SamplingParams, stream: bool = False, priority: int = 0) -> None:
        """Queue a request that check_request has passed."""
        self.add_checked_requests([(request_id, text, prompt_ids, params, priority)], stream)

    def add_checked_requests(self, batch: list[tuple[str, Optional[str], list[int],
                                                     SamplingParams, int]],
                             stream: bool = False) -> None:
        """Queue requests that check_request has passed, (id, text, prompt ids, params,
        priority) each, in one message to the engine core: it admits them all before its next
        step, so an offline batch's first step is as full as the token budget allows."""
        seen: set[str] = set()
        for request_id, *_ in batch:  # before any is queued: nothing half-submitted
            if request_id in self.output_processor.requests or request_id in seen:
                raise ValueError(f"request id {request_id!r} is already in use")
            seen.add(request_id)
        requests, queued = [], []
        try:
            for request_id, text, prompt_ids, params, priority in batch:
                mine = self.processor.make_requests(request_id, prompt_ids, params, priority)
                self.output_processor.add_request(request_id, text, prompt_ids, params,
                                                  [r.request_id for r in mine], stream)
                queued.append(request_id)
                requests += mine
            self.client.add_requests(requests)
        except BaseException:  # none left waiting for outputs that never come
            core_ids = [cid for request_id in queued
                        for cid in self.output_processor.abort_request(request_id)]
            try:  # what did reach the core (the core ignores ids it never saw)
                self.client.abort(core_ids)
            except Exception:  # a dead core: the caller hears of it from what it raised
                pass
            raise

    def abort_request(self, request_id: str) -> None:
        self.client.abort(self.output_processor.abort_request(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Wait for the engine core's next step; outputs of requests that finished or stream."""
        outputs = self.client.get_output()
        if outputs is None:
            return []
        results, stopped = self.output_processor.process(outputs)
        self.client.abort(stopped)
        return results

    def stats(self) -> EngineStats:
        return EngineStats(**self.client.call("stats"))

    def call(self, method: str, *args: Any) -> Any:
        """An engine core control call ("stats", "metrics", "host_times")."""
        return self.client.call(method, *args)

    def shutdown(self) -> None:
        self.client.shutdown()
