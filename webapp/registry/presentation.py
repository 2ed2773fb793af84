"""What the model page shows, from a row and its inspection (facts): plain values, no torch."""

import re

from django.template.defaultfilters import filesizeformat
from django.utils.html import format_html

from peft_core.methods import METHOD_LIST
from webapp.registry.models import BaseModel, ModelSource

LAYER_INDEX = re.compile(r"\.(\d+)\.")


def model_page_context(model: BaseModel) -> dict:
    facts = model.facts or {}
    return {
        "model": model,
        "summary": _summary(model, facts),
        "structures": [_structure(task, info) for task, info in facts.get("structure", {}).items()],
    }


def _summary(model: BaseModel, facts: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [("Source", model.get_source_display())]
    if model.source == ModelSource.HUB:
        rows += [("Hub id", model.location), ("Revision", model.revision)]
        rows += [("Commit", model.commit or "resolved when a worker fetches it")]
    elif model.source == ModelSource.LOCAL:
        rows.append(("Directory", model.location))
    if model.content_sha256:
        rows.append(("Config + weights index sha256", model.content_sha256))
    if not facts:
        return rows
    params = facts.get("parameters")
    rows += [
        ("Architecture", ", ".join(facts.get("architectures") or [facts.get("model_type", "")])),
        ("Tasks", ", ".join(facts.get("tasks", []))),
        ("Parameters", _count_text(params)),
        ("Layers", facts.get("layers")),
        ("Hidden size", facts.get("hidden_size")),
        ("Attention heads", _heads(facts)),
        ("Context length", facts.get("context_length") or "—"),
        ("Weights", f"{facts.get('dtype') or 'unknown dtype'}, "
         f"{filesizeformat(facts.get('weight_bytes') or 0)} of safetensors"),
        ("Chat template", "yes: datasets are rendered with it" if facts.get("has_chat_template")
         else "no"),
    ]  # fmt: skip
    return rows


def _count_text(count: int | None) -> str:
    """139,840 (0.14 M) · 494,032,768 (0.49 B)."""
    if not count:
        return "—"
    short = f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.2f} M"
    return f"{count:,} ({short})"


def _heads(facts: dict) -> str:
    heads, kv = facts.get("heads"), facts.get("kv_heads")
    if heads and kv and kv != heads:
        return format_html("{} query, {} key/value (grouped-query)", heads, kv)
    return str(heads or "—")


def _structure(task: str, info: dict) -> dict:
    """One task head's modules: the Linear layers (a block's once, with ×layers) and where
    each method goes with its default settings."""
    return {
        "task": task,
        "class": info.get("class", ""),
        "blocks": info.get("blocks", ""),
        "linears": _linear_rows(info.get("linears", [])),
        "methods": _method_rows(info.get("methods", {})),
    }


def _linear_rows(linears: list[dict]) -> list[dict]:
    """Linear layers grouped by their path with the layer index as <i>, in model order."""
    groups: dict[str, dict] = {}
    for linear in linears:
        pattern = LAYER_INDEX.sub(".<i>.", linear["path"], count=1)
        group = groups.setdefault(
            pattern, {"path": pattern, "in": linear["in"], "out": linear["out"], "count": 0}
        )
        group["count"] += 1
    return list(groups.values())


def _method_rows(methods: dict) -> list[dict]:
    rows = []
    for entry in METHOD_LIST:
        info = methods.get(entry.key)
        if info is None:
            continue
        row = {"key": entry.key, "title": entry.config_cls.title, "refused": info.get("refused")}
        if not row["refused"]:
            modules = info.get("modules", [])
            patterns = list(dict.fromkeys(LAYER_INDEX.sub(".<i>.", m, count=1) for m in modules))
            row |= {
                "places": patterns,
                "count": info.get("count", len(modules)),
                "trainable": info.get("trainable"),
            }
        rows.append(row)
    return rows
