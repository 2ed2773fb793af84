"""The checks every peft_core config shares, torch-free: one copy of each rule.

A config field declares its default, bounds, label and help once, with `setting(...)`
(dataclass field metadata). The config's `__post_init__` enforces those bounds with
`check_settings`, and the web's method forms draw their fields from the same metadata
(webapp/experiments/method_forms.py): what a form offers is what the config accepts, and
a form, the API and the CLI all take the config's default.

A refused value raises ConfigError, a ValueError that names the field, so a form shows
the config's own message beside that field.
"""

import math
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

SETTING = "setting"  # the metadata key of a field's Setting


class ConfigError(ValueError):
    """A config value refused; `field` names the dataclass field it was given for."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def is_number(value: Any) -> bool:
    """A finite int or float; bool is refused though Python counts it as an int."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def names_tuple(names: Any, field: str = "modules_to_save") -> tuple[str, ...]:
    """A name, or a list/tuple/set of names, as a tuple of distinct non-empty strings."""
    names = (names,) if isinstance(names, str) else tuple(names or ())
    if not all(isinstance(name, str) and name for name in names):
        raise ConfigError(field, f"{field}: module names must be non-empty strings, got {names!r}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Setting:
    """One config field as people see it: its name, what it does, which values it accepts."""

    label: str
    help: str
    kind: type | None = None  # int, float, bool or str; None: the config checks it itself
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, …: low itself is refused
    high_open: bool = False  # …, high): high itself is refused
    choices: tuple[tuple[str, str], ...] = ()  # a str field's (value, label) pairs
    none_means: str | None = None  # None is accepted and does this; unset: None is refused
    max_chars: int | None = None  # a free str field's longest value

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(value for value, _ in self.choices)

    def check(self, owner: str, name: str, value: Any) -> None:
        """Raise ConfigError("<owner> <name> must be <rule>, got <value>") for a refused value."""
        if value is None and self.none_means is not None:
            return
        if not self.accepts(value):
            raise ConfigError(name, f"{owner}{name} must be {self.rule()}, got {value!r}")

    def accepts(self, value: Any) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return value in self.values if self.choices else self._fits_text(value)
        number = is_int(value) if self.kind is int else is_number(value)
        return number and self._in_bounds(value)

    def _fits_text(self, value: Any) -> bool:
        return isinstance(value, str) and 0 < len(value) <= (self.max_chars or math.inf)

    def _in_bounds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def rule(self) -> str:
        """What the field accepts, in words: "an integer in 1..1024", "a number in (0, 1]"."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return self._text_rule()
        if self.kind is int:
            return f"an integer in {int(self.low)}..{int(self.high)}"
        return self._number_rule()

    def _text_rule(self) -> str:
        if self.choices:
            return f"one of {', '.join(self.values)}"
        return f"a non-empty string of at most {self.max_chars} characters"

    def _number_rule(self) -> str:
        if self.high is None:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"a number in {left}{self.low:g}, {self.high:g}{right}"


def setting(default: Any, label: str, help: str, **rules: Any) -> Any:
    """A dataclass field whose default, label, help and bounds are declared here, once."""
    return field(default=default, metadata={SETTING: Setting(label, help, **rules)})


def reuse(config_cls: type, name: str, default: Any = MISSING, **changes: Any) -> Any:
    """Another config's field for a config composed of it (MAM): same bounds, own default."""
    original = config_field(config_cls, name)
    rule = replace(original.metadata[SETTING], **changes)
    default = original.default if default is MISSING else default
    return field(default=default, metadata={SETTING: rule})


def config_field(config_cls: type, name: str) -> Field:
    """The dataclass field `name` of `config_cls` (a KeyError names the known ones)."""
    by_name = {f.name: f for f in fields(config_cls)}
    if name not in by_name:
        raise KeyError(f"{config_cls.__name__} has no field {name!r}; it has {', '.join(by_name)}")
    return by_name[name]


def settings(config_cls: type) -> dict[str, tuple[Any, Setting]]:
    """{field name: (default, Setting)} for every field of `config_cls` that declares one."""
    return {
        f.name: (f.default, f.metadata[SETTING])
        for f in fields(config_cls)
        if SETTING in f.metadata
    }


def check_settings(config: Any) -> None:
    """Check every field whose Setting has a kind against its bounds; the first refusal raises."""
    title = getattr(config, "title", "")
    owner = f"{title} " if title else ""
    for name, (_, rule) in settings(type(config)).items():
        if rule.kind is not None:
            rule.check(owner, name, getattr(config, name))
