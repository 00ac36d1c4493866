"""Progress reporting for long stages: a rich bar at the CLI, nothing in library calls."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class Progress:
    """Null reporter; stages call ``task(description, total)`` and advance with the returned callable."""

    @contextmanager
    def task(self, description: str, total: int, unit: str = "it") -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    def log(self, message: str) -> None:
        pass


class RichProgress(Progress):
    """A rich progress bar with rate, on stderr."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: int, unit: str = "it") -> Iterator[Callable[[int], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        class Rate(TextColumn):
            def render(self, t):  # items per second over the task so far
                speed = t.finished_speed or t.speed
                return super().render(t) if speed is None else f"{speed:,.0f} {unit}/s"

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(""), TimeElapsedColumn(), TimeRemainingColumn()]
        with Bar(*columns, console=self.console, transient=False) as bar:
            tid = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(tid, n)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)  # a line is never cut at the console's width
