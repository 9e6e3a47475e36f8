"""Progress of a submission: a live block in a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from orch.tracking.schema import is_eval_key, short_name
from orch.trial.status import COMPLETED, DIVERGED, FAILED, PENDING, RUNNING

MIN_RATE_SECONDS = 5.0
QUIET = {"on": False}
"""`orch -q`: no progress lines (the driver's own summary lines stay)."""


def set_quiet(on: bool) -> None:
    QUIET["on"] = on


def say_plain(line: str) -> None:
    """The driver's own lines (the summary, errors): shown even with -q."""
    print(line, file=sys.stdout, flush=True)


@dataclass
class TrialProgress:
    label: str
    steps: int
    step: int = 0
    status: str = PENDING
    last: str = ""


@dataclass
class Progress:
    """Tracks every trial of a submission. `started`, `update` and `finished` are called by the backends.

    In a terminal the view (counts per status, each running trial's step and last metric, elapsed and estimated
    time left) is redrawn in place; otherwise each event is one plain line.
    """

    trials: dict[str, TrialProgress]
    stream: TextIO | None = None
    """Where to write; None = the current sys.stdout, looked up at each write (Tune pickles its callbacks)."""
    live: bool | None = None
    started_at: float = field(default_factory=time.time)
    _drawn: int = 0
    _last_draw: float = 0.0
    _rate_from: tuple[float, int] | None = None

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = self.out.isatty()

    @property
    def out(self) -> TextIO:
        return self.stream or sys.stdout

    def started(self, trial_id: str, step: int = 0) -> None:
        trial = self.trials[trial_id]
        trial.status, trial.step = RUNNING, step
        self._event(f"{trial.label}: started" + (f" at step {step}" if step else ""))

    def update(self, trial_id: str, step: int, metrics: dict[str, float]) -> None:
        """A trial's progress: its step and latest metrics; a "note" (text, e.g. that FID reference features are
        being computed) is shown as a line of its own."""
        trial = self.trials[trial_id]
        if self._rate_from is None:  # the clock of the ETA starts with the first progress, not with start-up
            self._rate_from = (time.time(), self.done_steps())
        trial.step = step
        metrics = dict(metrics)
        if note := metrics.pop("note", None):
            self._event(f"{trial.label}: {note}")
        if metrics:
            trial.last = " ".join(f"{short_name(k)}={v:.4g}" for k, v in metrics.items())
        if any(is_eval_key(k) for k in metrics):  # plain mode logs evaluations only
            self._event(f"{trial.label}: step {step}/{trial.steps} {trial.last}", quiet=True)
        elif self.live:
            self._draw()

    def finished(self, trial_id: str, status: str, detail: str = "", warnings: list[str] = ()) -> None:
        trial = self.trials[trial_id]
        trial.status = status
        if status == COMPLETED:
            trial.step = trial.steps
        for warning in warnings:  # from the trial's worker, whose own log the user does not see
            self._event(f"{trial.label}: warning: {warning}")
        self._event(f"{trial.label}: {status}" + (f" — {detail}" if detail else ""))

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((PENDING, RUNNING, COMPLETED, DIVERGED, FAILED), 0)
        for trial in self.trials.values():
            counts[trial.status] = counts.get(trial.status, 0) + 1
        return counts

    def done_steps(self) -> int:
        return sum(t.steps if t.status in (COMPLETED, DIVERGED, FAILED) else t.step for t in self.trials.values())

    def eta_seconds(self) -> float | None:
        """Steps still to run divided by the step rate since the first progress report (start-up, Ray and
        imports aside), once that rate is MIN_RATE_SECONDS old."""
        if self._rate_from is None:
            return None
        since, done_then = self._rate_from
        elapsed = time.time() - since
        left = sum(t.steps - t.step for t in self.trials.values() if t.status in (PENDING, RUNNING))
        rate = (self.done_steps() - done_then) / elapsed if elapsed >= MIN_RATE_SECONDS else 0
        return left / rate if rate > 0 else None

    def summary(self) -> str:
        counts = " ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        eta = self.eta_seconds()
        return f"[{counts}] elapsed {clock(time.time() - self.started_at)}" + (f", ~{clock(eta)} left" if eta else "")

    def view(self) -> list[str]:
        lines = [self.summary()]
        for trial in self.trials.values():
            if trial.status == RUNNING:
                lines.append(f"  {trial.label}: step {trial.step}/{trial.steps} {trial.last}")
        return lines

    def _event(self, line: str, quiet: bool = False) -> None:
        if QUIET["on"]:
            return
        if not self.live:
            print(f"{self.summary()} {line}", file=self.out, flush=True)
            return
        if not quiet:
            self._erase()
            print(line, file=self.out)
            self._drawn = 0
        self._draw(force=True)

    def _erase(self) -> None:
        if self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the block's first line, clear to the end

    def _draw(self, force: bool = False) -> None:
        if QUIET["on"] or (not force and time.time() - self._last_draw < 0.5):
            return
        self._erase()
        lines = self.view()
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self._drawn, self._last_draw = len(lines), time.time()


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
