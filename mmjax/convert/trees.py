"""Small helpers shared by the converters: nested param dicts <-> flat paths, name lists."""

from __future__ import annotations

from typing import Any, Iterator, Mapping


def short_list(names: list[str], limit: int = 8) -> str:
    """'a, b, c, ... (12 more)' for error messages."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """tree[path[0]][path[1]]... = value, creating the intermediate dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) for every non-mapping leaf of a nested mapping."""
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from flatten(v, prefix + (str(k),))
        else:
            yield prefix + (str(k),), v
