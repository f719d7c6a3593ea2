"""A CPU stand-in for the device rules a CUDA run enforces (issue 14).

There is no GPU in CI, and on the CPU every tensor and every generator is on the same device,
so a draw like ``torch.randperm(n, generator=g)`` (which draws on the CPU whatever ``g`` is)
runs fine here and raises ``Expected a 'cpu' device type for generator but found 'cuda'`` on
a GPU. `DeviceGuard` is a torch function mode that checks, while the code runs on the CPU,
the rules whose breach fails or stalls a CUDA run:

1. draws: a random draw given ``generator=`` names ``device=`` (or draws into / from a tensor),
   and that device equals the generator's (``torch.device`` type and index);
2. factories: a tensor factory (zeros, arange, full, tensor, randn, ...) called from project
   code (dancegrpo/, bench/) names ``device=``; without it the tensor lands on the CPU of a GPU
   run. Host-side-by-design code (token ids, prompt order, the CPU toy reward) is listed in
   `HOST_SIDE`, each with its reason;
3. generators: ``torch.Generator(...)`` called from project code names its device (same list);
4. host syncs: inside a phase (``guard.phase("rollout")``; the trainer's phases via
   `instrument_trainer`) every call that makes the host wait for a GPU result is recorded with
   its call site: ``item``, ``tolist``, ``bool()``/``int()``/``float()``/``__index__``/format of a
   tensor, ``cpu``, ``numpy``, ``nonzero``, ``masked_select``, ``unique``, ``equal``, ``allclose``,
   ``.to("cpu")`` and boolean-mask indexing (which runs ``nonzero``). Calls made inside torch
   itself (e.g. AdamW reading its CPU step counter) and the host checks that only run for CPU
   tensors (`HOST_CHECKS`) are not counted.

What it cannot see: a tensor placed on the CPU *explicitly* (``device="cpu"``) and then mixed
with GPU tensors, GPU-only branches (``if x.is_cuda``), and code on other threads unless the
guard is entered there too (the mode stack is per thread; `instrument_trainer` enters it on the
reward worker of ``trainer.overlap_rewards``).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]
PROJECT_ROOTS = (str(REPO / "dancegrpo") + os.sep, str(REPO / "bench") + os.sep)
_TORCH_ROOT = str(Path(torch.__file__).resolve().parent) + os.sep
# torch's own dispatch layer between a Python call and the mode: skipped when looking for the caller.
_DISPATCH_FILES = {os.path.join(_TORCH_ROOT, name) for name in ("overrides.py", "_tensor.py", "functional.py")}
_THIS_FILE = str(Path(__file__).resolve())

#: (path relative to the repository, function name or "*") -> why its tensors live on the host by design.
HOST_SIDE: dict[tuple[str, str], str] = {
    ("dancegrpo/data.py", "prompts_for_iteration"): "the prompt order is host-side list work (CPU generator)",
    ("dancegrpo/models/toy_flux.py", "tokenize"): "token ids are built on the host; encode_prompts moves them",
    ("dancegrpo/toy/detect.py", "*"): "the rule-based toy reward moves images to the CPU first (detect_objects)",
    ("dancegrpo/toy/checker.py", "*"): "the toy checker scores on the CPU; the reward moves its outputs back",
    ("dancegrpo/models/skyreels_i2v.py", "encode"): "preprocess: image latents gathered on the host for the cache",
    ("dancegrpo/models/sd14.py", "denoiser_inputs"): "example inputs built on the host; bench moves them",
    ("dancegrpo/models/flux.py", "denoiser_inputs"): "example inputs built on the host; bench moves them",
    ("dancegrpo/models/hunyuan_video.py", "denoiser_inputs"): "example inputs built on the host; bench moves them",
    ("dancegrpo/sde.py", "ddim_alphas_cumprod"): "schedule tables built once on the host; samplers move them",
    ("dancegrpo/sde.py", "ddim_timesteps"): "schedule tables built once on the host; samplers move them",
}

#: (path, function) -> why its host reads are not syncs on a GPU (they run only for CPU tensors).
HOST_CHECKS: dict[tuple[str, str], str] = {
    ("dancegrpo/ops/validation.py", "require"): "CPU tensors only; on a GPU a torch._assert_async",
    ("dancegrpo/ops/validation.py", "require_positive_std"): "CPU tensors only; on a GPU a torch._assert_async",
    ("dancegrpo/sde.py", "gaussian_log_prob"): "validate=True only for CPU latents (rollout._sde_step)",
}

_SYNC_NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__", "cpu", "numpy",
               "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose",
               "is_nonzero"}


def _factories() -> set:
    names = ("zeros", "ones", "empty", "full", "arange", "range", "linspace", "logspace", "eye", "rand", "randn",
             "randint", "randperm", "normal", "tensor", "as_tensor", "scalar_tensor", "empty_strided",
             "tril_indices", "triu_indices", "bartlett_window", "hann_window")
    return {getattr(torch, n) for n in names if hasattr(torch, n)}


_FACTORIES = _factories()


@dataclass(frozen=True)
class Site:
    path: str  # relative to the repository when inside it
    line: int
    function: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line} ({self.function})"


@dataclass(frozen=True)
class Violation:
    rule: str
    call: str
    site: Site
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.call} at {self.site}: {self.detail}"


def _site(frame) -> Site:
    path = frame.f_code.co_filename
    rel = os.path.relpath(path, REPO) if path.startswith(str(REPO) + os.sep) else path
    return Site(rel, frame.f_lineno, frame.f_code.co_name)


def _caller():
    """The first frame outside this file and torch's dispatch wrappers: who made the call."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename == _THIS_FILE
                                 or frame.f_code.co_filename in _DISPATCH_FILES):
        frame = frame.f_back
    return frame


def _in_project(frame) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith(PROJECT_ROOTS)


def _in_torch(frame) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith(_TORCH_ROOT)


def _listed(site: Site, table: dict) -> bool:
    return (site.path, site.function) in table or (site.path, "*") in table


def _host_by_design(frame, depth: int = 4) -> bool:
    """Within `depth` frames of the call: a HOST_SIDE function, or an nn.Module's __init__ (its
    parameters and buffers are created on the CPU and moved with the module by `.to(device)`)."""
    for _ in range(depth):
        if frame is None:
            return False
        if _listed(_site(frame), HOST_SIDE):
            return True
        if frame.f_code.co_name == "__init__" and isinstance(frame.f_locals.get("self"), torch.nn.Module):
            return True
        frame = frame.f_back
    return False


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _tensors(args, kwargs):
    return [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]


def _is_mask_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


def _name(func) -> str:
    return getattr(func, "__name__", repr(func))


_active: list["DeviceGuard"] = []


class _CheckedGeneratorMeta(type(torch._C.Generator)):
    def __instancecheck__(cls, obj):  # isinstance(g, torch.Generator) stays true for every generator
        return isinstance(obj, torch._C.Generator)


class _CheckedGenerator(torch._C.Generator, metaclass=_CheckedGeneratorMeta):
    """Stands in for torch.Generator while a guard is active: checks who creates a generator
    and whether a device was named, then returns a plain torch generator."""

    def __new__(cls, *args, **kwargs):
        if _active:
            _active[-1]._generator_created(args, kwargs)
        return torch._C.Generator(*args, **kwargs)


class DeviceGuard(TorchFunctionMode):
    """Check the device rules while code runs (see the module docstring). Use as a context manager
    (it also replaces torch.Generator for the duration); read `violations` and `syncs` afterwards."""

    def __init__(self):
        super().__init__()
        self.violations: list[Violation] = []
        self.syncs: list[tuple[str, str, Site]] = []  # (phase, call, site)
        self._local = threading.local()
        self._saved_generator = None

    # ------------------------------------------------------------------ entering
    def __enter__(self):
        if not _active:
            self._saved_generator, torch.Generator = torch.Generator, _CheckedGenerator
        _active.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _active.remove(self)
        if not _active and self._saved_generator is not None:
            torch.Generator = self._saved_generator
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Count host syncs made on this thread as `name` (phases nest; the innermost counts)."""
        outer = getattr(self._local, "phase", None)
        self._local.phase = name
        try:
            yield
        finally:
            self._local.phase = outer

    @contextlib.contextmanager
    def on_this_thread(self):
        """Enter the mode on a worker thread (the mode stack is per thread); no phase there."""
        torch.overrides._push_mode(self)
        try:
            yield
        finally:
            torch.overrides._pop_mode()

    # ------------------------------------------------------------------ results
    def sync_count(self, phase: str) -> int:
        return sum(1 for p, _, _ in self.syncs if p == phase)

    def sync_sites(self, phase: str) -> Counter:
        return Counter(f"{call} at {site}" for p, call, site in self.syncs if p == phase)

    def assert_clean(self) -> None:
        if self.violations:
            unique = list(dict.fromkeys(str(v) for v in self.violations))
            raise AssertionError(f"{len(unique)} device-placement fault(s):\n  " + "\n  ".join(unique))

    # ------------------------------------------------------------------ checks
    def _violate(self, rule: str, call: str, frame, detail: str) -> None:
        self.violations.append(Violation(rule, call, _site(frame) if frame is not None else Site("?", 0, "?"),
                                         detail))

    def _generator_created(self, args, kwargs) -> None:
        frame = sys._getframe(2)
        if not _in_project(frame) or _listed(_site(frame), HOST_SIDE):
            return
        if not args and kwargs.get("device") is None:
            self._violate("generator", "torch.Generator", frame,
                          "created without a device: on a GPU run it is a CPU generator")

    def _check_draw(self, name, args, kwargs, generator, frame) -> None:
        tensors = _tensors(args, kwargs)
        if tensors:
            where = tensors[0].device
        elif kwargs.get("device") is None:
            self._violate("draw", name, frame, f"draws with a {generator.device} generator but names no device=: "
                          "the draw runs on the CPU and fails for a CUDA generator")
            return
        else:
            where = torch.device(kwargs["device"])
        if not _same_device(where, generator.device):
            self._violate("draw", name, frame, f"draws on {where} with a {generator.device} generator")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        generator = kwargs.get("generator")
        if generator is None:
            generator = next((a for a in args if isinstance(a, torch._C.Generator)), None)
        if generator is not None:
            frame = _caller()
            if not (_in_project(frame) and _listed(_site(frame), HOST_SIDE)):
                self._check_draw(name, args, kwargs, generator, frame)
        elif func in _FACTORIES and kwargs.get("device") is None:
            if not (name in ("tensor", "as_tensor", "normal") and _tensors(args, kwargs)):
                frame = _caller()
                if _in_project(frame) and not _host_by_design(frame):
                    self._violate("factory", f"torch.{name}", frame,
                                  "names no device=: on a GPU run this tensor is created on the CPU")
        phase = getattr(self._local, "phase", None)
        if phase is not None and self._is_sync(name, args, kwargs):
            frame = _caller()
            if frame is not None and not _in_torch(frame) and not _listed(_site(frame), HOST_CHECKS):
                self.syncs.append((phase, name, _site(frame)))
        return func(*args, **kwargs)

    @staticmethod
    def _is_sync(name, args, kwargs) -> bool:
        if name in _SYNC_NAMES:
            return True
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            return _is_mask_index(args[1])
        if name == "to":
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            return isinstance(target, str) and target.startswith("cpu")
        return False


@contextlib.contextmanager
def instrument_trainer(guard: DeviceGuard):
    """Mark the trainer's rollout and update phases (sync counting) and enter the guard on the
    reward worker thread of overlapped scoring."""
    from dancegrpo import collect as collect_module
    from dancegrpo import trainer as trainer_module
    from dancegrpo.rewards.async_scorer import AsyncScorer

    run_rollout, update, best_of_n, run = (collect_module.run_rollout, trainer_module.Trainer._update,
                                           collect_module.best_of_n, AsyncScorer._run)

    def rollout_phase(*args, **kwargs):
        with guard.phase("rollout"):
            return run_rollout(*args, **kwargs)

    def update_phase(self, *args, **kwargs):
        with guard.phase("update"):
            return update(self, *args, **kwargs)

    def best_of_n_phase(*args, **kwargs):
        with guard.phase("best_of_n"):
            return best_of_n(*args, **kwargs)

    def worker(self, *args, **kwargs):
        with guard.on_this_thread():
            return run(self, *args, **kwargs)

    collect_module.run_rollout, collect_module.best_of_n = rollout_phase, best_of_n_phase
    trainer_module.Trainer._update = update_phase
    AsyncScorer._run = worker
    try:
        yield guard
    finally:
        collect_module.run_rollout, collect_module.best_of_n = run_rollout, best_of_n
        trainer_module.Trainer._update = update
        AsyncScorer._run = run
