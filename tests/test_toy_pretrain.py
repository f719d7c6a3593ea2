"""Pretraining of the embedded model is deterministic and writes a loadable checkpoint."""
import torch
from safetensors.torch import load_file

from dancegrpo.models import load_model
from dancegrpo.toy.pretrain import PretrainConfig, pretrain

from conftest import TINY_TEXT, TINY_TRANSFORMER


def _run(out, steps=4):
    cfg = PretrainConfig(steps=steps, dataset_size=32, batch_size=8, warmup_steps=2, num_threads=1,
                         output_dir=str(out), transformer=TINY_TRANSFORMER, text_encoder=TINY_TEXT)
    return pretrain(cfg, progress=False)


def test_same_config_gives_identical_weights_and_loadable_model(tmp_path):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    for part, name in (("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        wa, wb = load_file(str(a / part / name)), load_file(str(b / part / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), part
    model = load_model("toy_flux", str(a))
    assert model.latent_shape() == (12, 16, 16)
    assert (a / "pretrain_config.yaml").is_file()


def test_weights_change_with_training(tmp_path):
    short, longer = _run(tmp_path / "short", steps=1), _run(tmp_path / "long", steps=3)
    # Both parts learn: the text encoder too (it once sat behind a no_grad and stayed random).
    for part, name in (("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        wa, wb = load_file(str(short / part / name)), load_file(str(longer / part / name))
        changed = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert changed, part
        if part == "text_encoder":
            assert any(k.startswith("embed") for k in changed) and any(k.startswith("layer") for k in changed)


def test_second_stage_from_first_with_decay_and_ema_is_deterministic(tmp_path):
    first = _run(tmp_path / "first")
    outs = []
    for name in ("a", "b"):
        cfg = PretrainConfig(steps=3, dataset_size=16, batch_size=4, warmup_steps=1, num_threads=1, seed=1,
                             init_from=str(first), decay_steps=3, ema_decay=0.5, output_dir=str(tmp_path / name))
        outs.append(load_file(str(pretrain(cfg, progress=False) / "transformer" / "diffusion_pytorch_model.safetensors")))
    start = load_file(str(first / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in start)
    assert any(not torch.equal(outs[0][k], start[k]) for k in start)


def test_frozen_text_encoder_option_leaves_it_at_its_init(tmp_path):
    cfg = PretrainConfig(steps=2, dataset_size=16, batch_size=4, warmup_steps=1, num_threads=1, train_text_encoder=False,
                         output_dir=str(tmp_path / "frozen"), transformer=TINY_TRANSFORMER, text_encoder=TINY_TEXT)
    frozen = pretrain(cfg, progress=False)
    from dancegrpo.models.toy_flux import build_toy_flux
    reference = build_toy_flux(seed=cfg.seed, transformer_overrides=TINY_TRANSFORMER, text_overrides=TINY_TEXT)
    saved = load_file(str(frozen / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in reference.text_encoder.state_dict().items())
