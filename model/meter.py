"""A search's clock: the progress line of a long check, and its state and time budgets.

The explorers (model.explore, model.parallel) call `Meter.look` every few hundred states
(and the parallel coordinator about twice a second while its workers expand a level),
so a search too big to finish shows it is alive and stops at its time budget on its
own, mid-level, with the same one line as the state budget.

Progress (`progress=`):
  False    nothing (the library's default: tests, the manifest, benchmarks).
  True     a line from the start (`lockstep check --progress`).
  "auto"   nothing for the first AUTO_AFTER_S seconds, then as True (`lockstep check`
           without --progress): a short check prints what it always printed, and a
           long one cannot be taken for a hang.
On a terminal the line is rewritten in place every TTY_EVERY_S seconds and erased when
the search ends; elsewhere (a log, a pipe, a CI job) it is a whole line every
LOG_EVERY_S seconds, so a log shows a sequence of them rather than carriage returns.

Rejected: a timer thread printing on its own (it would need the search's counters under
a lock, and a SIGALRM-based time budget would fire inside whatever the search was doing;
a check on the search's own thread every few hundred states costs nothing measurable).
"""
from __future__ import annotations

import sys
import time

AUTO_AFTER_S = 5.0    # "auto": a search this old starts printing its progress
TTY_EVERY_S = 2.0     # on a terminal: the line rewritten this often
LOG_EVERY_S = 10.0    # not a terminal: a whole line this often


class BudgetExceeded(RuntimeError):
    """The search passed a budget (`lockstep check --max-states / --max-seconds`): no
    verdict, nothing found in the part explored."""

    def __init__(self, budget: str, states: int, depth: int, seconds: float):
        super().__init__(f"{budget} exceeded at depth {depth} with {states:,} states after "
                         f"{seconds:.1f} s")
        self.states, self.depth, self.seconds = states, depth, seconds


class StateBudgetExceeded(BudgetExceeded):
    """The search stored more than its ``max_states``."""

    def __init__(self, max_states: int, states: int, depth: int, seconds: float):
        super().__init__(f"state budget {max_states:,}", states, depth, seconds)
        self.max_states = max_states


class TimeBudgetExceeded(BudgetExceeded):
    """The search ran longer than its ``max_seconds``."""

    def __init__(self, max_seconds: float, states: int, depth: int, seconds: float):
        super().__init__(f"time budget {max_seconds:g} s", states, depth, seconds)
        self.max_seconds = max_seconds


class Meter:
    def __init__(self, progress=False, max_seconds: float = 0.0, stream=None):
        if progress not in (False, True, "auto"):
            raise ValueError(f"progress: False, True or 'auto', not {progress!r}")
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + max_seconds if max_seconds > 0 else None
        self.max_seconds = max_seconds
        self.every = TTY_EVERY_S if self.tty else LOG_EVERY_S
        if not progress:
            self.next_line = None
        else:
            self.next_line = self.t0 + (AUTO_AFTER_S if progress == "auto" else self.every)
        self.width = 0        # of the line on the terminal (0: none to erase)

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def look(self, states: int, depth: int, frontier: int) -> None:
        """Called by the search as it goes: raise TimeBudgetExceeded past the deadline,
        print the progress line when one is due."""
        if self.deadline is None and self.next_line is None:
            return
        now = time.perf_counter()
        if self.deadline is not None and now > self.deadline:
            raise TimeBudgetExceeded(self.max_seconds, states, depth, now - self.t0)
        if self.next_line is not None and now >= self.next_line:
            self.next_line = now + self.every
            secs = now - self.t0
            line = (f"  {states:,} states  {states / secs:,.0f}/s  depth {depth}  "
                    f"frontier {frontier:,}  {secs:.0f} s")
            if self.tty:
                self.width = max(self.width, len(line))   # cover a longer line before
                print(f"\r{line:{self.width}}", end="", file=self.stream, flush=True)
            else:
                print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Erase the terminal's progress line (the result or the budget's line follows)."""
        if self.width:
            print("\r" + " " * self.width + "\r", end="", file=self.stream, flush=True)
            self.width = 0
