"""Rewards the tests name as `rewards_for_tests:<function>` (the `module:callable` path)."""


def mean_brightness(images, prompts):
    """Varies across samples even for a random model, so advantages are non-zero."""
    return images.mean(dim=(1, 2, 3))


def tagged_brightness(images, prompts):
    """Scores plus metadata, like a rule-based checker that is not the toy one: `bright` ((B,)
    bool: mean brightness above 0.3), `contrast` ((B,) float: pixel std) and a `tag` per sample
    (`short` / `long` prompt: over 20 characters)."""
    from dancegrpo.rewards import RewardOutput

    brightness = images.mean(dim=(1, 2, 3))
    tags = ["long" if len(p) > 20 else "short" for p in prompts]
    return RewardOutput(brightness, {"bright": brightness > 0.3, "contrast": images.flatten(1).std(dim=1), "tag": tags})
