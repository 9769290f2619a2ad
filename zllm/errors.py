"""Errors that cross module boundaries: raised deep down, caught by the engine or the user."""


class EngineDeadError(RuntimeError):
    """The workers can no longer run steps (a rank died, raised, or went silent).

    Raised by the executor for the step that found the failure and, at once, for every later
    call: the engine's state and the workers' state no longer agree, so nothing can resume on
    these workers (the engine core may rebuild them: see WorkerLostError).
    """


class WorkerLostError(EngineDeadError):
    """A rank died or went silent (Ray reports its actor dead, or a step timed out). Unlike a
    rank that raised, this says nothing about the requests: the engine core rebuilds the worker
    group (`Executor.restart`) and recomputes them, while `max_worker_restarts` allows."""


class RequestError(ValueError):
    """A request that cannot be served as given: its own value is wrong (a prompt too long for
    the context, a token id outside the vocabulary, an invalid schema). `param` names the
    request's field, so the HTTP server's 400 points at it; `code` is OpenAI's error code."""

    def __init__(self, message: str, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param, self.code = param, code


class SlowReaderError(RuntimeError):
    """A streaming client fell further behind its request than the server buffers for it (it
    stopped reading); the request was aborted and its KV blocks freed."""
