"""How many intra-op threads the scheduler's steps use, chosen from measured step times.

On a machine with few cores the right count depends on what else runs there. On an idle 2-core host two
threads decode 1.1-1.35x faster than one (the HTTP event loop needs little). Under background CPU load
a team member that is descheduled holds every matmul at its barrier, and one thread is several times
faster. So neither count can be fixed ahead of time. `ThreadTuner` measures both while serving.

Now and then one decoding step runs with the other count. It is compared with the steps just before and
after it that did the same work: decode-only steps with the same number of rows cost the same to within
a few percent. The count switches when the other one wins a majority of the recent probes by a margin.
A probe that loses makes probing rarer (exponential back-off, up to one in 256 steps), so a loaded
machine pays ~1% of its steps. A switch, or a probe that comes close, makes it frequent again.

The threads wait passively (`serve` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads). Threads that
spin in the OpenMP barrier would take the event loop's core and falsify the comparison.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable, Sequence

import torch

log = logging.getLogger("baichuan2.serve")


class ThreadTuner:
    """Choose between thread counts from step times. Call `threads_for` before a step and `record` after.

    Args:
        choices: candidate counts, the first the initial one (e.g. ``(cores - 1, cores)``).
        period: decode steps between probes at first; it doubles after each loss, up to ``max_period``,
            and resets after a switch or a probe within ``margin``.
        margin: relative speed-up a count must show to be switched to (it must win by that much).
        votes: probes kept per candidate; a switch needs a majority of them to win.
    """

    def __init__(self, choices: Sequence[int], period: int = 12, max_period: int = 256, margin: float = 0.04,
                 votes: int = 3):
        self.choices = list(dict.fromkeys(max(1, int(c)) for c in choices))
        self.current = self.choices[0]
        self.base_period, self.max_period = period, max_period
        self.period = {c: period for c in self.choices}
        self.margin, self.votes = margin, votes
        self.wins: dict[int, deque[float]] = {c: deque(maxlen=votes) for c in self.choices}
        self.switches = 0
        self._turn = 0  # which alternative is probed next
        self._since_probe = 0
        self._probe: int | None = None  # the count the step in flight runs with when it is a probe
        self._before: tuple[Hashable, float] | None = None  # (key, seconds) of the last normal step
        self._pending: tuple[int, Hashable, float] | None = None  # a probe waiting for the step after it

    @property
    def fixed(self) -> bool:
        return len(self.choices) == 1

    def threads_for(self, key: Hashable | None) -> int:
        """The count the next step runs with; ``key`` names its work (None: not comparable, no probe)."""
        self._probe = None
        if key is not None and not self.fixed and self._pending is None and self._before is not None \
                and self._before[0] == key:
            alternative = self._alternatives()[self._turn % (len(self.choices) - 1)]
            if self._since_probe >= self.period[alternative]:
                self._probe = alternative
        threads = self._probe or self.current
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads

    def record(self, key: Hashable | None, seconds: float) -> None:
        """The step announced by the last `threads_for` took ``seconds``."""
        if self._probe is not None:
            self._pending = (self._probe, key, seconds)
            self._since_probe, self._turn = 0, self._turn + 1
            return
        if self._pending is not None:
            threads, probe_key, probe_seconds = self._pending
            self._pending = None
            if key == probe_key and self._before is not None:
                self._judge(threads, probe_seconds / (0.5 * (self._before[1] + seconds)))
        self._before = (key, seconds) if key is not None else None
        self._since_probe += 1

    def _alternatives(self) -> list[int]:
        return [c for c in self.choices if c != self.current]

    def _judge(self, threads: int, ratio: float) -> None:
        """One probe: ``ratio`` = its step time / the neighbouring steps' time at the current count."""
        self.wins[threads].append(ratio)
        log.debug("probe: a step with %d threads took %.3fx the steps with %d", threads, ratio, self.current)
        if ratio > 1.0 + self.margin:  # a loss: probe that count half as often (a loss costs its probes)
            self.period[threads] = min(2 * self.period[threads], self.max_period)
        else:  # close or a win: look again soon
            self.period[threads] = self.base_period
        won = sum(r < 1.0 - self.margin for r in self.wins[threads])
        if won * 2 > self.votes:
            log.info("scheduler threads %d -> %d (%d of the last %d probes won, the last at %.2fx)",
                     self.current, threads, won, len(self.wins[threads]), ratio)
            self.current, self.switches = threads, self.switches + 1
            for c in self.choices:  # start afresh: the old verdicts were relative to the old count
                self.wins[c].clear()
                self.period[c] = self.base_period
