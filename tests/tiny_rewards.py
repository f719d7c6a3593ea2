"""Tiny random reward models written to disk in the real release formats, for the reward tests.

- a CLIP BPE vocabulary (vocab.json + merges.txt) laid out like OpenAI's: 256 byte symbols,
  the same with the end-of-word mark, a few merges, then start/end-of-text last;
- a transformers CLIPModel with exact GELU (the open_clip ViT-H-14 activation) and the
  conversion of its state dict to open_clip's parameter names, so one set of weights is
  both the open_clip checkpoint under test and its independent reference;
- the HPS v2.1 checkpoint layout ({"state_dict": ...}), the laion open_clip directory
  (open_clip_pytorch_model.bin + open_clip_config.json + tokenizer files), a PickScore
  transformers directory and its processor directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

MERGES = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>"),
          ("r", "e"), ("re", "d</w>")]
IMAGE_SIZE = 28
PATCH = 14


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_vocab() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer(directory: Path) -> dict[str, int]:
    """vocab.json + merges.txt in `directory`; returns the vocabulary."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
    return vocab


def tiny_clip_model(seed: int = 0) -> CLIPModel:
    """A random transformers CLIPModel with open_clip ViT-H-14's activation (exact GELU)."""
    vocab = clip_vocab()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="gelu"),
        projection_dim=16, logit_scale_init_value=2.6592)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # default init leaves LayerNorms at identity and biases at zero: randomise all
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def openclip_config(model: CLIPModel) -> dict:
    """The open_clip model JSON for the architecture of `model`."""
    v, t = model.config.vision_config, model.config.text_config
    return {"embed_dim": model.config.projection_dim,
            "vision_cfg": {"image_size": v.image_size, "layers": v.num_hidden_layers, "width": v.hidden_size,
                           "head_width": v.hidden_size // v.num_attention_heads, "patch_size": v.patch_size,
                           "mlp_ratio": v.intermediate_size / v.hidden_size},
            "text_cfg": {"context_length": t.max_position_embeddings, "vocab_size": t.vocab_size,
                         "width": t.hidden_size, "heads": t.num_attention_heads, "layers": t.num_hidden_layers,
                         "mlp_ratio": t.intermediate_size / t.hidden_size}}


def _blocks(sd: dict, src: str, dst: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        a, b = f"{src}.encoder.layers.{i}", f"{dst}.resblocks.{i}"
        out[f"{b}.attn.in_proj_weight"] = torch.cat([sd[f"{a}.self_attn.{p}_proj.weight"] for p in "qkv"])
        out[f"{b}.attn.in_proj_bias"] = torch.cat([sd[f"{a}.self_attn.{p}_proj.bias"] for p in "qkv"])
        for name_hf, name_oc in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
            for kind in ("weight", "bias"):
                out[f"{b}.{name_oc}.{kind}"] = sd[f"{a}.{name_hf}.{kind}"]
    return out


def openclip_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """`model`'s weights under open_clip's CLIP parameter names."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    v_layers = model.config.vision_config.num_hidden_layers
    t_layers = model.config.text_config.num_hidden_layers
    out = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": sd["logit_scale"],
    }
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    out.update(_blocks(sd, "vision_model", "visual.transformer", v_layers))
    out.update(_blocks(sd, "text_model", "transformer", t_layers))
    return out


def write_hps_files(root: Path, model: CLIPModel) -> dict[str, Path]:
    """HPS_v2.1_compressed.pt ({'state_dict': open_clip names}), tokenizer dir, model config JSON."""
    root.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": openclip_state_dict(model)}, root / "HPS_v2.1_compressed.pt")
    (root / "tiny-ViT.json").write_text(json.dumps(openclip_config(model)))
    write_clip_tokenizer(root / "tokenizer")
    return {"checkpoint": root / "HPS_v2.1_compressed.pt", "tokenizer": root / "tokenizer",
            "model_config": root / "tiny-ViT.json"}


def write_laion_dir(directory: Path, model: CLIPModel, safetensors: bool = False) -> Path:
    """The laion open_clip download: weights, open_clip_config.json and tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = openclip_state_dict(model)
    if safetensors:
        from safetensors.torch import save_file
        save_file(sd, str(directory / "open_clip_model.safetensors"))
    else:
        torch.save(sd, directory / "open_clip_pytorch_model.bin")
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": openclip_config(model)}))
    write_clip_tokenizer(directory)
    return directory


def write_pickscore_dirs(root: Path, model: CLIPModel) -> tuple[Path, Path]:
    """(model dir: CLIPModel.save_pretrained, processor dir: preprocessor_config.json + tokenizer)."""
    model_dir, proc_dir = root / "PickScore_v1", root / "processor"
    model.save_pretrained(model_dir)
    write_clip_tokenizer(proc_dir)
    (proc_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": IMAGE_SIZE}}))
    return model_dir, proc_dir


def smooth_images(n: int, height: int, width: int, seed: int = 0, frames: int | None = None) -> torch.Tensor:
    """Random but smooth pixels in [0, 1] (upsampled noise), like decoded generator output."""
    g = torch.Generator().manual_seed(seed)
    shape = (n * (frames or 1), 3, 6, 7)
    x = torch.nn.functional.interpolate(torch.rand(shape, generator=g), size=(height, width), mode="bicubic",
                                        align_corners=False).clamp(0, 1)
    return x if frames is None else x.view(n, frames, 3, height, width)


# ---------------------------------------------------------------- VideoAlign (Qwen2-VL reward model)

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
# The tests' own chat template (same message structure as Qwen2-VL's: video placeholder, then text).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATE_PY = 'DETAILED_PROMPT = "unused {text_prompt}"\nDETAILED_PROMPT_WITH_SPECIAL_TOKEN = """\n' \
    'Rate the video. Visual: <|VQ_reward|>\nMotion: <|MQ_reward|>\nPrompt - {text_prompt}\nText: <|TA_reward|>\n"""\n'
NORM = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.5, "TA_mean": 0.25, "TA_std": 4.0}


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _new_to_old_name(key: str) -> str:
    """transformers 5 Qwen2-VL names -> the 4.45 layout the release was saved in."""
    key = key.replace("model.language_model.", "model.")
    return key.replace("model.visual.", "visual.")


def write_videoalign_release(root: Path, seed: int = 0):
    """A tiny base Qwen2-VL directory and a VideoAlign release (LoRA adapter + non-LoRA weights)
    trained-from-it, as VideoAlign's create_model_and_processor + peft would save it. Returns
    (release dir, base dir, template file, reference peft model, tokenizer with reward tokens)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    base, release = root / "Qwen2-VL-tiny", root / "VideoReward"
    tok = qwen_tokenizer()
    tok.save_pretrained(base)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0},
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None, eos_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(base)
    (base / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))

    # "Training": add the reward tokens, resize, reward head, LoRA on the language model.
    tok = AutoTokenizer.from_pretrained(str(base), padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]})
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(base))
    model.resize_token_embeddings(len(tok))
    model.rm_head = torch.nn.Linear(32, 1, bias=False)
    targets = [n for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)) and "visual" not in n
               and n not in ("lm_head", "rm_head")]
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "rm_head" in name or "merger" in name or "embed_tokens.base_layer" in name:
                p.requires_grad_(True)
                p.normal_(0, 0.2)
    peft_model.eval()
    ckpt = release / "checkpoint-200"
    ckpt.mkdir(parents=True)
    (release / "checkpoint-100").mkdir()  # an older step: the latest must be the one loaded
    lora_sd = {_new_to_old_name(k): v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(lora_sd, str(ckpt / "adapter_model.safetensors"))
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": False}))
    non_lora = {_new_to_old_name(n): p.detach().clone() for n, p in peft_model.named_parameters()
                if "lora_" not in n and p.requires_grad}
    torch.save(non_lora, ckpt / "non_lora_state_dict.pth")
    (release / "model_config.json").write_text(json.dumps({
        "data_config": {"meta_data": "x.csv", "data_dir": "/data", "max_frame_pixels": 56 * 84, "num_frames": None,
                        "fps": 2.0, "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special",
                        "sample_type": "uniform"},
        "model_config": {"model_name_or_path": str(base), "output_dim": 1, "use_special_tokens": True,
                         "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
        "inference_config": NORM}))
    template = root / "prompt_template.py"
    template.write_text(TEMPLATE_PY)
    return release, base, template, peft_model, tok
