"""dancegrpo: GRPO fine-tuning for diffusion models and rectified flows."""

__version__ = "0.1.0"
