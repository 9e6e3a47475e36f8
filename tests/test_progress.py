"""The progress view: plain lines when not a terminal, an in-place block in one."""

import io
import time

from orch.progress import Progress, TrialProgress


def two_trials(live: bool) -> tuple[Progress, io.StringIO]:
    stream = io.StringIO()
    trials = {"a": TrialProgress("lsd seed=0", 100), "b": TrialProgress("psd seed=0", 100)}
    return Progress(trials, stream=stream, live=live), stream


def test_plain_lines_report_counts_evaluations_and_outcomes():
    progress, stream = two_trials(live=False)
    progress.started("a")
    progress.update("a", 10, {"train/loss": 0.9})  # training ticks are not logged in plain mode
    progress.update("a", 50, {"eval/kl/nfe_1": 0.5})
    progress.finished("a", "completed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert "[1 pending 1 running]" in lines[0] and "lsd seed=0: started" in lines[0]
    assert "step 50/100 kl/nfe_1=0.5" in lines[1]
    assert "[1 pending 1 completed]" in lines[2] and "lsd seed=0: completed" in lines[2]


def test_live_view_redraws_in_place_with_running_steps_and_eta():
    progress, stream = two_trials(live=True)
    progress.started_at = time.time() - 60  # a minute of start-up (Ray, imports) does not count as training
    progress.started("a")
    progress.started("b")
    progress.update("a", 10, {"train/loss": 0.9})
    assert progress.eta_seconds() is None  # no estimate from one report
    since, done = progress._rate_from
    progress._rate_from = (since - 10, done)  # as if the first report was 10 s ago
    progress.update("a", 50, {"eval/kl/nfe_1": 0.5})
    view = progress.view()
    assert view[0].startswith("[2 running]") and "left" in view[0]  # 40 steps in 10 s, 150 to go: ~37 s
    assert any("lsd seed=0: step 50/100 kl/nfe_1=0.5" in line for line in view)
    assert "\x1b[" in stream.getvalue()  # cursor movement: the block was redrawn, not appended
    assert 30 < progress.eta_seconds() < 45


def test_a_note_is_a_line_of_its_own():
    progress, stream = two_trials(live=False)
    progress.started("a")
    progress.update("a", 0, {"note": "computing the FID reference features of 500 images, once"})
    assert "lsd seed=0: computing the FID reference features of 500 images, once" in stream.getvalue()
