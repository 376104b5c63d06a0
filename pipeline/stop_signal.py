"""A named Ray actor by which the driver tells a stage's long-running remote work (a Ray Train
run's workers) to stop: its lease was lost to another run, which now computes the same output,
so only one of them can commit and the other should not go on for hours.

It lives in a module of its own that imports nothing: the actor's process loads only this module
(not torch, not the training code), so it costs a Ray worker's start-up and no more while it
waits out a whole training run."""

from __future__ import annotations

from typing import Optional


class StopSignal:
    """Set once, by the driver, with the reason; read by the workers, which poll it."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason

    def get(self) -> Optional[str]:
        return self.reason
