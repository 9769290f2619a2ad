from zllm.config import EngineConfig
from zllm.executor.base import Executor


def make_executor(config: EngineConfig) -> Executor:
    backend = config.executor_backend
    if backend == "uni":
        from zllm.executor.uniproc import UniprocExecutor

        return UniprocExecutor(config)
    if backend == "ray":
        from zllm.executor.ray_executor import RayExecutor

        return RayExecutor(config)
    raise ValueError(f"unknown distributed_executor_backend {backend!r}")


__all__ = ["Executor", "make_executor"]
