"""Rewards the tests name as `rewards_for_tests:<function>` (the `module:callable` path)."""


def mean_brightness(images, prompts):
    """Varies across samples even for a random model, so advantages are non-zero."""
    return images.mean(dim=(1, 2, 3))
