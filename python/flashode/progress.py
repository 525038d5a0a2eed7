"""Progress bars over a solve's time interval: `options=dict(progress=True)`.

The bar advances as the solver's time does (per accepted step of an adaptive method, per grid step
of a fixed-grid one, per step scipy takes) and shows the time reached, the last step size, the
steps taken and func's evaluations. tqdm draws it when installed; without tqdm a line goes to
stderr at most every half second, and one at the end.

`progress` is False (the default: off), True, or a dict of tqdm keyword arguments (`desc`, `file`,
`leave`, `position`, `mininterval`, ...); without tqdm only `desc`, `file` and `mininterval` apply.
Off costs a solve nothing per step but an `is None` test. Inside a solve that torch.compile traces
the bar is off: tracing runs the step loop once, at compile time, so it would report the tracing.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Any, Callable, Iterator, TextIO

import torch

# How often a bar is redrawn at most, in seconds: tqdm's default, and the fallback's.
TQDM_INTERVAL = 0.1
LINE_INTERVAL = 0.5
BOUNDED_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"


class Bar:
    """One bar over the internal times [start, end] (end may be inf: an event search), showing the
    user's time. Subclasses draw it."""

    def __init__(self, start: float, end: float, user_time: Callable[[float], float], interval: float) -> None:
        self.start = start
        self.end = end
        self.span = end - start
        self.user_time = user_time
        self.interval = interval
        self.tau, self.dt, self.nfe, self.steps = start, math.nan, 0, 0
        self._next_draw = 0.0

    def update(self, tau: float, dt: float, nfe: int) -> None:
        """The solver reached internal time tau with a step of dt, after nfe evaluations of func."""
        # An adaptive solver's last step may end past the interval (the outputs are interpolated).
        self.tau, self.dt, self.nfe = min(tau, self.end), dt, nfe
        self.steps += 1
        now = time.monotonic()
        if now >= self._next_draw:  # drawing costs more than a step of a small problem
            self._next_draw = now + self.interval
            self.draw()

    def fraction(self) -> float:
        return 1.0 if self.span == 0 else (self.tau - self.start) / self.span

    def postfix(self) -> str:
        return f"t={self.user_time(self.tau):.6g}, dt={self.dt:.3g}, steps={self.steps}, nfe={self.nfe}"

    def draw(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Draws where the solve ended (the end time, unless it failed) and ends the bar."""
        raise NotImplementedError


class TqdmBar(Bar):
    def __init__(
        self, start: float, end: float, user_time: Callable[[float], float], desc: str, kwargs: dict[str, Any]
    ) -> None:
        from tqdm.auto import tqdm

        super().__init__(start, end, user_time, float(kwargs.get("mininterval", TQDM_INTERVAL)))
        # The bar counts the fraction of the interval done (as a percentage); an event search has no
        # end to count towards, and shows the time reached only.
        if math.isfinite(self.span):
            settings = {"total": 1.0, "bar_format": BOUNDED_FORMAT}
        else:
            settings = {"total": None, "bar_format": "{desc}: [{elapsed}{postfix}]"}
        # Bar.update already limits redraws to one per interval: tqdm draws whenever asked.
        mine = {k: v for k, v in kwargs.items() if k != "mininterval"}
        self.bar = tqdm(**{"desc": desc, **settings, **mine, "mininterval": 0, "miniters": 0})

    def draw(self) -> None:
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        if self.bar.total:
            self.bar.update(self.fraction() - self.bar.n)
        else:
            self.bar.refresh()

    def close(self) -> None:
        self.draw()
        self.bar.close()


class LineBar(Bar):
    """Without tqdm: a line per `interval` seconds, on stderr unless `file` says otherwise."""

    def __init__(
        self, start: float, end: float, user_time: Callable[[float], float], desc: str, kwargs: dict[str, Any]
    ) -> None:
        super().__init__(start, end, user_time, float(kwargs.get("mininterval", LINE_INTERVAL)))
        self.desc = kwargs.get("desc", desc)
        self.file: TextIO | None = kwargs.get("file")
        self.began = time.monotonic()
        self._next_draw = self.began + self.interval  # no line for a solve that ends at once

    def draw(self, note: str = "") -> None:
        done = f"{100 * self.fraction():3.0f}% " if math.isfinite(self.span) else ""
        elapsed = time.monotonic() - self.began
        file = sys.stderr if self.file is None else self.file  # stderr as it is now (tests swap it)
        print(f"{self.desc}: {done}{self.postfix()} [{elapsed:.1f}s{note}]", file=file, flush=True)

    def close(self) -> None:
        self.draw(", done")


class Progress:
    """A solver's `progress` option: opens a bar for each solve, or lends the bar a caller opened
    over several solves (the adjoint's backward intervals, see `spanning`)."""

    def __init__(self, option: Any, desc: str) -> None:
        self.kwargs = _tqdm_kwargs(option)
        self.desc = desc
        self.shared: Bar | None = None

    def open(self, start: float, end: float, user_time: Callable[[float], float]) -> Bar | None:
        """The bar for a solve over the internal times [start, end]; None when off."""
        if self.shared is not None:
            return self.shared
        return self._new_bar(start, end, user_time, self.desc)

    def release(self, bar: Bar | None) -> None:
        """Ends a bar `open` gave, unless it is the shared one."""
        if bar is not None and bar is not self.shared:
            bar.close()

    @contextlib.contextmanager
    def spanning(self, start: float, end: float, user_time: Callable[[float], float], desc: str) -> Iterator[None]:
        """One bar over [start, end] for every solve inside the block."""
        self.shared = self._new_bar(start, end, user_time, desc)
        try:
            yield
        finally:
            bar, self.shared = self.shared, None
            if bar is not None:
                bar.close()

    def _new_bar(self, start: float, end: float, user_time: Callable[[float], float], desc: str) -> Bar | None:
        if self.kwargs is None or torch.compiler.is_compiling():
            return None
        return _bar(start, end, user_time, desc, self.kwargs)


def _bar(start: float, end: float, user_time: Callable[[float], float], desc: str, kwargs: dict[str, Any]) -> Bar:
    try:
        import tqdm  # noqa: F401 (only probing: tqdm is optional)
    except ImportError:
        return LineBar(start, end, user_time, desc, kwargs)
    return TqdmBar(start, end, user_time, desc, kwargs)


def _tqdm_kwargs(option: Any) -> dict[str, Any] | None:
    if option is None or option is False:
        return None
    if option is True:
        return {}
    if isinstance(option, dict):
        return dict(option)
    raise TypeError(
        f"options['progress'] must be True, False or a dict of tqdm keyword arguments, got {type(option).__name__}"
    )


NO_PROGRESS = Progress(False, "")
