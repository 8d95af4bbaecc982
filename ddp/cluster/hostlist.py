"""Pure parsers for Slurm's compressed host and task lists.

``expand_hostlist("node[01-03,07],gpu-a")`` → ``["node01", "node02", "node03", "node07", "gpu-a"]``
``first_host("node[01-10000000]")`` → ``"node01"`` without expanding the rest
``expand_tasks_per_node("2(x3),1")`` → ``[2, 2, 2, 1]``

Malformed lists (``n[1-]``, ``n[5-3]``, unbalanced brackets) raise ``ValueError``; callers name the
variable that held the list.
"""

from __future__ import annotations

import itertools
import re


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    items.append("".join(current))
    return [item for item in items if item]


def _range_bounds(spec: str) -> list[tuple[str, str | None]]:
    """``"01-03,7"`` → ``[("01", "03"), ("7", None)]``, each part checked (``1-`` and ``5-3`` refused)."""
    bounds: list[tuple[str, str | None]] = []
    for part in spec.split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in host list")
        if dash and int(high) < int(low):
            raise ValueError(f"descending range {part!r} in host list")
        bounds.append((low, high if dash else None))
    return bounds


def _expand_range(spec: str) -> list[str]:
    """``"01-03,7"`` → ``["01", "02", "03", "7"]`` keeping each bound's zero padding."""
    values = []
    for low, high in _range_bounds(spec):
        if high is None:
            values.append(low)
            continue
        width = len(low)
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def _item_pieces(item: str) -> list[str]:
    """Literal, range, literal, range, ..., literal; stray brackets refused."""
    pieces = re.split(r"\[([^\]]*)\]", item)
    for literal in pieces[::2]:
        if "[" in literal or "]" in literal:
            raise ValueError(f"unbalanced brackets in host list item {item!r}")
    for spec in pieces[1::2]:
        _range_bounds(spec)
    return pieces


def _expand_item(item: str) -> list[str]:
    """One host pattern, possibly with several bracket groups (``r[1-2]n[1-2]``)."""
    pieces = _item_pieces(item)
    choices = [[piece] if i % 2 == 0 else _expand_range(piece) for i, piece in enumerate(pieces)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list such as ``SLURM_JOB_NODELIST`` into host names, in order."""
    hosts = [host for item in _split_top_level(text.strip()) for host in _expand_item(item)]
    if not hosts:
        raise ValueError(f"empty host list {text!r}")
    return hosts


def first_host(text: str) -> str:
    """The first host of a Slurm host list, read without expanding the others.

    The whole list is still checked, so a malformed list is refused even when its first host is fine.
    """
    items = _split_top_level(text.strip())
    if not items:
        raise ValueError(f"empty host list {text!r}")
    pieces = [_item_pieces(item) for item in items][0]
    return "".join(piece if i % 2 == 0 else _range_bounds(piece)[0][0] for i, piece in enumerate(pieces))


def expand_tasks_per_node(text: str) -> list[int]:
    """Expand ``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``) into one task count per node."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"bad tasks-per-node entry {part!r} in {text!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts
