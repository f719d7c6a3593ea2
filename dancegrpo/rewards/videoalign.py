"""VideoAlign (KwaiVGI VideoReward): a Qwen2-VL-2B reward model scoring visual quality (VQ),
motion quality (MQ) and text alignment (TA) of a video, from tensors, batched.

Three modules by job: this one scores (`VideoAlignScorer`, the reward callables);
`videoalign_frames` turns a video tensor into the model's patches; `videoalign_release` reads
the release's files into the model.

What the released model defines and this module reproduces (from reading github.com/
KwaiVGI/VideoAlign, inference.py / trainer.py / vision_process.py, transformers 4.45):
- the release directory: `model_config.json` (data_config: sampling fps or num_frames,
  max_frame_pixels, eval_dim, prompt_template_type, sample_type; model_config: base model,
  output_dim, special reward tokens; peft_lora_config; inference_config: per-dimension
  mean/std) and `checkpoint-<step>/` holding either `model.pth` (full state dict) or a
  LoRA adapter (`adapter_model.safetensors`, `adapter_config.json`) plus
  `non_lora_state_dict.pth` (the trained non-LoRA weights: reward head, embeddings, ...);
- three special tokens <|VQ_reward|>, <|MQ_reward|>, <|TA_reward|> added to the Qwen2-VL
  tokenizer, embeddings resized to the tokenizer, a bias-free linear head `rm_head` on the
  last hidden states at those tokens (in sequence order: VQ, MQ, TA);
- the text decoder runs with plain sequential positions on all three M-RoPE axes (the
  released forward calls the decoder without position ids), right padding;
- frames: uniform sampling at `fps` given the video's own frame rate (at least 4 frames,
  an even count, linspace indices rounded), or `num_frames`; each frame resized (bicubic,
  antialiased, uint8 rounding) to multiples of 28 within [128*28*28, max_frame_pixels]
  pixels; rescale, CLIP mean/std normalisation, Qwen2-VL patches (temporal patch 2);
- one user turn: the video, then the prompt in the release's template, rendered with the
  base model's chat template with a generation prompt;
- normalisation (x - mean) / std per dimension, Overall = VQ + MQ + TA.

The prompt template's text is part of VideoAlign's code, not of its checkpoint, so the
user passes it: `prompt_template` is VideoAlign's `prompt_template.py` (the constant for the
configured template type is read from it, without importing it) or a text file with a
`{text_prompt}` placeholder.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import Tensor

from .clip_rewards import cached, require_dir, resolve_dtype
from .image_transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from .videoalign_frames import (FRAME_FACTOR, VIDEO_MIN_PIXELS, patchify_video, resize_frames, sample_frame_indices,
                                smart_resize)
from .videoalign_release import (SPECIAL_TOKENS, VIDEOREWARD_REPO, VideoAlignConfig, VideoAlignModel,
                                 load_prompt_template, load_videoalign_model)

DIMENSIONS = ("VQ", "MQ", "TA")

__all__ = ["DIMENSIONS", "VideoAlignConfig", "VideoAlignModel", "VideoAlignReward", "VideoAlignScorer",
           "load_prompt_template", "load_videoalign_model", "patchify_video", "resize_frames", "sample_frame_indices",
           "smart_resize", "videoalign"]


class VideoAlignScorer:
    """Scores (B, T, 3, H, W) videos in [0, 1] -> dict of (B,) VQ, MQ, TA, Overall.

    Options: see `videoalign`. The last batch and its result are kept (until the next call), so
    rewards for several dimensions of one batch (videoalign_vq and videoalign_mq in one config)
    run the model once.
    """

    def __init__(self, path: str, video_fps: float | None = None, base_model: str | None = None,
                 prompt_template: str | None = None, fps: float | None = None, num_frames: int | None = None,
                 max_pixels: int | None = None, use_norm: bool = True, dtype: str = "bfloat16",
                 batch_size: int = 4, quantize: bool = True, checkpoint_step: int | None = None):
        bad = [f"{name} = {value!r} must be {rule}" for name, value, ok, rule in (
            ("video_fps", video_fps, video_fps is None or video_fps > 0, "> 0 (or null)"),
            ("fps", fps, fps is None or fps > 0, "> 0 (or null for the release's)"),
            ("num_frames", num_frames, num_frames is None or num_frames >= FRAME_FACTOR,
             f">= {FRAME_FACTOR} (or null for the release's)"),
            ("max_pixels", max_pixels, max_pixels is None or max_pixels > 0,
             "> 0 (or null for the release's max_frame_pixels)"),
            ("batch_size", batch_size, batch_size >= 1, ">= 1")) if not ok]
        if bad:
            raise ValueError("videoalign reward options: " + "; ".join(bad))
        from transformers import AutoTokenizer
        root = require_dir(path, "VideoAlign", f"the Hugging Face repo {VIDEOREWARD_REPO}",
                           must_hold=("model_config.json",))
        self.cfg = cfg = VideoAlignConfig.from_file(root / "model_config.json")
        base = base_model or cfg.base_model
        if not base or not Path(base).expanduser().is_dir():
            raise FileNotFoundError(f"VideoAlign base model {base!r} is not a local directory: download the Hugging "
                                    "Face repo Qwen/Qwen2-VL-2B-Instruct and pass its path as the option base_model")
        base_dir = Path(base).expanduser()
        if cfg.template_type == "none":
            self.template = "{text_prompt}"
        elif prompt_template is None:
            raise FileNotFoundError(f"VideoAlign uses the {cfg.template_type!r} prompt template, whose text is part of "
                                    "VideoAlign's code: pass prompt_template: <path to prompt_template.py from "
                                    "github.com/KwaiVGI/VideoAlign, or a text file with a {text_prompt} placeholder>")
        else:
            self.template = load_prompt_template(prompt_template, cfg.template_type)
        if fps is not None and num_frames is not None:
            raise ValueError("set fps or num_frames, not both")
        self.video_fps = video_fps
        self.fps = fps if fps is not None else (None if num_frames is not None else cfg.fps)
        self.num_frames = num_frames if num_frames is not None else (cfg.num_frames if fps is None else None)
        self.max_pixels = cfg.max_frame_pixels if max_pixels is None else max_pixels
        self.use_norm = use_norm
        self.quantize = quantize
        self.batch_size = batch_size
        self.dtype = resolve_dtype(dtype)

        tokenizer = AutoTokenizer.from_pretrained(str(base_dir), padding_side="right")
        if cfg.use_special_tokens:
            tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        if tokenizer.chat_template is None and (base_dir / "chat_template.json").is_file():
            from ..io_errors import load_json
            tokenizer.chat_template = load_json(base_dir / "chat_template.json", "chat template")["chat_template"]
        if tokenizer.chat_template is None:
            raise FileNotFoundError(f"no chat template in {base_dir} (tokenizer_config.json or chat_template.json)")
        self.tokenizer = tokenizer
        proc_file = base_dir / "preprocessor_config.json"
        from ..io_errors import load_json
        proc = load_json(proc_file, "image preprocessor config") if proc_file.is_file() else {}
        self.patch_size = proc.get("patch_size", 14)
        self.merge_size = proc.get("merge_size", 2)
        self.temporal_patch_size = proc.get("temporal_patch_size", 2)
        self.mean = tuple(proc.get("image_mean", OPENAI_CLIP_MEAN))
        self.std = tuple(proc.get("image_std", OPENAI_CLIP_STD))
        self.model = load_videoalign_model(root, cfg, base_dir, tokenizer, self.dtype, checkpoint_step)
        self._memo: tuple | None = None
        self._lock = threading.Lock()

    def prompt_text(self, prompt: str) -> str:
        """The chat-formatted text for one sample, before video tokens are expanded."""
        messages = [{"role": "user", "content": [
            {"type": "video"}, {"type": "text", "text": self.template.replace("{text_prompt}", prompt)}]}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def video_inputs(self, video: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """One (T, 3, H, W) video in [0, 1] -> (patches, grid_thw), as VideoAlign prepares a video file."""
        idx = sample_frame_indices(video.shape[0], self.video_fps, self.fps, self.num_frames).to(video.device)
        frames = video.index_select(0, idx).float() * 255.0
        h, w = smart_resize(*frames.shape[-2:], factor=self.patch_size * self.merge_size,
                            min_pixels=VIDEO_MIN_PIXELS, max_pixels=self.max_pixels)
        frames = resize_frames(frames, h, w, self.quantize) / 255.0
        mean = torch.tensor(self.mean, device=frames.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=frames.device).view(1, 3, 1, 1)
        return patchify_video((frames - mean) / std, self.patch_size, self.merge_size, self.temporal_patch_size)

    # Adapted from VideoAlign inference.py::VideoVLMRewardInference.prepare_batch (MIT)
    def batch_inputs(self, videos: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """The model inputs for a batch: right-padded ids and mask, patches, grids."""
        patches, grids, texts = [], [], []
        video_token = "<|video_pad|>"
        for video, prompt in zip(videos, prompts):
            p, grid = self.video_inputs(video)
            patches.append(p)
            grids.append(grid)
            n_tokens = grid[0] * grid[1] * grid[2] // self.merge_size ** 2
            text = self.prompt_text(prompt)
            if text.count(video_token) != 1:
                raise ValueError(f"the chat template must render one {video_token} per video, got: {text!r}")
            texts.append(text.replace(video_token, video_token * n_tokens))
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        device = videos.device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                "pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, device=device)}

    # Adapted from VideoAlign inference.py::VideoVLMRewardInference.reward (MIT)
    @torch.no_grad()
    def score(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """(B, T, 3, H, W) (or (B, 3, H, W): a still video of two frames) -> {VQ, MQ, TA, Overall}: (B,)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} samples")
        if images.ndim == 4:
            images = images.unsqueeze(1).expand(-1, FRAME_FACTOR, -1, -1, -1)
        # Same tensor object, unmodified since, same prompts: the memo holds the tensor itself, so its
        # memory cannot be reused by another batch that would otherwise look identical.
        key = (images._version, tuple(prompts))
        with self._lock:
            if self._memo is not None and self._memo[0] is images and self._memo[1] == key:
                return self._memo[2]
            if next(self.model.parameters()).device != images.device:
                self.model.to(images.device)
            raw = []
            for start in range(0, images.shape[0], self.batch_size):
                batch = self.batch_inputs(images[start:start + self.batch_size], prompts[start:start + self.batch_size])
                raw.append(self.model(**batch).float())
            raw = torch.cat(raw)
            if raw.shape[1] != 3:
                raise ValueError(f"the reward head gives {raw.shape[1]} values per sample; VQ/MQ/TA need 3")
            out = {}
            for i, dim in enumerate(DIMENSIONS):
                value = raw[:, i]
                if self.use_norm and self.cfg.norm:
                    value = (value - self.cfg.norm[f"{dim}_mean"]) / self.cfg.norm[f"{dim}_std"]
                out[dim] = value
            out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
            self._memo = (images, key, out)
            return out


class VideoAlignReward:
    """One VideoAlign dimension (VQ, MQ, TA or Overall) as a reward callable."""

    def __init__(self, scorer: VideoAlignScorer, dimension: str = "Overall"):
        if dimension not in (*DIMENSIONS, "Overall"):
            raise ValueError(f"dimension={dimension!r}: use one of VQ, MQ, TA, Overall")
        self.scorer, self.dimension = scorer, dimension

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.scorer.score(images, prompts)[self.dimension]


def videoalign(path: str, dimension: str = "Overall", **options) -> VideoAlignReward:
    """VideoAlign reward for one dimension.

    path: the KwaiVGI/VideoReward download (model_config.json, checkpoint-<step>/).
    Options: video_fps (frame rate of the generated videos; needed when sampling by rate),
    base_model (Qwen/Qwen2-VL-2B-Instruct directory; default model_config's path),
    prompt_template (VideoAlign's prompt_template.py or a text file), fps or num_frames
    (override the release's sampling), max_pixels, use_norm (default true), dtype
    (default bfloat16), batch_size, quantize (uint8 rounding of frames, default true),
    checkpoint_step. Scorers with the same options are shared.
    """
    key = ("videoalign", str(Path(path).expanduser().resolve()), tuple(sorted(options.items())))
    return VideoAlignReward(cached(key, lambda: VideoAlignScorer(path, **options)), dimension)
