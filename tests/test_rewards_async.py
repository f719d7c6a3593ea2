"""AsyncScorer: same results as synchronous scoring, in order; faults propagate, never replaced."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from dancegrpo.rewards import RewardEntry, RewardSet
from dancegrpo.rewards.async_scorer import AsyncScorer


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def nan_for_dogs(images, prompts):
    out = images.amax(dim=(1, 2, 3))
    return torch.where(torch.tensor(["dog" in p for p in prompts]), torch.nan, out)


def test_async_results_equal_synchronous_scoring_in_order():
    reward_set = RewardSet([RewardEntry("brightness", brightness), RewardEntry("nan_for_dogs", nan_for_dogs, 2.0)])
    batches = [(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)),
                ["a cat", "a dog", "a cow", "a dog"][: 4 - i % 2] + ["a dog"] * (i % 2)) for i in range(5)]
    with AsyncScorer(reward_set.score) as scorer:
        futures = [scorer.submit(images, prompts) for images, prompts in batches]
        results = [f.result(timeout=30) for f in futures]
    for (images, prompts), got in zip(batches, results):
        want = reward_set.score(images, prompts)
        assert torch.equal(got.valid, want.valid) and got.faults == want.faults
        for name in want.values:
            torch.testing.assert_close(got.values[name], want.values[name], rtol=0, atol=0, equal_nan=True)
    assert results[0].faults == {"brightness": 0, "nan_for_dogs": 2}


def test_exception_propagates_through_the_future():
    def broken(images, prompts):
        raise RuntimeError("reward model exploded")

    with AsyncScorer(broken) as scorer:
        future = scorer.submit(torch.rand(2, 3, 4, 4), ["a", "b"])
        with pytest.raises(RuntimeError, match="reward model exploded"):
            future.result(timeout=30)
        ok = AsyncScorer(brightness)  # a failure does not poison later batches of another scorer
        assert ok.submit(torch.ones(1, 3, 2, 2), ["x"]).result(timeout=30).item() == 1.0
        ok.close()


def test_reward_faults_inside_a_reward_set_are_counted_not_raised():
    def broken(images, prompts):
        raise ValueError("bad weights")

    reward_set = RewardSet([RewardEntry("broken", broken), RewardEntry("brightness", brightness)])
    with AsyncScorer(reward_set.score) as scorer:
        result = scorer.submit(torch.rand(3, 3, 4, 4), ["a", "b", "c"]).result(timeout=30)
    assert result.faults == {"broken": 3, "brightness": 0} and not result.valid.any()


def test_scoring_runs_in_the_background_and_bounds_pending_batches():
    started, release = threading.Event(), threading.Event()

    def slow(images, prompts):
        started.set()
        release.wait(timeout=30)
        return brightness(images, prompts)

    scorer = AsyncScorer(slow, max_pending=1)
    t0 = time.monotonic()
    first = scorer.submit(torch.rand(2, 3, 4, 4), ["a", "b"])
    assert time.monotonic() - t0 < 5 and started.wait(timeout=30) and not first.done()  # submit did not wait
    blocked = threading.Thread(target=scorer.submit, args=(torch.rand(2, 3, 4, 4), ["a", "b"]))
    blocked.start()
    blocked.join(timeout=0.3)
    assert blocked.is_alive()                        # second batch waits for a free slot
    release.set()
    blocked.join(timeout=30)
    assert not blocked.is_alive() and first.result(timeout=30).shape == (2,)
    scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.submit(torch.rand(1, 3, 2, 2), ["a"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_scoring_equals_synchronous():
    images = torch.rand(4, 3, 64, 64, device="cuda")
    images = images * 2 - images  # pending work on the producer's stream when submitted
    with AsyncScorer(brightness) as scorer:
        got = scorer.submit(images, ["a"] * 4).result(timeout=30)
    assert torch.equal(got, brightness(images, ["a"] * 4))
