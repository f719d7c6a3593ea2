"""VideoAlign on a tiny random Qwen2-VL reward model saved as the release saves it (LoRA adapter
and non-LoRA weights in the transformers 4.45 layout, model_config.json with normalisation).

References: the peft-wrapped model the release was written from (LoRA unmerged, transformers
5 names) running the released forward; transformers' Qwen2-VL smart_resize and its PIL image
processor's patches; frame indices worked out by hand from the released sampling rule.
"""
from __future__ import annotations

import pytest
import torch

from dancegrpo.rewards import build_reward
from dancegrpo.rewards.videoalign import (DIMENSIONS, VideoAlignScorer, load_prompt_template, patchify_video,
                                          sample_frame_indices, smart_resize, videoalign)
from tiny_rewards import NORM, smooth_images, write_videoalign_release

PROMPTS = ["a cat", "the dog runs over the red hill", "a cat"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    release_dir, base, template, ref_model, tokenizer = write_videoalign_release(tmp_path_factory.mktemp("va"))
    return {"release": release_dir, "base": base, "template": template, "ref": ref_model, "tok": tokenizer}


@pytest.fixture(scope="module")
def scorer(release):
    return VideoAlignScorer(str(release["release"]), video_fps=8.0, prompt_template=str(release["template"]),
                            dtype="float32")


@torch.no_grad()
def reference_raw(peft_model, tokenizer, batch):
    """The released forward on the peft model: embeddings (with LoRA), video features scattered into
    the video tokens, decoder without position ids, rm_head at the reward tokens (sequence order)."""
    model = peft_model.base_model.model
    inner = model.model
    ids = batch["input_ids"]
    embeds = inner.language_model.embed_tokens(ids)
    video = inner.visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"]).pooler_output
    mask = (ids == model.config.video_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, video)
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    logits = model.rm_head(hidden)
    special = torch.isin(ids, torch.tensor(tokenizer.convert_tokens_to_ids(
        ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"])))
    return logits[special].view(ids.shape[0], 3)


def test_scores_equal_the_released_model(release, scorer):
    videos = smooth_images(3, 40, 60, seed=1, frames=8)
    batch = scorer.batch_inputs(videos, PROMPTS)
    raw = reference_raw(release["ref"], release["tok"], batch)
    got = scorer.score(videos, PROMPTS)
    for i, dim in enumerate(DIMENSIONS):
        want = (raw[:, i] - NORM[f"{dim}_mean"]) / NORM[f"{dim}_std"]
        assert torch.allclose(got[dim], want, atol=1e-4), dim
    assert torch.allclose(got["Overall"], got["VQ"] + got["MQ"] + got["TA"])
    assert got["VQ"].std() > 0
    raw_scorer = VideoAlignScorer(str(release["release"]), video_fps=8.0, prompt_template=str(release["template"]),
                                  dtype="float32", use_norm=False)
    assert torch.allclose(raw_scorer.score(videos, PROMPTS)["MQ"], raw[:, 1], atol=1e-4)


def test_batched_scores_equal_per_sample(scorer):
    videos = smooth_images(3, 40, 60, seed=2, frames=6)
    batched = scorer.score(videos, PROMPTS)["Overall"]
    single = torch.cat([scorer.score(videos[i:i + 1], PROMPTS[i:i + 1])["Overall"] for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-4)


def test_inputs_follow_the_release_settings(scorer, release):
    videos = smooth_images(1, 40, 60, seed=3, frames=16)
    batch = scorer.batch_inputs(videos, PROMPTS[:1])
    # 16 frames at 8 fps sampled at 2 fps -> 4 frames -> 2 temporal patches; 40x60 within
    # [128*28*28, 56*84] pixels -> smart_resize gives the grid in 14-pixel patches.
    h, w = smart_resize(40, 60, 28, 128 * 28 * 28, 56 * 84)
    assert batch["video_grid_thw"].tolist() == [[2, h // 14, w // 14]]
    n_video = int((batch["input_ids"] == release["ref"].base_model.model.config.video_token_id).sum())
    assert n_video == 2 * (h // 14) * (w // 14) // 4
    text = scorer.prompt_text("a cat")
    assert "Prompt - a cat" in text and text.endswith("<|im_start|>assistant\n")
    assert text.index("<|video_pad|>") < text.index("<|VQ_reward|>") < text.index("<|TA_reward|>")


def test_frame_sampling_rule():
    assert sample_frame_indices(16, 8.0, 2.0).tolist() == [0, 5, 10, 15]
    assert sample_frame_indices(53, 24.0, 2.0).tolist() == [0, 17, 35, 52]        # 4.4 frames -> 4 (minimum)
    assert sample_frame_indices(96, 24.0, 2.0).tolist() == torch.linspace(0, 95, 8).round().long().tolist()
    assert sample_frame_indices(3, 8.0, 2.0).tolist() == [0, 2]                   # even count within the video
    assert sample_frame_indices(20, None, num_frames=5).tolist() == [0, 6, 13, 19]  # round(2.5) * 2 = 4
    with pytest.raises(ValueError, match="video_fps"):
        sample_frame_indices(16, None, 2.0)
    with pytest.raises(ValueError, match="at least 2"):
        sample_frame_indices(1, 8.0, 2.0)


@pytest.mark.parametrize("hw", [(40, 60), (480, 480), (720, 1280), (10, 300), (600, 50)])
def test_smart_resize_matches_transformers(hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference
    for max_pixels in (200704, 2 * 200704):  # consistent bounds (min <= max), as in the release
        assert smart_resize(*hw, 28, 128 * 28 * 28, max_pixels) == reference(*hw, factor=28, min_pixels=128 * 28 * 28,
                                                                               max_pixels=max_pixels)


def test_patches_match_the_qwen2vl_image_processor():
    """A video of frame pairs (f0, f0, f1, f1) is, per temporal patch, the image processor's
    patches of f0 then f1 (it repeats an image over the temporal patch)."""
    import numpy as np
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    frames = torch.randn(2, 3, 56, 84)
    video = frames.repeat_interleave(2, dim=0)
    ours, grid = patchify_video(video, 14, 2, 2)
    processor = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False)
    out = processor(images=[f.numpy() for f in frames], return_tensors="np", input_data_format="channels_first")
    assert grid == (2, 4, 6) and out["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 6]]
    assert torch.allclose(ours, torch.from_numpy(np.asarray(out["pixel_values"])), atol=1e-6)
    odd, odd_grid = patchify_video(video[:3], 14, 2, 2)                           # last frame repeated
    assert odd_grid == (2, 4, 6) and torch.equal(odd, ours)


def test_an_image_is_a_still_two_frame_video(scorer):
    images = smooth_images(2, 40, 60, seed=4)
    still = images.unsqueeze(1).expand(-1, 2, -1, -1, -1)
    assert torch.allclose(scorer.score(images, PROMPTS[:2])["TA"], scorer.score(still, PROMPTS[:2])["TA"])


def test_registry_names_share_one_model_and_one_pass(release, scorer):
    opts = {"path": str(release["release"]), "video_fps": 8.0, "prompt_template": str(release["template"]),
            "dtype": "float32"}
    vq, mq = build_reward("videoalign_vq", opts), build_reward("videoalign_mq", opts)
    assert vq.scorer is mq.scorer
    videos = smooth_images(2, 40, 60, seed=5, frames=4)
    calls = []
    forward = vq.scorer.model.forward
    vq.scorer.model.forward = lambda **kw: calls.append(1) or forward(**kw)
    try:
        got_vq, got_mq = vq(videos, PROMPTS[:2]), mq(videos, PROMPTS[:2])
        assert len(calls) == 1
        videos.mul_(0.5)                                   # modified in place: scored again
        mq(videos, PROMPTS[:2])
        mq(videos.clone(), PROMPTS[:2])                    # another tensor: scored again
        assert len(calls) == 3
    finally:
        vq.scorer.model.forward = forward
    want = scorer.score(videos * 2, PROMPTS[:2])
    assert torch.allclose(got_vq, want["VQ"], atol=1e-5) and torch.allclose(got_mq, want["MQ"], atol=1e-5)


def test_prompt_template_sources(release, tmp_path):
    text = load_prompt_template(release["template"], "detailed_special")
    assert "<|MQ_reward|>" in text and "{text_prompt}" in text
    plain = tmp_path / "template.txt"
    plain.write_text("no placeholder")
    with pytest.raises(ValueError, match="text_prompt"):
        load_prompt_template(plain, "detailed_special")
    with pytest.raises(FileNotFoundError, match="prompt_template.py.*KwaiVGI/VideoAlign"):
        load_prompt_template(tmp_path / "prompt_template.py", "detailed_special")
    with pytest.raises(FileNotFoundError, match="prompt_template"):
        VideoAlignScorer(str(release["release"]), video_fps=8.0)


def test_missing_release_files_name_what_to_download(release, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model_config\.json.*KwaiVGI/VideoReward"):
        videoalign(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Qwen/Qwen2-VL-2B-Instruct"):
        VideoAlignScorer(str(release["release"]), video_fps=8.0, prompt_template=str(release["template"]),
                         base_model=str(tmp_path / "missing"))
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(release["release"], broken)
    (broken / "checkpoint-200" / "non_lora_state_dict.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-200/non_lora_state_dict\.pth.*KwaiVGI/VideoReward"):
        VideoAlignScorer(str(broken), video_fps=8.0, prompt_template=str(release["template"]))


def test_bf16_is_close_to_fp32(release, scorer):
    videos = smooth_images(2, 40, 60, seed=6, frames=4)
    bf16 = VideoAlignScorer(str(release["release"]), video_fps=8.0, prompt_template=str(release["template"]))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16                 # the default
    got, want = bf16.score(videos, PROMPTS[:2]), scorer.score(videos, PROMPTS[:2])
    assert got["VQ"].dtype == torch.float32
    assert all((got[d] - want[d]).abs().max() < 0.1 for d in DIMENSIONS)
