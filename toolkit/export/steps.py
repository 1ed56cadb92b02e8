"""Named, timed export steps, shown as a rich progress display when a person is watching.

Exports take tens of seconds (TensorFlow import, tf2onnx, the onnxruntime check); the CLI shows
each step with a spinner and its elapsed time, the library records the same timings in the report.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Steps(AbstractContextManager["Steps"]):
    """``with Steps(show=True) as steps: with steps.step("convert", "Converting"): ...``

    ``show`` may be a text stream to draw on instead of stderr (the CLI passes the terminal while
    TensorFlow's own output goes to a log file)."""

    def __init__(self, show: bool | TextIO = False):
        self.timings: dict[str, float] = {}
        console = Console(stderr=True) if show is True else Console(file=show) if show else None
        self._progress = (
            Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
            if console is not None else None
        )

    def __enter__(self) -> Steps:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def step(self, key: str, description: str) -> Iterator[None]:
        task = self._progress.add_task(description, total=None) if self._progress is not None else None
        start = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.timings[key] = round(time.perf_counter() - start, 3)
            if self._progress is not None and task is not None:
                mark = "[green]done[/]" if ok else "[red]failed[/]"
                self._progress.update(task, total=1, completed=1, description=f"{description} {mark}")
