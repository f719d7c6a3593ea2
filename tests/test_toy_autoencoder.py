"""The toy generator's autoencoder: training, FLUX-style latent factors, and the latent-mode generator."""
import json

import pytest
import torch
from diffusers import AutoencoderKL

from dancegrpo.models import load_model
from dancegrpo.models.toy_flux import ToyFluxGenerator, build_toy_flux
from dancegrpo.toy.grammar import all_prompts, balance_by_kind
from dancegrpo.toy.render import render_batch
from dancegrpo.toy.autoencoder import AutoencoderConfig, build_autoencoder, train_autoencoder
from dancegrpo.toy.pretrain import PretrainConfig, pretrain

from conftest import TINY_TEXT, TINY_TRANSFORMER

TINY_VAE = dict(block_out_channels=(8, 8, 8), norm_num_groups=4, latent_channels=4)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_vae")
    cfg = AutoencoderConfig(steps=3, dataset_size=48, held_out=16, batch_size=8, num_threads=1,
                            output_dir=str(out), **TINY_VAE)
    return train_autoencoder(cfg, progress=False)


def test_saved_factors_standardise_the_training_latents(tiny_vae_dir):
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    cfg = AutoencoderConfig(dataset_size=48, held_out=16, **TINY_VAE)
    # The same draws as training: one generator, prompts then scenes.
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts = balance_by_kind(all_prompts())
    picks = torch.randint(len(prompts), (cfg.dataset_size,), generator=generator)
    images = render_batch([prompts[i] for i in picks], generator)[:cfg.dataset_size - cfg.held_out]
    with torch.no_grad():
        z = vae.encode(images * 2 - 1).latent_dist.mean
    standardised = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(standardised.mean().item()) < 1e-4
    assert abs(standardised.std().item() - 1) < 1e-4


def test_training_is_deterministic_and_changes_weights(tiny_vae_dir, tmp_path):
    cfg = AutoencoderConfig(steps=3, dataset_size=48, held_out=16, batch_size=8, num_threads=1,
                            output_dir=str(tmp_path / "again"), **TINY_VAE)
    again = AutoencoderKL.from_pretrained(train_autoencoder(cfg, progress=False)).state_dict()
    first = AutoencoderKL.from_pretrained(tiny_vae_dir).state_dict()
    init = build_autoencoder(cfg).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], init[k]) for k in first)


def test_bad_autoencoder_config_is_refused():
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderConfig(block_out_channels=(12, 16), norm_num_groups=8)
    with pytest.raises(ValueError, match="held_out"):
        AutoencoderConfig(dataset_size=64, held_out=64)


def test_latent_mode_generator_round_trips_and_decodes_through_the_vae(tiny_vae_dir, tmp_path):
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    model = build_toy_flux(seed=1, transformer_overrides=TINY_TRANSFORMER, text_overrides=TINY_TEXT, vae=vae)
    assert model.latent_shape() == (4, 8, 8)
    assert model.transformer.config.in_channels == 16
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["latent_space"] == "vae"
    loaded = load_model("toy_flux", str(tmp_path / "m"))
    latents = torch.randn(2, 4, 8, 8)
    cfg = vae.config
    with torch.no_grad():  # reference: AutoencoderKL's own API, with FLUX's (z - shift) * scale convention
        expected = ((vae.decode(latents / cfg.scaling_factor + cfg.shift_factor).sample + 1) / 2).clamp(0, 1)
        images = torch.rand(2, 3, 32, 32)
        expected_latents = (vae.encode(images * 2 - 1).latent_dist.mode() - cfg.shift_factor) * cfg.scaling_factor
        torch.testing.assert_close(loaded.decode(latents), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(loaded.encode_images(images), expected_latents, atol=1e-6, rtol=0)
        cond = loaded.encode_prompts(["a red circle on the left"] * 2)
        assert loaded.predict(latents, torch.tensor([0.7]), cond).shape == latents.shape


def test_latent_mode_errors_name_the_problem(tiny_vae_dir, tmp_path):
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    with pytest.raises(ValueError, match="in_channels = 48"):
        build_toy_flux(transformer_overrides={**TINY_TRANSFORMER, "in_channels": 48, "out_channels": 48}, vae=vae,
                       text_overrides=TINY_TEXT)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_toy_flux(image_size=36, transformer_overrides=TINY_TRANSFORMER, text_overrides=TINY_TEXT, vae=vae)
    build_toy_flux(transformer_overrides=TINY_TRANSFORMER, text_overrides=TINY_TEXT, vae=vae).save_pretrained(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match="latent_space = vae"):
        ToyFluxGenerator.from_pretrained(tmp_path)


def test_pretraining_on_the_vae_latent_writes_a_loadable_latent_model(tiny_vae_dir, tmp_path):
    cfg = PretrainConfig(steps=2, dataset_size=16, batch_size=4, warmup_steps=1, num_threads=1,
                         autoencoder=str(tiny_vae_dir), output_dir=str(tmp_path / "flow"),
                         transformer=TINY_TRANSFORMER, text_encoder=TINY_TEXT)
    model = load_model("toy_flux", str(pretrain(cfg, progress=False)))
    assert model.vae is not None and model.latent_shape() == (4, 8, 8)
    reference = AutoencoderKL.from_pretrained(tiny_vae_dir).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.vae.state_dict().items())  # the VAE stays frozen
    with pytest.raises(FileNotFoundError, match="dancegrpo.toy.autoencoder"):
        pretrain(PretrainConfig(autoencoder=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "y")), progress=False)
    with pytest.raises(ValueError, match="init_from"):
        pretrain(PretrainConfig(init_from=str(tmp_path / "flow"), autoencoder=str(tiny_vae_dir),
                                output_dir=str(tmp_path / "x")), progress=False)
