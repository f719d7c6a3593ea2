"""Decode and score rollout chunks on a worker thread while later chunks sample (trainer.overlap_rewards)."""
from __future__ import annotations

import torch

from .protocol import RewardEntry, RewardFn, RewardScores, RewardSet, as_reward_output, concat_outputs
from .async_scorer import AsyncScorer


class OverlappedScoring:
    """Decode and score each rollout chunk on a worker thread while later chunks sample.

    `submit` is run_rollout's `on_chunk_done`; `gather` waits for every chunk and returns
    what `rewards.score` on the whole batch would. Each reward's raw chunk outputs (or its
    exception) are kept and replayed through `rewards.score` over the full batch, so
    validity, fault counts, thresholds and logs are exactly those of the synchronous path:
    a reward that raises on any chunk fails the whole batch, as it would have at once.
    This assumes, like any batched scorer, that a sample's score does not depend on the
    other samples in its batch.
    """

    def __init__(self, adapter, rewards: RewardSet, prompts: list[str], device: torch.device, max_pending: int = 2):
        self.adapter, self.rewards, self.prompts, self.device = adapter, rewards, prompts, device
        self._scorer = AsyncScorer(self._decode_and_score, max_pending)
        self._futures = []
        self._next_row = 0

    def submit(self, rows: torch.Tensor, final_latents: torch.Tensor) -> None:
        # Chunks are consecutive ranges, in order: their prompts follow without reading `rows`
        # (which would wait for the device).
        start, self._next_row = self._next_row, self._next_row + len(rows)
        self._futures.append(self._scorer.submit(final_latents, self.prompts[start:self._next_row]))

    @torch.no_grad()  # grad mode is per thread: the worker's must be off as in the synchronous path
    def _decode_and_score(self, latents: torch.Tensor, prompts: list[str]) -> dict:
        images = self.adapter.decode(latents)
        raw = {}
        for entry in self.rewards.entries:
            try:
                raw[entry.name] = as_reward_output(entry.fn(images, prompts), len(prompts), images.device)
            except Exception as err:  # replayed by gather(), where RewardSet logs and counts it
                raw[entry.name] = err
        return raw

    def gather(self) -> RewardScores:
        try:
            chunks = [future.result() for future in self._futures]
        finally:
            self._scorer.close()

        def replay(name: str) -> RewardFn:
            def scores(images, prompts):
                parts = [chunk[name] for chunk in chunks]
                failed = [part for part in parts if isinstance(part, Exception)]
                if failed:
                    raise failed[0]
                return concat_outputs(parts)
            return scores

        replayed = RewardSet([RewardEntry(e.name, replay(e.name), e.weight, e.threshold) for e in self.rewards.entries])
        # The replayed rewards ignore their images: RewardSet.score reads only the batch size and device.
        return replayed.score(torch.empty((len(self.prompts), 0), device=self.device), self.prompts)
