"""The commented shadowlane YAML that `shadowlane import` writes.

Comments say where each route and backend came from, where the peer's semantics were kept on
purpose (one shadow per Emissary resource, Envoy's `-shadow` Host), and, at the top, every
field that was not translated, so the file can be reviewed before it replaces the peer's.
"""

from __future__ import annotations

from typing import Any

import yaml

from shadowlane.importers.documents import Loaded


def _dump(value: Any, indent: int) -> list[str]:
    text = yaml.safe_dump(value, sort_keys=False, default_flow_style=False, width=100)
    pad = " " * indent
    return [pad + line if line else line for line in text.rstrip("\n").split("\n")]


def _comment(text: str, indent: int) -> str:
    return " " * indent + "# " + text


def render(loaded: Loaded, sources: list[str]) -> str:
    """YAML text that `shadowlane check -c` accepts (the caller checks it does)."""
    out: list[str] = ["# shadowlane config translated by `shadowlane import` from:"]
    out += [f"#   {s}" for s in sources]
    if loaded.notes:
        out.append("#")
        out.append(f"# {len(loaded.notes)} field(s) not translated (or not exactly):")
        out += [f"#   {n}" for n in loaded.notes]
    out.append("")
    config = loaded.config
    for key, value in config.items():
        if key in ("backends", "routes"):
            continue
        out += _dump({key: value}, 0)
    tr = loaded.translation
    out.append("backends:")
    for name, data in (config.get("backends") or {}).items():
        backend = tr.backends.get(name)
        if backend is not None and backend.origin != "native":
            out.append(_comment(f"from {backend.origin}", 2))
        out += _dump({name: data}, 2)
    out.append("routes:")
    comments = {id(r.data): r.comments for r in tr.routes}
    for route in config.get("routes") or []:
        for line in comments.get(id(route), []):
            out.append(_comment(line, 2))
        out += _dump([route], 2)
    return "\n".join(out) + "\n"
