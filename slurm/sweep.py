"""Sweeps: ``--sweep KEY=V1,V2,...`` (repeatable); the grid is the product of the values (pure functions).

Elements come in ``itertools.product`` order over the ``--sweep`` flags as given (the first flag's
values change slowest); element ``i`` is array task ``i``. Each element is a run of its own, in
``<run dir>/<key=value,...>`` (``ddp.lifecycle.sweep_dirs``: keys sorted, values as typed, other
characters than ``[A-Za-z0-9._+-]`` written ``%XX``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from ddp.lifecycle.sweep_dirs import element_name
from slurm.request import SubmitError

NAME_MAX = 255  # bytes in one path component on Linux filesystems
_OPEN, _CLOSE = "[{(", "]})"


@dataclass(frozen=True)
class Axis:
    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Element:
    index: int
    values: tuple[tuple[str, str], ...]  # (key, value as typed), in --sweep order

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.values]

    @property
    def name(self) -> str:
        return element_name(self.values)

    @property
    def label(self) -> str:
        """The values as a user reads them (unquoted), for messages."""
        return ", ".join(self.overrides)


def parse_axis(spec: str) -> Axis:
    """``optim.lr=0.1,0.05`` → Axis; commas inside brackets or quotes belong to one value (``[1,2]``)."""
    key, sep, text = spec.partition("=")
    key = key.strip()
    if not sep or not key or key.startswith("-"):
        raise SubmitError(f"--sweep {spec!r} is not a key with values.", "write --sweep KEY=V1,V2,..., "
                          "e.g. --sweep optim.lr=0.1,0.05,0.01")
    if key.split(".")[0] == "run":
        raise SubmitError(f"--sweep {key}: run.name and run.dir choose where the sweep's runs go; they cannot be swept.",
                          "set them once as key=value; each run of the sweep gets its own directory inside")
    values = split_values(text)
    empty = [i + 1 for i, value in enumerate(values) if not value.strip()]
    if empty:
        raise SubmitError(f"--sweep {spec!r}: value {empty[0]} is empty.",
                          f"give each value between commas, e.g. --sweep {key}=0.1,0.05")
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise SubmitError(f"--sweep {key}: the value {repeated[0]!r} is given twice (it would be the same run twice).",
                          "give each value once")
    return Axis(key, tuple(values))


def split_values(text: str) -> list[str]:
    """Split on commas outside ``[]``, ``{}``, ``()`` and quotes."""
    values, current, depth, quote_char = [], [], 0, ""
    for char in text:
        if quote_char:
            quote_char = "" if char == quote_char else quote_char
        elif char in "'\"":
            quote_char = char
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(char)
    values.append("".join(current))
    return values


def grid(axes: list[Axis], overrides: list[str] = ()) -> list[Element]:
    """Every combination, in product order; refuses a key swept twice or also set by an override."""
    keys = [axis.key for axis in axes]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise SubmitError(f"--sweep {twice[0]} is given twice.", f"give all its values in one --sweep {twice[0]}=V1,V2")
    fixed = {item.partition("=")[0].strip() for item in overrides}
    both = [key for key in keys if key in fixed]
    if both:
        raise SubmitError(f"{both[0]} is both swept (--sweep) and set by the override {both[0]}=....",
                          f"drop one of them: put the value into --sweep {both[0]}=...")
    elements = []
    for index, combination in enumerate(itertools.product(*(axis.values for axis in axes))):
        element = Element(index, tuple(zip(keys, combination)))
        if len(element.name.encode()) > NAME_MAX:
            raise SubmitError(f"run {index} of the sweep ({element.label}) would be a directory name of "
                              f"{len(element.name.encode())} bytes; a name holds at most {NAME_MAX}.",
                              "sweep fewer keys or shorter values")
        elements.append(element)
    return elements
