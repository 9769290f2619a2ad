"""Errors that cross module boundaries: raised deep down, caught by the engine or the user."""


class EngineDeadError(RuntimeError):
    """The workers can no longer run steps (a rank died, raised, or went silent).

    Raised by the executor for the step that found the failure and, at once, for every later
    call: the engine's state and the workers' state no longer agree, so nothing can resume.
    """
