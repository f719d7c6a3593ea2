"""One `ModelSpec` per generator: everything the rest of the project needs to know about a model.

A generator's module (e.g. `models/flux.py`) defines its adapter and one `ModelSpec` beside it;
`models/__init__.py` registers it. Every consumer reads the registry, none keeps a table of its
own (the design follows torchtitan's `TrainSpec`: one registration per model):

- `load_model` (training, sampling, eval): `load`;
- `dancegrpo preprocess`: `prompt_encoder`, `cfg`;
- `python -m dancegrpo.memory_estimate`: `denoiser_class` / `denoiser_config` / `vae_class` /
  `vae_config` (published configs), `default_options`, `denoiser_inputs`, `latent_numel`,
  `cond_bytes`, `cfg`, `checkpointed_blocks`, `text_tokens`;
- `bench.throughput`: `bench_recipe`, `tiny_config` / `tiny_options` / `tiny_batch`,
  `denoiser_inputs`, `token_counts`, `forward_flops`, `attention_masked`, `sliding_tile_attention`;
- `bench.scaling_model`: `forward_flops`, `parameter_count`, `block_parameter_counts`,
  `attention_layers`, `bench_recipe`;
- the config's option-pair checks: `sequence_parallel`;
- activation checkpointing, `compile_blocks` and FSDP2 (dancegrpo.distributed.blocks): `denoiser_blocks`.

Only `name` and `load` are required; a consumer that needs a field the spec leaves unset refuses
the model by name (`ModelSpec.require`). Registering must stay cheap: a spec's module must not
import diffusers or transformers at import time (adapters import them where they load weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class ModelSpec:
    """What one generator is, for every part of the project that is not its adapter.

    The dict fields are read-only by convention (consumers copy them before changing anything).
    """

    #: `model.name` in the config.
    name: str
    #: loader(model.path, model.options) -> an adapter implementing models.base.GeneratorAdapter.
    load: Callable[[str, dict], Any]

    # ---- preprocess
    #: Prompt encoder class for `dancegrpo preprocess` (None: the model encodes prompts itself). It is
    #: built as `cls(root, device, dtype, **options)` and has `default_dtype`, `components()`, `meta()`
    #: and `encode(prompts, extras) -> dict[str, Tensor]`; it imports its text encoders when built.
    prompt_encoder: type | None = None
    #: Classifier-free guidance: the prompt cache also holds the empty prompt, and the denoiser runs
    #: conditional and unconditional rows in one call (twice the batch) when `cfg_scale` != 1.
    cfg: bool = False
    #: The adapter's option defaults (`model.options`), as its options dataclass states them.
    default_options: dict = field(default_factory=dict)
    #: Ulysses sequence parallelism (`parallel.sp_size` > 1) is implemented for this model.
    sequence_parallel: bool = False
    #: The denoiser masks attention (padded text tokens): attention backends must take a mask.
    attention_masked: bool = False
    #: Sliding-tile attention (`model.options.sta`, docs/sta.md) can replace its joint attention.
    sliding_tile_attention: bool = False

    # ---- published configuration (memory estimate, throughput, scaling)
    #: diffusers class names and the published config.json of the checkpoint (with its source).
    denoiser_class: str = ""
    denoiser_config: dict | None = None
    vae_class: str = ""
    vae_config: dict | None = None
    #: What diffusers' gradient checkpointing wraps (documentation of the memory estimate).
    checkpointed_blocks: str = ""
    #: Text tokens per prompt as the prompt cache stores them (`max_sequence_length` default).
    text_tokens: int = 0
    #: {diffusers class name of the denoiser: blocks(denoiser) -> its repeated blocks, in execution
    #: order}: the units activation checkpointing, `compile_blocks` and FSDP2 wrap one by one
    #: (dancegrpo.distributed.blocks looks a denoiser's class up here, through its bases). A value is
    #: usually `BlockLists("transformer_blocks", ...)`; two models naming one class must agree.
    denoiser_blocks: dict = field(default_factory=dict)

    # ---- shapes and sizes (functions of the denoiser config and `model.options`)
    #: (config, options, batch) -> keyword inputs of one denoiser call with random tensors of the
    #: recipe's shapes on the host, as the adapter builds them (CFG: 2 x batch rows).
    denoiser_inputs: Callable[[dict, dict, int], dict] | None = None
    #: options -> elements of one sample's latent (`GeneratorAdapter.latent_shape()` product).
    latent_numel: Callable[[dict], int] | None = None
    #: options -> bytes of one sample's conditioning as the prompt cache stores it (CFG: with the
    #: empty prompt's).
    cond_bytes: Callable[[dict], int] | None = None
    #: (config, options) -> (image or video tokens, text tokens) of one sample in the denoiser.
    token_counts: Callable[[dict, dict], tuple[int, int]] | None = None
    #: (config, image_tokens, text_tokens) -> matmul + attention FLOPs of one sample's forward.
    forward_flops: Callable[[dict, int, int], int] | None = None
    #: config -> parameters of the denoiser, and of each FSDP unit (dancegrpo.distributed.blocks order).
    parameter_count: Callable[[dict], int] | None = None
    block_parameter_counts: Callable[[dict], list[int]] | None = None
    #: config -> attention layers over the joint sequence (the ones Ulysses shards).
    attention_layers: Callable[[dict], int] | None = None

    # ---- benchmarks
    #: The YAML recipe (relative to the repository) whose resolution and micro-batch the benchmarks use.
    bench_recipe: str = ""
    #: A tiny denoiser config, options and micro-batch (tests, `bench.throughput --tiny`).
    tiny_config: dict | None = None
    tiny_options: dict | None = None
    tiny_batch: int = 1

    def missing(self, *fields: str) -> list[str]:
        """The names among `fields` this spec leaves unset (None, "", 0, False or {})."""
        return [name for name in fields if getattr(self, name) in (None, "", 0, {})]

    def require(self, consumer: str, *fields: str) -> "ModelSpec":
        """Self, or ValueError naming the model, `consumer` and the unset fields."""
        missing = self.missing(*fields)
        if missing:
            raise ValueError(f"model {self.name!r}: {consumer} needs ModelSpec field(s) {', '.join(missing)}, which "
                             f"its spec leaves unset; models it covers: {', '.join(model_names(*fields)) or 'none'}")
        return self


@dataclass(frozen=True, init=False)
class BlockLists:
    """blocks(denoiser) -> the modules of the `nn.ModuleList`s at `paths` (dotted attribute paths from
    the denoiser), concatenated in the order given, e.g. `BlockLists("transformer_blocks",
    "single_transformer_blocks")`. Equal when the paths are (two specs naming one class may share it)."""

    paths: tuple[str, ...]

    def __init__(self, *paths: str) -> None:
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"BlockLists needs one or more attribute paths, got {paths!r}")
        object.__setattr__(self, "paths", paths)

    def __call__(self, denoiser: Any) -> list:
        """ValueError naming the class and the path when the denoiser lacks one of the lists."""
        blocks: list = []
        for path in self.paths:
            module = denoiser
            for part in path.split("."):
                module = getattr(module, part, None)
                if module is None:
                    raise ValueError(f"{type(denoiser).__name__} has no block list {path!r} "
                                     f"(ModelSpec.denoiser_blocks names {list(self.paths)})")
            blocks += list(module)
        return blocks


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add `spec` to the registry under `spec.name` and return it.

    Raises ValueError if the name is taken (pass `replace=True` to override a registration on
    purpose, e.g. a test's), and TypeError if `spec` is not a ModelSpec or `spec.load` is not callable.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model takes a ModelSpec, got {type(spec).__name__}")
    if not spec.name or not callable(spec.load):
        raise TypeError(f"ModelSpec {spec.name!r}: needs a non-empty name and a callable load")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"model {spec.name!r} is already registered; pick another name or pass replace=True")
    for other in _REGISTRY.values():
        for cls, blocks in spec.denoiser_blocks.items():
            if other.name != spec.name and other.denoiser_blocks.get(cls, blocks) != blocks:
                raise ValueError(f"model {spec.name!r}: denoiser_blocks[{cls!r}] = {blocks!r} differs from registered "
                                 f"model {other.name!r}'s {other.denoiser_blocks[cls]!r}; a denoiser class has one "
                                 f"list of blocks (give the same value, or unregister {other.name!r} first)")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_model(name: str) -> None:
    """Remove a registration (KeyError if absent); for tests that register a throwaway model."""
    del _REGISTRY[name]


def get_model_spec(name: str) -> ModelSpec:
    """The registered spec of `name`; ValueError listing the registered names if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose one of {model_names()}") from None


def model_names(*fields: str) -> list[str]:
    """Registered model names in registration order; with `fields`, only models that set all of them."""
    return [name for name, spec in _REGISTRY.items() if not spec.missing(*fields)]


def denoiser_blocks(class_names: Iterable[str]) -> Callable[[Any], list] | None:
    """The `denoiser_blocks` function of the first of `class_names` (a class and its bases, most
    derived first) that a registered spec names, or None."""
    for name in class_names:
        for spec in _REGISTRY.values():
            if name in spec.denoiser_blocks:
                return spec.denoiser_blocks[name]
    return None


def block_classes() -> list[str]:
    """The denoiser class names whose blocks the registered specs give."""
    return list(dict.fromkeys(name for spec in _REGISTRY.values() for name in spec.denoiser_blocks))


def option_defaults(options_class: type) -> dict:
    """{field: default} of an adapter's options dataclass, as `model.options` is filled in."""
    import dataclasses
    instance = options_class()
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(options_class)}
