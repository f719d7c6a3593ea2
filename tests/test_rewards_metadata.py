"""The reward protocol's metadata: plain tensors still work, (scores, metadata) is checked,
kept through thresholds, chunking and row selection, and averaged overall and per tag."""
from __future__ import annotations

import logging

import pytest
import torch

from dancegrpo.rewards import (RewardEntry, RewardOutput, RewardSet, as_reward_output, concat_outputs,
                               metadata_metrics)
from dancegrpo.rewards.binary import BinaryReward

PROMPTS = ["a cat", "a dog", "a cow", "a dog"]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def checker(images, prompts):
    """Correct when the prompt names a dog and the image is bright; tagged by animal."""
    score = images.mean(dim=(1, 2, 3))
    correct = torch.tensor(["dog" in p for p in prompts]) & (score > 0.5)
    return RewardOutput(score, {"accuracy": correct, "tag": [p.split()[-1] for p in prompts]})


def _images():
    return torch.stack([torch.full((3, 2, 2), v) for v in (0.2, 0.9, 0.6, 0.4)])


def test_plain_callables_and_pairs_both_work():
    images = _images()
    scores = RewardSet([RewardEntry("plain", brightness),
                        RewardEntry("pair", lambda i, p: (brightness(i, p).tolist(), {"half": brightness(i, p) / 2})),
                        RewardEntry("checker", checker)]).score(images, PROMPTS)
    want = torch.tensor([0.2, 0.9, 0.6, 0.4])
    for name in ("plain", "pair", "checker"):
        torch.testing.assert_close(scores.values[name], want)
    assert scores.metadata["plain"] == {} and scores.valid.all() and set(scores.faults.values()) == {0}
    torch.testing.assert_close(scores.metadata["pair"]["half"], want / 2)
    assert scores.metadata["checker"]["accuracy"].tolist() == [False, True, False, False]


@pytest.mark.parametrize("metadata, match", [
    ({"accuracy": torch.ones(3, dtype=torch.bool)}, r"'accuracy' is not per sample: expected a \(4,\) tensor.*\(3,\)"),
    ({"tag": ["a", "b", "c", 4]}, "'tag' is not per sample: expected .* 4 strings"),
    ({"temperature": 0.7}, "'temperature' is not per sample"),
])
def test_malformed_metadata_fails_the_reward_loudly(metadata, match, caplog):
    bad = RewardEntry("bad", lambda images, prompts: RewardOutput(brightness(images, prompts), metadata))
    with pytest.raises(ValueError, match=match):
        as_reward_output(bad.fn(_images(), PROMPTS), 4, torch.device("cpu"))
    with caplog.at_level(logging.ERROR, logger="dancegrpo.rewards"):
        scores = RewardSet([bad, RewardEntry("ok", brightness)]).score(_images(), PROMPTS)
    assert scores.faults == {"bad": 4, "ok": 0} and not scores.valid.any() and scores.metadata["bad"] == {}
    assert "reward 'bad' failed" in caplog.text


def test_binary_reward_keeps_the_metadata():
    out = BinaryReward(checker, 0.5)(_images(), PROMPTS)
    assert out.scores.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert out.metadata["tag"] == ["cat", "dog", "cow", "dog"]
    assert torch.equal(BinaryReward(brightness, 0.5)(_images(), PROMPTS), torch.tensor([0.0, 1.0, 1.0, 0.0]))


def test_chunks_concatenate_to_the_whole_batch_output():
    images, device = _images(), torch.device("cpu")
    whole = as_reward_output(checker(images, PROMPTS), 4, device)
    parts = [as_reward_output(checker(images[a:b], PROMPTS[a:b]), b - a, device) for a, b in ((0, 1), (1, 4))]
    joined = concat_outputs(parts)
    assert torch.equal(joined.scores, whole.scores) and torch.equal(joined.metadata["accuracy"], whole.metadata["accuracy"])
    assert joined.metadata["tag"] == whole.metadata["tag"]
    with pytest.raises(ValueError, match="different metadata keys"):
        concat_outputs([parts[0], as_reward_output(brightness(images[1:], PROMPTS[1:]), 3, device)])


def test_select_keeps_values_validity_and_metadata_aligned():
    scores = RewardSet([RewardEntry("checker", checker)]).score(_images(), PROMPTS)
    for rows in (torch.tensor([3, 1]), torch.tensor([False, True, False, True])):
        picked = scores.select(rows)
        torch.testing.assert_close(picked.values["checker"], torch.tensor([0.4, 0.9]) if rows.dtype != torch.bool
                                   else torch.tensor([0.9, 0.4]))
        expected_tags = ["dog", "dog"]
        assert picked.metadata["checker"]["tag"] == expected_tags and picked.valid.tolist() == [True, True]
        assert picked.metadata["checker"]["accuracy"].tolist() == ([False, True] if rows.dtype != torch.bool
                                                                   else [True, False])


def test_metadata_metrics_are_means_overall_and_per_tag():
    def measured(images, prompts):
        error = torch.tensor([0.5, float("nan"), 1.5, 2.5])  # the NaN sample is left out of the means
        return RewardOutput(brightness(images, prompts), {"error": error, "tag": ["x", "y", "x", "y"],
                                                          "caption": ["c1", "c2", "c3", "c4"]})

    scores = RewardSet([RewardEntry("checker", checker), RewardEntry("m", measured), RewardEntry("plain", brightness)]
                       ).score(_images(), PROMPTS)
    assert metadata_metrics(scores) == {"checker_accuracy": 0.25, "m_error": pytest.approx(1.5)}
    assert metadata_metrics(scores, by_tag=True) == {
        "checker_accuracy": 0.25, "checker_accuracy/cat": 0.0, "checker_accuracy/dog": 0.5,
        "checker_accuracy/cow": 0.0, "m_error": pytest.approx(1.5), "m_error/x": 1.0, "m_error/y": 2.5}
