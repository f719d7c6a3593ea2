"""One tester for every diffusers generator adapter: `AdapterTesterMixin`.

The idea follows diffusers' `PipelineTesterMixin` (tests/pipelines/test_pipelines_common.py):
the checks every model must pass are written once, as test methods of a mixin, and each model's
test file is a short subclass that states the model's facts (class attributes) and answers a
few questions about its diffusers pipeline (hook methods). A model's file adds only the tests
of what is its own (HunyuanVideo's text-to-image mode, SkyReels' image latent frame...).

Every check compares the adapter with an independent reference: the diffusers pipeline of the
same tiny random checkpoint (tests/tiny_models.py writes it in the real diffusers layout), peft
and diffusers loaders, or the adapter's own initial weights.

Adding a model (issue 18: Wan 2.1/2.2, SD3.5, Qwen-Image)
---------------------------------------------------------
1. tests/tiny_models.py: `build_<name>(root)`, a tiny random pipeline saved with its own
   `save_pretrained`.
2. tests/test_models_<name>.py::

       class TestWan21(AdapterTesterMixin):
           model = "wan21"                       # the name load_model / preprocess know
           pipeline_class = WanPipeline
           denoiser_class = WanTransformer3DModel
           tiny_options = {"height": 32, "width": 32, "frames": 5}
           latent_shape = (16, 2, 4, 4)          # hand-computed from tiny_options and the VAE
           cfg_option = "cfg_scale"              # or None: no classifier-free guidance
           ...

           def build_checkpoint(self, root): return build_wan21(root)
           def pipeline_prompt_embeds(self, pipe, prompts, cache): ...
           def pipeline_sample(self, pipe, cond, noise, tiny): ...
           def pipeline_decode(self, pipe, latents): ...
           def unguided_predict(self, adapter, x, t, cond, prefix): ...   # only with cfg_option

   A subclass that lacks a required attribute or hook fails at import, naming what it lacks.

Class attributes (the model's facts)
------------------------------------
model               registry name (`dancegrpo.models.load_model`, `dancegrpo preprocess --model`).
pipeline_class      the diffusers pipeline whose outputs are the references.
pipeline_kwargs     extra `from_pretrained` arguments of the pipeline (SD: no safety checker).
denoiser_class      the diffusers class of the trained module (`unet/` or `transformer/`).
prediction          "flow" or "ddim": the adapter's prediction and the sampler built for it.
tiny_options        `model.options` of the tiny runs (height, width[, frames]); the prompt cache
                    is added by `options()`.
latent_shape        one sample's latent shape under tiny_options, hand-computed.
preprocess_options  `--option k=v` pairs for `dancegrpo preprocess` (sequence length...).
cfg_option          the option naming the classifier-free guidance scale, or None (no CFG: the
                    cache holds no empty prompt and the CFG checks are not collected).
image_conditioned   prompts come with reference images (JSONL); the image-latent check runs.
sta                 the adapter takes the `sta` option (sliding-tile attention); its check runs.
sample_options      options of the pipeline-equality sampling check, if not the defaults.
sample_steps, sample_shift, sample_batch
                    the deterministic (eta = 0) sampling compared with the pipeline.
lora_options        `model.options.lora` of the LoRA checks (rank, alpha, target_modules).
bad_options         a table of (option overrides, regex of the error) that must be refused
                    before any weights are read.
tolerances          overrides of TOLERANCES (below), by check name; the rest keep the default.

Hooks (methods the subclass writes)
-----------------------------------
build_checkpoint(root) -> Path
    writes the tiny checkpoint (a builder of tests/tiny_models.py).
make_tiny(request, tmp_path_factory) -> Tiny
    optional: by default builds the checkpoint and runs `dancegrpo preprocess` on
    tiny_models.PROMPTS (with images when image_conditioned); FLUX reuses conftest's session
    fixture instead.
pipeline_prompt_embeds(pipe, prompts, cache) -> {cache key: tensor}
    what the pipeline's own `encode_prompt` gives for these prompts, under the cache's keys.
pipeline_sample(pipe, cond, noise, tiny) -> tensor
    the pipeline's deterministic sampling from `noise` with the cached conditioning `cond`,
    `output_type="latent"`, in the pipeline's latent layout.
to_pipeline_layout(latents) -> tensor
    optional: the adapter's latents in the pipeline's layout (FLUX packs 2x2); default identity.
pipeline_decode(pipe, pipeline_latents) -> tensor
    pixels in [0, 1] as the pipeline's VAE and post-processor give them.
unguided_predict(adapter, x, t, cond, prefix) -> tensor
    CFG models: one unguided denoiser pass on the conditional (prefix "") or unconditional
    (prefix "negative_") conditioning, without going through `adapter.predict`.
pipeline_image_latents(pipe, image) -> tensor
    image-conditioned models: the pipeline's latent of one reference image.

Checks (test methods every subclass runs)
-----------------------------------------
test_prompt_cache_equals_pipeline_encode_prompt      cache == pipeline.encode_prompt (and the
                                                     empty prompt's, with CFG); shards, entries
test_sampling_and_decode_equal_the_pipeline          eta = 0 sampling == the pipeline; decode ==
                                                     the pipeline's VAE + post-processor
test_batched_cfg_equals_two_separate_passes          (CFG) one batched call == two passes
test_cache_holds_image_latents_as_the_pipeline_encodes_them   (image_conditioned)
test_one_iteration_has_first_ratio_exactly_one       a full fine-tune iteration: ratio exactly 1,
                                                     weights moved, reward input shape
test_saved_model_reloads_bit_identical               final_model/ via diffusers and via load_model
test_frozen_reference_is_the_initial_policy          full fine-tune: frozen_reference() == before
test_lora_trains_only_lora_weights                   a LoRA iteration: base frozen, B moved, ratio
                                                     exactly 1, adapter and merged weights saved
test_lora_round_trip                                 its final_model/ via peft, merged, init_from ==
                                                     live; frozen_reference() == base
test_bf16_autocast_keeps_fp32_master_weights_and_exact_first_ratio   full and LoRA on a bf16 base
test_sample_command_writes_images_or_videos          `dancegrpo sample`: PNG or MP4 of the size
test_sliding_tile_attention_gets_the_step_schedule   (sta)
test_bad_checkpoint_is_refused_before_loading        missing component, missing folder
test_bad_options_are_refused_before_loading          bad_options table, misspelt option / LoRA option
test_bad_prompt_cache_is_refused                     no cache, another model's cache, unknown prompt,
                                                     preprocess without its prompt file

A check that does not apply to a model (CFG, image, STA) is not collected for it at all (never
skipped), so a green run lists exactly the checks that ran.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from dancegrpo.cli import main
from dancegrpo.models import load_model
from dancegrpo.models.checkpoint_layout import CheckpointLayoutError
from dancegrpo.models.prompt_cache import PromptCache, PromptCacheError
from dancegrpo.rollout import ode_sample
from dancegrpo.sampler import build_sampler
from dancegrpo.trainer import Trainer
from tiny_models import PROMPTS, brightness, write_images, write_prompts
from tiny_models import trainer_config as base_trainer_config

#: Default tolerances (torch.testing.assert_close keyword arguments) by check; a subclass's
#: `tolerances` overrides entries. Exact (0, 0) where the same computation runs on both sides.
TOLERANCES: dict[str, dict[str, float]] = {
    "prompt_cache": dict(rtol=0, atol=1e-6),     # the same encoders, batched differently
    "image_latents": dict(rtol=0, atol=1e-6),
    "sampling": dict(rtol=1e-4, atol=1e-5),      # our sampler vs the pipeline's scheduler
    "decode": dict(rtol=1e-4, atol=1e-5),
    "cfg": dict(rtol=1e-5, atol=1e-5),           # one batched call vs two calls
    "reload": dict(rtol=0, atol=0),              # saved and reloaded weights: bit-identical
    "lora_reference": dict(rtol=0, atol=1e-6),   # LoRA layers disabled vs the base model
    "lora_peft": dict(rtol=0, atol=1e-6),        # peft's loader vs the live LoRA model
    "lora_merged": dict(rtol=1e-4, atol=1e-5),   # merged weights: a different summation order
}

#: Denoiser positions of the direct-prediction checks, by prediction type:
#: DDIM timesteps in [0, 1000), flow sigmas in (0, 1].
TIMESTEPS = {"ddim": [901, 41, 500, 20], "flow": [0.9, 0.4, 0.7, 0.1]}

SHARD_SIZE = 2  # preprocess --shard-size of the mixin-built caches: several shards per cache

REQUIRED_ATTRIBUTES = ("model", "pipeline_class", "denoiser_class", "tiny_options", "latent_shape")
REQUIRED_HOOKS = ("pipeline_prompt_embeds", "pipeline_sample", "pipeline_decode")

#: checks collected only when a class attribute says they apply
CFG_CHECKS = ("test_batched_cfg_equals_two_separate_passes",)
IMAGE_CHECKS = ("test_cache_holds_image_latents_as_the_pipeline_encodes_them",)
STA_CHECKS = ("test_sliding_tile_attention_gets_the_step_schedule",)


@dataclass(frozen=True)
class Tiny:
    """A tiny checkpoint and its prompt cache, built once per test class."""

    checkpoint: Path
    cache: Path
    images: Path | None = None      # folder of the reference images (image-conditioned models)
    shard_size: int | None = None   # preprocess --shard-size, when the mixin wrote the cache


@dataclass
class Run:
    """One GRPO iteration on the tiny checkpoint, with what the checks need from before it."""

    trainer: Trainer
    run_dir: Path
    reward_input_shape: tuple[int, ...]
    x: torch.Tensor                   # latents, positions and conditioning of the direct predictions
    t: torch.Tensor
    cond: dict
    initial: torch.Tensor             # prediction before training
    initial_state: dict               # denoiser state dict before training
    options: dict                     # model.options of the run
    reference: Any = None             # adapter.frozen_reference(), taken before training


def _assert_close(actual, expected, tolerance: dict[str, float], what: str) -> None:
    torch.testing.assert_close(actual, expected, **tolerance, msg=lambda m: f"{what}: {m}")


@contextlib.contextmanager
def denoiser_swapped(adapter, module):
    """Run `adapter.predict` with another denoiser module (a diffusers- or peft-loaded one)."""
    live = adapter.denoiser
    setattr(adapter, adapter.denoiser_attr, module)
    try:
        yield adapter
    finally:
        setattr(adapter, adapter.denoiser_attr, live)


class AdapterTesterMixin:
    """The checks every diffusers generator adapter passes; see the module docstring for the
    class attributes and hooks a model's subclass provides."""

    model: ClassVar[str]
    pipeline_class: ClassVar[type]
    pipeline_kwargs: ClassVar[dict] = {}
    denoiser_class: ClassVar[type]
    prediction: ClassVar[str] = "flow"
    tiny_options: ClassVar[dict]
    latent_shape: ClassVar[tuple[int, ...]]
    preprocess_options: ClassVar[dict] = {}
    cfg_option: ClassVar[str | None] = None
    image_conditioned: ClassVar[bool] = False
    sta: ClassVar[bool] = False
    sample_options: ClassVar[dict] = {}
    sample_steps: ClassVar[int] = 3
    sample_shift: ClassVar[float] = 1.0
    sample_batch: ClassVar[int] = 2
    lora_options: ClassVar[dict] = {"rank": 4, "alpha": 8}
    bad_options: ClassVar[list[tuple[dict, str]]] = []
    tolerances: ClassVar[dict[str, dict[str, float]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(cls, name)]
        missing += [name for name in REQUIRED_HOOKS if getattr(cls, name) is getattr(AdapterTesterMixin, name)]
        default = AdapterTesterMixin
        if cls.build_checkpoint is default.build_checkpoint and cls.make_tiny is default.make_tiny:
            missing.append("build_checkpoint (or make_tiny)")
        if cls.cfg_option is not None and cls.unguided_predict is AdapterTesterMixin.unguided_predict:
            missing.append("unguided_predict (cfg_option is set)")
        if cls.image_conditioned and cls.pipeline_image_latents is AdapterTesterMixin.pipeline_image_latents:
            missing.append("pipeline_image_latents (image_conditioned is set)")
        unknown = sorted(set(cls.tolerances) - set(TOLERANCES))
        if missing or unknown:
            extra = f"; unknown tolerance names {unknown}, known are {sorted(TOLERANCES)}" if unknown else ""
            raise TypeError(f"{cls.__name__}: AdapterTesterMixin needs {missing} (see tests/adapter_tester.py){extra}")
        # Checks that do not apply are not collected (pytest skips None attributes).
        for applies, names in ((cls.cfg_option is not None, CFG_CHECKS), (cls.image_conditioned, IMAGE_CHECKS),
                               (cls.sta, STA_CHECKS)):
            if not applies:
                for name in names:
                    setattr(cls, name, None)

    # ------------------------------------------------------------------ hooks
    def build_checkpoint(self, root: Path) -> Path:
        raise NotImplementedError

    def pipeline_prompt_embeds(self, pipe, prompts: list[str], cache: PromptCache) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pipeline_sample(self, pipe, cond: dict, noise: torch.Tensor, tiny: Tiny) -> torch.Tensor:
        raise NotImplementedError

    def to_pipeline_layout(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def pipeline_decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unguided_predict(self, adapter, x: torch.Tensor, t: torch.Tensor, cond: dict, prefix: str) -> torch.Tensor:
        raise NotImplementedError

    def pipeline_image_latents(self, pipe, image) -> torch.Tensor:
        raise NotImplementedError

    def make_tiny(self, request, tmp_path_factory) -> Tiny:
        root = tmp_path_factory.mktemp(self.model)
        checkpoint = self.build_checkpoint(root / "ckpt")
        images = None
        if self.image_conditioned:
            images = root / "data"
            prompts = write_images(images, PROMPTS)
        else:
            prompts = write_prompts(root / "prompts.txt", PROMPTS)
        args = ["preprocess", "--model", self.model, "--path", str(checkpoint), "--prompts", str(prompts),
                "--out", str(root / "cache"), "--dtype", "float32", "--batch-size", "3",
                "--shard-size", str(SHARD_SIZE), "--no-progress"]
        for key, value in self.preprocess_options.items():
            args += ["--option", f"{key}={value}"]
        assert main(args) == 0
        return Tiny(checkpoint, root / "cache", images, SHARD_SIZE)

    # ------------------------------------------------------------------ helpers
    def tolerance(self, check: str) -> dict[str, float]:
        return {**TOLERANCES, **self.tolerances}[check]

    def options(self, tiny: Tiny, **extra) -> dict:
        return {"prompt_cache": str(tiny.cache), **self.tiny_options, **extra}

    def pixels_shape(self, batch: int) -> tuple[int, ...]:
        """(B, 3, H, W) for images, (B, T, 3, H, W) for videos of tiny_options."""
        frames, h, w = self.tiny_options.get("frames", 1), self.tiny_options["height"], self.tiny_options["width"]
        return (batch, 3, h, w) if frames == 1 else (batch, frames, 3, h, w)

    def inputs(self, adapter, batch: int, seed: int = 0):
        """Seeded latents, positions and cached conditioning for direct predictions."""
        x = torch.randn(batch, *adapter.latent_shape(), generator=torch.Generator().manual_seed(seed),
                        device="cpu")
        return x, torch.tensor(TIMESTEPS[self.prediction][:batch]), adapter.encode_prompts(PROMPTS[-batch:])

    def trainer_config(self, run_dir: Path, tiny: Tiny, **extra_options) -> dict:
        """The smallest GRPO iteration in which every check still means something: one prompt x a
        group of 2 (two rewards, nonzero advantages), 2 sampling steps (tau 0.5: one trained step),
        one update; tiny_models.trainer_config otherwise (checkpoint every iteration, final_model/)."""
        cfg = base_trainer_config(run_dir, self.model, tiny.checkpoint, self.options(tiny, **extra_options),
                                  prediction=self.prediction)
        cfg["sampler"]["num_steps"] = 2
        cfg["grpo"]["prompts_per_iteration"] = 1
        return cfg

    def train_once(self, run_dir: Path, tiny: Tiny, **extra_options) -> Run:
        """One GRPO iteration of `trainer_config`, then final_model/. LoRA weights start perturbed
        (seeded), as if resumed from a long LoRA training."""
        seen = {}

        def reward(images, prompts):
            seen["shape"] = tuple(images.shape)
            return brightness(images, prompts)

        trainer = Trainer(self.trainer_config(run_dir, tiny, **extra_options), rewards={"brightness": reward})
        adapter = trainer.adapter
        if adapter.lora is not None:
            with torch.no_grad():  # as if resumed from a long LoRA training: B far from its zero init, so
                gen = torch.Generator().manual_seed(1)  # the round trip's comparisons are far above tolerance
                for p in trainer.policy.parameters():
                    p.add_(torch.randn(p.shape, generator=gen, device="cpu") * 0.1)
        x, t, cond = self.inputs(adapter, 2)
        with torch.no_grad():
            initial = adapter.predict(x, t, cond)
        initial_state = {k: v.clone() for k, v in adapter.denoiser.state_dict().items()}
        reference = adapter.frozen_reference() if adapter.lora is None else None
        trainer.train(progress=False)
        return Run(trainer, run_dir, seen["shape"], x, t, cond, initial, initial_state,
                   self.options(tiny, **extra_options), reference)

    def assert_one_exact_iteration(self, run: Run) -> None:
        metrics = run.trainer.metrics[-1]
        assert metrics["first_update_logp_max_dev"] == 0.0, metrics  # the ratio of the first update is exactly 1
        assert metrics["updates"] == 1 and metrics["grad_norm"] > 0, metrics

    def assert_reloads_bit_identical(self, run: Run, tiny: Tiny) -> None:
        """final_model/ is a whole checkpoint: its denoiser loads with diffusers, and the folder
        loads back through load_model; both predict exactly as the trained adapter."""
        final = run.run_dir / "final_model"
        attr = run.trainer.adapter.denoiser_attr
        assert json.loads((final / "dancegrpo_model.json").read_text())["model"] == self.model
        assert (final / "vae").is_symlink() and (final / "model_index.json").is_file()
        assert sorted(p.name for p in tiny.checkpoint.iterdir() if p.is_dir()) == \
            sorted(p.name for p in final.iterdir() if p.is_dir())  # every component is there
        again = load_model(self.model, str(final), run.options)
        diffusers_loaded = self.denoiser_class.from_pretrained(str(final), subfolder=attr)
        with torch.no_grad():
            live = run.trainer.adapter.predict(run.x, run.t, run.cond)
            _assert_close(again.predict(run.x, run.t, run.cond), live, self.tolerance("reload"),
                          "load_model(final_model)")
            with denoiser_swapped(again, diffusers_loaded):
                _assert_close(again.predict(run.x, run.t, run.cond), live, self.tolerance("reload"),
                              f"{self.denoiser_class.__name__}.from_pretrained(final_model)")

    # ------------------------------------------------------------------ fixtures (one build per class)
    # (class methods, as pytest wants for class-scoped fixtures; the hooks run on a fresh instance)
    @pytest.fixture(scope="class")
    @classmethod
    def tiny(cls, request, tmp_path_factory) -> Tiny:
        return cls().make_tiny(request, tmp_path_factory)

    @pytest.fixture(scope="class")
    @classmethod
    def pipe(cls, tiny):
        return cls.pipeline_class.from_pretrained(str(tiny.checkpoint), **cls.pipeline_kwargs)

    @pytest.fixture(scope="class")
    @classmethod
    def base_adapter(cls, tiny):
        """The untrained adapter on tiny_options; tests only read it."""
        return load_model(cls.model, str(tiny.checkpoint), cls().options(tiny))

    @pytest.fixture(scope="class")
    @classmethod
    def full_run(cls, tiny, tmp_path_factory) -> Run:
        return cls().train_once(tmp_path_factory.mktemp(f"{cls.model}_full"), tiny)

    @pytest.fixture(scope="class")
    @classmethod
    def lora_run(cls, tiny, tmp_path_factory) -> Run:
        return cls().train_once(tmp_path_factory.mktemp(f"{cls.model}_lora"), tiny, lora=dict(cls.lora_options))

    # ------------------------------------------------------------------ prompt cache
    def test_prompt_cache_equals_pipeline_encode_prompt(self, tiny, pipe):
        cache = PromptCache(tiny.cache, self.model)
        with_cfg = self.cfg_option is not None
        assert ("" in cache) == with_cfg  # the empty prompt is added exactly when CFG needs it
        assert len(cache) == len(PROMPTS) + with_cfg
        if tiny.shard_size:
            assert len(cache.shards) == math.ceil(len(cache) / tiny.shard_size)
        for prompts in [PROMPTS] + [[""]] * with_cfg:
            with torch.no_grad():
                expected = self.pipeline_prompt_embeds(pipe, prompts, cache)
            cached = cache.lookup(prompts)
            assert expected and set(expected) <= set(cached), (sorted(expected), sorted(cached))
            for key, value in expected.items():
                _assert_close(cached[key], value, self.tolerance("prompt_cache"), f"{key} of {prompts}")

    def test_cache_holds_image_latents_as_the_pipeline_encodes_them(self, tiny, pipe):
        from PIL import Image
        cache = PromptCache(tiny.cache, self.model)
        image = Image.open(tiny.images / "image_1.png").convert("RGB")  # not of the model's size: resized
        with torch.no_grad():
            expected = self.pipeline_image_latents(pipe, image)
        _assert_close(cache.lookup([PROMPTS[1]])["image_latents"], expected, self.tolerance("image_latents"),
                      "image_latents")

    # ------------------------------------------------------------------ sampling, decoding, guidance
    def test_sampling_and_decode_equal_the_pipeline(self, tiny, pipe, base_adapter):
        adapter = (load_model(self.model, str(tiny.checkpoint), self.options(tiny, **self.sample_options))
                   if self.sample_options else base_adapter)
        assert adapter.prediction == self.prediction
        assert tuple(adapter.latent_shape()) == tuple(self.latent_shape)
        batch = self.sample_batch
        cond = adapter.encode_prompts(PROMPTS[:batch])
        noise = torch.randn(batch, *self.latent_shape, generator=torch.Generator().manual_seed(0), device="cpu")
        sampler = build_sampler(self.prediction, self.sample_steps, 0.0, self.sample_shift)
        ours = ode_sample(adapter, sampler, cond, noise, chunk_size=batch)
        with torch.no_grad():
            reference = self.pipeline_sample(pipe, cond, noise.clone(), tiny)
        _assert_close(self.to_pipeline_layout(ours), reference, self.tolerance("sampling"), "sampled latents")

        pixels = adapter.decode(ours)
        assert tuple(pixels.shape) == self.pixels_shape(batch)
        with torch.no_grad():
            expected = self.pipeline_decode(pipe, self.to_pipeline_layout(ours))
        _assert_close(pixels, expected, self.tolerance("decode"), "decoded pixels")

    def test_batched_cfg_equals_two_separate_passes(self, tiny):
        scale = 7.5  # not the default, so the option is honoured
        adapter = load_model(self.model, str(tiny.checkpoint), self.options(tiny, **{self.cfg_option: scale}))
        x, t, cond = self.inputs(adapter, 2)
        with torch.no_grad():
            uncond = self.unguided_predict(adapter, x, t, cond, "negative_")
            text = self.unguided_predict(adapter, x, t, cond, "")
            assert not torch.allclose(uncond, text)  # the empty prompt conditions differently
            _assert_close(adapter.predict(x, t, cond), uncond + scale * (text - uncond), self.tolerance("cfg"),
                          "guided prediction")

    # ------------------------------------------------------------------ training a full fine-tune
    def test_one_iteration_has_first_ratio_exactly_one(self, full_run):
        self.assert_one_exact_iteration(full_run)
        state = full_run.trainer.adapter.denoiser.state_dict()
        assert any(not torch.equal(full_run.initial_state[k], v) for k, v in state.items())  # it learned
        assert full_run.reward_input_shape == self.pixels_shape(2)  # 1 prompt x group of 2

    def test_saved_model_reloads_bit_identical(self, full_run, tiny):
        self.assert_reloads_bit_identical(full_run, tiny)

    def test_frozen_reference_is_the_initial_policy(self, full_run):
        adapter = full_run.trainer.adapter
        with torch.no_grad():
            assert not torch.allclose(adapter.predict(full_run.x, full_run.t, full_run.cond), full_run.initial)
            with full_run.reference.active():
                _assert_close(adapter.predict(full_run.x, full_run.t, full_run.cond), full_run.initial,
                              dict(rtol=0, atol=0), "frozen reference")

    # ------------------------------------------------------------------ LoRA
    def test_lora_trains_only_lora_weights(self, lora_run):
        self.assert_one_exact_iteration(lora_run)
        trainer, adapter = lora_run.trainer, lora_run.trainer.adapter
        assert all("lora_" in name for name, _ in trainer.policy.named_parameters())
        state = adapter.denoiser.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in lora_run.initial_state.items() if "lora_" not in k)
        lora_b = [k for k in state if "lora_B" in k]
        assert lora_b and any(not torch.equal(lora_run.initial_state[k], state[k]) for k in lora_b)  # B updated
        # final_model/ holds the adapter (peft format) and the merged weights (test_lora_round_trip loads both)
        final, attr = lora_run.run_dir / "final_model", adapter.denoiser_attr
        assert (final / f"{attr}_lora" / "adapter_config.json").is_file() and (final / attr / "config.json").is_file()

    def test_lora_round_trip(self, lora_run, tiny, base_adapter, tmp_path):
        """The trained LoRA adapter's final_model/ loads with peft (adapter), diffusers (merged) and
        as lora.init_from; disabling the LoRA layers gives the base model back."""
        from peft import PeftModel
        adapter, final = lora_run.trainer.adapter, lora_run.run_dir / "final_model"
        attr = adapter.denoiser_attr
        x, t, cond = lora_run.x, lora_run.t, lora_run.cond
        resumed = load_model(self.model, str(tiny.checkpoint), self.options(
            tiny, lora={**self.lora_options, "init_from": str(final / f"{attr}_lora"), "save_merged": False}))
        with torch.no_grad():
            ours = adapter.predict(x, t, cond)
            base = base_adapter.predict(x, t, cond)
            assert not torch.allclose(ours, base, rtol=1e-3, atol=1e-3)  # the LoRA weights matter
            with adapter.frozen_reference().active():
                _assert_close(adapter.predict(x, t, cond), base, self.tolerance("lora_reference"), "frozen_reference()")
            peft = PeftModel.from_pretrained(self.denoiser_class.from_pretrained(str(tiny.checkpoint), subfolder=attr),
                                             str(final / f"{attr}_lora"))
            with denoiser_swapped(base_adapter, peft):
                _assert_close(base_adapter.predict(x, t, cond), ours, self.tolerance("lora_peft"),
                              "PeftModel.from_pretrained")
            merged = self.denoiser_class.from_pretrained(str(final), subfolder=attr)
            with denoiser_swapped(base_adapter, merged):
                _assert_close(base_adapter.predict(x, t, cond), ours, self.tolerance("lora_merged"), "merged weights")
            _assert_close(resumed.predict(x, t, cond), ours, self.tolerance("lora_peft"), "lora.init_from")
        resumed.save_pretrained(tmp_path / "adapter_only")
        assert (tmp_path / "adapter_only" / f"{attr}_lora" / "adapter_config.json").is_file()
        assert not (tmp_path / "adapter_only" / attr).exists()  # save_merged: false writes the adapter only

    # ------------------------------------------------------------------ bf16
    def test_bf16_autocast_keeps_fp32_master_weights_and_exact_first_ratio(self, tiny, tmp_path):
        for name, extra in (("full", {}), ("lora", {"lora": dict(self.lora_options), "frozen_dtype": "bfloat16"})):
            cfg = self.trainer_config(tmp_path / name, tiny, **extra)
            cfg["run"]["autocast_dtype"] = "bf16"
            trainer = Trainer(cfg, rewards={"brightness": brightness})
            metrics = trainer.step()
            assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["grad_norm"] > 0, (name, metrics)
            assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())  # master weights
            if name == "lora":  # the frozen base (and VAE) sit in bf16, only LoRA weights are fp32
                assert trainer.adapter.vae.dtype == torch.bfloat16
                frozen = [p.dtype for n, p in trainer.adapter.denoiser.named_parameters() if "lora_" not in n]
                assert frozen and set(frozen) == {torch.bfloat16}

    # ------------------------------------------------------------------ commands
    def test_sample_command_writes_images_or_videos(self, tiny, tmp_path):
        import yaml
        cfg = self.trainer_config(tmp_path / "run", tiny)
        cfg["rewards"] = [{"name": "tiny_models:brightness"}]
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = tmp_path / "samples"
        assert main(["sample", "--config", str(path), "--prompt", PROMPTS[0], "--prompt", PROMPTS[3],
                     "--out", str(out), "--upscale", "1"]) == 0
        shape = self.pixels_shape(2)
        h, w = shape[-2:]
        if len(shape) == 4:
            from PIL import Image
            files = sorted(out.glob("*.png"))
            assert len(files) == 2 and all(Image.open(f).size == (w, h) for f in files)
        else:
            import av
            files = sorted(out.glob("*.mp4"))
            assert len(files) == 2
            with av.open(str(files[0])) as video:
                frames = [frame.to_ndarray(format="rgb24") for frame in video.decode(video=0)]
            assert len(frames) == shape[1] and frames[0].shape == (h, w, 3)

    def test_sliding_tile_attention_gets_the_step_schedule(self, tiny, tmp_path):
        """full_attention_steps needs the sampling step, which STA reads off the trainer's schedule."""
        sta = {"window": [1, 1, 1], "tile": [1, 2, 2], "full_attention_steps": 1, "backend": "torch"}
        cfg = self.trainer_config(tmp_path / "run", tiny, sta=sta)
        trainer = Trainer(cfg, rewards={"brightness": brightness})
        metrics = trainer.step()
        assert metrics["first_update_logp_max_dev"] == 0.0 and metrics["grad_norm"] > 0
        assert torch.equal(trainer.adapter.sta.schedule, trainer.sampler.sigmas[:-1].double())

    # ------------------------------------------------------------------ refusals
    def test_bad_checkpoint_is_refused_before_loading(self, tiny, base_adapter, tmp_path):
        attr = base_adapter.denoiser_attr
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "model_index.json").write_text((tiny.checkpoint / "model_index.json").read_text())
        (broken / attr).symlink_to(tiny.checkpoint / attr)
        with pytest.raises(CheckpointLayoutError, match=rf"missing vae/.*Expected layout: model_index.json, {attr}/"):
            load_model(self.model, str(broken), self.options(tiny))
        with pytest.raises(CheckpointLayoutError, match="does not exist"):
            load_model(self.model, str(tmp_path / "no_such_dir"), self.options(tiny))

    def test_bad_options_are_refused_before_loading(self, tiny):
        for overrides, message in self.bad_options:
            with pytest.raises(ValueError, match=message):
                load_model(self.model, str(tiny.checkpoint), self.options(tiny, **overrides))
        typo = {"prompt_cache": str(tiny.cache), "heigth": 16}
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['heigth'\]"):
            load_model(self.model, str(tiny.checkpoint), typo)
        with pytest.raises(ValueError, match=r"unknown lora option\(s\) \['rnak'\]"):
            load_model(self.model, str(tiny.checkpoint), self.options(tiny, lora={"rnak": 4}))

    def test_bad_prompt_cache_is_refused(self, tiny, base_adapter, tmp_path):
        with pytest.raises(PromptCacheError, match="has no index.json"):
            load_model(self.model, str(tiny.checkpoint), self.options(tiny, prompt_cache=str(tmp_path / "nowhere")))
        other = "flux" if self.model == "sd14" else "sd14"
        with pytest.raises(FileNotFoundError, match=f"was written for model '{self.model}', not '{other}'"):
            PromptCache(tiny.cache, other)
        with pytest.raises(PromptCacheError, match="'a purple cow' not in the prompt cache"):
            base_adapter.encode_prompts(["a red cat", "a purple cow"])
        assert main(["preprocess", "--model", self.model, "--path", str(tiny.checkpoint),
                     "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
        assert not (tmp_path / "c").exists()
