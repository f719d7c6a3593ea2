"""FLUX.1-dev adapter on a tiny random checkpoint in the real diffusers layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import PeftModel

from dancegrpo.cli import main
from dancegrpo.models import load_model
from dancegrpo.models.checkpoint_layout import CheckpointLayoutError
from dancegrpo.models.prompt_cache import PromptCache
from dancegrpo.models.toy_flux import pack_latents
from dancegrpo.rollout import ode_sample
from dancegrpo.sampler import build_sampler
from dancegrpo.trainer import Trainer
from tiny_models import PROMPTS, brightness, trainer_config

SEQ = 24  # T5 sequence length of the tiny cache, conftest.FLUX_SEQ (FLUX.1-dev: 512)


@pytest.fixture
def flux(tiny_flux):
    return tiny_flux  # (checkpoint, prompt cache), shared by the session (conftest)


def options(cache, **extra):
    return {"prompt_cache": str(cache), "height": 16, "width": 24, **extra}


def test_cache_equals_pipeline_encode_prompt(flux):
    ckpt, cache_dir = flux
    pipe = FluxPipeline.from_pretrained(str(ckpt))
    sequence, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, device="cpu", max_sequence_length=SEQ)
    cached = PromptCache(cache_dir, "flux").lookup(PROMPTS)
    assert "" not in PromptCache(cache_dir).entries  # no CFG, no empty prompt
    torch.testing.assert_close(cached["prompt_embeds"], sequence, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached["pooled_embeds"], pooled, rtol=0, atol=1e-6)


def test_ode_sampling_and_decode_equal_diffusers_flux_pipeline(flux):
    ckpt, cache_dir = flux
    adapter = load_model("flux", str(ckpt), options(cache_dir, guidance_scale=3.5))
    c, h, w = adapter.latent_shape()
    assert (c, h, w) == (4, 8, 12)
    cond = adapter.encode_prompts(PROMPTS[:2])
    noise = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    steps, shift = 4, 3.0
    ours = ode_sample(adapter, build_sampler("flow", steps, 0.0, shift), cond, noise, chunk_size=2)

    pipe = FluxPipeline.from_pretrained(str(ckpt))  # its scheduler applies the same static shift (3.0)
    packed = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_embeds"],
                  latents=pack_latents(noise), height=16, width=24, num_inference_steps=steps,
                  sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], guidance_scale=3.5, output_type="latent").images
    torch.testing.assert_close(pack_latents(ours), packed, rtol=1e-4, atol=1e-5)

    unpacked = pipe._unpack_latents(packed, 16, 24, pipe.vae_scale_factor)
    scaled = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    expected = pipe.image_processor.postprocess(pipe.vae.decode(scaled).sample, output_type="pt")
    torch.testing.assert_close(adapter.decode(ours), expected, rtol=1e-4, atol=1e-5)


def test_trainer_iteration_then_saved_transformer_loads_with_diffusers(flux, tmp_path):
    ckpt, cache_dir = flux
    trainer = Trainer(trainer_config(tmp_path / "run", "flux", ckpt, options(cache_dir)),
                      rewards={"brightness": brightness})
    base = {k: v.clone() for k, v in trainer.adapter.transformer.state_dict().items()}
    trainer.train(progress=False)
    metrics = trainer.metrics[-1]
    assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["updates"] == 1 and metrics["grad_norm"] > 0
    assert any(not torch.equal(base[k], v) for k, v in trainer.adapter.transformer.state_dict().items())

    final = tmp_path / "run" / "final_model"
    loaded = FluxTransformer2DModel.from_pretrained(str(final), subfolder="transformer")
    assert (final / "vae").is_symlink() and (final / "text_encoder_2").exists()
    again = load_model("flux", str(final), options(cache_dir))
    x, t = torch.randn(2, *again.latent_shape()), torch.tensor([0.9, 0.3])
    cond = again.encode_prompts(PROMPTS[2:])
    with torch.no_grad():
        live = trainer.adapter.predict(x, t, cond)
        torch.testing.assert_close(again.predict(x, t, cond), live, rtol=0, atol=0)
        again.transformer = loaded  # the diffusers-loaded module itself, in the same packing
        torch.testing.assert_close(again.predict(x, t, cond), live, rtol=0, atol=0)


def test_lora_round_trip_and_free_reference(flux, tmp_path):
    ckpt, cache_dir = flux
    lora = {"rank": 4, "alpha": 8}
    adapter = load_model("flux", str(ckpt), options(cache_dir, lora=lora))
    params = dict(adapter.trainable.named_parameters())
    assert params and all("lora_" in name for name in params)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)  # as if trained: B is no longer zero
    x, t = torch.randn(2, *adapter.latent_shape()), torch.tensor([0.8, 0.2])
    cond = adapter.encode_prompts(PROMPTS[:2])
    adapter.save_pretrained(tmp_path / "out")

    base_adapter = load_model("flux", str(ckpt), options(cache_dir))
    with torch.no_grad():
        ours = adapter.predict(x, t, cond)
        base_out = base_adapter.predict(x, t, cond)
        assert not torch.allclose(ours, base_out)
        with adapter.frozen_reference().active():
            torch.testing.assert_close(adapter.predict(x, t, cond), base_out, rtol=0, atol=1e-6)

        base_adapter.transformer = PeftModel.from_pretrained(base_adapter.transformer, str(tmp_path / "out" / "transformer_lora"))
        torch.testing.assert_close(base_adapter.predict(x, t, cond), ours, rtol=0, atol=1e-6)
        base_adapter.transformer = FluxTransformer2DModel.from_pretrained(str(tmp_path / "out"), subfolder="transformer")
        torch.testing.assert_close(base_adapter.predict(x, t, cond), ours, rtol=1e-4, atol=1e-5)

    resumed = load_model("flux", str(ckpt), options(cache_dir, lora={**lora, "init_from": str(tmp_path / "out" / "transformer_lora")}))
    with torch.no_grad():
        torch.testing.assert_close(resumed.predict(x, t, cond), ours, rtol=0, atol=1e-6)


def test_refusals_name_the_problem(flux, tmp_path):
    ckpt, cache_dir = flux
    with pytest.raises(ValueError, match=r"width = 18 not divisible by 4 \(VAE factor 2 x 2x2 latent packing\)"):
        load_model("flux", str(ckpt), options(cache_dir, width=18))
    with pytest.raises(CheckpointLayoutError, match="does not exist"):
        load_model("flux", str(tmp_path / "no_such_dir"), options(cache_dir))
    with pytest.raises(FileNotFoundError, match="was written for model 'flux', not 'sd14'"):
        PromptCache(cache_dir, "sd14")
    with pytest.raises(ValueError, match=r"unknown lora option\(s\) \['rnak'\]"):
        load_model("flux", str(ckpt), options(cache_dir, lora={"rnak": 4}))
    assert main(["preprocess", "--model", "flux", "--path", str(ckpt), "--prompts", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path / "c"), "--no-progress"]) == 2


def test_sample_command_writes_pngs(flux, tmp_path):
    import yaml
    from PIL import Image
    ckpt, cache_dir = flux
    cfg = trainer_config(tmp_path / "run", "flux", ckpt, options(cache_dir))
    cfg["rewards"] = [{"name": "tiny_models:brightness"}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "samples"
    assert main(["sample", "--config", str(path), "--prompt", PROMPTS[0], "--prompt", PROMPTS[3],
                 "--out", str(out), "--upscale", "1"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (24, 16)


def test_bf16_autocast_keeps_fp32_master_weights_and_exact_first_ratio(flux, tmp_path):
    ckpt, cache_dir = flux
    lora = {"rank": 4, "alpha": 8}
    for name, opts in (("full", options(cache_dir)),
                       ("lora", options(cache_dir, lora=lora, frozen_dtype="bfloat16"))):
        cfg = trainer_config(tmp_path / name, "flux", ckpt, opts)
        cfg["run"]["autocast_dtype"] = "bf16"
        trainer = Trainer(cfg, rewards={"brightness": brightness})
        metrics = trainer.step()
        assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["grad_norm"] > 0
        assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())  # master weights
        if name == "lora":  # the frozen base (and VAE) sit in bf16, only LoRA weights are fp32
            assert trainer.adapter.vae.dtype == torch.bfloat16
            assert trainer.adapter.transformer.get_base_model().x_embedder.weight.dtype == torch.bfloat16
