"""The model registry: one ModelSpec registered in a test reaches every consumer, with no edit elsewhere.

`fake_gen` below is a throwaway generator (a tiny FLUX transformer with a prompt encoder of its
own, CFG, and sizes chosen so that no built-in model has them). Preprocess, the memory estimate,
bench.throughput, bench.scaling_model and the sp_size check are each asked about it by name:
a consumer that still kept a table of its own would not know the name, or would give another
figure than the one computed here from the spec's own functions.
"""
from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

from bench import scaling_model, throughput
from dancegrpo import memory_estimate
from dancegrpo.distributed.compat import option_pair_problems
from dancegrpo.models import ModelSpec, get_model_spec, load_model, model_names, register_model, unregister_model
from dancegrpo.models import flux
from dancegrpo.models.prompt_cache import EMPTY_PROMPT, PromptCache
from dancegrpo.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=8)
#: A FLUX transformer with one block of each kind: the smallest config that runs every part of the class.
DENOISER = {**flux.TINY_TRANSFORMER, "num_layers": 1, "num_single_layers": 1}
CALLS: list[tuple[str, int]] = []   # (function, rows) of the fake spec's denoiser_inputs


class FakePromptEncoder:
    """Encodes a prompt as (its length, its word count), repeated over `width` channels."""

    default_dtype = "float32"

    def __init__(self, root, device, dtype, width: int = 3):
        self.device, self.dtype, self.width = device, dtype, width

    @staticmethod
    def components() -> list:
        return []

    def meta(self) -> dict:
        return {"width": self.width}

    def encode(self, prompts, extras=None) -> dict[str, torch.Tensor]:
        rows = [[float(len(p)), float(len(p.split()))] for p in prompts]
        return {"prompt_embeds": torch.tensor(rows, device=self.device).repeat(1, self.width).to(self.dtype)}


def fake_inputs(config: dict, options: dict, rows: int) -> dict:
    CALLS.append(("denoiser_inputs", rows))
    return flux.denoiser_inputs(config, options, rows)


def fake_tokens(config: dict, options: dict) -> tuple[int, int]:
    return flux.token_counts(config, options)


FAKE = ModelSpec(
    name="fake_gen",
    load=lambda path, options: ("fake adapter", path, options),
    prompt_encoder=FakePromptEncoder,
    cfg=True,
    default_options={"height": 32, "width": 48, "cfg_scale": 2.0, "max_sequence_length": 8},
    sequence_parallel=True,
    denoiser_class="FluxTransformer2DModel",
    denoiser_config=DENOISER,
    vae_class="AutoencoderKL",
    vae_config=TINY_VAE,
    checkpointed_blocks="each block",
    text_tokens=8,
    denoiser_inputs=fake_inputs,
    latent_numel=lambda options: 7 * options["height"] + options["width"],
    cond_bytes=lambda options: 1234,
    token_counts=fake_tokens,
    forward_flops=flux.forward_flops,
    parameter_count=flux.parameter_count,
    block_parameter_counts=flux.block_parameter_counts,
    attention_layers=lambda config: 1,
    tiny_config=DENOISER,
    tiny_options=dict(height=32, width=48, max_sequence_length=5),
    tiny_batch=3,
)


@pytest.fixture
def fake_gen(tmp_path):
    recipe = tmp_path / "fake.yaml"
    recipe.write_text("model:\n  name: fake_gen\ndata:\n  train_prompts: toy:train\ntrainer:\n  micro_batch_size: 2\n"
                      "grpo:\n  prompts_per_iteration: 2\n  group_size: 3\n  tau: 1.0\nsampler:\n  num_steps: 4\n")
    spec = register_model(replace(FAKE, bench_recipe=str(recipe)))
    CALLS.clear()
    try:
        yield spec
    finally:
        unregister_model("fake_gen")


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_lookups_and_refusals():
    assert model_names()[:5] == ["toy_flux", "sd14", "flux", "hunyuan_video", "skyreels_i2v"]
    with pytest.raises(ValueError, match=r"unknown model 'sdxl': choose one of \['toy_flux', 'sd14', 'flux'"):
        get_model_spec("sdxl")
    with pytest.raises(ValueError, match="unknown model 'sdxl'"):
        load_model("sdxl")
    with pytest.raises(ValueError, match="'flux' is already registered"):
        register_model(get_model_spec("flux"))
    with pytest.raises(TypeError, match="takes a ModelSpec"):
        register_model({"name": "x"})
    # the first five built-ins (issue 18's models register after them)
    assert model_names("prompt_encoder")[:4] == ["sd14", "flux", "hunyuan_video", "skyreels_i2v"]
    assert model_names("cfg")[:2] == ["sd14", "skyreels_i2v"]
    assert throughput.bench_models() == ["flux", "hunyuan_video", "sd35", "qwen_image", "wan_t2v", "wan_i2v"]
    assert model_names("denoiser_blocks") == model_names()   # every built-in names its blocks
    with pytest.raises(ValueError, match=r"model 'toy_flux': forward_flops needs ModelSpec field\(s\) forward_flops"):
        throughput.forward_flops("toy_flux", {}, 1, 1)


def executed_imports(statements: list[ast.stmt]):
    """The import statements that run when these statements run (not those in function bodies or
    under `if TYPE_CHECKING`)."""
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from executed_imports(node.orelse)
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While, ast.ClassDef)):
            for block in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, block, []):
                    yield from executed_imports(child.body if isinstance(child, ast.ExceptHandler) else [child])


def module_level_imports(module: str) -> set[str]:
    """Every module `import <module>` executes, following dancegrpo's own modules (and their packages'
    __init__) through their module-level imports; imports inside functions or under TYPE_CHECKING run later
    or never, and are left out. Read from the source (ast), nothing is imported."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if not name.startswith("dancegrpo"):
            continue
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]   # the parent packages run first
        path = REPO.joinpath(*parts)
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not path.is_file():
            continue                                                   # a name imported from a module
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in executed_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                todo += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return seen


def test_registration_imports_no_diffusers_or_transformers():
    imported = module_level_imports("dancegrpo.models")
    assert {"dancegrpo.models.flux", "dancegrpo.models.toy_flux", "dancegrpo.models.spec", "torch"} <= imported
    # the walk sees a module-level diffusers import (the toy pretraining module has one): this test would catch one
    assert "diffusers" in module_level_imports("dancegrpo.toy.pretrain")
    heavy = sorted(n for n in imported if n.split(".")[0] in ("diffusers", "transformers", "peft"))
    assert heavy == []


def test_a_registered_spec_reaches_load_model_and_preprocess(fake_gen, tmp_path):
    assert load_model("fake_gen", "somewhere", {"a": 1}) == ("fake adapter", "somewhere", {"a": 1})
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model_index.json").write_text("{}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    out = preprocess("fake_gen", checkpoint, prompts, tmp_path / "cache", options={"width": 2}, progress=False)
    cache = PromptCache(out, ("fake_gen",))
    assert cache.meta["width"] == 2
    assert len(cache) == 3 and EMPTY_PROMPT in cache   # cfg=True: the empty prompt joins the cache
    got = cache.lookup(["two blue squares", EMPTY_PROMPT])["prompt_embeds"]
    assert torch.equal(got, torch.tensor([[16.0, 3.0, 16.0, 3.0], [0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['depth'\]"):
        preprocess("fake_gen", checkpoint, prompts, tmp_path / "c2", options={"depth": 2}, progress=False)


def test_a_registered_spec_reaches_the_memory_estimate(fake_gen, tmp_path):
    est = memory_estimate.estimate_recipe(fake_gen.bench_recipe)
    rows = {row.part: row for row in est.state + est.buffers}
    n = numel(FluxTransformer2DModel(**DENOISER))
    assert rows["denoiser weights (fp32 master)"].bytes == 4 * n
    assert rows["VAE (float32, frozen)"].bytes == 4 * numel(AutoencoderKL(**TINY_VAE))
    samples, steps = 2 * 3, 4
    # the spec's default options (height 32, width 48) fill what the recipe leaves out
    assert rows["rollout latents (fp32, every step)"].bytes == 4 * samples * (steps + 1) * (7 * 32 + 48)
    assert rows["conditioning per sample"].bytes == samples * 1234
    assert est.decoded.bytes == 4 * samples * 3 * 32 * 48
    assert "32x48" in est.summary and "(x2 with CFG)" in est.summary
    # CFG (cfg_scale 2.0 by default): the micro-batch of 2 runs as 4 denoiser rows, in both measured passes
    assert CALLS == [("denoiser_inputs", 4)] * 2
    CALLS.clear()
    memory_estimate.denoiser_inputs("fake_gen", DENOISER, {**fake_gen.default_options, "cfg_scale": 1.0}, 2)
    assert CALLS == [("denoiser_inputs", 2)]


def test_a_registered_spec_reaches_the_benchmarks(fake_gen, tmp_path):
    path = tmp_path / "throughput.csv"
    rows = throughput.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--iterations", "1", "--warmup", "0",
                            "--model", "fake_gen", "--settings", "none", "--csv", str(path)])
    assert [r["model"] for r in rows] == ["fake_gen"] and rows[0]["status"] == "ok"
    # 32 x 48 pixels -> 4 x 6 latent cells -> 2 x 3 packed tokens; 5 text tokens (the tiny options)
    assert (rows[0]["image_tokens"], rows[0]["text_tokens"], rows[0]["batch"]) == (6, 5, 3)
    assert CALLS == [("denoiser_inputs", 3)]   # no cfg_scale in the bench options: no CFG rows
    flops = 3 * 3 * flux.forward_flops(DENOISER, 6, 5)
    assert float(rows[0]["model_tflop_per_step"]) == pytest.approx(flops / 1e12, rel=1e-5)
    assert "fake_gen" in throughput.bench_models()
    # bench.scaling_model: the spec's parameter counts; its recipe's iteration (2 prompts x 3 samples x 4 steps)
    assert scaling_model.parameter_count("fake_gen", DENOISER) == numel(FluxTransformer2DModel(**DENOISER))
    assert scaling_model.attention_layers("fake_gen", DENOISER) == 1
    assert scaling_model.recipe_micro_steps("fake_gen") == 2 * 3 * 4


def test_a_registered_spec_reaches_the_option_pair_checks(fake_gen):
    def cfg(name: str):
        return SimpleNamespace(parallel=SimpleNamespace(sp_size=2, activation_checkpointing="none"),
                               model=SimpleNamespace(name=name, options={}))
    assert option_pair_problems(cfg("fake_gen")) == []
    problems = option_pair_problems(cfg("flux"))
    assert len(problems) == 1
    assert "exists for hunyuan_video, skyreels_i2v, wan_t2v, wan_i2v, fake_gen only" in problems[0]
