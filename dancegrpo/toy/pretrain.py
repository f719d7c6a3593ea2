"""Deterministic flow-matching pretraining of the embedded toy generator.

    python -m dancegrpo.toy.autoencoder --config configs/toy_autoencoder.yaml
    python -m dancegrpo.toy.pretrain --config configs/toy_pretrain.yaml

produce dancegrpo/assets/toy_flux, the base model the quickstart fine-tunes: the flow
transformer and text encoder are trained on the latents of the (frozen) toy VAE. Training
data is drawn on the fly from the procedural scene renderer, every random draw coming
from one seeded generator, so the same config gives the same weights on the same
machine. The step budget is deliberately small: the base must be imperfect so that RL
has something to learn.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from diffusers import AutoencoderKL

from ..models.toy_flux import EMBEDDED_CHECKPOINT, ToyFluxGenerator, build_toy_flux
from ..sde import time_shift
from .grammar import all_prompts, balance_by_kind
from .render import render_batch


@dataclass
class PretrainConfig:
    seed: int = 0
    steps: int = 2000
    dataset_size: int = 16384  # scenes rendered once up front; rendering is slower than a training step
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    shift: float = 1.0  # sigma ~ time_shift(U(0,1)); 1 = uniform, so low-noise detail is trained too
    snapshot_every: int = 0  # also save <output_dir>/snapshots/step_N every N steps (0 = never)
    num_threads: int = 2
    output_dir: str = str(EMBEDDED_CHECKPOINT)
    init_from: str | None = None  # start from this checkpoint's weights (a second stage)
    decay_steps: int = 0  # cosine-decay the LR to 0 over the last N steps (0 = constant after warmup)
    ema_decay: float | None = None  # save an exponential moving average of the weights instead of the last ones
    image_size: int = 32  # the generator's native resolution; scenes are rendered at this size
    output_size: int | None = None  # decode upsamples to this (None = image_size); the checker sees it
    autoencoder: str | None = None  # a trained toy VAE (dancegrpo.toy.autoencoder): the flow works in its latent
    kind_balanced: bool = False  # draw each prompt kind equally often (grammar.balance_by_kind)
    train_text_encoder: bool = True  # False keeps it frozen at its random init
    transformer: dict = field(default_factory=dict)  # overrides of DEFAULT_TRANSFORMER_CONFIG
    text_encoder: dict = field(default_factory=dict)  # overrides of DEFAULT_TEXT_CONFIG


def lr_factor(cfg: "PretrainConfig", step: int) -> float:
    """Warmup, then constant (so a snapshot at step k equals a k-step run), then an optional
    cosine decay over the last `decay_steps` steps, which sharpens samples a lot."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_start = cfg.steps - cfg.decay_steps
    if cfg.decay_steps and step >= decay_start:
        return warm * 0.5 * (1 + math.cos(math.pi * (step - decay_start) / cfg.decay_steps))
    return warm


def flow_matching_loss(model, x0: torch.Tensor, prompts: list[str], generator: torch.Generator,
                       shift: float) -> torch.Tensor:
    """Rectified-flow loss on clean latents `x0` (from `model.encode_images`)."""
    noise = torch.randn(x0.shape, generator=generator)
    sigma = time_shift(torch.rand(x0.shape[0], generator=generator), shift)
    s = sigma.view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    # Not model.encode_prompts: that one runs without gradients (the text encoder is frozen in RL),
    # and pretraining must train the text encoder too.
    ids, mask = model.text_encoder.tokenize(prompts)
    hidden, pooled = model.text_encoder(ids, mask)
    velocity = model.predict(xt, sigma, {"prompt_embeds": hidden, "pooled_embeds": pooled})
    return (velocity - (noise - x0)).square().mean()


def pretrain(cfg: PretrainConfig, progress: bool = True) -> Path:
    torch.set_num_threads(cfg.num_threads)
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.init_from and cfg.autoencoder:
        raise ValueError(f"pretrain: init_from = {cfg.init_from!r} brings its own latent space; drop "
                         f"autoencoder = {cfg.autoencoder!r} (it only applies to a model built from scratch)")
    if cfg.init_from:
        model = ToyFluxGenerator.from_pretrained(cfg.init_from)
    else:
        vae = _load_autoencoder(cfg.autoencoder) if cfg.autoencoder else None
        model = build_toy_flux(seed=cfg.seed, image_size=cfg.image_size, output_size=cfg.output_size,
                               transformer_overrides=cfg.transformer, text_overrides=cfg.text_encoder, vae=vae)
    model.text_encoder.requires_grad_(cfg.train_text_encoder).train(cfg.train_text_encoder)
    params = list(model.transformer.parameters())
    if cfg.train_text_encoder:
        params += list(model.text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg))
    ema = [p.detach().clone() for p in params] if cfg.ema_decay else None
    prompts = all_prompts()
    if cfg.kind_balanced:
        prompts = balance_by_kind(prompts)
    start = time.time()
    picks = torch.randint(len(prompts), (cfg.dataset_size,), generator=generator)
    data_prompts = [prompts[i] for i in picks]
    # Encoded once up front: rendering and the VAE encoder cost more than a training step.
    data_latents = torch.cat([
        model.encode_images(render_batch(data_prompts[i: i + 512], generator, size=model.image_size))
        for i in tqdm(range(0, cfg.dataset_size, 512), desc="render and encode scenes", disable=not progress)])
    bar = tqdm(range(cfg.steps), desc="pretrain toy_flux", dynamic_ncols=True, disable=not progress)
    for step in bar:
        rows = torch.randint(cfg.dataset_size, (cfg.batch_size,), generator=generator)
        batch_prompts = [data_prompts[i] for i in rows]
        loss = flow_matching_loss(model, data_latents[rows], batch_prompts, generator, cfg.shift)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            with torch.no_grad():
                for average, p in zip(ema, params):
                    average.lerp_(p, 1 - cfg.ema_decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0 and step + 1 < cfg.steps:
            with _weights_swapped(params, ema):
                _save(model, Path(cfg.output_dir) / "snapshots" / f"step_{step + 1}", cfg)
    out = Path(cfg.output_dir)
    if ema is not None:
        with torch.no_grad():
            for average, p in zip(ema, params):
                p.copy_(average)
    _save(model, out, cfg)
    print(f"saved {out} after {cfg.steps} steps in {time.time() - start:.0f}s (final loss {loss.item():.4f})")
    return out


def _load_autoencoder(path: str) -> AutoencoderKL:
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"pretrain: autoencoder = {path!r} holds no trained toy VAE (config.json); train it "
                                "first: python -m dancegrpo.toy.autoencoder --config configs/toy_autoencoder.yaml")
    return AutoencoderKL.from_pretrained(path)


@contextlib.contextmanager
def _weights_swapped(params: list[torch.Tensor], ema: list[torch.Tensor] | None):
    """Temporarily load the EMA weights (if any), so a snapshot holds what the final save would."""
    if ema is None:
        yield
        return
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, average in zip(params, ema):
            p.copy_(average)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, saved in zip(params, live):
                p.copy_(saved)


def _save(model, out: Path, cfg: PretrainConfig) -> None:
    model.save_pretrained(out)
    (out / "pretrain_config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy_pretrain.yaml")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    from ..io_errors import load_yaml
    data = load_yaml(args.config, "pretraining config file") or {}
    cfg = PretrainConfig(**data)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.steps:
        cfg.steps = args.steps
    pretrain(cfg)


if __name__ == "__main__":
    main()
