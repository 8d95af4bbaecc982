"""The directory of one run of a sweep: ``<run dir>/<key=value,...>`` (pure functions).

``key=value`` pairs joined by commas, keys sorted, so the same values name the same directory
whatever the order they were given in: ``optim.lr=0.1,train.seed=0``. A value keeps its text as
typed; every character other than a letter, a digit or one of ``._+-`` is written ``%XX`` (its
UTF-8 bytes: ``/`` is ``%2F``, a space ``%20``, a comma ``%2C``), so a name is always one path
component, and ``parse_name`` reads the values back (``python -m ddp.report`` shows them).
"""

from __future__ import annotations

from urllib.parse import quote, unquote

SAFE = "._+-"  # besides letters and digits: kept as they are


def element_name(values: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> str:
    """``[("train.seed", "0"), ("optim.lr", "0.1")]`` → ``optim.lr=0.1,train.seed=0``."""
    return ",".join(f"{quote(key, safe=SAFE)}={quote(value, safe=SAFE)}" for key, value in sorted(values))


def parse_name(name: str) -> dict[str, str] | None:
    """The inverse of ``element_name``: ``{"optim.lr": "0.1", ...}``; None for another name."""
    if "/" in name:
        return None
    values = {}
    for pair in name.split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            return None
        values[unquote(key)] = unquote(value)
    return values
