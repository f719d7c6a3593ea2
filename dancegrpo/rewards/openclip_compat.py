"""An open_clip-compatible CLIP (ViT image tower + causal text transformer) without open_clip.

open_clip imports torchvision, which has no CPU build matching our torch, so this module
re-implements the parts a reward needs: the modules and parameter names of open_clip's
`CLIP` with a `VisionTransformer` image tower and its built-in text transformer (the
ViT-H-14 layout: pre-LN residual blocks with fused `in_proj` attention, exact GELU,
class-token pooling with `ln_post` and a `proj` matrix, argmax (end-of-text) text
pooling, `text_projection` matrix), so state dicts saved by open_clip load unchanged:
the laion2B ViT-H-14 weights (`open_clip_pytorch_model.bin` / `open_clip_model.safetensors`)
and the HPS v2.1 checkpoint (`torch.load(...)["state_dict"]`).

Text uses open_clip's token layout (start-of-text, BPE ids, end-of-text, zero padding to
77, truncation keeping end-of-text last) from the CLIP BPE vocabulary read by
transformers' `CLIPTokenizer` out of a directory holding `vocab.json` + `merges.txt`
(or `tokenizer.json`): the laion/CLIP-ViT-H-14-laion2B-s32B-b79K download has them.
open_clip additionally runs `ftfy.fix_text`; we unescape HTML and collapse whitespace as
it does, but do not depend on ftfy (it only changes mis-encoded unicode).
"""
from __future__ import annotations

import html
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Files of an open_clip checkpoint directory, in the order they are looked for.
OPENCLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                         "open_clip_pytorch_model.bin")
OPENCLIP_CONFIG_FILE = "open_clip_config.json"


@dataclass
class VisionConfig:
    image_size: int = 224
    layers: int = 32
    width: int = 1280
    head_width: int = 80
    patch_size: int = 14
    mlp_ratio: float = 4.0


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0


@dataclass
class OpenCLIPConfig:
    """open_clip's model config (`model_configs/<name>.json`); defaults are ViT-H-14."""

    embed_dim: int = 1024
    vision_cfg: VisionConfig = field(default_factory=VisionConfig)
    text_cfg: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False

    @classmethod
    def from_dict(cls, cfg: dict) -> "OpenCLIPConfig":
        """From open_clip's JSON layout: {"embed_dim", "vision_cfg": {...}, "text_cfg": {...}}."""
        def pick(kind, values):
            known = set(kind.__dataclass_fields__)
            unsupported = {k: v for k, v in values.items() if k not in known}
            if unsupported:
                raise ValueError(f"open_clip config keys {sorted(unsupported)} are not supported by this "
                                 f"compatible CLIP (supported: {sorted(known)})")
            return kind(**values)
        return cls(embed_dim=cfg["embed_dim"], vision_cfg=pick(VisionConfig, cfg.get("vision_cfg", {})),
                   text_cfg=pick(TextConfig, cfg.get("text_cfg", {})), quick_gelu=cfg.get("quick_gelu", False))

    @classmethod
    def from_file(cls, path: str | Path) -> "OpenCLIPConfig":
        """A model config JSON, or an `open_clip_config.json` (config under "model_cfg")."""
        from ..io_errors import load_json
        data = load_json(path, "open_clip model config")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an open_clip model config must be a JSON object, got {type(data).__name__}")
        return cls.from_dict(data.get("model_cfg", data))


# Adapted from open_clip src/open_clip/layers.py::LayerNorm (MIT)
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (open_clip's LayerNormFp32 under bf16/fp16)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


# Adapted from open_clip src/open_clip/layers.py::QuickGELU (MIT)
class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        n, length, width = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        mask = None if attn_mask is None else attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


# Adapted from open_clip src/open_clip/transformer.py::ResidualAttentionBlock (MIT)
class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


# Adapted from open_clip src/open_clip/transformer.py::Transformer (MIT)
class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)])

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


# Adapted from open_clip src/open_clip/transformer.py::VisionTransformer (MIT)
class VisionTransformer(nn.Module):
    """open_clip's ViT tower: patch conv, class token, ln_pre, blocks, ln_post on the class token, proj."""

    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width ** -0.5
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.width // cfg.head_width, cfg.mlp_ratio, quick_gelu)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, output_dim))

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)                                   # (N, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj                           # ln_post is per token: pool first


# Adapted from open_clip src/open_clip/model.py::CLIP (MIT)
class OpenCLIP(nn.Module):
    """open_clip's `CLIP` (image and text towers, `logit_scale`), with its state-dict names."""

    def __init__(self, cfg: OpenCLIPConfig | None = None):
        super().__init__()
        cfg = cfg or OpenCLIPConfig()
        t = cfg.text_cfg
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision_cfg, cfg.embed_dim, cfg.quick_gelu)
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.quick_gelu)
        self.context_length = t.context_length
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(torch.log(torch.tensor(1 / 0.07)))))
        causal = torch.full((t.context_length, t.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", causal, persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    def encode_image(self, pixels: Tensor, normalize: bool = False) -> Tensor:
        """Normalised (N, 3, S, S) pixels -> (N, embed_dim) features."""
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """(N, context_length) token ids in open_clip's layout -> (N, embed_dim) features."""
        dtype = self.token_embedding.weight.dtype
        x = self.token_embedding(tokens) + self.positional_embedding.to(dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # end-of-text has the largest id
        features = x @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file, or of a torch file holding a state dict, possibly under
    "state_dict" (HPS checkpoints) and possibly with DDP's "module." prefix."""
    from ..io_errors import load_tensor_file
    path = Path(path)
    state = load_tensor_file(path, "checkpoint")  # names the file when it is missing, truncated or pickles objects
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict of tensors (got "
                         f"{type(state).__name__}): expected name -> tensor, possibly under \"state_dict\"")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_openclip(weights: str | Path, config: OpenCLIPConfig | None = None) -> OpenCLIP:
    """Build the model for `config` (default ViT-H-14) and load an open_clip state dict file.

    Every key must match: a missing or extra key means the file is for another architecture.
    """
    model = OpenCLIP(config)
    state = read_state_dict(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match the open_clip architecture "
                         f"(missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); pass the matching model config")
    return model.eval().requires_grad_(False)


def find_openclip_weights(directory: str | Path) -> Path | None:
    """The first open_clip weight file present in `directory`, or None."""
    for name in OPENCLIP_WEIGHT_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


_WHITESPACE = re.compile(r"\s+")


# Adapted from open_clip src/open_clip/tokenizer.py::basic_clean (MIT)
# Adapted from open_clip src/open_clip/tokenizer.py::whitespace_clean (MIT)
def clean_text(text: str) -> str:
    """open_clip's text cleaning without ftfy: HTML unescaped twice, whitespace collapsed, lower case."""
    return _WHITESPACE.sub(" ", html.unescape(html.unescape(text))).strip().lower()


# Adapted from open_clip src/open_clip/tokenizer.py::SimpleTokenizer.__call__ (MIT)
class OpenCLIPTokenizer:
    """CLIP BPE tokens in open_clip's layout: [sot, ids..., eot, 0, 0, ...], length `context_length`.

    `directory` holds the CLIP BPE files (`vocab.json` + `merges.txt`, or `tokenizer.json`).
    """

    def __init__(self, directory: str | Path, context_length: int = 77):
        from transformers import CLIPTokenizer
        directory = Path(directory)
        if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()) \
                and not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"no CLIP tokenizer files in {directory}: expected vocab.json + merges.txt (or tokenizer.json), "
                "e.g. from the Hugging Face repo laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(directory))
        self.context_length = context_length
        self.sot = self.tokenizer.convert_tokens_to_ids("<|startoftext|>")
        self.eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def __call__(self, texts: list[str]) -> Tensor:
        """(N, context_length) int64 token ids on the CPU."""
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.tokenizer(clean_text(text), add_special_tokens=False)["input_ids"]
            ids = [self.sot, *ids[: self.context_length - 2], self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out
