"""HPS v2.1, CLIP score and PickScore on tiny random models in the real checkpoint formats.

The independent reference is transformers' CLIPModel holding the same weights (converted
to open_clip names for our module), fed by PIL-based preprocessing and transformers'
tokenizer, scored as the released code scores: cosine of normalised features (HPS, CLIP
score) or exp(logit_scale) * cosine (PickScore).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from dancegrpo.rewards import build_reward
from dancegrpo.rewards.clip_rewards import clip_score, hps_v21, pickscore
from dancegrpo.rewards.image_transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from dancegrpo.rewards.openclip_compat import OpenCLIPConfig, OpenCLIPTokenizer, load_openclip
from test_rewards_transforms import pil_longest_pad, pil_shortest_crop
from tiny_rewards import (clip_vocab, openclip_config, smooth_images, tiny_clip_model, write_hps_files,
                          write_laion_dir, write_pickscore_dirs)

PROMPTS = ["the cat", "a red dog", "the cat", "dog &amp; cat at the door"]
TOL = 2e-5


@pytest.fixture(scope="module")
def hf_model():
    return tiny_clip_model(seed=0)


@pytest.fixture(scope="module")
def files(hf_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_rewards")
    hps = write_hps_files(root / "hps", hf_model)
    laion = write_laion_dir(root / "laion", hf_model)
    pick_model, pick_proc = write_pickscore_dirs(root / "pick", hf_model)
    return {"hps": hps, "laion": laion, "pick_model": pick_model, "pick_proc": pick_proc}


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def reference_scores(hf_model, tokenizer_dir, images, prompts, pil_transform, logit=False):
    """Released-code scoring with transformers' CLIPModel, PIL preprocessing and HF tokenizer."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    pixels = torch.stack([(pil_transform(im) - mean) / std for im in images])
    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    # open_clip unescapes HTML; the released PickScore processor does not, but our prompts only
    # differ there in one entry and both paths below see the same cleaned text.
    import html
    text = [html.unescape(p) for p in prompts]
    ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    img = F.normalize(_features(hf_model.get_image_features(pixel_values=pixels)), dim=-1)
    txt = F.normalize(_features(hf_model.get_text_features(input_ids=ids)), dim=-1)
    cos = (img * txt).sum(-1)
    return cos * hf_model.logit_scale.exp() if logit else cos


def test_openclip_module_equals_transformers_clip(hf_model, files):
    cfg = OpenCLIPConfig.from_file(files["hps"]["model_config"])
    ours = load_openclip(files["hps"]["checkpoint"], cfg)
    pixels = torch.randn(3, 3, 28, 28)
    tokens = OpenCLIPTokenizer(files["hps"]["tokenizer"])(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(pixels), _features(hf_model.get_image_features(pixel_values=pixels)),
                              atol=1e-5)
        assert torch.allclose(ours.encode_text(tokens), _features(hf_model.get_text_features(input_ids=tokens)),
                              atol=1e-5)
    assert torch.equal(ours.logit_scale, hf_model.logit_scale)


@pytest.mark.parametrize("safetensors", [False, True])
def test_laion_directory_formats_load(hf_model, tmp_path, safetensors):
    from dancegrpo.rewards.openclip_compat import find_openclip_weights
    directory = write_laion_dir(tmp_path / "laion", hf_model, safetensors=safetensors)
    model = load_openclip(find_openclip_weights(directory), OpenCLIPConfig.from_file(directory / "open_clip_config.json"))
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), _features(hf_model.get_image_features(pixel_values=pixels)),
                              atol=1e-5)


def test_tokenizer_uses_open_clip_layout(files):
    vocab = clip_vocab()
    sot, eot = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tokens = OpenCLIPTokenizer(files["hps"]["tokenizer"])(["The  Cat", "x" * 200, "a &amp; b"])
    assert tokens.shape == (3, 77) and tokens.dtype == torch.long
    assert tokens[0, :4].tolist() == [sot, vocab["the</w>"], vocab["cat</w>"], eot]
    assert (tokens[0, 4:] == 0).all()                                   # zero padding, not eot padding
    assert tokens[1, 0] == sot and tokens[1, -1] == eot and (tokens[1, 1:-1] == vocab["x"]).all()
    assert tokens[2, 1:5].tolist() == [vocab["a</w>"], vocab["&</w>"], vocab["b</w>"], eot]


def test_hps_scores_equal_reference(hf_model, files):
    reward = hps_v21(**{k: str(v) for k, v in files["hps"].items()})
    images = smooth_images(4, 40, 60, seed=5)                          # not square: exercises the padding
    ours = reward(images, PROMPTS)
    ref = reference_scores(hf_model, files["hps"]["tokenizer"], images, PROMPTS, lambda im: pil_longest_pad(im, 28))
    assert ours.shape == (4,) and ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=TOL)


def test_clip_score_equals_reference(hf_model, files):
    reward = clip_score(str(files["laion"]))
    images = smooth_images(4, 50, 70, seed=6)
    ours = reward(images, PROMPTS)
    ref = reference_scores(hf_model, files["laion"], images, PROMPTS, lambda im: pil_shortest_crop(im, 28, 28))
    assert torch.allclose(ours, ref, atol=TOL)


def test_pickscore_equals_reference(hf_model, files):
    images = smooth_images(4, 28, 40, seed=7)                          # even margin: crop rounding agrees
    prompts = ["the cat", "a red dog", "the cat", "the dog"]
    ref = reference_scores(hf_model, files["pick_proc"], images, prompts, lambda im: pil_shortest_crop(im, 28, 28),
                           logit=True)
    ours = pickscore(str(files["pick_model"]), str(files["pick_proc"]))(images, prompts)
    assert torch.allclose(ours, ref, atol=1e-4)
    cosine = pickscore(str(files["pick_model"]), str(files["pick_proc"]), scale="cosine")(images, prompts)
    assert torch.allclose(cosine * hf_model.logit_scale.exp(), ref, atol=1e-4)


@pytest.mark.parametrize("kind", ["hps", "pickscore"])
def test_batched_scores_equal_per_sample(files, kind):
    if kind == "hps":
        reward = hps_v21(**{k: str(v) for k, v in files["hps"].items()}, batch_size=3)
    else:
        reward = pickscore(str(files["pick_model"]), str(files["pick_proc"]), batch_size=3)
    images = smooth_images(5, 32, 48, seed=8)
    prompts = PROMPTS + ["a dog"]
    batched = reward(images, prompts)
    single = torch.cat([reward(images[i:i + 1], [prompts[i]]) for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert batched.std() > 0                                           # the comparison is not between constants


def test_video_score_is_mean_over_frames(files):
    reward = clip_score(str(files["laion"]))
    video = smooth_images(2, 30, 30, seed=9, frames=3)
    per_frame = torch.stack([reward(video[:, t], PROMPTS[:2]) for t in range(3)], dim=1)
    assert torch.allclose(reward(video, PROMPTS[:2]), per_frame.mean(dim=1), atol=1e-5)


def test_bf16_is_close_to_fp32(files):
    images = smooth_images(3, 40, 40, seed=10)
    args = {k: str(v) for k, v in files["hps"].items()}
    fp32 = hps_v21(**args)(images, PROMPTS[:3])
    bf16 = hps_v21(**args, dtype="bf16")(images, PROMPTS[:3])
    assert bf16.dtype == torch.float32
    assert (fp32 - bf16).abs().max() < 0.03 and not torch.equal(fp32, bf16)


def test_registry_builds_rewards_and_binary_forms(files):
    hps_opts = {k: str(v) for k, v in files["hps"].items()}
    images = smooth_images(4, 28, 28, seed=11)
    scores = build_reward("hps", hps_opts)(images, PROMPTS)
    threshold = float(scores.median())
    binary = build_reward("hps_binary", {**hps_opts, "threshold": threshold})(images, PROMPTS)
    assert torch.equal(binary, (scores > threshold).float())
    assert build_reward("hps_binary", hps_opts).threshold == 0.28
    assert build_reward("clip_score_binary", {"path": str(files["laion"])}).threshold == 0.39


def test_missing_files_name_the_file_and_the_download(files, tmp_path):
    hps = {k: str(v) for k, v in files["hps"].items()}
    with pytest.raises(FileNotFoundError, match=r"nowhere/HPS_v2\.1_compressed\.pt.*xswu/HPSv2"):
        hps_v21(**{**hps, "checkpoint": str(tmp_path / "nowhere" / "HPS_v2.1_compressed.pt")})
    with pytest.raises(FileNotFoundError, match=r"vocab\.json.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        hps_v21(**{**hps, "tokenizer": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"open_clip_pytorch_model\.bin.*laion/CLIP-ViT-H-14"):
        clip_score(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"config\.json.*yuvalkirstain/PickScore_v1"):
        pickscore(str(tmp_path), str(files["pick_proc"]))
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json.*laion/CLIP-ViT-H-14"):
        pickscore(str(files["pick_model"]), str(tmp_path))


def test_checkpoint_for_another_architecture_is_refused(hf_model, files, tmp_path):
    cfg = openclip_config(hf_model)
    cfg["vision_cfg"]["layers"] = 3                                    # the file has 2 blocks
    with pytest.raises(ValueError, match=r"missing keys .*resblocks\.2"):
        load_openclip(files["hps"]["checkpoint"], OpenCLIPConfig.from_dict(cfg))
