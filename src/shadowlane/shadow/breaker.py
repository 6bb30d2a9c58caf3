"""A lane's circuit breaker: Envoy's consecutive-failure outlier detection, per lane.

Why a lane has one: a hung or dead target would otherwise cost a connect and a timer for every
copy, and its timeouts would come in bursts of `max_in_flight`. After FAILURES copies in a row
end in error or timeout the circuit opens: copies are shed (counted `dropped`, no connection
tried) for OPEN_SECONDS; then one probe copy decides whether it closes or opens again.

    CLOSED --FAILURES failures in a row--> OPEN --cool-down over, admit()--> HALF_OPEN
    HALF_OPEN --any copy fails--> OPEN          any state --any copy succeeds--> CLOSED

Copies already in flight when the circuit opened still end, and count: one that succeeds
closes the circuit (the target answers after all), one that fails while the probe is out
opens it again, like the probe failing. The clock is injected (the loop's `time` in a lane),
so the transitions can be tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

#: copies in a row ending in error or timeout that open the circuit
FAILURES: Final = 5
#: how long an open circuit sheds copies before it lets one probe through
OPEN_SECONDS: Final = 1.0


class BreakerState:
    """The states, as Final ints: compiled, checking one is a C comparison (an Enum member
    would be an object loaded and compared by pointer, on every copy)."""

    CLOSED: Final = 0
    OPEN: Final = 1
    HALF_OPEN: Final = 2
    NAMES: Final = ("closed", "open", "half_open")


class CircuitBreaker:
    """The breaker of one lane; the lane asks it before building and before sending a copy."""

    __slots__ = ("clock", "failures", "limit", "open_for", "open_until", "state")

    def __init__(
        self, clock: Callable[[], float], failures: int = FAILURES, open_for: float = OPEN_SECONDS
    ) -> None:
        self.clock = clock
        self.limit = failures
        self.open_for = open_for
        self.state = BreakerState.CLOSED
        #: failures in a row since the last success or the last opening
        self.failures = 0
        #: clock time when an open circuit lets a probe through
        self.open_until = 0.0

    @property
    def name(self) -> str:
        return BreakerState.NAMES[self.state]

    def is_open(self) -> bool:
        """Shed a copy without building it: open and still cooling down. Past the cool-down
        the copy is built, and `admit` decides whether it is the probe."""
        return self.state == BreakerState.OPEN and self.clock() < self.open_until

    def admit(self) -> bool:
        """May a copy go to the target now? Closed: yes. Open: no, until the cool-down is
        over; then one copy, the probe, goes and the circuit is half-open. Half-open: no,
        while the probe is out."""
        state = self.state
        if state == BreakerState.CLOSED:
            return True
        if state == BreakerState.OPEN and self.clock() >= self.open_until:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def failed(self) -> bool:
        """A copy ended in error or timeout. True when that opened the circuit (again): the
        lane then fails what waits at once, instead of letting every queued copy pay a
        connect and a timeout against a target that is not answering."""
        self.failures += 1
        if self.state == BreakerState.HALF_OPEN or self.failures >= self.limit:
            self.state = BreakerState.OPEN
            self.open_until = self.clock() + self.open_for
            self.failures = 0
            return True
        return False

    def succeeded(self) -> None:
        """A copy got its answer: the target works, whatever state the circuit was in."""
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.open_until = 0.0
