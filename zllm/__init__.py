"""zllm: a from-scratch LLM serving runtime."""

from zllm.client import AsyncClient, Client, ServerError
from zllm.config import EngineConfig
from zllm.llm import LLM
from zllm.outputs import CompletionOutput, RequestOutput
from zllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Client", "AsyncClient", "ServerError", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
