"""The checks every adapter's options dataclass shares: bounds and choices declared once per option.

An options dataclass (`model.options`, `lora`) derives from `CheckedOptions` and states its
rules as a class-level `checks` mapping; it writes a `problems()` method only for what a table
cannot say (a pair of options, a nested mapping):

    @dataclass
    class FluxOptions(GeneratorOptions):
        guidance_scale: float = 3.5
        checks: ClassVar[dict] = {"guidance_scale": at_least(0)}

`validate()` walks the class hierarchy from the base class down: each class's `checks` (in
their order), then its own `problems()`. A subclass that overrides a field's default keeps the
base class's rule for it. Every problem names the option, its value and what it must be.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable


@dataclass(frozen=True)
class Check:
    """One rule on one option's value. Build it with `at_least`, `greater_than` or `one_of`."""

    minimum: float | None = None          # value >= minimum
    exclusive_minimum: float | None = None  # value > exclusive_minimum
    choices: tuple | None = None          # value in choices
    choices_text: str = ""                # how the message lists the choices (default "one of a, b, c")
    note: str = ""                        # appended to the message in parentheses

    def problem(self, name: str, value: Any) -> str | None:
        """None if `value` passes, else "<name> = <value> must be ..."."""
        if self.minimum is not None and not value >= self.minimum:
            message = f"{name} = {value} must be >= {self.minimum}"
        elif self.exclusive_minimum is not None and not value > self.exclusive_minimum:
            message = f"{name} = {value} must be > {self.exclusive_minimum}"
        elif self.choices is not None and value not in self.choices:
            message = f"{name} = {value!r} must be {self.choices_text or 'one of ' + ', '.join(self.choices)}"
        else:
            return None
        return message + (f" ({self.note})" if self.note else "")


def at_least(minimum: float, note: str = "") -> Check:
    """The value must be >= `minimum`."""
    return Check(minimum=minimum, note=note)


def greater_than(bound: float, note: str = "") -> Check:
    """The value must be > `bound`."""
    return Check(exclusive_minimum=bound, note=note)


def one_of(choices: Iterable[str], text: str = "") -> Check:
    """The value must be one of `choices` (a mapping's keys count); `text` rewords the list."""
    return Check(choices=tuple(choices), choices_text=text)


class CheckedOptions:
    """Mixin for options dataclasses: `validate()` from the declared `checks` plus `problems()`."""

    #: option name -> its Check; merged along the class hierarchy (see the module docstring).
    checks: ClassVar[dict[str, Check]] = {}
    #: Prefix of the names in messages, e.g. "lora." for options nested under `lora`.
    prefix: ClassVar[str] = ""

    def problems(self) -> list[str]:
        """This class's own checks that `checks` cannot state; each class defines its own (no super())."""
        return []

    def validate(self) -> list[str]:
        """Every problem of these options, [] when none (base classes' first)."""
        found = []
        for cls in reversed(type(self).__mro__):
            for name, check in vars(cls).get("checks", {}).items():
                problem = check.problem(self.prefix + name, getattr(self, name))
                if problem:
                    found.append(problem)
            own = vars(cls).get("problems")
            if own is not None and cls is not CheckedOptions:
                found += own(self)
        return found
