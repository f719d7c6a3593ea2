"""Stable Diffusion 3.5 adapter on a tiny random checkpoint in the real diffusers layout.

The common checks come from tests/adapter_tester.py; this file gives SD3.5's facts and hooks,
and adds its own refusals, the published sizes of its spec and one `dancegrpo train` iteration
with the structure of configs/sd35_hps.yaml.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from adapter_tester import AdapterTesterMixin
from dancegrpo.cli import main
from dancegrpo.config import load_config
from dancegrpo.config.checks import trainable_step_count, trained_step_count
from dancegrpo.memory_estimate import count_diffusers_parameters
from dancegrpo.metrics import read_metrics
from dancegrpo.models import load_model
from dancegrpo.models.prompt_cache import PromptCache
from dancegrpo.models.sd35 import SD35_LARGE_TRANSFORMER, SD35_MEDIUM_TRANSFORMER
from tiny_models import PROMPTS, build_sd35

SEQ = 16          # T5 tokens of the tiny cache (SD3.5: 256 by default, the recipe 128)
HEIGHT, WIDTH = 16, 32
RECIPE = Path(__file__).resolve().parent.parent / "configs" / "sd35_hps.yaml"


class TestSD35(AdapterTesterMixin):
    model = "sd35"
    pipeline_class = StableDiffusion3Pipeline
    denoiser_class = SD3Transformer2DModel
    tiny_options = {"height": HEIGHT, "width": WIDTH, "max_sequence_length": SEQ}
    latent_shape = (4, 8, 16)       # 4 latent channels, VAE factor 2; the transformer patchifies 2x2 itself
    preprocess_options = {"max_sequence_length": SEQ}
    cfg_option = "cfg_scale"
    sample_steps, sample_shift = 4, 3.0   # the tiny scheduler's static shift is SD3.5's 3.0
    # the recipe's LoRA targets (Flow-GRPO's): the joint attention's both streams
    lora_options = yaml.safe_load(RECIPE.read_text())["model"]["options"]["lora"] | {"rank": 4, "alpha": 8}
    bad_options = [({"width": 18}, r"width = 18 not divisible by 4 \(VAE factor 2 x patch size 2\)"),
                   ({"height": 80}, r"height = 80 \(20 patches\) exceeds the transformer's positional embedding "
                                    r"of 16 x 16 patches \(pos_embed_max_size in .*transformer/config.json\)"),
                   ({"max_sequence_length": 8}, r"holds T5 sequences of 16 tokens, but model.options."
                                                r"max_sequence_length = 8; rerun `dancegrpo preprocess --option "
                                                r"max_sequence_length=8`"),
                   ({"cfg_scale": 0.5}, r"cfg_scale = 0.5")]

    def build_checkpoint(self, root):
        return build_sd35(root)

    def pipeline_prompt_embeds(self, pipe, prompts, cache):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=SEQ)
        return {"prompt_embeds": embeds, "pooled_embeds": pooled}

    def pipeline_sample(self, pipe, cond, noise, tiny):
        steps = self.sample_steps  # guidance 4.5: the adapter's default cfg_scale (model card, Flow-GRPO)
        return pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_embeds"],
                    negative_prompt_embeds=cond["negative_prompt_embeds"],
                    negative_pooled_prompt_embeds=cond["negative_pooled_embeds"], latents=noise,
                    height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                    sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], guidance_scale=4.5, output_type="latent").images

    def pipeline_decode(self, pipe, latents):
        scaled = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        return pipe.image_processor.postprocess(pipe.vae.decode(scaled).sample, output_type="pt")

    def unguided_predict(self, adapter, x, t, cond, prefix):
        return adapter.transformer(hidden_states=x, timestep=t * 1000,
                                   encoder_hidden_states=cond[f"{prefix}prompt_embeds"],
                                   pooled_projections=cond[f"{prefix}pooled_embeds"]).sample

    # ------------------------------------------------------------------ SD3.5's own
    def test_cache_layout_is_clip_padded_then_t5(self, tiny, pipe):
        """prompt_embeds = [CLIP-L | CLIP-G | zeros] over 77 rows, then T5's rows; pooled = both projections."""
        cache = PromptCache(tiny.cache, self.model)
        cond = cache.lookup(PROMPTS[:2])
        assert cond["prompt_embeds"].shape == (2, 77 + SEQ, 64) and cond["pooled_embeds"].shape == (2, 32 + 16)
        assert torch.count_nonzero(cond["prompt_embeds"][:, :77, 48:]) == 0   # 32 + 16 CLIP features, padded to 64
        ids = pipe.tokenizer_3(PROMPTS[:2], padding="max_length", max_length=SEQ, truncation=True,
                               return_tensors="pt").input_ids
        with torch.no_grad():
            t5 = pipe.text_encoder_3(ids)[0]
        torch.testing.assert_close(cond["prompt_embeds"][:, 77:], t5, rtol=0, atol=1e-6)

    def test_dynamic_shifting_scheduler_is_refused_before_loading(self, tiny, tmp_path):
        checkpoint = tmp_path / "ckpt"
        checkpoint.mkdir()
        for entry in tiny.checkpoint.iterdir():
            if entry.name != "scheduler":
                (checkpoint / entry.name).symlink_to(entry)
        (checkpoint / "scheduler").mkdir()
        config = json.loads((tiny.checkpoint / "scheduler" / "scheduler_config.json").read_text())
        dynamic = {**config, "use_dynamic_shifting": True}
        (checkpoint / "scheduler" / "scheduler_config.json").write_text(json.dumps(dynamic))
        with pytest.raises(ValueError, match=r"scheduler_config.json sets use_dynamic_shifting = true"):
            load_model(self.model, str(checkpoint), self.options(tiny))

    def test_recipe_trains_one_iteration_through_the_cli(self, tiny, tmp_path):
        """configs/sd35_hps.yaml as is (LoRA on Flow-GRPO's modules, flow_grpo SDE, CFG, KL, last step
        excluded), with only the sizes, paths, device and reward overridden to tiny ones."""
        out = tmp_path / "run"
        sets = [f"run.output_dir={out}", "run.device=cpu", "run.autocast_dtype=none", f"model.path={tiny.checkpoint}",
                f"model.options.prompt_cache={tiny.cache}", f"model.options.height={HEIGHT}",
                f"model.options.width={WIDTH}", f"model.options.max_sequence_length={SEQ}",
                "model.options.lora.rank=4", "model.options.lora.alpha=8",
                f"data.train_prompts={tiny.cache}/prompts.txt",
                "rewards=[{name: 'tiny_models:brightness'}]", "sampler.num_steps=3", "sampler.eval_num_steps=3",
                "grpo.group_size=2", "grpo.prompts_per_iteration=1", "trainer.iterations=1",
                "trainer.micro_batch_size=2", "trainer.updates_per_iteration=1", "trainer.checkpoint_every=1"]
        args = ["train", "--config", str(RECIPE), "--no-progress"]
        for item in sets:
            args += ["--set", item]
        assert main(args) == 0
        saved = load_config(str(out / "config.yaml"))
        recipe = load_config(str(RECIPE))
        assert saved.model.options["lora"]["target_modules"] == recipe.model.options["lora"]["target_modules"]
        assert (saved.sampler.sde_form, saved.grpo.kl_coef, saved.grpo.exclude_last_step) == ("flow_grpo", 0.01, True)
        [row] = read_metrics(out)
        assert row["step"] == 1 and row["first_update_logp_max_dev"] == 0.0 and row["grad_norm"] > 0
        assert (out / "final_model" / "transformer_lora" / "adapter_config.json").is_file()


def test_spec_configs_build_the_published_models():
    """The spec's configs build the real diffusers class (no memory allocated): Large has the 8.1 B
    parameters Stability AI announced. Medium counts 2.24 B this way where Stability AI quotes
    "2.5 billion" for the model, so it is only bounded here."""
    medium = count_diffusers_parameters("SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER)
    large = count_diffusers_parameters("SD3Transformer2DModel", SD35_LARGE_TRANSFORMER)
    assert round(large / 1e9, 1) == 8.1, large
    assert 2e9 < medium < large / 3, medium


def test_recipe_trains_flow_grpos_steps_and_updates():
    """Flow-GRPO (train_sd3.py) trains steps j = 0 .. int(10 * 0.99) - 1 = 0 .. 8 of every sample and
    steps the optimizer twice per epoch (each GPU: 4 batches of 9 samples, accumulation 2): the recipe
    picks 9 steps of 10, never the last, and 2 updates."""
    cfg = load_config(str(RECIPE))
    assert int(10 * 0.99) == 9 == trained_step_count(trainable_step_count(cfg), cfg.grpo.tau, cfg.grpo.tau_rounding)
    per_gpu_samples, flow_grpo_batch, accumulation = 9 * 4, 9, 4 // 2
    assert cfg.trainer.updates_per_iteration == per_gpu_samples // (flow_grpo_batch * accumulation)
    assert cfg.grpo.prompts_per_iteration * cfg.grpo.group_size == 32 * per_gpu_samples
