"""Qwen-Image adapter on a tiny random checkpoint in the real diffusers layout.

The common checks come from tests/adapter_tester.py; this file gives Qwen-Image's facts and hooks,
replaces the CFG check by Qwen-Image's true CFG (rescaled to the conditional prediction's norm),
and adds its own: the prompt template, the text trim that lets both CFG passes batch, the
exponential time shift, and the recipe through `dancegrpo train`.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from adapter_tester import AdapterTesterMixin, _assert_close
from dancegrpo.cli import main
from dancegrpo.metrics import read_metrics
from dancegrpo.models import load_model
from dancegrpo.models.prompt_cache import PromptCache
from dancegrpo.models.qwen_image import PROMPT_TEMPLATE, TEMPLATE_DROP, exponential_shift
from dancegrpo.preprocess import preprocess
from dancegrpo.sde import flow_sigmas
from tiny_models import PROMPTS, QWEN_IMAGE_SCHEDULER, build_qwen_image, write_prompts

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "qwen_image.yaml"
SEQ = 32                     # max_sequence_length of the tiny cache (the pipeline's default: 512)
HEIGHT, WIDTH = 16, 24       # VAE factor 2, then 2x2 packing: 4 x 6 = 24 image tokens
NEGATIVE = " "               # the encoder's default negative prompt (the model card's)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]  # the recipe's


def pipeline_pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def pipeline_shift(image_tokens: int) -> float:
    """exp(mu) with the pipeline's own calculate_shift and the checkpoint's scheduler config."""
    s = QWEN_IMAGE_SCHEDULER
    return math.exp(calculate_shift(image_tokens, s["base_image_seq_len"], s["max_image_seq_len"], s["base_shift"],
                                    s["max_shift"]))


class TestQwenImage(AdapterTesterMixin):
    model = "qwen_image"
    pipeline_class = QwenImagePipeline
    denoiser_class = QwenImageTransformer2DModel
    tiny_options = {"height": HEIGHT, "width": WIDTH}
    latent_shape = (4, 8, 12)       # 4 latent channels, VAE factor 2; packed 2x2 only inside predict
    preprocess_options = {"max_sequence_length": SEQ}
    cfg_option = "cfg_scale"
    sample_steps = 3
    sample_shift = pipeline_shift(24)   # the pipeline's dynamic shift at 24 image tokens, as a static shift
    lora_options = {"rank": 4, "alpha": 8, "target_modules": LORA_TARGETS}
    bad_options = [({"width": 18}, r"width = 18 not divisible by 4 \(VAE factor 2 x 2x2 latent packing\)"),
                   ({"cfg_scale": 0.5}, r"cfg_scale = 0.5 .*1 = no guidance")]

    def build_checkpoint(self, root):
        return build_qwen_image(root)

    def pipeline_prompt_embeds(self, pipe, prompts, cache):
        # The cache's unconditional entry ("") holds the negative prompt; the pipeline pads to the
        # batch's longest prompt (mask None when none is padded), the cache to max_sequence_length.
        texts = [cache.meta["negative_prompt"] if p == "" else p for p in prompts]
        embeds, mask = pipe.encode_prompt(texts, device="cpu", max_sequence_length=SEQ)
        mask = torch.ones(embeds.shape[:2], dtype=torch.int64) if mask is None else mask
        pad = SEQ - embeds.shape[1]
        return {"prompt_embeds": F.pad(embeds, (0, 0, 0, pad)), "prompt_embeds_mask": F.pad(mask, (0, pad))}

    def pipeline_sample(self, pipe, cond, noise, tiny):
        # The pipeline encodes the prompts itself (each CFG pass at its own length, two transformer calls).
        # Its scheduler without shift_terminal: the trainer's sampler does not stretch the schedule to end
        # at sigma 0.02 (configs/qwen_image.yaml says so); the dynamic shift stays.
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
        pipe = QwenImagePipeline(**{**pipe.components, "scheduler": scheduler})
        steps, batch = self.sample_steps, len(noise)
        return pipe(prompt=PROMPTS[:batch], negative_prompt=[NEGATIVE] * batch, true_cfg_scale=4.0,
                    latents=pipeline_pack(noise), height=HEIGHT, width=WIDTH, num_inference_steps=steps,
                    sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], max_sequence_length=SEQ,
                    output_type="latent").images

    def to_pipeline_layout(self, latents):
        return pipeline_pack(latents)

    def pipeline_decode(self, pipe, latents):
        # the decode branch of QwenImagePipeline.__call__
        config = pipe.vae.config
        unpacked = pipe._unpack_latents(latents, HEIGHT, WIDTH, pipe.vae_scale_factor)
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        image = pipe.vae.decode(unpacked / std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type="pt")

    def unguided_predict(self, adapter, x, t, cond, prefix):
        """One transformer pass on packed latents, the text at its own valid length (no shared padding)."""
        text, mask = cond[f"{prefix}prompt_embeds"], cond[f"{prefix}prompt_embeds_mask"]
        length = int(mask.sum(1).max())
        b, _, h, w = x.shape
        return adapter.transformer(hidden_states=pipeline_pack(x), timestep=t, encoder_hidden_states=text[:, :length],
                                   encoder_hidden_states_mask=mask[:, :length],
                                   img_shapes=[[(1, h // 2, w // 2)]] * b).sample

    # ------------------------------------------------------------------ Qwen-Image's own checks
    def test_batched_cfg_equals_two_separate_passes(self, tiny):
        """One transformer call on [cond; uncond] == two calls, each text at its own length, combined
        as QwenImagePipeline does: u + s (c - u), rescaled per token to the norm of c."""
        scale = 7.5  # not the default, so the option is honoured
        adapter = load_model(self.model, str(tiny.checkpoint), self.options(tiny, cfg_scale=scale))
        x, t, cond = self.inputs(adapter, 2)
        with torch.no_grad():
            uncond = self.unguided_predict(adapter, x, t, cond, "negative_")
            text = self.unguided_predict(adapter, x, t, cond, "")
            assert not torch.allclose(uncond, text)  # the negative prompt conditions differently
            combined = uncond + scale * (text - uncond)
            expected = combined * (torch.norm(text, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
            assert not torch.allclose(expected, combined, rtol=1e-3, atol=1e-3)  # the rescale matters
            _assert_close(pipeline_pack(adapter.predict(x, t, cond)), expected, self.tolerance("cfg"),
                          "guided prediction")

    def test_prompt_template_is_the_pipelines(self, pipe):
        assert pipe.prompt_template_encode == PROMPT_TEMPLATE
        assert pipe.prompt_template_encode_start_idx == TEMPLATE_DROP
        # the tiny tokenizer splits the template's system part as the real one does, so the drop is meaningful
        assert len(pipe.tokenizer(PROMPT_TEMPLATE.split("{}")[0]).input_ids) == TEMPLATE_DROP

    def test_text_is_trimmed_to_the_longest_valid_sequence(self, tiny, base_adapter):
        cache = PromptCache(tiny.cache, self.model)
        full = cache.lookup(PROMPTS[:2] + [""])["prompt_embeds_mask"]
        lengths = full.sum(1).tolist()   # the valid tokens are the first ones of each row
        assert full.shape[1] == SEQ and max(lengths) < SEQ and len(set(lengths)) == 3
        cond = base_adapter.encode_prompts(PROMPTS[:2])
        assert cond["prompt_embeds"].shape[1] == max(lengths)
        assert cond["prompt_embeds_mask"].sum(1).tolist() == lengths[:2]
        assert cond["negative_prompt_embeds_mask"].sum(1).tolist() == [lengths[2]] * 2
        assert cond["negative_prompt_embeds"].shape == cond["prompt_embeds"].shape
        unguided = load_model(self.model, str(tiny.checkpoint), self.options(tiny, cfg_scale=1.0))
        alone = unguided.encode_prompts(PROMPTS[2:3])
        assert set(alone) == {"prompt_embeds", "prompt_embeds_mask"}   # no negative pass without CFG
        assert alone["prompt_embeds_mask"].shape[1] == cache.lookup(PROMPTS[2:3])["prompt_embeds_mask"].sum()
        x, t, _ = self.inputs(unguided, 1)
        with torch.no_grad():  # cfg_scale 1: one plain pass
            _assert_close(pipeline_pack(unguided.predict(x, t[:1], alone)),
                          self.unguided_predict(unguided, x, t[:1], alone, ""), self.tolerance("cfg"), "unguided")

    def test_exponential_shift_is_the_static_shift_exp_mu(self):
        """The scheduler's dynamic exponential shift (shift_terminal off) gives the sampler's sigmas
        at shift = exp(mu), for the recipe's 512 x 512 (1024 image tokens) and a tiny size."""
        scheduler = FlowMatchEulerDiscreteScheduler(**{**QWEN_IMAGE_SCHEDULER, "shift_terminal": None})
        for tokens, steps in ((1024, 10), (24, 3)):
            assert exponential_shift(tokens) == pytest.approx(pipeline_shift(tokens), rel=1e-12)
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=math.log(pipeline_shift(tokens)))
            expected = flow_sigmas(steps, exponential_shift(tokens)).double()
            torch.testing.assert_close(scheduler.sigmas.double(), expected, rtol=0, atol=1e-6)
        assert exponential_shift(1024) == pytest.approx(1.7138, abs=1e-4)  # exp(0.5 + 0.4 * 768 / 7936)
        recipe = yaml.safe_load(RECIPE.read_text())
        tokens = (recipe["model"]["options"]["height"] // 16) * (recipe["model"]["options"]["width"] // 16)
        assert recipe["sampler"]["shift"] == pytest.approx(pipeline_shift(tokens), rel=1e-7)

    def test_preprocess_truncates_and_refuses_like_the_pipeline(self, tiny, pipe, tmp_path):
        prompts = write_prompts(tmp_path / "p.txt", [PROMPTS[1]])
        out = preprocess(self.model, tiny.checkpoint, prompts, tmp_path / "short", dtype="float32",
                         options={"max_sequence_length": 6, "negative_prompt": "blurry"}, progress=False)
        cache = PromptCache(out, self.model)
        assert cache.meta["negative_prompt"] == "blurry"
        with torch.no_grad():
            for prompt, text in ((PROMPTS[1], PROMPTS[1]), ("", "blurry")):
                embeds, mask = pipe.encode_prompt([text], device="cpu", max_sequence_length=6)
                _assert_close(cache.lookup([prompt])["prompt_embeds"], embeds, self.tolerance("prompt_cache"), text)
                assert mask is None and cache.lookup([prompt])["prompt_embeds_mask"].sum() == 6
        with pytest.raises(ValueError, match=r"max_sequence_length = 2000 must be an integer in \[1, 1024\]"):
            preprocess(self.model, tiny.checkpoint, prompts, tmp_path / "long", options={"max_sequence_length": 2000})
        foreign = tmp_path / "foreign"
        shutil.copytree(tiny.checkpoint, foreign, symlinks=True)
        tokenizer = json.loads((foreign / "tokenizer" / "tokenizer.json").read_text())
        tokenizer["model"]["merges"] = []   # every word falls back to bytes: the system part is no longer 34 tokens
        (foreign / "tokenizer" / "tokenizer.json").write_text(json.dumps(tokenizer))
        with pytest.raises(ValueError, match=r"splits the prompt template's system part into \d+ tokens, but "
                                             r"QwenImagePipeline drops the first 34"):
            preprocess(self.model, foreign, prompts, tmp_path / "c")
        assert not (tmp_path / "c").exists()

    def test_other_transformer_variants_are_refused_before_loading(self, tiny, tmp_path):
        for change, message in (({"guidance_embeds": True}, r"sets guidance_embeds = true"),
                                ({"zero_cond_t": True}, r"sets zero_cond_t = true"),
                                ({"in_channels": 12}, r"in_channels = 12, patch_size = 2, out_channels = 4, but the "
                                                      r"VAE has z_dim = 4: 2x2 packing needs .* = 16")):
            root = tmp_path / next(iter(change))
            shutil.copytree(tiny.checkpoint, root, symlinks=True)
            config = root / "transformer" / "config.json"
            config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
            (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
            with pytest.raises(ValueError, match=message):
                load_model(self.model, str(root), self.options(tiny))

    def test_spec_shapes(self):
        """The memory estimate's view of the model: its denoiser inputs drive the real class (tiny
        config here), and the sizes are the hand counts at the recipe's 512 x 512."""
        from dancegrpo.models import get_model_spec
        spec = get_model_spec(self.model)
        config = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4))
        inputs = spec.denoiser_inputs(config, {"height": 64, "width": 32, "max_sequence_length": 8}, 3)
        with torch.no_grad():
            out = QwenImageTransformer2DModel(**config)(**inputs)[0]
        assert out.shape == (3, 4 * 2, 16)   # (64/16) x (32/16) packed tokens of 4 x 4 channels
        options = {"height": 512, "width": 512}
        assert spec.latent_numel(options) == 16 * 64 * 64
        assert spec.cond_bytes(options) == 2 * 512 * (3584 * 2 + 8)   # bf16 text + int64 mask, prompt and negative
        assert spec.default_options["cfg_scale"] == 4.0 and spec.cfg and spec.attention_masked

    def test_the_recipe_trains_one_iteration_through_the_command_line(self, tiny, tmp_path):
        """configs/qwen_image.yaml as it is (LoRA on the recipe's modules, Flow-GRPO's SDE on a window,
        true CFG in training), with only the sizes, paths and reward made tiny."""
        run = tmp_path / "run"
        tiny_sizes = [f"model.path={tiny.checkpoint}", f"model.options.prompt_cache={tiny.cache}",
                      f"model.options.height={HEIGHT}", f"model.options.width={WIDTH}", "model.options.lora.rank=4",
                      "model.options.lora.alpha=8", "run.device=cpu",
                      f"data.train_prompts={tiny.cache / 'prompts.txt'}", "rewards=[{name: 'tiny_models:brightness'}]",
                      "grpo.group_size=2", "grpo.prompts_per_iteration=1", "sampler.num_steps=3",
                      "sampler.eval_num_steps=3", "trainer.iterations=1", "trainer.micro_batch_size=2"]
        args = ["train", "--config", str(RECIPE), "--output-dir", str(run), "--no-progress"]
        for override in tiny_sizes:
            args += ["--set", override]
        assert main(args) == 0
        metrics = read_metrics(run)[-1]
        assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["grad_norm"] > 0, metrics
        saved = json.loads((run / "final_model" / "dancegrpo_model.json").read_text())
        assert saved["model"] == "qwen_image" and saved["options"]["lora"]["target_modules"] == LORA_TARGETS
        assert (run / "final_model" / "transformer_lora" / "adapter_config.json").is_file()
