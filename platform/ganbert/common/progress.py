"""Counts, rate and ETA for long loops (preprocessing, folder synthesis), printed every few seconds."""

from __future__ import annotations

import time


class Progress:
    """Prints `done/total`, rate and ETA at most every `every` seconds (and at the end)."""

    def __init__(self, what: str, total: int, every: float = 5.0) -> None:
        self.what, self.total, self.every = what, total, every
        self.done, self.start, self.last = 0, time.monotonic(), 0.0

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        print(f"[{self.what}] {self.done}/{self.total} done, {rate:.2f}/s, ETA {eta:.0f} s", flush=True)
