"""Tiny random checkpoints of the real generators, written in the real diffusers layouts.

Each builder assembles the diffusers pipeline from tiny configs (random weights; tokenizers
from a small character vocabulary written here, since real vocabularies cannot be
downloaded) and calls the pipeline's own `save_pretrained`, so the folder is exactly what a
user's downloaded checkpoint looks like: model_index.json, unet/ or transformer/, vae/,
text_encoder*/, tokenizer*/, scheduler/.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

CHARS = list(string.ascii_lowercase) + list("0123456789.,!?'-<>|_:{}\n ")


def clip_tokenizer():
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    from transformers import T5Tokenizer
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in CHARS if c.strip()] + [("\u2581" + c, -1.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def llama_tokenizer():
    from transformers import LlamaTokenizer
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("\u2581" + c, len(vocab))
    # Right padding as HunyuanVideo's tokenizer: valid tokens first, which the transformer's mask assumes.
    return LlamaTokenizer(vocab=vocab, merges=[], pad_token="<unk>", padding_side="right")


def clip_text_model(hidden: int = 32, vocab_size: int = 128):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        projection_dim=hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1))


def tiny_vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=16, **extra)


def build_sd14(root: Path, seed: int = 0) -> Path:
    """Stable Diffusion v1 layout; VAE factor 2 (two levels) keeps it tiny."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=tiny_vae(4, scaling_factor=0.18215), text_encoder=clip_text_model(),
                                   tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(root))
    return root


def build_flux(root: Path, seed: int = 0) -> Path:
    """FLUX.1-dev layout: CLIP + T5 text encoders, 16-channel-style VAE (here 4), packed transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                        vae=tiny_vae(4, scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=clip_text_model(), tokenizer=clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(str(root))
    return root


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(p + "\n" for p in prompts))
    return path


PROMPTS = ["a red cat", "a blue dog on a hill", "two green birds", "an old boat at sea"]


def brightness(images, prompts):
    """Mean pixel value per sample, for images (B, C, H, W) or videos (B, T, C, H, W)."""
    return images.flatten(1).mean(1)


def trainer_config(run_dir: Path, model: str, path: Path, options: dict, prediction: str = "flow",
                   iterations: int = 1) -> dict:
    """One small GRPO iteration's config on a tiny checkpoint; prompts come from the cache."""
    return {
        "run": {"output_dir": str(run_dir), "seed": 0, "device": "cpu"},
        "model": {"name": model, "path": str(path), "options": options},
        "sampler": {"num_steps": 3, "eta": 1.0 if prediction == "ddim" else 0.7, "shift": 3.0},
        "data": {"train_prompts": str(Path(options["prompt_cache"]) / "prompts.txt"), "eval_prompts": ""},
        "rewards": [{"name": "brightness"}],
        "grpo": {"group_size": 2, "prompts_per_iteration": 2, "tau": 0.5, "clip_range": 1e-3},
        "trainer": {"iterations": iterations, "lr": 1e-3, "updates_per_iteration": 1, "micro_batch_size": 2,
                    "checkpoint_every": 1, "keep_last": 1},
    }


def _hunyuan_parts(in_channels: int, seed: int):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=32, rope_axes_dim=(2, 2, 4), guidance_embeds=True)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                    norm_num_groups=4)
    llama = LlamaModel(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024))
    return dict(text_encoder=llama, tokenizer=llama_tokenizer(), transformer=transformer, vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip_text_model(),
                tokenizer_2=clip_tokenizer())


def build_hunyuan_video(root: Path, seed: int = 0) -> Path:
    """hunyuanvideo-community/HunyuanVideo layout (Llama + CLIP, 3D VAE: 8x space, 4x time)."""
    from diffusers import HunyuanVideoPipeline
    HunyuanVideoPipeline(**_hunyuan_parts(4, seed)).save_pretrained(str(root))
    return root


def build_skyreels_i2v(root: Path, seed: int = 0) -> Path:
    """SkyReels-V1-Hunyuan-I2V layout: the same, with a transformer taking video + image latent channels."""
    from diffusers import HunyuanSkyreelsImageToVideoPipeline
    parts = _hunyuan_parts(8, seed)
    # A near-deterministic posterior (log-variance clamped at -30), so the pipeline's sampled
    # image latent equals the cache's posterior mean to ~1e-6 and the two can be compared.
    with torch.no_grad():
        quant = parts["vae"].quant_conv
        quant.weight[4:].zero_()
        quant.bias[4:].fill_(-60.0)
    HunyuanSkyreelsImageToVideoPipeline(**parts).save_pretrained(str(root))
    return root


def write_images(folder: Path, prompts: list[str], size=(40, 28)) -> Path:
    """Random RGB images and a JSONL prompt file naming them (relative paths)."""
    import json

    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    lines = []
    for i, prompt in enumerate(prompts):
        pixels = (torch.rand(size[1], size[0], 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"image_{i}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"image_{i}.png"}))
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_sd35(root: Path, seed: int = 0) -> Path:
    """Stable Diffusion 3.5 layout: two CLIPs with projection (of different widths, so their
    concatenation and the padding to T5's width are both exercised) + T5, a 4-channel VAE of
    factor 2 with SD3.5's scaling and shift factors, an MMDiT with one dual-attention block and
    RMS QK-norm as SD3.5, and the flow-matching scheduler with SD3.5's static shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(seed)

    def clip(hidden):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden, bos_token_id=0,
            eos_token_id=1, pad_token_id=1))

    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=48,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=64, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    vae = tiny_vae(4, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(32), tokenizer=clip_tokenizer(), text_encoder_2=clip(16), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer())
    pipe.save_pretrained(str(root))
    return root


# Qwen/Qwen-Image scheduler/scheduler_config.json (exponential time shift from the image's token count).
QWEN_IMAGE_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                            max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                            stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                            use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)
# The words of QwenImagePipeline's prompt template, each one token of the real Qwen2 vocabulary.
QWEN_TEMPLATE_WORDS = ("system user assistant Describe the image by detailing color shape size texture quantity "
                       "text spatial relationships of objects and background")


def qwen2_tokenizer():
    """A byte-level BPE Qwen2 tokenizer: the 256 byte symbols, the chat markers as special tokens, and
    merges that make each template word one token, as Qwen2.5-VL's vocabulary does, so that the
    template's system part is the 34 tokens QwenImagePipeline drops. Other text falls back to bytes."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer
    vocab = {"<|endoftext|>": 0}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab.setdefault(symbol, len(vocab))
    merges = []
    for i, word in enumerate(QWEN_TEMPLATE_WORDS.split()):
        word = word if i < 4 else "\u0120" + word   # \u0120: the byte-level symbol of a leading space
        token = word[0]
        for symbol in word[1:]:
            if token + symbol not in vocab:
                vocab[token + symbol] = len(vocab)
                merges.append((token, symbol))
            token += symbol
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def build_qwen_image(root: Path, seed: int = 0) -> Path:
    """Qwen/Qwen-Image layout: Qwen2.5-VL text encoder (tiny, with its vision tower), 3D-causal VAE
    (here factor 2, 4 latent channels), dual-stream transformer on 2x2-packed latents."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    tokenizer = qwen2_tokenizer()
    text = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=1024, bos_token_id=None, eos_token_id=0, pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=380, video_token_id=381, vision_start_token_id=382,
        vision_end_token_id=383)).eval()
    assert len(tokenizer) <= text["vocab_size"]
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(2, 2, 4))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(str(root))
    return root


# ---------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2 (text- and image-to-video): UMT5 text encoder, AutoencoderKLWan, WanTransformer3DModel

WAN_LATENTS_MEAN = [0.3, -0.2, 0.1, -0.4]   # not the identity, so the adapters' (de)normalisation is tested
WAN_LATENTS_STD = [1.5, 0.8, 2.0, 1.2]


def wan_transformer(in_channels: int = 4, **extra):
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                 in_channels=in_channels, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32, **extra)


def _wan_parts(seed: int, scheduler_shift: float):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=WAN_LATENTS_MEAN,
                           latents_std=WAN_LATENTS_STD)
    umt5 = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                       eos_token_id=1))
    return dict(tokenizer=t5_tokenizer(), text_encoder=umt5, vae=vae,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=scheduler_shift))


def build_wan_t2v(root: Path, seed: int = 0, two_experts: bool = False, boundary_ratio: float = 0.8) -> Path:
    """Wan-AI/Wan2.1-T2V-*-Diffusers layout (UMT5, Wan VAE: 8x space, 4x time); with `two_experts`,
    Wan2.2-T2V-A14B-Diffusers': transformer/ (high noise) and transformer_2/ (low noise), switched at
    `boundary_ratio` x 1000. Euler flow-matching scheduler with shift 3 (the adapter's sampler)."""
    from diffusers import WanPipeline
    parts = _wan_parts(seed, 3.0)
    parts["transformer"] = wan_transformer()
    if two_experts:
        parts.update(transformer_2=wan_transformer(), boundary_ratio=boundary_ratio)
    WanPipeline(**parts).save_pretrained(str(root))
    return root


def build_wan_i2v(root: Path, seed: int = 0, two_experts: bool = False, boundary_ratio: float = 0.8) -> Path:
    """Wan-AI/Wan2.1-I2V-14B-*-Diffusers layout: the T2V parts, a CLIP vision tower and its image
    processor (image_encoder/, image_processor/) and a transformer taking video latent + frame mask +
    condition latent channels (4 + 4 + 4) and CLIP image tokens; with `two_experts`,
    Wan2.2-I2V-A14B-Diffusers': no image encoder, transformer/ + transformer_2/ at `boundary_ratio`."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    parts = _wan_parts(seed, 3.0)
    if two_experts:
        parts.update(transformer=wan_transformer(in_channels=12), transformer_2=wan_transformer(in_channels=12),
                     boundary_ratio=boundary_ratio)
    else:
        vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=32, patch_size=8,
                                                  projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        parts.update(transformer=wan_transformer(in_channels=12, image_dim=16, added_kv_proj_dim=16),
                     image_encoder=vision, image_processor=processor)
    WanImageToVideoPipeline(**parts).save_pretrained(str(root))
    return root
