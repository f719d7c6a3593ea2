"""Score batch k in the background while batch k+1 samples.

`AsyncScorer(score_fn).submit(images, prompts)` returns a `concurrent.futures.Future` at
once; one worker thread scores submitted batches in order. On CUDA the worker runs on its
own stream, after waiting for the producer's stream up to the point of `submit` (so the
decoded images are complete) and without blocking the producer; on CPU it is a plain
thread (torch releases the GIL inside its kernels, so sampling and scoring overlap).

The scorer is any callable (a RewardSet's `score`, or a single reward). Whatever it
returns is the future's result; whatever it raises is the future's exception, re-raised
by `result()`: a fault is never replaced by a value here. RewardSet already turns a
reward's exception or non-finite score into a dropped, counted sample.

The caller must not modify `images` in place until the future is done (the worker reads
them; nothing is copied).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import Tensor


class AsyncScorer:
    """Runs `score_fn(images, prompts)` on a background thread (and CUDA stream), in order.

    max_pending: submitted but unfinished batches allowed before `submit` blocks, which
    bounds the memory held by batches waiting to be scored.
    """

    def __init__(self, score_fn: Callable[[Tensor, list[str]], Any], max_pending: int = 2):
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending}: must be >= 1")
        self.score_fn = score_fn
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-scorer")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._closed = False

    def submit(self, images: Tensor, prompts: list[str]) -> Future:
        """Queue one batch; returns a Future of `score_fn(images, prompts)`."""
        if self._closed:
            raise RuntimeError("AsyncScorer is closed")
        ready = None
        if images.is_cuda:  # the worker's stream must not read the pixels before the producer wrote them
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(images.device))
        self._slots.acquire()
        try:
            future = self._executor.submit(self._run, images, list(prompts), ready)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def _run(self, images: Tensor, prompts: list[str], ready: torch.cuda.Event | None) -> Any:
        if ready is None:
            return self.score_fn(images, prompts)
        stream = self._streams.setdefault(images.device, torch.cuda.Stream(images.device))
        with torch.cuda.device(images.device), torch.cuda.stream(stream):
            stream.wait_event(ready)
            images.record_stream(stream)  # the caching allocator must not reuse this memory early
            result = self.score_fn(images, prompts)
        stream.synchronize()  # blocks only this worker: the result is complete when the future resolves
        return result

    def close(self, wait: bool = True) -> None:
        """Stop accepting batches; with `wait`, finish the queued ones first."""
        self._closed = True
        self._executor.shutdown(wait=wait)

    def __enter__(self) -> "AsyncScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
