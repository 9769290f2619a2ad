"""max_worker_restarts within a rolling window."""

from zllm.engine.restart_budget import RestartBudget


class Clock:
    """A clock the test moves by hand (RestartBudget takes any clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restarts_are_counted_over_a_rolling_window():
    clock = Clock()
    budget = RestartBudget(max_restarts=2, window_s=3600, clock=clock)
    assert budget.take()
    clock.now += 1800
    assert budget.take()
    assert not budget.take()  # two within the hour
    clock.now += 1800  # the first is an hour old now
    assert budget.take()
    assert not budget.take()
    assert "2 worker restart(s) per 3600 s" in budget.describe()


def test_zero_restarts_never_allows_one():
    assert not RestartBudget(max_restarts=0, window_s=3600).take()
