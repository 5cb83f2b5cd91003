"""The configuration reference as Markdown: `cifar-dist config --reference` prints it, and
docs/configuration.md carries it (a test keeps the two equal)."""

from __future__ import annotations

import dataclasses

import yaml

from cifar_dist.config.schema import RESULT_WHEN, SECTION_CLASSES, choices, group_class


def reference_markdown() -> str:
    """A Markdown table per section: key, default, meaning (and the allowed values)."""
    out = [
        "Keys marked *result-free* do not change what a run trains or measures: `--resume` may",
        "change them, and `cifar-dist compare` groups runs that differ only in them (and the seed).",
        *(f"`{key}` is not result-free {why}." for key, _, why in RESULT_WHEN),
        "",
    ]
    for section, cls in SECTION_CLASSES.items():
        out += [f"**{section}**", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            out.append(_row(section, f, f"{section}.{f.name}"))
            group, free = group_class(section, f), not f.metadata.get("result", True)
            for g in dataclasses.fields(group) if group else ():  # its keys, with their defaults when on
                out.append(_row(group, g, f"{section}.{f.name}.{g.name}", result_free=free))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _row(owner, f, key: str, result_free: bool = False) -> str:
    factory = f.default_factory
    default = factory() if callable(factory) else f.default
    meaning = f.metadata["help"]
    allowed = choices(owner, f)
    if allowed:
        user = " / package.module:name" if f.metadata.get("specs") else ""
        meaning += " (" + " / ".join(allowed) + user + ")"
    if result_free or not f.metadata.get("result", True):
        meaning += "; *result-free*"
    shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
    return f"| `{key}` | `{shown}` | {meaning.replace('|', '/')} |"
