"""The embedded toy generator: on-disk format, packing, and adapter behaviour."""
import json

import pytest
import torch
from diffusers import FluxTransformer2DModel

from dancegrpo.models import load_model
from dancegrpo.models.toy_flux import (ToyFluxGenerator, build_toy_flux, latents_to_pixels, pack_latents, pixels_to_latents,
                                       unpack_latents)


def test_pack_unpack_and_pixel_round_trip():
    x = torch.randn(3, 12, 16, 16)
    assert torch.equal(unpack_latents(pack_latents(x), 12, 16, 16), x)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(latents_to_pixels(pixels_to_latents(images)), images, atol=1e-6, rtol=0)


def test_pack_matches_flux_pipeline_layout():
    """Token k of the packed latent holds the 2x2 patch at (row, col) = divmod(k, w/2)."""
    x = torch.randn(1, 4, 6, 8)
    tokens = pack_latents(x)
    row, col = divmod(5, 4)
    patch = x[0, :, 2 * row: 2 * row + 2, 2 * col: 2 * col + 2]  # (C, 2, 2)
    assert torch.equal(tokens[0, 5], patch.reshape(-1))


def test_checkpoint_loads_through_diffusers_and_matches(tiny_checkpoint):
    model = load_model("toy_flux", str(tiny_checkpoint))
    direct = FluxTransformer2DModel.from_pretrained(tiny_checkpoint, subfolder="transformer")
    for (name, a), (_, b) in zip(model.transformer.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    cond = model.encode_prompts(["a red circle", "two blue squares"])
    x, t = torch.randn(2, *model.latent_shape()), torch.tensor([1.0, 0.3])
    with torch.no_grad():
        out = model.predict(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_save_pretrained_round_trip(tmp_path, tiny_checkpoint):
    model = ToyFluxGenerator.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "copy")
    again = ToyFluxGenerator.from_pretrained(tmp_path / "copy")
    cond = model.encode_prompts(["a green triangle above a red square"])
    x, t = torch.randn(1, *model.latent_shape()), torch.tensor([0.5])
    with torch.no_grad():
        assert torch.equal(model.predict(x, t, cond), again.predict(x, t, again.encode_prompts(
            ["a green triangle above a red square"])))


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        ToyFluxGenerator.from_pretrained(tmp_path)


def test_unknown_word_is_refused_with_vocabulary(tiny_checkpoint):
    model = ToyFluxGenerator.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="purple"):
        model.encode_prompts(["a purple circle"])


def test_embedded_checkpoint_is_committed_and_loads():
    model = load_model("toy_flux")
    index = json.loads((model_dir := __import__("dancegrpo.models.toy_flux", fromlist=["x"]).EMBEDDED_CHECKPOINT)
                       .joinpath("model_index.json").read_text())
    assert index["image_size"] == model.image_size == 32
    assert index["latent_space"] == "vae" and model.latent_shape() == (4, 8, 8)  # the small latent RL learns on
    assert model_dir.joinpath("pretrain_config.yaml").is_file()


def test_small_native_size_round_trips_and_decodes_to_output_size(tmp_path):
    from conftest import TINY_TEXT, TINY_TRANSFORMER
    model = build_toy_flux(seed=3, image_size=16, output_size=32, transformer_overrides=TINY_TRANSFORMER,
                           text_overrides=TINY_TEXT)
    model.save_pretrained(tmp_path)
    loaded = ToyFluxGenerator.from_pretrained(tmp_path)
    assert (loaded.image_size, loaded.output_size, loaded.latent_shape()) == (16, 32, (12, 8, 8))
    latents = torch.randn(2, 12, 8, 8)
    small = latents_to_pixels(latents)
    expected = torch.nn.functional.interpolate(small, size=32, mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.equal(loaded.decode(latents), expected)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_toy_flux(image_size=18)
