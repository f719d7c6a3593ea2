"""CPU thread count that follows the cores this process really gets (issue 15, item 9).

torch's CPU kernels split each parallel region evenly over its OpenMP threads and wait for
the slowest. When another process holds one of the cores, the thread placed there runs at
a fraction of its speed and every region waits for it: on 2 cores with one busy process the
quickstart ran 4x slower, not 2x. `ThreadGovernor` measures, between iterations, how many of
the allowed cores other processes used, and sets torch's intra-op thread count to the cores
left, so a run degrades about in proportion to the CPU it gets.

Measurement (Linux): the busy time of the allowed CPUs from /proc/stat (user + nice + system
+ irq + softirq + steal jiffies), minus this process's own CPU time (all its threads,
`time.process_time`), over the wall time of the interval, is the number of cores other
processes kept busy. Elsewhere (no /proc/stat) the governor keeps the maximum.

The thread count does not change the toy model's results on CPU (one quickstart iteration is
bit-identical on 1 and 2 threads: tests/test_cpu_threads.py), but torch does not promise this
for every op: set `run.num_threads` to an integer for a fixed count.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PROC_STAT = Path("/proc/stat")
_IDLE_FIELDS = (3, 4)  # idle, iowait (0-based among the numbers after "cpuN")


def allowed_cpus() -> list[int]:
    """The CPU indices this process may run on (its affinity mask), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def read_busy_seconds(cpus: list[int], stat_text: str | None = None) -> float | None:
    """Busy seconds (all processes) summed over `cpus` since boot, from /proc/stat; None if unreadable.

    `stat_text` replaces the file's content (tests). Guest time is already inside user time.
    """
    if stat_text is None:
        try:
            stat_text = PROC_STAT.read_text()
        except OSError:
            return None
    wanted = {f"cpu{c}" for c in cpus}
    ticks = 0
    found = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if name not in wanted:
            continue
        values = [int(v) for v in rest.split()]
        busy = sum(values[:8]) - sum(values[i] for i in _IDLE_FIELDS if i < len(values))
        ticks += busy
        found += 1
    if found != len(wanted):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


def threads_for_free_cores(num_cpus: int, others_busy_cores: float, max_threads: int) -> int:
    """Threads for the cores others leave free: round down, but count a core as free when
    others use less than a quarter of it; at least 1, at most `max_threads`."""
    free = num_cpus - max(0.0, others_busy_cores)
    return max(1, min(max_threads, int(free + 0.25)))


class ThreadGovernor:
    """Set torch's intra-op thread count to the cores not used by other processes.

    Call `update()` between iterations; it returns the thread count in force and logs each
    change. `max_threads` defaults to the allowed CPUs.
    """

    def __init__(self, max_threads: int | None = None, probe_seconds: float = 0.2):
        self.cpus = allowed_cpus()
        self.max_threads = max_threads or len(self.cpus)
        self.threads = torch.get_num_threads()
        self._last = self._snapshot()
        if self._last is not None and probe_seconds > 0:
            time.sleep(probe_seconds)  # a first reading before the first iteration
        self.update()

    def _snapshot(self) -> tuple[float, float, float] | None:
        busy = read_busy_seconds(self.cpus)
        if busy is None:
            return None
        return time.monotonic(), busy, time.process_time()

    def update(self) -> int:
        now = self._snapshot()
        if now is None or self._last is None:
            threads = self.max_threads
        else:
            wall = now[0] - self._last[0]
            if wall < 0.05:  # too short to read jiffies (10 ms each) meaningfully
                return self.threads
            others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
            threads = threads_for_free_cores(len(self.cpus), others, self.max_threads)
            self._last = now
        if threads != torch.get_num_threads():
            log.info("CPU threads: %d -> %d (cores used by other processes changed)", torch.get_num_threads(), threads)
            torch.set_num_threads(threads)
        self.threads = threads
        return threads
