"""STA for diffusers' HunyuanVideoTransformer3DModel (HunyuanVideo, SkyReels-I2V).

`install_sta(transformer, options)` replaces the attention processors of the dual-stream and
single-stream blocks (the joint video + text attention; the text-only token refiner keeps
its own) and registers a forward pre-hook that records, per call, the video canvas in tokens
(after patchify) and each sample's sampling step. The step decides the window: full
attention for the first `full_attention_steps` steps, then `window` (all layers) or the
row of `table` for that step (one window spec per layer, layers numbered over the
dual-stream blocks then the single-stream blocks). Windows count tiles (`window_unit:
tiles`) or give a span in tokens (`window_unit: tokens`, converted per canvas to the
fewest tiles covering it for the tile in use, `sta_mask.window_for_extent`). The tile is
`tile` or, with "auto", `sta_mask.auto_tile` of each canvas. With `kernel_efficiency` set,
a (step, layer) whose window would not pay runs dense attention instead (see `pays_off`).

The step comes from the model time: `controller.set_schedule(model_times)` registers the
sampler's model times (sigmas) so each call maps its timestep to a step index; or
`controller.set_step(step)` fixes it. A batch mixing steps is split by step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.backends import ENV_VAR, known_backends, op_backends
from .sta import BACKENDS, STA_OP, kernel_plan, renamed_backend_message, sta_attention
from .sta_mask import AUTO, normalize_windows, resolve_tile, window_for_extent

WINDOW_UNITS = ("tiles", "tokens")


def _window_spec_problem(spec, where: str) -> str | None:
    try:
        normalize_windows(spec)
    except (ValueError, TypeError) as exc:
        return f"{where}: {exc}"
    return None


@dataclass
class STAOptions:
    """`model.options.sta`: window ([t, h, w], or one per head) or a per-step table (docs/sta.md)."""

    window: list | None = None
    table: list | None = None          # table[step][layer] = window spec; later steps reuse the last row
    tile: list | str = AUTO            # (t, h, w) in tokens, or "auto": per canvas, the fewest padded tokens
    window_unit: str = "tiles"         # tiles: window / table entries count tiles; tokens: spans in tokens
    full_attention_steps: int = 0
    backend: str = "auto"              # auto (dancegrpo.ops' rule: DANCEGRPO_OPS_BACKEND, else Triton on CUDA,
    #                                    else torch) | torch (dense-mask reference) | triton | flex
    kernel_efficiency: float | None = None  # STA TFLOP/s on attended blocks / dense TFLOP/s; None = always STA

    @classmethod
    def from_dict(cls, options: dict) -> "STAOptions":
        if not isinstance(options, dict):
            raise ValueError(f"sta = {options!r} must be a mapping (window or table, tile, full_attention_steps)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown sta option(s) {unknown}: allowed are {sorted(known)}")
        return cls(**options)

    def validate(self) -> list[str]:
        problems = []
        if (self.window is None) == (self.table is None):
            problems.append("sta: give exactly one of window ([t, h, w] in tiles, or one per head) or table")
        if self.window is not None:
            problems.append(_window_spec_problem(self.window, "sta.window"))
        if self.table is not None:
            if not isinstance(self.table, list) or not self.table or not all(isinstance(r, list) for r in self.table):
                problems.append(f"sta.table = {self.table!r} must be a non-empty list (steps) of lists (layers)")
            else:
                problems += [_window_spec_problem(spec, f"sta.table[{s}][{l}]")
                             for s, row in enumerate(self.table) for l, spec in enumerate(row)]
        if isinstance(self.tile, str):
            if self.tile != AUTO:
                problems.append(f"sta.tile = {self.tile!r} must be \"auto\" or three positive integers (t, h, w)")
        elif not isinstance(self.tile, (list, tuple)) or len(self.tile) != 3 or \
                not all(isinstance(t, int) and t >= 1 for t in self.tile):
            problems.append(f"sta.tile = {self.tile!r} must be \"auto\" or three positive integers (t, h, w)")
        if self.window_unit not in WINDOW_UNITS:
            problems.append(f"sta.window_unit = {self.window_unit!r} must be one of {', '.join(WINDOW_UNITS)}")
        if self.kernel_efficiency is not None and not (
                isinstance(self.kernel_efficiency, (int, float)) and 0 < self.kernel_efficiency <= 10):
            problems.append(f"sta.kernel_efficiency = {self.kernel_efficiency!r} must be a number in (0, 10]: the "
                            "STA kernel's TFLOP/s on attended blocks over dense attention's "
                            "(python -m bench.sta_bench)")
        if self.full_attention_steps < 0:
            problems.append(f"sta.full_attention_steps = {self.full_attention_steps} must be >= 0")
        renamed = renamed_backend_message(self.backend, "sta.backend")
        if renamed:
            problems.append(renamed)
        elif self.backend not in BACKENDS:
            problems.append(f"sta.backend = {self.backend!r} must be one of {', '.join(BACKENDS)}")
        elif self.backend == "auto":
            problems.append(_env_backend_problem())
        return [p for p in problems if p]


def _env_backend_problem() -> str | None:
    """With sta.backend auto, DANCEGRPO_OPS_BACKEND chooses STA's backend too: refuse a name STA lacks."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    implemented = op_backends(STA_OP).names
    if not name or name == "auto" or name in implemented:
        return None
    what = "is not a backend" if name not in known_backends() else "has no sliding-tile attention implementation"
    return (f"environment variable {ENV_VAR} = {name!r} also chooses sliding-tile attention's backend "
            f"(sta.backend: auto), and {name!r} {what} (sliding-tile attention implements "
            f"{', '.join(implemented)}): unset it, or set sta.backend to one of them")


class STAController:
    """State shared by the STA processors of one transformer: canvas, steps, windows."""

    def __init__(self, options: STAOptions, patch: int, patch_t: int, num_layers: int):
        self.options, self.patch, self.patch_t, self.num_layers = options, patch, patch_t, num_layers
        if options.table is not None and any(len(row) != num_layers for row in options.table):
            raise ValueError(f"sta.table rows must give one window per layer: the transformer has {num_layers} "
                             f"(dual-stream + single-stream blocks), rows have {[len(r) for r in options.table]}")
        self.canvas: tuple[int, int, int] | None = None
        self.steps: torch.Tensor | None = None
        self.schedule: torch.Tensor | None = None
        self.fixed_step: int | None = None
        self.enabled = True

    def set_schedule(self, model_times: torch.Tensor) -> None:
        """Register the sampler's model times (index = step), e.g. FlowSampler.sigmas."""
        self.schedule = torch.as_tensor(model_times, dtype=torch.float64).flatten().cpu()

    def set_step(self, step: int | None) -> None:
        """Fix the sampling step of the following calls (None: infer it from the timestep)."""
        self.fixed_step = step

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        _, _, frames, height, width = hidden.shape
        self.canvas = (frames // self.patch_t, height // self.patch, width // self.patch)
        self.steps = self._steps(kwargs.get("timestep", args[1] if len(args) > 1 else None), hidden.shape[0])

    def _steps(self, timestep, batch: int) -> torch.Tensor | None:
        if self.fixed_step is not None:
            return torch.full((batch,), self.fixed_step, dtype=torch.long)
        if self.options.full_attention_steps == 0 and self.options.table is None:
            return None  # the window does not depend on the step
        if self.schedule is None or timestep is None:
            raise RuntimeError("STA with full_attention_steps or a per-step table needs the sampling step: call "
                               "controller.set_schedule(sampler model times) or controller.set_step(step)")
        t = (timestep.detach().double().cpu().flatten() / 1000.0).expand(batch)  # the adapters pass sigma x 1000
        return (t[:, None] - self.schedule[None]).abs().argmin(1)

    def window(self, step: int | None, layer: int):
        """The window spec of (step, layer), or None for full attention."""
        if step is not None and step < self.options.full_attention_steps:
            return None
        if self.options.table is None:
            return self.options.window
        row = self.options.table[min(step if step is not None else 0, len(self.options.table) - 1)]
        return row[layer]

    def tile(self, canvas) -> tuple[int, int, int]:
        """The tile (t, h, w) in tokens used on this canvas."""
        return resolve_tile(self.options.tile if isinstance(self.options.tile, str) else tuple(self.options.tile),
                            canvas)

    def window_in_tiles(self, spec, tile):
        """A window spec of the options (in `window_unit`) as tiles of `tile`."""
        return window_for_extent(spec, tile) if self.options.window_unit == "tokens" else spec

    def pays_off(self, canvas, window, tile, text_tokens: int, heads: int, device) -> bool:
        """Whether STA is predicted faster than dense attention for this call (always True without
        `kernel_efficiency`).

        Cost model: attention time is proportional to the (query, key) pairs computed divided by
        the kernel's throughput. Dense attention computes N^2 pairs per head (N = real video +
        text tokens); STA computes the plan's attended blocks x block^2 (padding included) at
        `kernel_efficiency` times dense attention's TFLOP/s. STA runs when
        pairs_sta / kernel_efficiency < N^2. The plan is cached, so this is host arithmetic.
        """
        efficiency = self.options.kernel_efficiency
        if efficiency is None:
            return True
        plan = kernel_plan(canvas, window, tile, text_tokens, heads, device)
        pairs_per_head = plan.attended_pairs / plan.block_mask.shape[0]
        tokens = canvas[0] * canvas[1] * canvas[2] + text_tokens
        return pairs_per_head / efficiency < tokens * tokens


def _qkv(x, to_q, to_k, to_v, norm_q, norm_k, heads: int):
    """q, k, v of tokens x as (B, N, heads, D), with the q/k norms of diffusers' processor."""
    q, k, v = (proj(x).unflatten(2, (heads, -1)) for proj in (to_q, to_k, to_v))
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


def project_qkv(attn, hidden_states: torch.Tensor):
    """The main projections (video tokens, or video + text in single-stream blocks)."""
    return _qkv(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k, attn.heads)


def project_added_qkv(attn, encoder_hidden_states: torch.Tensor):
    """The text tokens' own projections of dual-stream blocks (`add_*_proj`, `norm_added_*`)."""
    return _qkv(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                attn.norm_added_q, attn.norm_added_k, attn.heads)


class STAHunyuanAttnProcessor:
    """HunyuanVideo's joint attention (video tokens first, then text) through sliding-tile attention."""

    def __init__(self, controller: STAController, layer: int):
        self.controller, self.layer = controller, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        from diffusers.models.embeddings import apply_rotary_emb
        joint_projections = attn.add_q_proj is not None
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        if not joint_projections and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], 1)
        q, k, v = project_qkv(attn, hidden_states)
        video_len = q.shape[1] - (0 if joint_projections else text_len)
        if image_rotary_emb is not None:  # rotary on video tokens only
            q = torch.cat([apply_rotary_emb(q[:, :video_len], image_rotary_emb, sequence_dim=1), q[:, video_len:]], 1)
            k = torch.cat([apply_rotary_emb(k[:, :video_len], image_rotary_emb, sequence_dim=1), k[:, video_len:]], 1)
        if joint_projections and encoder_hidden_states is not None:
            eq, ek, ev = project_added_qkv(attn, encoder_hidden_states)
            q, k, v = torch.cat([q, eq], 1), torch.cat([k, ek], 1), torch.cat([v, ev], 1)

        text_valid = None if attention_mask is None else attention_mask.reshape(q.shape[0], -1)[:, video_len:].bool()
        out = self._attend(*(x.transpose(1, 2) for x in (q, k, v)), text_valid)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out, None
        out, text_out = out[:, :-text_len], out[:, -text_len:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out

    def _attend(self, q, k, v, text_valid) -> torch.Tensor:
        control = self.controller
        if control.canvas is None:
            raise RuntimeError("STA processor called outside the transformer's forward (no canvas recorded)")
        steps = control.steps
        groups = [(None, slice(None))] if steps is None else \
            [(int(s), (steps == s).nonzero().flatten().to(q.device)) for s in steps.unique()]
        outs, order = [], []
        for step, rows in groups:
            window = control.window(step, self.layer) if control.enabled else None
            sub = [x if isinstance(rows, slice) else x.index_select(0, rows) for x in (q, k, v)]
            sub_text = None if text_valid is None else \
                (text_valid if isinstance(rows, slice) else text_valid.index_select(0, rows))
            if window is not None:
                tile = control.tile(control.canvas)
                window = control.window_in_tiles(window, tile)
                text_tokens = q.shape[2] - control.canvas[0] * control.canvas[1] * control.canvas[2]
                if not control.pays_off(control.canvas, window, tile, text_tokens, q.shape[1], q.device):
                    window = None
            if window is None:
                outs.append(_full_attention(*sub, sub_text))
            else:
                backend = None if control.options.backend == "auto" else control.options.backend
                outs.append(sta_attention(*sub, control.canvas, window, tile, sub_text, backend=backend))
            order.append(rows)
        if len(outs) == 1:
            return outs[0]
        out = torch.empty_like(q)
        for rows, part in zip(order, outs):
            out[rows] = part.to(out.dtype)
        return out


def _full_attention(q, k, v, text_valid) -> torch.Tensor:
    """Dense attention with padded text keys masked (the stock processor's mask); SDPA picks flash."""
    if text_valid is None:
        return F.scaled_dot_product_attention(q, k, v)
    video = torch.ones(q.shape[0], q.shape[2] - text_valid.shape[1], dtype=torch.bool, device=q.device)
    key_valid = torch.cat([video, text_valid.to(q.device)], 1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid)


def install_sta(transformer: nn.Module, options: dict | STAOptions) -> STAController:
    """Route the joint attention of a HunyuanVideoTransformer3DModel through STA; returns the controller."""
    options = options if isinstance(options, STAOptions) else STAOptions.from_dict(options)
    problems = options.validate()
    if problems:
        raise ValueError("; ".join(problems))
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    config = transformer.config
    controller = STAController(options, config.patch_size, config.patch_size_t, len(blocks))
    for layer, block in enumerate(blocks):
        block.attn.set_processor(STAHunyuanAttnProcessor(controller, layer))
    transformer.register_forward_pre_hook(controller.before_forward, with_kwargs=True)
    return controller
