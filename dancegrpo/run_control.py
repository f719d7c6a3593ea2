"""The training loop's control around the math: stop signals, the restart test hook, the
non-writing logger of ranks other than 0, and which metrics the console line shows."""
from __future__ import annotations

import os
import signal
import threading

from tqdm import tqdm

CRASH_ENV = "DANCEGRPO_TEST_CRASH"


def crash_for_test(iteration: int) -> None:
    """Test hook for restart-after-failure: with DANCEGRPO_TEST_CRASH="RANK:ITERATION", that
    rank exits abruptly before running that iteration, on the first attempt of a torchrun job only."""
    spec = os.environ.get(CRASH_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank, at = (int(x) for x in spec.split(":"))
    if iteration == at and int(os.environ.get("RANK", "0")) == rank:
        os._exit(17)


class SilentLogger:
    """The metrics logger of ranks other than 0: they compute metrics but write nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def truncate_after(self, step: int) -> int:
        return 0

    def close(self) -> None:
        pass


class StopSignals:
    """First SIGINT/SIGTERM: finish the running iteration, checkpoint, stop. Second: stop now.

    Stopping mid-iteration saves nothing: a half-applied iteration would not resume exactly, and
    the last checkpoint is at most `checkpoint_every` iterations old. Use as a context manager
    (handlers are installed only on the main thread, and restored on exit); `requested` is the flag.
    """

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        tqdm.write(f"{signal.Signals(signum).name}: finishing this iteration, saving a checkpoint, then stopping "
                   "(send it again to stop at once without saving)")
        self.requested = True


def console_keys(metrics: dict, with_kl: bool) -> list[str]:
    """Rewards, loss and ratio health always; faults, skips and eval only when present."""
    keys = [k.removesuffix("_mean") for k in metrics if k.startswith("reward/") and k.endswith("_mean")]
    keys += ["loss", "grad_norm", "ratio", "clip_fraction"]
    keys += ["kl"] if with_kl else []
    keys += [k for k in metrics if k.startswith("eval/")]
    keys += [k for k in metrics if (k.endswith("_faults") or k in ("skipped_updates", "first_update_logp_max_dev"))
             and metrics[k]]
    return keys + ["time"]
