"""Wan 2.1 and 2.2 (two experts) text-to-video adapter on tiny random checkpoints (diffusers layout).

The common checks come from tests/adapter_tester.py; `WanFamily` holds the hooks Wan T2V and I2V
share (UMT5 conditioning, the Wan VAE, the pipeline's sampling with sigmas). The Wan 2.2 class
reruns every check on a two-expert checkpoint (boundary 0.8: the direct predictions at sigma 0.9
and 0.4 and the 3-step sampling use both experts) and adds the checks of the expert switch and
of training one or both experts.
"""
from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import WanPipeline, WanTransformer3DModel

from adapter_tester import AdapterTesterMixin, _assert_close
from dancegrpo.cli import main
from dancegrpo.metrics import read_metrics
from dancegrpo.models import load_model
from dancegrpo.trainer import Trainer
from tiny_models import PROMPTS, brightness, build_wan_t2v

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEQ = 24          # UMT5 tokens of the tiny caches (Wan: 512)
BOUNDARY = 0.8    # the tiny two-expert checkpoint's boundary_ratio


@contextlib.contextmanager
def euler_sigmas(pipe):
    """WanPipeline calls scheduler.set_timesteps(steps) with no sigmas; give it the adapter's
    schedule linspace(1, 0, steps + 1)[:-1] (shifted by the scheduler's shift, as our sampler)."""
    original = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda steps, device=None: original(
        steps, device=device, sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    try:
        yield pipe
    finally:
        del pipe.scheduler.set_timesteps


def expert_of(adapter_or_pipe, t: torch.Tensor):
    """Per row, the pipeline's rule: `transformer` for timesteps >= boundary_ratio x 1000, else `transformer_2`."""
    return t * 1000 >= BOUNDARY * 1000


class WanFamily:
    """Hooks shared by the Wan text- and image-to-video tests."""

    denoiser_class = WanTransformer3DModel
    preprocess_options = {"max_sequence_length": SEQ}
    cfg_option = "cfg_scale"
    sample_steps, sample_shift = 3, 3.0   # the tiny scheduler's shift is 3.0
    two_experts = False
    recipe = "wan21_t2v"

    def pipeline_prompt_embeds(self, pipe, prompts, cache):
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                       max_sequence_length=cache.meta["max_sequence_length"])
        return {"prompt_embeds": embeds}

    def pipeline_decode(self, pipe, latents):
        config = pipe.vae.config   # WanPipeline.__call__'s decode of output_type != "latent"
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1)
        video = pipe.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pt")

    def test_recipe_trains_one_iteration_through_the_command_line(self, tiny, tmp_path):
        """`dancegrpo train` with the recipe as published, only its sizes, paths, device and reward
        overridden: the recipe's structure (CFG scales, experts, LoRA, exclude_last_step, tau...) runs."""
        out = tmp_path / "run"
        overrides = {"run.device": "cpu", "run.output_dir": str(out), "model.path": str(tiny.checkpoint),
                     "model.options.prompt_cache": str(tiny.cache),
                     "data.train_prompts": str(tiny.cache / "prompts.txt"),
                     "sampler.num_steps": 2, "sampler.eval_num_steps": 2, "grpo.group_size": 2,
                     "grpo.prompts_per_iteration": 1, "trainer.iterations": 1, "trainer.checkpoint_every": 1,
                     "rewards": '[{"name": "tiny_models:brightness"}]',
                     **{f"model.options.{k}": v for k, v in self.tiny_options.items()}}
        recipe = CONFIGS / f"{self.recipe}.yaml"
        args = ["train", "--config", str(recipe), "--no-progress"]
        for key, value in overrides.items():
            args += ["--set", f"{key}={value}"]
        assert main(args) == 0
        [row] = read_metrics(out)
        assert row["first_update_logp_max_dev"] == 0.0 and row["grad_norm"] > 0, row
        saved = yaml.safe_load((out / "config.yaml").read_text())
        published = yaml.safe_load(recipe.read_text())["model"]["options"]
        kept = {k: v for k, v in published.items() if k not in self.tiny_options and k != "prompt_cache"}
        assert kept and all(saved["model"]["options"][k] == v for k, v in kept.items())   # the recipe's own options ran
        assert (out / "final_model" / "dancegrpo_model.json").is_file()

    def expert_inputs(self, adapter, x, cond, prefix):
        """hidden_states and extra keyword inputs of one unguided pass (T2V: the latents alone)."""
        return x, {}

    def unguided_predict(self, adapter, x, t, cond, prefix):
        hidden, extra = self.expert_inputs(adapter, x, cond, prefix)

        def run(expert):
            return expert(hidden_states=hidden, timestep=t * 1000, encoder_hidden_states=cond[f"{prefix}prompt_embeds"],
                          **extra).sample
        if not self.two_experts:
            return run(adapter.transformer)
        high = expert_of(adapter, t).view(-1, *[1] * (x.dim() - 1))
        return torch.where(high, run(adapter.transformer), run(adapter.transformer_2))


class TestWan21(WanFamily, AdapterTesterMixin):
    model = "wan_t2v"
    pipeline_class = WanPipeline
    tiny_options = {"height": 32, "width": 32, "frames": 5}
    latent_shape = (4, 2, 4, 4)     # z_dim 4; 1 + (5-1)/4 latent frames; VAE factor 8
    bad_options = [({"frames": 6}, r"frames = 6 is not 4k\+1 .* use 5 or 9"),
                   ({"height": 40}, r"height = 40 not divisible by 16 \(VAE factor 8 x patch size 2\)"),
                   ({"cfg_scale": 0.5}, r"cfg_scale = 0.5 must be >= 1"),
                   ({"cfg_scale": 1.0, "cfg_scale_2": 3.0}, r"cfg_scale_2 = 3.0 has no effect with cfg_scale = 1"),
                   ({"train_experts": ["mid"]}, r"train_experts = \['mid'\] must be a non-empty list"),
                   ({"cfg_scale_2": 3.0}, r"cfg_scale_2 = 3.0 is for two-expert \(Wan 2.2\) checkpoints"),
                   ({"train_experts": ["low"]}, r"names the low-noise expert, but .* has one transformer")]

    def build_checkpoint(self, root):
        return build_wan_t2v(root)

    def pipeline_sample(self, pipe, cond, noise, tiny):
        with euler_sigmas(pipe):   # CFG 5.0: the adapter's default, the pipeline's default
            return pipe(prompt_embeds=cond["prompt_embeds"], negative_prompt_embeds=cond["negative_prompt_embeds"],
                        latents=noise, height=32, width=32, num_frames=5, num_inference_steps=self.sample_steps,
                        guidance_scale=5.0, output_type="latent").frames

    def test_cache_zeroes_the_states_after_each_prompt(self, base_adapter, pipe):
        """The pipeline keeps UMT5 states of the prompt's own tokens and zeros after them: the
        cache does too, so the comparison with encode_prompt above covers real padding."""
        embeds = base_adapter.encode_prompts(PROMPTS)["prompt_embeds"]
        lengths = pipe.tokenizer(PROMPTS, padding="max_length", max_length=SEQ, truncation=True,
                                 return_tensors="pt").attention_mask.sum(1)
        for row, length in zip(embeds, lengths.tolist()):
            assert 0 < length < SEQ and row[:length].abs().sum(1).min() > 0 and not row[length:].any()

    def test_unsupported_or_incomplete_checkpoints_are_refused_before_loading(self, tiny, tmp_path):
        """Wan2.2-TI2V-5B's per-token timesteps (expand_timesteps) and a two-expert model_index.json
        without transformer_2/ are refused, naming the file, before any weights are read."""
        def copy_with(name, index_changes, leave_out=()):
            folder = tmp_path / name
            folder.mkdir()
            for entry in tiny.checkpoint.iterdir():
                if entry.is_dir() and entry.name not in leave_out:
                    (folder / entry.name).symlink_to(entry)
            index = json.loads((tiny.checkpoint / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps({**index, **index_changes}))
            return folder
        with pytest.raises(ValueError, match=r"model_index.json sets expand_timesteps: true \(Wan2.2-TI2V-5B"):
            load_model(self.model, str(copy_with("ti2v", {"expand_timesteps": True})), self.options(tiny))
        with pytest.raises(FileNotFoundError, match=r"boundary_ratio = 0.9 \(two experts\) but lacks transformer_2/"):
            load_model(self.model, str(copy_with("half", {"boundary_ratio": 0.9}, ("transformer_2",))),
                       self.options(tiny))

    def test_text_to_image_iteration_then_diffusers_reload(self, tiny, tmp_path):
        """frames: 1 is text-to-image: rewards see images (B, C, H, W); the checks of a video run hold."""
        run = self.train_once(tmp_path / "run", tiny, frames=1)
        self.assert_one_exact_iteration(run)
        assert run.reward_input_shape == (2, 3, 32, 32)  # 1 prompt x group of 2
        assert run.x.shape[2] == 1  # one latent frame
        self.assert_reloads_bit_identical(run, tiny)


@contextlib.contextmanager
def experts_swapped(adapter, **modules):
    """Run `adapter.predict` with other expert modules (diffusers- or peft-loaded)."""
    live = {name: getattr(adapter, name) for name in modules}
    for name, module in modules.items():
        setattr(adapter, name, module)
    try:
        yield adapter
    finally:
        for name, module in live.items():
            setattr(adapter, name, module)


class TwoExperts:
    """The checks of a Wan 2.2 two-expert checkpoint (T2V and I2V), on top of every shared check:
    `transformer` (high noise) and `transformer_2` (low noise) switched at boundary_ratio x 1000."""

    two_experts = True

    def trainer_config(self, run_dir, tiny, **extra_options):
        """Both sampling steps (sigma 1.0: high expert, 0.75: low expert) are trained (tau 1), so every
        iteration of the shared checks moves both experts."""
        cfg = super().trainer_config(run_dir, tiny, **extra_options)
        cfg["grpo"]["tau"] = 1.0
        return cfg

    def test_both_experts_learned_and_reload(self, full_run, tiny):
        adapter, final = full_run.trainer.adapter, full_run.run_dir / "final_model"
        assert set(dict(full_run.trainer.policy.named_children())) == {"transformer", "transformer_2"}
        initial_low = WanTransformer3DModel.from_pretrained(str(tiny.checkpoint), subfolder="transformer_2")
        low = adapter.transformer_2.state_dict()
        assert any(not torch.equal(v, low[k]) for k, v in initial_low.state_dict().items())   # it learned too
        reloaded_low = WanTransformer3DModel.from_pretrained(str(final), subfolder="transformer_2")
        assert all(torch.equal(v, low[k]) for k, v in reloaded_low.state_dict().items())
        assert not (final / "transformer_2").is_symlink()

    def test_expert_switch_is_the_pipelines_boundary(self, base_adapter):
        """sigma 0.8 (timestep 800 = the boundary) goes to the high-noise expert with cfg_scale, sigma
        0.79 to the low-noise one with cfg_scale_2, in one batch, as WanPipeline's `t >= boundary`."""
        adapter = load_model(self.model, str(base_adapter.source),
                             {**base_adapter_options(base_adapter), "cfg_scale": 4.0, "cfg_scale_2": 3.0})
        x = torch.randn(2, *self.latent_shape, generator=torch.Generator().manual_seed(3))
        t, cond = torch.tensor([0.8, 0.79]), adapter.encode_prompts(PROMPTS[2:])
        with torch.no_grad():
            out = adapter.predict(x, t, cond)
            for row, expert, scale in ((0, adapter.transformer, 4.0), (1, adapter.transformer_2, 3.0)):
                def run(prefix):
                    hidden, extra = self.expert_inputs(adapter, x, cond, prefix)
                    return expert(hidden_states=hidden, timestep=t * 1000, encoder_hidden_states=cond[
                        f"{prefix}prompt_embeds"], **extra).sample[row:row + 1]
                uncond = run("negative_")
                _assert_close(out[row:row + 1], uncond + scale * (run("") - uncond), self.tolerance("cfg"),
                              f"row {row}")

    def test_training_the_low_expert_only_leaves_the_high_one(self, tiny, tmp_path):
        cfg = self.trainer_config(tmp_path / "refused", tiny, train_experts=["low"])
        # sigmas [1.0, 0.75]: step 0 (timestep 1000) is the high-noise expert's, which [low] leaves frozen
        with pytest.raises(ValueError, match=r"step\(s\) \[0\] fall on the frozen high-noise expert .* "
                                             r"sampler.sde_window to the trained expert's steps \[1, 2\]"):
            Trainer(cfg, rewards={"brightness": brightness})
        cfg = self.trainer_config(tmp_path / "run", tiny, train_experts=["low"])
        cfg["sampler"]["sde_window"] = [1, 2]
        trainer = Trainer(cfg, rewards={"brightness": brightness})
        adapter = trainer.adapter
        assert trainer.policy is adapter.transformer_2
        assert not any(p.requires_grad for p in adapter.transformer.parameters())
        high = {k: v.clone() for k, v in adapter.transformer.state_dict().items()}
        low = {k: v.clone() for k, v in adapter.transformer_2.state_dict().items()}
        trainer.train(progress=False)
        self.assert_one_exact_iteration(trainer_run(trainer))
        assert all(torch.equal(v, adapter.transformer.state_dict()[k]) for k, v in high.items())
        assert any(not torch.equal(v, adapter.transformer_2.state_dict()[k]) for k, v in low.items())
        final = tmp_path / "run" / "final_model"
        assert (final / "transformer").is_symlink() and not (final / "transformer_2").is_symlink()

    def test_lora_round_trip(self, lora_run, tiny, base_adapter, tmp_path):
        """Both experts' LoRA adapters load with peft and merged; lora.init_from takes final_model/."""
        from peft import PeftModel
        adapter, final = lora_run.trainer.adapter, lora_run.run_dir / "final_model"
        x, t, cond = lora_run.x, lora_run.t, lora_run.cond
        assert bool(expert_of(adapter, t).any()) and not bool(expert_of(adapter, t).all())   # rows on both experts
        resumed = load_model(self.model, str(tiny.checkpoint), self.options(
            tiny, lora={**self.lora_options, "init_from": str(final), "save_merged": False}))
        with torch.no_grad():
            ours = adapter.predict(x, t, cond)
            base = base_adapter.predict(x, t, cond)
            assert not torch.allclose(ours, base, rtol=1e-3, atol=1e-3)
            with adapter.frozen_reference().active():
                _assert_close(adapter.predict(x, t, cond), base, self.tolerance("lora_reference"), "frozen_reference()")
            experts = ("transformer", "transformer_2")
            peft = {attr: PeftModel.from_pretrained(WanTransformer3DModel.from_pretrained(
                str(tiny.checkpoint), subfolder=attr), str(final / f"{attr}_lora")) for attr in experts}
            with experts_swapped(base_adapter, **peft):
                _assert_close(base_adapter.predict(x, t, cond), ours, self.tolerance("lora_peft"), "peft")
            merged = {attr: WanTransformer3DModel.from_pretrained(str(final), subfolder=attr)
                      for attr in experts}
            with experts_swapped(base_adapter, **merged):
                _assert_close(base_adapter.predict(x, t, cond), ours, self.tolerance("lora_merged"), "merged weights")
            _assert_close(resumed.predict(x, t, cond), ours, self.tolerance("lora_peft"), "lora.init_from")
        with pytest.raises(FileNotFoundError, match="two trained experts it must be a folder holding transformer_lora"):
            load_model(self.model, str(tiny.checkpoint), self.options(
                tiny, lora={**self.lora_options, "init_from": str(final / "transformer_lora")}))


class TestWan22(TwoExperts, TestWan21):
    """Wan 2.2 T2V (A14B layout): every check of Wan 2.1 again, and the two-expert checks."""

    bad_options = TestWan21.bad_options[:5]   # the last two are refusals of one-transformer checkpoints
    recipe = "wan22_t2v"

    def build_checkpoint(self, root):
        return build_wan_t2v(root, two_experts=True, boundary_ratio=BOUNDARY)


def base_adapter_options(adapter) -> dict:
    import dataclasses
    return {k: v for k, v in dataclasses.asdict(adapter.options).items() if k in ("prompt_cache", "height", "width",
                                                                                  "frames")}


def trainer_run(trainer):
    """The fields assert_one_exact_iteration reads."""
    return types.SimpleNamespace(trainer=trainer)


@pytest.mark.parametrize("recipe", ["wan21_t2v", "wan22_t2v", "wan_i2v"])
def test_every_recipe_setting_names_its_source(recipe):
    """As tests/test_preprocess.py checks the other recipes: a comment on every value line."""
    for line in (CONFIGS / f"{recipe}.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "- name")) and not stripped.endswith(":"):
            assert "#" in line, f"{recipe}.yaml: no source comment on {stripped!r}"
