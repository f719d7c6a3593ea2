"""bench.throughput: FLOP formula vs torch's FLOP counter, token counts vs the model, the tiny run's CSV rows."""
from __future__ import annotations

import csv

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench import throughput
from bench.throughput import (
    Workload,
    build_denoiser,
    forward_flops,
    peak_tflops,
    recipe_workload,
    token_counts,
)
from dancegrpo.memory_estimate import denoiser_inputs

# Odd sizes (distinct widths, batch 3, non-square canvas) so that a wrong term cannot cancel out.
FLUX_ODD = dict(patch_size=1, in_channels=20, out_channels=12, num_layers=2, num_single_layers=1, attention_head_dim=8,
                num_attention_heads=3, joint_attention_dim=10, pooled_projection_dim=14, guidance_embeds=False,
                axes_dims_rope=(2, 2, 4))
HUNYUAN_ODD = dict(in_channels=6, out_channels=5, num_attention_heads=3, attention_head_dim=8, num_layers=1,
                   num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=12,
                   pooled_projection_dim=20, rope_axes_dim=(2, 2, 4), guidance_embeds=True, mlp_ratio=3.0)


def workloads():
    yield recipe_workload("flux", tiny=True)
    yield recipe_workload("hunyuan_video", tiny=True)
    yield Workload("flux", "FluxTransformer2DModel", FLUX_ODD, dict(height=48, width=80, max_sequence_length=7), 3)
    yield Workload("hunyuan_video", "HunyuanVideoTransformer3DModel", HUNYUAN_ODD,
                   dict(height=48, width=80, frames=9, max_sequence_length=7), 3)


@pytest.mark.parametrize("work", list(workloads()), ids=lambda w: f"{w.model_name}-{w.batch}")
def test_forward_flops_equal_torch_flop_counter(work):
    model = build_denoiser(work, torch.device("cpu"), torch.float32)
    image_tokens, text_tokens = work.tokens
    seen = {}

    def record(module, args, kwargs):   # the first double-stream block: image and text streams apart
        names = ("hidden_states", "encoder_hidden_states")
        values = {**dict(zip(names, args)), **kwargs}
        seen.update({name: values[name].shape[1] for name in names})

    model.transformer_blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    inputs = denoiser_inputs(work.model_name, work.config, {**work.options}, work.batch)
    # The math backend runs attention as matmuls, which the counter sees (the fused CPU kernel it does not).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    assert (seen["hidden_states"], seen["encoder_hidden_states"]) == (image_tokens, text_tokens)
    expected = counter.get_total_flops()
    assert forward_flops(work.model_name, work.config, image_tokens, text_tokens, work.batch) == expected


def test_recipe_token_counts():
    flux = recipe_workload("flux")
    assert (flux.options["height"], flux.options["width"], flux.batch) == (720, 720, 1)
    assert token_counts("flux", flux.config, flux.options) == (45 * 45, 512)        # 720/8 = 90 latents, 2x2 packed
    video = recipe_workload("hunyuan_video")
    assert (video.options["frames"], video.batch) == (53, 1)
    assert token_counts("hunyuan_video", video.config, video.options) == (14 * 30 * 30, 256)  # 1+52/4 frames, 60/2


def test_peak_lookup():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H20") == 148.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some CPU") is None


def test_refuses_a_cpu_without_tiny(capsys):
    with pytest.raises(SystemExit) as exc:
        throughput.main(["--device", "cpu"])
    assert exc.value.code == 2 and "--tiny" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'half'"):
        throughput.main(["--tiny", "--device", "cpu", "--settings", "half"])


def test_tiny_run_writes_consistent_rows(tmp_path):
    path = tmp_path / "throughput.csv"
    common = ["--tiny", "--device", "cpu", "--dtype", "float32", "--iterations", "1", "--warmup", "1",
              "--peak-tflops", "0.5", "--csv", str(path)]
    rows = throughput.main([*common, "--settings", "none,full"])
    # compile on one model only: aot_eager (no C++ build) keeps the test short
    rows += throughput.main([*common, "--model", "flux", "--settings", "selective+compile",
                             "--compile-backend", "aot_eager"])
    with path.open() as f:
        written = list(csv.DictReader(f))
    models = throughput.bench_models()
    assert {"flux", "hunyuan_video", "wan_t2v", "wan_i2v", "sd35", "qwen_image"} <= set(models)
    assert [(r["model"], r["checkpointing"], r["compile"]) for r in written] == [
        (m, mode, "False") for m in models for mode in ("none", "full")] + [("flux", "selective", "True")]
    assert len(rows) == 2 * len(models) + 1
    for row in written:
        assert row["status"] == "ok" and row["date"] and row["device"]
        work = recipe_workload(row["model"], tiny=True)
        image_tokens, text_tokens = work.tokens
        step = float(row["step_s"])
        flops = 3 * forward_flops(row["model"], work.config, image_tokens, text_tokens, work.batch)
        assert float(row["samples_per_s"]) == pytest.approx(work.batch / step, rel=1e-4)
        assert float(row["tokens_per_s"]) == pytest.approx(work.batch * image_tokens / step, rel=1e-4)
        assert float(row["model_tflop_per_step"]) == pytest.approx(flops / 1e12, rel=1e-4)
        assert float(row["mfu"]) == pytest.approx(flops / step / 0.5e12, rel=1e-4)
        recompute = flops / 3 if row["checkpointing"] == "full" else 0
        assert float(row["hfu"]) == pytest.approx((flops + recompute) / step / 0.5e12, rel=1e-4)


def test_sta_setting_routes_attention_through_sta(tmp_path, monkeypatch):
    """--sta adds an STA row after the dense one; its joint attention calls go through sta_attention (tiny
    HunyuanVideo: 2 + 2 blocks, 1 warm-up + 1 timed step = 8 calls), the dense row's do not."""
    from dancegrpo.attention import hunyuan_processor
    calls = []
    original = hunyuan_processor.sta_attention

    def counting(*args, **kwargs):
        calls.append((args[3], args[4], args[5]))   # canvas, window, tile
        return original(*args, **kwargs)

    monkeypatch.setattr(hunyuan_processor, "sta_attention", counting)
    path = tmp_path / "throughput.csv"
    rows = throughput.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--iterations", "1", "--warmup", "1",
                            "--model", "hunyuan_video", "--settings", "none", "--sta", "1x1x1", "--csv", str(path)])
    assert [r["sta"] for r in rows] == ["", '{"window": [1, 1, 1]}'] and all(r["status"] == "ok" for r in rows)
    # tiny canvas: latent 2 x 8 x 8 -> tokens 2 x 4 x 4 (32), whose auto tile is the whole canvas
    assert calls == [((2, 4, 4), [1, 1, 1], (2, 4, 4))] * 8
    with path.open() as f:
        assert [r["sta"] for r in csv.DictReader(f)] == ["", '{"window": [1, 1, 1]}']


def test_sta_setting_is_checked_before_work():
    for bad, message in [("1x3", "TxHxW"), ("{window", "not valid JSON"), ('{"window": [0, 1, 1]}', "sta.window"),
                         ('{"tile": "big", "window": [1, 1, 1]}', "sta.tile")]:
        with pytest.raises(ValueError, match=message):
            throughput.main(["--tiny", "--device", "cpu", "--sta", bad])
    assert throughput.parse_sta('{"window": [1, 3, 3], "tile": [6, 8, 8]}') == {"window": [1, 3, 3],
                                                                                "tile": [6, 8, 8]}


def test_attention_backend_is_installed_and_recorded(tmp_path, monkeypatch):
    """The step runs its attention on the chosen backend (as training does), and the row says which;
    a backend that cannot run on the CPU is refused with the backend's own error."""
    from dancegrpo.attention import backends
    installed = []
    original = backends.install_attention_backend

    def spying(denoiser, name="auto", model="model", masked=False, installed_packages=None, **kw):
        installed.append((model, name, masked))
        return original(denoiser, name, model, masked, **kw)

    monkeypatch.setattr(throughput, "install_attention_backend", spying)
    path = tmp_path / "throughput.csv"
    rows = throughput.main(["--tiny", "--device", "cpu", "--dtype", "float32", "--iterations", "1", "--warmup", "0",
                            "--settings", "none", "--attention-backend", "math", "--csv", str(path)])
    models = throughput.bench_models()
    assert installed == [(m, "math", m in ("hunyuan_video", "qwen_image")) for m in models]   # their text masks
    assert [r["attention_backend"] for r in rows] == ["math"] * len(models) and all(r["status"] == "ok" for r in rows)
    with pytest.raises(backends.AttentionBackendError, match="cudnn"):
        throughput.main(["--tiny", "--device", "cpu", "--model", "flux", "--settings", "none", "--iterations", "1",
                         "--warmup", "0", "--attention-backend", "cudnn", "--csv", str(tmp_path / "x.csv")])
