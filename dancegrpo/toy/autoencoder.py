"""Deterministic training of the toy generator's autoencoder (its "VAE", as FLUX has one).

    python -m dancegrpo.toy.autoencoder --config configs/toy_autoencoder.yaml

A diffusers AutoencoderKL at toy size, trained on procedurally rendered scenes with an L1 +
L2 reconstruction loss and a small KL term (which keeps the latent smooth, so imperfect
latents from the flow still decode to clean shapes). After training, the latent's mean and
std over the data set become the VAE's `shift_factor` and `scaling_factor`, as in FLUX, so
the flow sees latents of zero mean and unit variance. The saved directory is loadable with
`AutoencoderKL.from_pretrained`; `dancegrpo.toy.pretrain` builds the generator on it.

The figure of merit is the checker's accuracy on reconstructions of rendered scenes: a
decoder that loses shapes or colours would cap what any generator on it can reach.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL
from tqdm import tqdm

from .checker import check
from .grammar import all_prompts, balance_by_kind
from .render import render_batch


@dataclass
class AutoencoderConfig:
    seed: int = 0
    steps: int = 1000
    dataset_size: int = 8192
    held_out: int = 256  # the last scenes of the data set, never trained on, for the reported figures
    batch_size: int = 64
    lr: float = 2e-3  # one-cycle peak
    kl_weight: float = 1e-4  # per latent element, relative to the per-pixel reconstruction loss
    image_size: int = 32
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # 3 blocks: 4x downsampling, 32 px -> 8 x 8 latent
    norm_num_groups: int = 8
    num_threads: int = 2
    output_dir: str = "runs/toy_autoencoder"

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if self.held_out >= self.dataset_size:
            raise ValueError(f"held_out = {self.held_out} must be smaller than dataset_size = {self.dataset_size}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must all be multiples of "
                             f"norm_num_groups = {self.norm_num_groups}")


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    torch.manual_seed(cfg.seed)
    blocks = len(cfg.block_out_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=cfg.block_out_channels, layers_per_block=1, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups, sample_size=cfg.image_size, mid_block_add_attention=False,
        scaling_factor=1.0, shift_factor=0.0)


def autoencoder_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float,
                     generator: torch.Generator) -> torch.Tensor:
    x = images * 2 - 1
    posterior = vae.encode(x).latent_dist
    reconstruction = vae.decode(posterior.sample(generator=generator)).sample
    kl_per_element = posterior.kl().mean() / posterior.mean[0].numel()
    return (reconstruction - x).abs().mean() + (reconstruction - x).square().mean() + kl_weight * kl_per_element


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] through the posterior mean and back."""
    return (vae.decode(vae.encode(images * 2 - 1).latent_dist.mode()).sample + 1).div(2).clamp(0, 1)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: torch.Tensor, chunk: int = 512) -> tuple[float, float]:
    """(mean, std) of the posterior means over `images`, all elements pooled (FLUX's two factors)."""
    z = torch.cat([vae.encode(images[i:i + chunk] * 2 - 1).latent_dist.mode() for i in range(0, len(images), chunk)])
    return z.mean().item(), z.std().item()


def train_autoencoder(cfg: AutoencoderConfig, progress: bool = True) -> Path:
    torch.set_num_threads(cfg.num_threads)
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts = balance_by_kind(all_prompts())
    picks = torch.randint(len(prompts), (cfg.dataset_size,), generator=generator)
    data_prompts = [prompts[i] for i in picks]
    images = torch.cat([render_batch(data_prompts[i: i + 512], generator, size=cfg.image_size)
                        for i in range(0, cfg.dataset_size, 512)])
    train_rows = cfg.dataset_size - cfg.held_out
    vae = build_autoencoder(cfg)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.05)
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="train toy autoencoder", dynamic_ncols=True, disable=not progress)
    for step in bar:
        rows = torch.randint(train_rows, (cfg.batch_size,), generator=generator)
        loss = autoencoder_loss(vae, images[rows], cfg.kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    mean, std = latent_statistics(vae, images[:train_rows])
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    held_images, held_prompts = images[train_rows:], data_prompts[train_rows:]
    accuracy = check(reconstruct(vae, held_images), held_prompts).correct.float().mean().item()
    out = Path(cfg.output_dir)
    vae.save_pretrained(out)
    (out / "autoencoder_config.yaml").write_text(yaml.safe_dump(
        {**asdict(cfg), "block_out_channels": list(cfg.block_out_channels)}, sort_keys=False))
    print(f"saved {out} after {cfg.steps} steps in {time.time() - start:.0f}s: checker accuracy on "
          f"{cfg.held_out} held-out reconstructions {accuracy:.3f}; latent shift {mean:.4f}, scale {1 / std:.4f}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_autoencoder.yaml")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    from ..io_errors import load_yaml
    cfg = AutoencoderConfig(**(load_yaml(args.config, "autoencoder config file") or {}))
    if args.output_dir:
        cfg.output_dir = args.output_dir
    train_autoencoder(cfg)


if __name__ == "__main__":
    main()
