"""VideoAlign (KwaiVGI VideoReward): a Qwen2-VL-2B reward model scoring visual quality (VQ),
motion quality (MQ) and text alignment (TA) of a video, from tensors, batched.

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

import ast
import glob
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip_rewards import cached, require_dir, require_file, resolve_dtype
from .image_transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

VIDEOREWARD_REPO = "KwaiVGI/VideoReward"
DIMENSIONS = ("VQ", "MQ", "TA")
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
MAX_ASPECT_RATIO = 200
#: template type -> constant holding it in VideoAlign's prompt_template.py
TEMPLATE_CONSTANTS = {"detailed_special": "DETAILED_PROMPT_WITH_SPECIAL_TOKEN", "detailed": "DETAILED_PROMPT"}


# ---------------------------------------------------------------- frames and pixels

def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"frames of {height}x{width}: aspect ratio above {MAX_ASPECT_RATIO} is not supported")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        # at least one factor per side (the release's copy can reach 0 here and then fails; transformers clamps)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def sample_frame_indices(total: int, video_fps: float | None, fps: float | None = None,
                         num_frames: int | None = None) -> Tensor:
    """Indices of the frames VideoAlign looks at: `num_frames` of them, or `fps` per second of
    a video playing at `video_fps` (at least 4, at most 768 and `total`, an even count)."""
    def even(x: float) -> int:
        return round(x / FRAME_FACTOR) * FRAME_FACTOR
    if num_frames is not None:
        n = even(num_frames)
    else:
        if video_fps is None or fps is None:
            raise ValueError("frame sampling by rate needs the video's frame rate: set the reward option video_fps")
        lo = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = even(min(max(total / video_fps * fps, lo), hi))
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(f"{total} frames give {n} sampled frames; VideoAlign needs at least {FRAME_FACTOR}")
    return torch.linspace(0, total - 1, n).round().long()


def resize_frames(frames: Tensor, height: int, width: int, quantize: bool = True) -> Tensor:
    """(T, 3, H, W) in [0, 255] -> bicubic antialiased resize; with `quantize`, rounded to integers
    before and after as the released pipeline's uint8 video frames are."""
    if quantize:
        frames = frames.round()
    if tuple(frames.shape[-2:]) != (height, width):
        frames = F.interpolate(frames, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        frames = frames.clamp(0, 255)
        if quantize:
            frames = frames.round()
    return frames


def patchify_video(frames: Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
                   ) -> tuple[Tensor, tuple[int, int, int]]:
    """Normalised (T, C, H, W) -> (grid_t*grid_h*grid_w, C*tps*p*p) patches in Qwen2-VL's order, and the grid.

    A frame count not divisible by the temporal patch repeats the last frame, as Qwen2-VL does.
    """
    t, c, h, w = frames.shape
    if t % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(temporal_patch_size - t % temporal_patch_size, -1, -1, -1)])
        t = frames.shape[0]
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, tps, p, p)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


# ---------------------------------------------------------------- release files

@dataclass
class VideoAlignConfig:
    """The parts of a release's model_config.json that inference depends on."""

    base_model: str
    output_dim: int = 1
    use_special_tokens: bool = True
    reward_token: str = "special"
    fps: float | None = 2.0
    num_frames: int | None = None
    max_frame_pixels: int = 240 * 320
    template_type: str = "none"
    sample_type: str = "uniform"
    lora_enable: bool = False
    lora_r: int = 16
    lora_alpha: float = 32
    use_rslora: bool = False
    norm: dict | None = None

    @classmethod
    def from_file(cls, path: Path) -> "VideoAlignConfig":
        from ..io_errors import load_json
        raw = load_json(path, "VideoAlign model config")
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a VideoAlign model config must be a JSON object, got {type(raw).__name__}")
        data, model, lora = raw.get("data_config", {}), raw.get("model_config", {}), raw.get("peft_lora_config", {})
        cfg = cls(base_model=model.get("model_name_or_path"), output_dim=model.get("output_dim", 1),
                  use_special_tokens=model.get("use_special_tokens", False),
                  reward_token=model.get("reward_token", "last"), fps=data.get("fps", 2.0),
                  num_frames=data.get("num_frames"), max_frame_pixels=data.get("max_frame_pixels", 240 * 320),
                  template_type=data.get("prompt_template_type", "none"),
                  sample_type=data.get("sample_type", "uniform"), lora_enable=lora.get("lora_enable", False),
                  lora_r=lora.get("lora_r", 16), lora_alpha=lora.get("lora_alpha", 32),
                  use_rslora=lora.get("use_rslora", False), norm=raw.get("inference_config"))
        if cfg.use_special_tokens:
            cfg.reward_token = "special"
        if cfg.sample_type != "uniform":
            raise ValueError(f"{path}: sample_type={cfg.sample_type!r} is not supported (only 'uniform')")
        if cfg.reward_token not in ("special", "last"):
            raise ValueError(f"{path}: reward_token={cfg.reward_token!r} is not supported ('special' or 'last')")
        return cfg


def load_prompt_template(path: str | Path, template_type: str) -> str:
    """The template text with a `{text_prompt}` placeholder, from VideoAlign's prompt_template.py
    (read with `ast`, not imported) or from a plain text file."""
    path = require_file(path, "VideoAlign prompt template",
                        "prompt_template.py from github.com/KwaiVGI/VideoAlign")
    from ..io_errors import read_text
    text = read_text(path, "VideoAlign prompt template")
    if path.suffix == ".py":
        wanted = TEMPLATE_CONSTANTS.get(template_type)
        if wanted is None:
            raise ValueError(f"prompt template type {template_type!r} is not supported: use one of "
                             f"{sorted(TEMPLATE_CONSTANTS)} or 'none'")
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == wanted for t in node.targets) \
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                text = node.value.value
                break
        else:
            raise ValueError(f"{path} defines no string constant {wanted} (the {template_type!r} template)")
    if "{text_prompt}" not in text:
        raise ValueError(f"prompt template {path} has no {{text_prompt}} placeholder")
    return text


def normalize_key(key: str) -> str | None:
    """A release state-dict key (peft-wrapped, transformers 4.45 layout) -> our module's key.

    None for weights inference does not use (the language-model head, peft's original copies).
    """
    for prefix in ("base_model.model.",):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if ".original_module." in key:
        return None
    key = key.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
    key = key.replace(".default.weight", ".weight").replace("lora_embedding_A.default", "lora_embedding_A") \
        .replace("lora_embedding_B.default", "lora_embedding_B")
    if key.startswith("lm_head."):
        return None
    if key.startswith("rm_head."):
        return key
    if key.startswith("visual."):                     # transformers 4.x: visual at the top level
        return "backbone.model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "backbone.model.language_model." + key[len("model."):]
    return "backbone." + key


def _latest_checkpoint(root: Path, step: int | None) -> Path:
    found = sorted(glob.glob(str(root / "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[-1]))
    if step is not None:
        wanted = root / f"checkpoint-{step}"
        if str(wanted) not in found:
            raise FileNotFoundError(f"{wanted} not found (have {[Path(p).name for p in found]})")
        return wanted
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> directory in {root}: download the Hugging Face repo "
                                f"{VIDEOREWARD_REPO} into {root}")
    return Path(found[-1])


def _read_torch(path: Path) -> dict[str, Tensor]:
    from ..io_errors import load_tensor_file
    state = load_tensor_file(path, "VideoAlign weights")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"VideoAlign weights {str(path)!r} do not hold a state dict of tensors (got {type(state).__name__})")
    return state


# ---------------------------------------------------------------- the model

class VideoAlignModel(nn.Module):
    """Qwen2-VL backbone + the reward head on the special tokens' last hidden states."""

    def __init__(self, backbone: nn.Module, output_dim: int, special_token_ids: list[int] | None,
                 pad_token_id: int | None):
        super().__init__()
        self.backbone = backbone
        text_cfg = getattr(backbone.config, "text_config", backbone.config)
        self.rm_head = nn.Linear(text_cfg.hidden_size, output_dim, bias=False)
        self.special_token_ids = special_token_ids
        self.pad_token_id = pad_token_id
        self.video_token_id = backbone.config.video_token_id

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values_videos: Tensor,
                video_grid_thw: Tensor) -> Tensor:
        """-> (B, 3) raw VQ, MQ, TA (special tokens), or (B, output_dim) at the last token."""
        inner = self.backbone.model
        embeds = inner.get_input_embeddings()(input_ids)
        visual = inner.visual
        video = visual(pixel_values_videos.to(visual.dtype), grid_thw=video_grid_thw)
        video = video.pooler_output if hasattr(video, "pooler_output") else video
        mask = (input_ids == self.video_token_id).unsqueeze(-1).expand_as(embeds)
        if int(mask[..., 0].sum()) != video.shape[0]:
            raise ValueError(f"{int(mask[..., 0].sum())} video tokens in the text for {video.shape[0]} video embeddings")
        embeds = embeds.masked_scatter(mask, video.to(embeds.dtype))
        # Sequential positions on every M-RoPE axis, as the released model was trained.
        hidden = inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        logits = self.rm_head(hidden)
        b = input_ids.shape[0]
        if self.special_token_ids is None:
            last = attention_mask.long().sum(dim=1) - 1              # right padding
            return logits[torch.arange(b, device=logits.device), last]
        special = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.special_token_ids:
            special |= input_ids == token
        counts = special.sum(dim=1)
        if not bool((counts == 3).all()):
            raise ValueError(f"expected 3 reward tokens per sample, found {counts.tolist()}: "
                             "the prompt template must contain <|VQ_reward|>, <|MQ_reward|> and <|TA_reward|>")
        pooled = logits[special].view(b, 3, -1)
        return pooled.diagonal(dim1=1, dim2=2) if pooled.shape[-1] == 3 else pooled.reshape(b, -1)


def merge_lora(weights: dict[str, Tensor], lora: dict[str, Tensor], scale: float) -> int:
    """Adds scale * B @ A into `weights` for each LoRA pair; returns how many were merged."""
    merged = 0
    for key in [k for k in lora if ".lora_A." in k or k.endswith(".lora_embedding_A")]:
        if key.endswith(".lora_embedding_A"):
            base = key[: -len(".lora_embedding_A")]
            delta = (lora[base + ".lora_embedding_B"] @ lora[key]).T   # (num_embeddings, dim)
        else:
            base = key.split(".lora_A.")[0]
            delta = lora[base + ".lora_B.weight"] @ lora[key]          # (out, in)
        target = base + ".weight"
        if target not in weights:
            raise ValueError(f"LoRA weights for {base!r}, which the base model does not have")
        weights[target] = weights[target] + scale * delta.to(weights[target].dtype)
        merged += 1
    return merged


def load_videoalign_model(path: Path, cfg: VideoAlignConfig, base_model: Path, tokenizer, dtype: torch.dtype,
                          checkpoint_step: int | None = None) -> VideoAlignModel:
    """Base Qwen2-VL + resized embeddings + reward head, with the release checkpoint applied
    (full state dict, or non-LoRA weights then merged LoRA deltas)."""
    from transformers import Qwen2VLForConditionalGeneration
    backbone = Qwen2VLForConditionalGeneration.from_pretrained(str(base_model), dtype=torch.float32)
    ckpt = _latest_checkpoint(path, checkpoint_step)
    full = ckpt / "model.pth"
    if full.is_file():
        raw, lora = _read_torch(full), {}
    else:
        non_lora = require_file(ckpt / "non_lora_state_dict.pth", "VideoAlign non-LoRA weights",
                                f"the Hugging Face repo {VIDEOREWARD_REPO}")
        adapter = require_file(ckpt / "adapter_model.safetensors", "VideoAlign LoRA adapter",
                               f"the Hugging Face repo {VIDEOREWARD_REPO}")
        raw, lora = _read_torch(non_lora), _read_torch(adapter)
    state = {normalize_key(k): v for k, v in raw.items()}
    state.pop(None, None)
    embed_key = "backbone.model.language_model.embed_tokens.weight"
    vocab = state[embed_key].shape[0] if embed_key in state else len(tokenizer)
    backbone.resize_token_embeddings(vocab, mean_resizing=False)
    special = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) if cfg.use_special_tokens else None
    model = VideoAlignModel(backbone, cfg.output_dim, special, tokenizer.pad_token_id)
    weights = model.state_dict()
    unknown = sorted(k for k in state if k not in weights)
    if unknown:
        raise ValueError(f"{ckpt}: weights {unknown[:5]} do not exist in the Qwen2-VL reward model built from "
                         f"{base_model}; is base_model the model this checkpoint was trained from?")
    weights.update(state)
    if lora:
        adapter_cfg = ckpt / "adapter_config.json"
        r, alpha, rslora = cfg.lora_r, cfg.lora_alpha, cfg.use_rslora
        if adapter_cfg.is_file():
            from ..io_errors import load_json
            a = load_json(adapter_cfg, "VideoAlign LoRA adapter config")
            r, alpha, rslora = a.get("r", r), a.get("lora_alpha", alpha), a.get("use_rslora", rslora)
        lora = {normalize_key(k): v for k, v in lora.items()}
        lora.pop(None, None)
        # lm_head shares its weight with the embeddings in Qwen2-VL-2B; its LoRA is unused by the reward.
        merge_lora(weights, lora, alpha / math.sqrt(r) if rslora else alpha / r)
    if backbone.config.tie_word_embeddings:  # keep the (unused) lm_head from aliasing the merged embeddings
        backbone.lm_head.weight = nn.Parameter(backbone.lm_head.weight.detach().clone())
        weights.pop("backbone.lm_head.weight", None)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [m for m in missing if m != "backbone.lm_head.weight"]:
        raise ValueError(f"{ckpt}: could not apply weights (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(dtype).eval().requires_grad_(False)


# ---------------------------------------------------------------- scoring

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
