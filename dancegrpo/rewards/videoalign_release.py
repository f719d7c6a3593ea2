"""VideoAlign's release files: its model config, prompt template, checkpoint layout and model.

Reads a KwaiVGI/VideoReward download (`model_config.json`, `checkpoint-<step>/` with a full
state dict or a LoRA adapter plus the non-LoRA weights) into `VideoAlignModel`, a Qwen2-VL
backbone with the reward head on the special tokens; `dancegrpo.rewards.videoalign` scores
videos with it (its docstring lists what the release defines).
"""
from __future__ import annotations

import ast
import glob
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .clip_rewards import require_file

VIDEOREWARD_REPO = "KwaiVGI/VideoReward"
SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
#: template type -> constant holding it in VideoAlign's prompt_template.py
TEMPLATE_CONSTANTS = {"detailed_special": "DETAILED_PROMPT_WITH_SPECIAL_TOKEN", "detailed": "DETAILED_PROMPT"}


# Adapted from VideoAlign inference.py::load_configs_from_json (MIT)
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


def latest_checkpoint(root: Path, step: int | None) -> Path:
    """`root/checkpoint-<step>`, or the highest-numbered one when `step` is None (FileNotFoundError
    naming what exists, or the download to get, when there is none)."""
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


def read_release_weights(path: Path) -> dict[str, Tensor]:
    """A release weight file (`model.pth`, `non_lora_state_dict.pth`, the adapter) as a state dict of
    tensors; InputFileError (io_errors) for an unreadable file, ValueError for one holding anything else."""
    from ..io_errors import load_tensor_file
    state = load_tensor_file(path, "VideoAlign weights")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"VideoAlign weights {str(path)!r} do not hold a state dict of tensors "
                         f"(got {type(state).__name__})")
    return state


# Adapted from VideoAlign trainer.py::Qwen2VLRewardModelBT.forward (MIT)
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
            raise ValueError(f"{int(mask[..., 0].sum())} video tokens in the text for {video.shape[0]} "
                             "video embeddings")
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


# Adapted from VideoAlign inference.py::VideoVLMRewardInference.__init__ (MIT)
# Adapted from VideoAlign utils.py::load_model_from_checkpoint (MIT)
def load_videoalign_model(path: Path, cfg: VideoAlignConfig, base_model: Path, tokenizer, dtype: torch.dtype,
                          checkpoint_step: int | None = None) -> VideoAlignModel:
    """Base Qwen2-VL + resized embeddings + reward head, with the release checkpoint applied
    (full state dict, or non-LoRA weights then merged LoRA deltas)."""
    from transformers import Qwen2VLForConditionalGeneration
    backbone = Qwen2VLForConditionalGeneration.from_pretrained(str(base_model), dtype=torch.float32)
    ckpt = latest_checkpoint(path, checkpoint_step)
    full = ckpt / "model.pth"
    if full.is_file():
        raw, lora = read_release_weights(full), {}
    else:
        non_lora = require_file(ckpt / "non_lora_state_dict.pth", "VideoAlign non-LoRA weights",
                                f"the Hugging Face repo {VIDEOREWARD_REPO}")
        adapter = require_file(ckpt / "adapter_model.safetensors", "VideoAlign LoRA adapter",
                               f"the Hugging Face repo {VIDEOREWARD_REPO}")
        raw, lora = read_release_weights(non_lora), read_release_weights(adapter)
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
