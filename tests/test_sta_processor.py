"""The STA attention processor in a tiny HunyuanVideoTransformer3DModel: full window equals
diffusers' stock processor; a small window equals the stock processor fed the dense STA
mask; full attention for the first steps; the adapter option installs it."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from dancegrpo.attention import STAMask
from dancegrpo.attention.hunyuan_processor import STAOptions, install_sta

CANVAS_LATENT = (3, 8, 12)       # frames, height, width of the latent; tokens (3, 4, 6) after 2x2 patches
TILE = (1, 4, 4)       # 16 tokens (the Triton/flex block minimum); the 6-wide canvas pads to 8


def tiny_transformer(seed: int = 0) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=32, rope_axes_dim=(2, 2, 4), guidance_embeds=True).eval()


def inputs(batch: int = 2, sigma: float | list = 0.5):
    generator = torch.Generator().manual_seed(1)
    sigma = torch.tensor(sigma if isinstance(sigma, list) else [sigma] * batch)
    return dict(hidden_states=torch.randn(batch, 4, *CANVAS_LATENT, generator=generator),
                timestep=sigma * 1000.0,
                encoder_hidden_states=torch.randn(batch, 5, 32, generator=generator),
                encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]][:batch]),
                pooled_projections=torch.randn(batch, 32, generator=generator),
                guidance=torch.full((batch,), 6018.0), return_dict=False)


class DenseMaskProcessor(HunyuanVideoAttnProcessor2_0):
    """diffusers' processor with its key-padding mask replaced by the dense STA mask."""

    def __init__(self, canvas, window):
        super().__init__()
        self.canvas, self.window = canvas, window

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        text = encoder_hidden_states.shape[1]
        text_valid = attention_mask.reshape(attention_mask.shape[0], -1)[:, -text:]
        mask = STAMask.build(self.canvas, self.window, TILE, text, heads=attn.heads).dense_mask(text_valid)
        return super().__call__(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


def with_dense_mask(model, window):
    reference = copy.deepcopy(model)
    for block in list(reference.transformer_blocks) + list(reference.single_transformer_blocks):
        block.attn.set_processor(DenseMaskProcessor((3, 4, 6), window))
    return reference


@torch.no_grad()
def test_full_window_equals_stock_processor():
    stock = tiny_transformer()
    sta = copy.deepcopy(stock)
    install_sta(sta, {"window": [3, 1, 2], "tile": list(TILE)})  # tiles per dim: the whole canvas
    torch.testing.assert_close(sta(**inputs())[0], stock(**inputs())[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [[1, 1, 1], [[1, 1, 2], [3, 1, 1]]])
@pytest.mark.parametrize("backend", ["torch", "flex"])
@torch.no_grad()
def test_small_window_equals_dense_mask_reference(window, backend):
    stock = tiny_transformer()
    sta = copy.deepcopy(stock)
    install_sta(sta, {"window": window, "tile": list(TILE), "backend": backend})
    out = sta(**inputs())[0]
    torch.testing.assert_close(out, with_dense_mask(stock, window)(**inputs())[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, stock(**inputs())[0], atol=1e-3)  # the window does change the output


@torch.no_grad()
def test_full_attention_for_first_steps_and_mixed_batches():
    stock = tiny_transformer()
    sta = copy.deepcopy(stock)
    controller = install_sta(sta, {"window": [1, 1, 1], "tile": list(TILE), "full_attention_steps": 1})
    controller.set_schedule(torch.tensor([1.0, 0.75, 0.5, 0.25]))
    windowed = with_dense_mask(stock, [1, 1, 1])
    first = sta(**inputs(sigma=1.0))[0]
    torch.testing.assert_close(first, stock(**inputs(sigma=1.0))[0], atol=1e-5, rtol=1e-5)
    later = sta(**inputs(sigma=0.75))[0]
    torch.testing.assert_close(later, windowed(**inputs(sigma=0.75))[0], atol=1e-5, rtol=1e-5)
    mixed = sta(**inputs(sigma=[1.0, 0.75]))[0]   # sample 0 at step 0 (full), sample 1 at step 1 (window)
    torch.testing.assert_close(mixed[0], stock(**inputs(sigma=[1.0, 0.75]))[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], windowed(**inputs(sigma=[1.0, 0.75]))[0][1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_per_step_per_layer_table():
    stock = tiny_transformer()
    sta = copy.deepcopy(stock)
    table = [[[1, 1, 1], [1, 1, 1]], [[1, 1, 1], [3, 1, 2]]]   # step 1: the single-stream layer is full
    controller = install_sta(sta, {"table": table, "tile": list(TILE)})
    controller.set_step(1)
    reference = with_dense_mask(stock, [1, 1, 1])
    reference.single_transformer_blocks[0].attn.set_processor(HunyuanVideoAttnProcessor2_0())
    torch.testing.assert_close(sta(**inputs())[0], reference(**inputs())[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_window_in_tokens_is_converted_to_tiles():
    """window_unit tokens: spans in tokens -> the fewest odd tiles of 1x4x4 covering them
    ([1, 4, 4] -> [1, 1, 1]; [3, 5, 1] -> [3, 3, 1]), equal to those windows given in tiles."""
    stock = tiny_transformer()
    sta = copy.deepcopy(stock)
    install_sta(sta, {"window": [[1, 4, 4], [3, 5, 1]], "tile": list(TILE), "window_unit": "tokens"})
    torch.testing.assert_close(sta(**inputs())[0], with_dense_mask(stock, [[1, 1, 1], [3, 3, 1]])(**inputs())[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("efficiency,uses_sta", [(0.83, True), (0.82, False)])
@torch.no_grad()
def test_kernel_efficiency_runs_sta_only_where_it_pays(efficiency, uses_sta):
    """Tokens (3, 4, 6) in 1x4x4 tiles, 5 text tokens, window 1x1x1: 6 video blocks of 16 tokens (the 6-wide
    canvas pads to 8) each attend their own and the text block, the text block attends all 7: 19 blocks x 16^2 =
    4864 pairs against (72 + 5)^2 = 5929 dense, so STA pays when 4864 / efficiency < 5929: efficiency > 0.8204."""
    stock = tiny_transformer()
    sta = copy.deepcopy(stock)
    install_sta(sta, {"window": [1, 1, 1], "tile": list(TILE), "kernel_efficiency": efficiency})
    expected = with_dense_mask(stock, [1, 1, 1]) if uses_sta else stock
    torch.testing.assert_close(sta(**inputs())[0], expected(**inputs())[0], atol=1e-5, rtol=1e-5)


def test_options_are_validated():
    assert STAOptions(window=[1, 1, 1]).validate() == []
    assert STAOptions(window=[1, 1, 1]).tile == "auto"           # the default tile
    problems = STAOptions(window=[0, 1, 1], full_attention_steps=-1, backend="cuda").validate()
    assert len(problems) == 3 and "sta.window" in problems[0]
    problems = STAOptions(window=[1, 1, 1], tile="automatic", window_unit="frames", kernel_efficiency=0).validate()
    assert len(problems) == 3
    assert "sta.tile" in problems[0] and "sta.window_unit" in problems[1] and "sta.kernel_efficiency" in problems[2]
    assert "sta.tile" in STAOptions(window=[1, 1, 1], tile=[6, 8]).validate()[0]
    with pytest.raises(ValueError, match="unknown sta option"):
        STAOptions.from_dict({"windows": [1, 1, 1]})
    with pytest.raises(ValueError, match="one window per layer"):
        install_sta(tiny_transformer(), {"table": [[[1, 1, 1]]]})


def test_backend_option_follows_the_ops_rule(monkeypatch):
    """sta.backend: the former 'reference' is refused naming 'torch'; with auto, DANCEGRPO_OPS_BACKEND
    chooses STA's backend too, so a name STA does not implement is refused at config time."""
    monkeypatch.delenv("DANCEGRPO_OPS_BACKEND", raising=False)
    for name in ("auto", "torch", "triton", "flex"):
        assert STAOptions(window=[1, 1, 1], backend=name).validate() == []
    (problem,) = STAOptions(window=[1, 1, 1], backend="reference").validate()
    assert "sta.backend = 'reference' was renamed 'torch'" in problem
    (problem,) = STAOptions(window=[1, 1, 1], backend="cpp").validate()
    assert problem == "sta.backend = 'cpp' must be one of auto, torch, triton, flex"
    monkeypatch.setenv("DANCEGRPO_OPS_BACKEND", "cpp")
    (problem,) = STAOptions(window=[1, 1, 1]).validate()
    assert "DANCEGRPO_OPS_BACKEND = 'cpp'" in problem and "no sliding-tile attention implementation" in problem
    assert STAOptions(window=[1, 1, 1], backend="torch").validate() == []   # an explicit backend wins
    monkeypatch.setenv("DANCEGRPO_OPS_BACKEND", "flex")
    assert STAOptions(window=[1, 1, 1]).validate() == []


def test_hunyuan_adapter_option_installs_sta(tmp_path):
    """model.options.sta on a tiny HunyuanVideo checkpoint: ODE rollouts equal the same
    checkpoint with the stock processor fed the dense STA mask."""
    from tiny_models import PROMPTS, build_hunyuan_video, write_prompts

    from dancegrpo.cli import main
    from dancegrpo.models import load_model
    from dancegrpo.rollout import ode_sample
    from dancegrpo.sampler import build_sampler

    ckpt = build_hunyuan_video(tmp_path / "ckpt")
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS[:2])
    assert main(["preprocess", "--model", "hunyuan_video", "--path", str(ckpt), "--prompts", str(prompts),
                 "--out", str(tmp_path / "cache"), "--dtype", "float32", "--option", "max_sequence_length=16",
                 "--option", "template_crop_start=auto", "--no-progress"]) == 0
    base = {"prompt_cache": str(tmp_path / "cache"), "height": 32, "width": 48, "frames": 5}
    window = [1, 1, 1]   # latent (2, 4, 6) -> tokens (2, 2, 3): two tiles of 1x4x4 in time, each attends itself
    sta = load_model("hunyuan_video", str(ckpt), {**base, "sta": {"window": window, "tile": list(TILE)}})
    plain = load_model("hunyuan_video", str(ckpt), base)
    assert sta.sta is not None and plain.sta is None
    for block in list(plain.transformer.transformer_blocks) + list(plain.transformer.single_transformer_blocks):
        block.attn.set_processor(DenseMaskProcessor((2, 2, 3), window))
    cond = sta.encode_prompts(PROMPTS[:2])
    noise = torch.randn(2, *sta.latent_shape(), generator=torch.Generator().manual_seed(0))
    sampler = build_sampler("flow", 2, 0.0, 7.0)
    with torch.no_grad():
        ours = ode_sample(sta, sampler, cond, noise, chunk_size=2)
        reference = ode_sample(plain, sampler, cond, noise, chunk_size=2)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sta.window"):
        load_model("hunyuan_video", str(ckpt), {**base, "sta": {"window": [0, 1, 1]}})


def test_skyreels_options_take_sta():
    from dancegrpo.models.skyreels_i2v import SkyReelsOptions
    options = SkyReelsOptions(sta={"window": [3, 3, 3], "full_attention_steps": 2})
    assert options.validate() == []
    assert any("full_attention_steps" in p for p in SkyReelsOptions(sta={"window": [3, 3, 3],
                                                                         "full_attention_steps": -1}).validate())
