"""The lane's circuit breaker as a state machine, on a clock the test moves (no sleeps).

docs/shadowing.md promises: after 5 copies in a row end in error or timeout, copies are shed
for 1 s; then one probe decides whether the circuit closes or opens again.
"""

from __future__ import annotations

import pytest

from shadowlane.shadow.breaker import FAILURES, OPEN_SECONDS, BreakerState, CircuitBreaker


class Clock:
    """A clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def opened(clock: Clock) -> CircuitBreaker:
    breaker = CircuitBreaker(clock)
    for _ in range(FAILURES):
        breaker.failed()
    assert breaker.state == BreakerState.OPEN
    return breaker


def test_the_documented_numbers() -> None:
    assert (FAILURES, OPEN_SECONDS) == (5, 1.0)


def test_closed_admits_everything_and_opens_after_failures_in_a_row(clock: Clock) -> None:
    breaker = CircuitBreaker(clock)
    assert breaker.state == BreakerState.CLOSED and breaker.name == "closed"
    opened_at = [breaker.failed() for _ in range(FAILURES - 1)]
    assert opened_at == [False] * (FAILURES - 1)
    assert breaker.state == BreakerState.CLOSED
    assert breaker.admit() and not breaker.is_open()
    assert breaker.failed() is True  # the fifth: the lane sheds what waits
    assert breaker.state == BreakerState.OPEN and breaker.name == "open"
    assert breaker.is_open() and not breaker.admit()


def test_a_success_resets_the_count_of_failures_in_a_row(clock: Clock) -> None:
    breaker = CircuitBreaker(clock)
    for _ in range(FAILURES - 1):
        breaker.failed()
    breaker.succeeded()
    for _ in range(FAILURES - 1):
        assert breaker.failed() is False
    assert breaker.state == BreakerState.CLOSED


def test_open_sheds_until_the_cool_down_then_lets_one_probe_through(clock: Clock) -> None:
    breaker = opened(clock)
    clock.now += OPEN_SECONDS - 0.001
    assert breaker.is_open() and not breaker.admit()
    clock.now += 0.001
    # past the cool-down copies are built again; admit() picks the one probe
    assert not breaker.is_open()
    assert breaker.state == BreakerState.OPEN
    assert breaker.admit() is True
    assert breaker.state == BreakerState.HALF_OPEN and breaker.name == "half_open"
    assert not breaker.admit()  # one probe at a time
    assert not breaker.is_open()


def test_probe_success_closes(clock: Clock) -> None:
    breaker = opened(clock)
    clock.now += OPEN_SECONDS
    assert breaker.admit()
    breaker.succeeded()
    assert breaker.state == BreakerState.CLOSED
    assert breaker.admit() and breaker.admit()


def test_probe_failure_opens_again_for_a_full_cool_down(clock: Clock) -> None:
    breaker = opened(clock)
    clock.now += OPEN_SECONDS + 5.0  # the probe may come long after the cool-down
    assert breaker.admit()
    assert breaker.failed() is True  # one failure is enough in half-open
    assert breaker.state == BreakerState.OPEN
    clock.now += OPEN_SECONDS - 0.001
    assert breaker.is_open() and not breaker.admit()
    clock.now += 0.001
    assert breaker.admit() and breaker.state == BreakerState.HALF_OPEN


def test_copies_in_flight_when_it_opened_still_count(clock: Clock) -> None:
    # a straggler that succeeds while open closes the circuit: the target answers after all
    breaker = opened(clock)
    breaker.succeeded()
    assert breaker.state == BreakerState.CLOSED and breaker.admit()
    # stragglers that fail while open count toward opening again (a fresh cool-down)
    breaker = opened(clock)
    until = breaker.open_until
    clock.now += 0.5
    assert [breaker.failed() for _ in range(FAILURES)] == [False] * (FAILURES - 1) + [True]
    assert breaker.state == BreakerState.OPEN and breaker.open_until == until + 0.5


def test_failure_of_another_copy_while_the_probe_is_out_opens_again(clock: Clock) -> None:
    breaker = opened(clock)
    clock.now += OPEN_SECONDS
    assert breaker.admit()  # the probe is out
    assert breaker.failed() is True  # a copy started before the opening failed
    assert breaker.state == BreakerState.OPEN


def test_the_limits_are_parameters(clock: Clock) -> None:
    breaker = CircuitBreaker(clock, failures=2, open_for=10.0)
    breaker.failed()
    assert breaker.failed() is True
    clock.now += 9.999
    assert not breaker.admit()
    clock.now += 0.001
    assert breaker.admit()
