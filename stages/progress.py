"""One progress display for a whole run: a tqdm bar in place on a terminal, a few plain lines anywhere else.

tqdm on a stream that is not a terminal (a log file, a CI console, Prefect's captured output) writes a carriage-
return update ten times a second, which a log shows as one endless line. `StepProgress` keeps tqdm for terminals
and otherwise prints at most `lines` lines - one per `total / lines` steps - plus a final one, each with the step
count, the elapsed time and the estimated time left:

    train: step 200/2000 (10%), 0m12s elapsed, ~1m48s left, epoch 40/400, lr 0.0976
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

from tqdm import tqdm


def format_seconds(s: float) -> str:
    """`1h02m` from an hour up, else `4m05s`."""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


class StepProgress:
    """Progress over `total` steps. `update(n)` after n steps; `describe(text)` (e.g. the epoch) and
    `note(text)` (e.g. the learning rate) are shown with the next update; `close()` prints the final state.
    Disabled (`enabled=False`) it prints nothing."""

    def __init__(self, total: int, label: str, enabled: bool = True, file: TextIO | None = None, lines: int = 10):
        self.total, self.label, self.enabled = max(0, int(total)), label, enabled
        self.file = file if file is not None else sys.stderr
        self.done, self.description, self.postfix = 0, "", ""
        self.every = max(1, math.ceil(self.total / max(1, lines)))
        self.start = time.perf_counter()
        self.closed = False
        self.bar = tqdm(total=self.total, unit="step", file=self.file, dynamic_ncols=True) \
            if enabled and _is_tty(self.file) else None

    def describe(self, text: str) -> None:
        self.description = text
        if self.bar is not None:
            self.bar.set_description(text, refresh=False)

    def note(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done < self.total and before // self.every != self.done // self.every:
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.start
        pct = 100 * self.done / self.total if self.total else 100.0
        left = elapsed / self.done * (self.total - self.done) if self.done else math.nan
        parts = [f"step {self.done}/{self.total} ({pct:.0f}%)", f"{format_seconds(elapsed)} elapsed"]
        if self.done < self.total and not math.isnan(left):
            parts.append(f"~{format_seconds(left)} left")
        parts += [p for p in (self.description, self.postfix) if p]
        print(f"{self.label}: " + ", ".join(parts), file=self.file, flush=True)

    def close(self) -> None:
        """The final line (off a terminal) or the bar's last refresh; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()
