"""CLIP-family rewards, batched on the images' device: HPS v2.1, CLIP score, PickScore.

Each is a callable `reward(images, prompts) -> (B,) float32`, images in [0, 1] shaped
(B, 3, H, W) or (B, T, 3, H, W); a video scores the mean over its frames. Prompts are
encoded once per distinct prompt (a GRPO group repeats its prompt G times). Nothing
touches the disk after loading.

Files (downloads the user makes; weights cannot be fetched by this package):
- HPS v2.1: `HPS_v2.1_compressed.pt` from the Hugging Face repo xswu/HPSv2, plus the CLIP
  tokenizer files (vocab.json, merges.txt) from laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
- CLIP score: the laion/CLIP-ViT-H-14-laion2B-s32B-b79K directory (open_clip weights
  `open_clip_pytorch_model.bin` or `open_clip_model.safetensors`, and the tokenizer files).
- PickScore: the yuvalkirstain/PickScore_v1 directory (a transformers CLIPModel), and the
  processor directory laion/CLIP-ViT-H-14-laion2B-s32B-b79K (preprocessor_config.json and
  tokenizer files).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .image_transforms import ImageTransform, frames_as_batch
from .openclip_compat import (OPENCLIP_CONFIG_FILE, OPENCLIP_WEIGHT_FILES, OpenCLIPConfig, OpenCLIPTokenizer,
                              find_openclip_weights, load_openclip)

LAION_VIT_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# Loaded models shared by rewards built from the same files (e.g. `hps` and `hps_binary` in
# one config), so a model is held in memory once.
_MODEL_CACHE: dict[tuple, object] = {}
_CACHE_LOCK = threading.Lock()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32'/'fp32' or 'bfloat16'/'bf16' (or a torch dtype of those) -> torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.bfloat16):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use 'float32' or 'bfloat16'")
    return _DTYPES[dtype]


def require_file(path: str | Path, what: str, download: str) -> Path:
    """`path` if it is a file; else FileNotFoundError naming it and what to download."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. Download {download} and pass its local path.")
    return path


def require_dir(path: str | Path, what: str, download: str, must_hold: tuple[str, ...] = ()) -> Path:
    """`path` if it is a directory holding every name in `must_hold`; else FileNotFoundError."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory not found: {path}. Download {download} there.")
    for name in must_hold:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{what}: {path / name} is missing. Download {download} into {path}.")
    return path


def cached(key: tuple, build: Callable[[], object]) -> object:
    with _CACHE_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = build()
        return _MODEL_CACHE[key]


class CLIPFamilyReward:
    """Shared batching for rewards of the form score(image features, text features).

    Subclasses set `transform` and implement `_image_features`, `_text_features` (unit
    vectors) and optionally `_score`.
    """

    name = "clip_family"
    transform: ImageTransform
    model: nn.Module

    def __init__(self, dtype: str = "float32", batch_size: int = 32):
        self.dtype = resolve_dtype(dtype)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.batch_size = batch_size

    def _to_device(self, device: torch.device) -> None:
        if next(self.model.parameters()).device != device:
            self.model.to(device)

    def _image_features(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def _text_features(self, prompts: list[str], device: torch.device) -> Tensor:
        raise NotImplementedError

    def _score(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        return (image_features * text_features).sum(dim=-1)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        """(B, 3, H, W) or (B, T, 3, H, W) in [0, 1] and B prompts -> (B,) float32 on the images' device."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} samples")
        device = images.device
        self._to_device(device)
        frames, per_sample = frames_as_batch(images)
        unique = list(dict.fromkeys(prompts))
        text = self._text_features(unique, device).float()
        index = torch.tensor([unique.index(p) for p in prompts], device=device)
        text = text[index].repeat_interleave(per_sample, dim=0)
        scores = []
        for start in range(0, frames.shape[0], self.batch_size):
            pixels = self.transform(frames[start:start + self.batch_size])
            feats = self._image_features(pixels.to(self.dtype)).float()
            scores.append(self._score(feats, text[start:start + self.batch_size]))
        return torch.cat(scores).view(images.shape[0], per_sample).mean(dim=1)


# Adapted from HPSv2 hpsv2/img_score.py::score (Apache-2.0)
class OpenCLIPCosineReward(CLIPFamilyReward):
    """Cosine of normalised open_clip image and text features (HPS v2.1 and CLIP score)."""

    def __init__(self, model: nn.Module, tokenizer: OpenCLIPTokenizer, transform: ImageTransform,
                 dtype: str = "float32", batch_size: int = 32):
        super().__init__(dtype, batch_size)
        self.model, self.tokenizer, self.transform = model, tokenizer, transform

    def _image_features(self, pixels: Tensor) -> Tensor:
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def _text_features(self, prompts: list[str], device: torch.device) -> Tensor:
        tokens = self.tokenizer(prompts).to(device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _openclip_config(model_config: str | None, directory: Path | None) -> OpenCLIPConfig:
    if model_config is not None:
        return OpenCLIPConfig.from_file(require_file(model_config, "open_clip model config", "the model's JSON"))
    if directory is not None and (directory / OPENCLIP_CONFIG_FILE).is_file():
        return OpenCLIPConfig.from_file(directory / OPENCLIP_CONFIG_FILE)
    return OpenCLIPConfig()  # ViT-H-14


def hps_v21(checkpoint: str, tokenizer: str, model_config: str | None = None, dtype: str = "float32",
            batch_size: int = 32) -> OpenCLIPCosineReward:
    """HPS v2.1: open_clip ViT-H-14 with the HPS v2.1 weights; score = cosine (about 0.2-0.35).

    checkpoint: `HPS_v2.1_compressed.pt` (xswu/HPSv2). tokenizer: a directory with the CLIP
    BPE files (laion/CLIP-ViT-H-14-laion2B-s32B-b79K). model_config: an open_clip model JSON
    (default ViT-H-14). Preprocessing is HPS's own: longest side to 224, zero padding.
    """
    ckpt = require_file(checkpoint, "HPS v2.1 checkpoint", "HPS_v2.1_compressed.pt from the Hugging Face repo xswu/HPSv2")
    tok_dir = require_dir(tokenizer, "CLIP tokenizer", f"vocab.json and merges.txt from {LAION_VIT_H}")
    cfg = _openclip_config(model_config, None)
    model = cached(("openclip", str(ckpt.resolve()), repr(cfg), resolve_dtype(dtype)),
                   lambda: load_openclip(ckpt, cfg).to(resolve_dtype(dtype)))
    size = cfg.vision_cfg.image_size
    return OpenCLIPCosineReward(model, OpenCLIPTokenizer(tok_dir, cfg.text_cfg.context_length),
                                ImageTransform(crop_size=(size, size), resize_to=size, mode="pad"), dtype, batch_size)


def clip_score(path: str, model_config: str | None = None, dtype: str = "float32",
               batch_size: int = 32) -> OpenCLIPCosineReward:
    """CLIP score: cosine of open_clip ViT-H-14 (laion2B) image and text features.

    path: the laion/CLIP-ViT-H-14-laion2B-s32B-b79K directory (open_clip weights and
    tokenizer files; an `open_clip_config.json` there, or `model_config`, sets the
    architecture). Preprocessing is open_clip's: shortest side to 224, centre crop.
    """
    directory = require_dir(path, "CLIP score model", LAION_VIT_H)
    weights = find_openclip_weights(directory)
    if weights is None:
        raise FileNotFoundError(f"no open_clip weights in {directory}: expected one of {list(OPENCLIP_WEIGHT_FILES)} "
                                f"(download open_clip_pytorch_model.bin from {LAION_VIT_H})")
    cfg = _openclip_config(model_config, directory)
    model = cached(("openclip", str(weights.resolve()), repr(cfg), resolve_dtype(dtype)),
                   lambda: load_openclip(weights, cfg).to(resolve_dtype(dtype)))
    size = cfg.vision_cfg.image_size
    return OpenCLIPCosineReward(model, OpenCLIPTokenizer(directory, cfg.text_cfg.context_length),
                                ImageTransform(crop_size=(size, size), resize_to=size, mode="crop"), dtype, batch_size)


class PickScoreReward(CLIPFamilyReward):
    """PickScore: a transformers CLIPModel; score = exp(logit_scale) * cosine, as PickScore
    defines it (about 18-24), or the bare cosine with `scale="cosine"` (DanceGRPO's code)."""

    name = "pickscore"

    def __init__(self, path: str, processor_path: str, scale: str = "logit", dtype: str = "float32",
                 batch_size: int = 32):
        super().__init__(dtype, batch_size)
        from transformers import CLIPModel, CLIPTokenizer
        if scale not in ("logit", "cosine"):
            raise ValueError(f"scale={scale!r}: use 'logit' (PickScore's definition) or 'cosine'")
        model_dir = require_dir(path, "PickScore model", "the Hugging Face repo yuvalkirstain/PickScore_v1",
                                must_hold=("config.json",))
        proc_dir = require_dir(processor_path, "PickScore processor", f"the Hugging Face repo {LAION_VIT_H}",
                               must_hold=("preprocessor_config.json",))
        self.scale = scale
        self.model = cached(("pickscore", str(model_dir.resolve()), self.dtype),
                            lambda: CLIPModel.from_pretrained(str(model_dir), dtype=self.dtype).eval().requires_grad_(False))
        self.tokenizer = CLIPTokenizer.from_pretrained(str(proc_dir))
        from ..io_errors import load_json
        self.transform = ImageTransform.from_preprocessor_config(
            load_json(proc_dir / "preprocessor_config.json", "PickScore preprocessor config"))

    def _image_features(self, pixels: Tensor) -> Tensor:
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def _text_features(self, prompts: list[str], device: torch.device) -> Tensor:
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        return F.normalize(_features(self.model.get_text_features(**batch)).float(), dim=-1)

    def _score(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        cos = (image_features * text_features).sum(dim=-1)
        return cos * self.model.logit_scale.float().exp() if self.scale == "logit" else cos


def _features(output) -> Tensor:
    """transformers 5 returns a model output with the projected features as pooler_output."""
    return output if isinstance(output, Tensor) else output.pooler_output


def pickscore(path: str, processor_path: str, scale: str = "logit", dtype: str = "float32",
              batch_size: int = 32) -> PickScoreReward:
    """PickScore (yuvalkirstain/PickScore_v1) with the laion ViT-H-14 processor settings."""
    return PickScoreReward(path, processor_path, scale, dtype, batch_size)
