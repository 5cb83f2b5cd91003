"""The configuration reference: every key with its default and meaning, as Markdown.

`cifar-dist config --reference` prints it; docs/configuration.md carries it (a test
keeps the two equal).
"""

from __future__ import annotations

import dataclasses

import yaml

from cifar_dist.config.schema import SECTION_CLASSES, choices


def reference_markdown() -> str:
    """A Markdown table per section: key, default, meaning (and the allowed values)."""
    out = [
        "Keys marked *result-free* do not change what a run trains or measures: `--resume` may",
        "change them, and `cifar-dist compare` groups runs that differ only in them (and the seed).",
        "",
    ]
    for section, cls in SECTION_CLASSES.items():
        out += [f"**{section}**", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            factory = f.default_factory
            default = factory() if callable(factory) else f.default
            meaning = f.metadata["help"]
            allowed = choices(section, f)
            if allowed:
                user = " / package.module:name" if f.metadata.get("specs") else ""
                meaning += " (" + " / ".join(allowed) + user + ")"
            if not f.metadata.get("result", True):
                meaning += "; *result-free*"
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            out.append(f"| `{section}.{f.name}` | `{shown}` | {meaning.replace('|', '/')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
