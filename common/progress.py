"""Progress of long loops: a tqdm bar on a terminal; in a batch job's log (no terminal, where tqdm draws
nothing), a line with the count and the rate at most once every EVERY seconds, so that hours of training on a
real dataset are not hours of silence."""
from __future__ import annotations

import logging
import time

from tqdm import tqdm

EVERY = 60  # seconds between lines in a log without a terminal
DISABLE = None  # tqdm's: None draws a bar on a terminal only; True always writes the log lines (the tests' setting)
log = logging.getLogger("common.progress")  # the scripts' log handlers take common.* (runs.get_logger)
log.setLevel(logging.INFO)


class Progress:
    def __init__(self, desc: str, unit: str = "img", total: int | None = None, initial: int = 0, leave=False,
                 disable=...):
        """initial: done before this run (a resumed one), counted but not in the rate. disable: tqdm's (None: no
        bar without a terminal; True: the log lines even on one; by default DISABLE)."""
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                        disable=DISABLE if disable is ... else disable)
        self.desc, self.unit, self.total, self.done, self.initial = desc, unit, total, initial, initial
        self.start = self.said = time.time()

    def update(self, n: int = 1, **info) -> None:
        """n more done; info (epoch=..., val=...) shown beside the count."""
        self.done += n
        if not self.bar.disable:
            self.bar.update(n)
            if info:
                self.bar.set_postfix(info, refresh=False)
            return
        now = time.time()
        if now - self.said >= EVERY:
            self.said = now
            of = f"/{self.total}" if self.total else ""
            extra = "".join(f", {k} {v}" for k, v in info.items())
            rate = (self.done - self.initial) / max(now - self.start, 1e-6)
            log.info(f"{self.desc}: {self.done}{of} {self.unit}, {rate:.1f} {self.unit}/s{extra}")

    def update_to(self, n: int, **info) -> None:
        """Brings the count to n, a step counter's: at the first call, the n - 1 steps before it are a resumed
        job's, done before this run, counted but not in the rate (else its first lines gave thousands of
        steps/s)."""
        if self.done == self.initial == 0 and n > 1:
            self.done = self.initial = self.bar.initial = self.bar.n = self.bar.last_print_n = n - 1
        self.update(n - self.done, **info)

    def close(self) -> None:
        self.bar.close()


def counted(iterable, desc: str, unit: str = "img", total: int | None = None):
    """Each item of iterable, counted by a Progress (tqdm's wrapper, with the log lines)."""
    bar = Progress(desc, unit, total)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
