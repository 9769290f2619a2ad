"""zllm: a from-scratch LLM serving runtime."""

from zllm.client import AsyncClient, Client, ServerError
from zllm.config import EngineConfig
from zllm.errors import EngineDeadError
from zllm.llm import LLM
from zllm.outputs import CompletionOutput, RequestOutput
from zllm.sampling_params import SamplingParams
from zllm.structured_outputs import StructuredOutputs

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "EngineConfig", "EngineDeadError",
           "RequestOutput", "CompletionOutput", "Client", "AsyncClient", "ServerError"]
