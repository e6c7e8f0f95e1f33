"""One reader for every settings class: declared keys, their types, bounds and help.

A settings class is a dataclass whose fields are declared with ``key(...)``: the default, the
help text (the one place a key's meaning is written; CLI help, docs/configuration.md and the
pyproject comments are generated from it or checked against it), and what the key accepts
(choices, bounds, a parser of its own). ``read`` builds an instance from any flat mapping (a
Flower run or node config, a TOML table, parsed CLI flags) and ``check`` checks one built in code;
a bad value is one line in one format, naming the key and the fix::

    run config: key 'server-eval' = 'ture' is not a boolean; use true or false

Keys are the field names with hyphens (``lora_r`` -> ``lora-r``); keys a class does not declare
are ignored, so several classes read the same table. Booleans are strict everywhere: true/false
(also 1/0, yes/no, on/off); anything else is an error, never a silent false.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class SettingsError(ValueError):
    """A bad value of a declared key: one line naming the source, the key and the fix."""


@dataclass(frozen=True)
class Rule:
    """What a key accepts beyond its type: choices, bounds (``low``/``high``, open or closed),
    finiteness, values allowed outside the bounds (``special``, e.g. -1 = auto), a parser of its
    own (``parse(value)`` raising ``ValueError(fix)``), and the fix to print."""

    choices: tuple[str, ...] = ()
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    finite: bool = False
    special: tuple[float, ...] = ()
    parse: Callable[[Any], Any] | None = None
    fix: str = ""
    read: bool = True

    def accepts(self, value: Any) -> bool:
        """Whether a typed value is within the choices and bounds."""
        if self.choices:
            return value in self.choices
        if not isinstance(value, int | float) or isinstance(value, bool) or value in self.special:
            return True
        if math.isnan(value) or (self.finite and not math.isfinite(value)):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def default_fix(self) -> str:
        """``use 'a', 'b' or 'c'`` / ``use a value > 0`` when no fix is declared."""
        if self.fix:
            return self.fix
        if self.choices:
            quoted = [repr(c) for c in self.choices]
            return "use " + (
                " or ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
            )
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "use a value " + " and ".join(parts) if parts else "use another value"


def key(
    default: Any = MISSING,
    help: str = "",  # noqa: A002 - the field's help, as argparse names it
    *,
    default_factory: Callable[[], Any] | Any = MISSING,
    **rule: Any,
) -> Any:
    """A declared key: a dataclass field whose metadata holds its help and its ``Rule``."""
    metadata = {"help": help, "rule": Rule(**rule)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def key_name(name: str) -> str:
    """A field name as a key: ``lora_r`` -> ``lora-r``."""
    return name.replace("_", "-")


def rule_of(f: Field) -> Rule:
    """The field's ``Rule`` (an empty one for an undeclared field)."""
    return f.metadata.get("rule", Rule())


def declared(cls: type) -> Iterator[Field]:
    """The fields of ``cls`` that are read from configs (declared keys), in order."""
    return (f for f in fields(cls) if rule_of(f).read)


def parse_bool(value: Any) -> bool:
    """A strict boolean: ``True``/``False``, 1/0, or true/false, yes/no, on/off as text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError("is not a boolean; use true or false")


def _number(value: Any, kind: str) -> int | float:
    if isinstance(value, bool):
        raise ValueError(
            f"is {str(value).lower()}, not a number; use {'a whole number' if kind == 'int' else 'a number'}"
        )
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"is not {'a whole number' if kind == 'int' else 'a number'}; use one, e.g. 3"
        ) from None
    if kind == "float":
        return number
    if not number.is_integer():
        raise ValueError("is not a whole number; use one, e.g. 3")
    return int(number)


def parse_value(f: Field, value: Any) -> Any:
    """``value`` as the field's declared type (its ``Rule.parse`` first); ``ValueError(problem;
    fix)`` otherwise."""
    rule = rule_of(f)
    if rule.parse is not None:
        return rule.parse(value)
    kind = str(f.type)
    if kind == "bool":
        return parse_bool(value)
    if kind in ("int", "float"):
        return _number(value, kind)
    return str(value)


def fail(source: str, key: str, value: Any, problem: str) -> SettingsError:
    """The one error format: ``<source>: key 'x' = <value> <problem; fix>``."""
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:56] + "...'"
    return SettingsError(f"{source}: key '{key}' = {shown} {problem}")


def read(
    cls: type[T],
    mapping: Mapping[str, Any],
    source: str,
    *,
    prefix: str = "",
    base: T | None = None,
    missing: str = "set it",
) -> T:
    """An instance of ``cls`` from the declared keys in ``mapping`` (``prefix`` + key), over
    ``base`` (or the defaults), checked; keys ``cls`` does not declare are ignored. A missing key
    without a default raises ``<source>: key 'x' is not set; <missing>``."""
    values = {}
    for f in declared(cls):
        name = prefix + key_name(f.name)
        if name not in mapping or mapping[name] is None:
            if base is None and f.default is MISSING and f.default_factory is MISSING:
                raise SettingsError(f"{source}: key '{name}' is not set; {missing}")
            continue
        try:
            values[f.name] = parse_value(f, mapping[name])
        except ValueError as err:
            raise fail(source, name, mapping[name], str(err)) from None
    built = dataclasses.replace(base, **values) if base is not None else cls(**values)  # type: ignore[type-var]
    return check(built, source, prefix)


def check(settings: T, source: str, prefix: str = "") -> T:
    """``settings`` if every declared key is within its rule and its class's ``cross_checks()``
    (``[(ok, key, fix), ...]``) hold; else the first bad key as one ``SettingsError`` line."""
    for f in declared(type(settings)):
        rule, value = rule_of(f), getattr(settings, f.name)
        if not rule.accepts(value):
            problem = "is not one of its choices" if rule.choices else "is out of range"
            raise fail(source, prefix + key_name(f.name), value, f"{problem}; {rule.default_fix()}")
    cross = getattr(settings, "cross_checks", None)
    for ok, name, fix in cross() if cross is not None else ():
        if not ok:
            value = getattr(settings, name.replace("-", "_"))
            raise fail(source, prefix + name, value, f"does not fit the other settings; {fix}")
    return settings


def defaults(cls: type) -> dict[str, Any]:
    """The declared keys' defaults, hyphenated (keys without a default are left out)."""
    out = {}
    for f in declared(cls):
        if f.default is not MISSING:
            out[key_name(f.name)] = f.default
        elif f.default_factory is not MISSING:
            out[key_name(f.name)] = f.default_factory()
    return out


def help_of(cls: type) -> dict[str, str]:
    """Each declared key's help text: the one place its meaning is written."""
    return {key_name(f.name): f.metadata.get("help", "") for f in declared(cls)}
