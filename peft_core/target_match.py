"""Which module paths a target spec selects: the string rules alone, torch-free.

The web previews a `target_modules` spec against a model's stored list of Linear-like
modules (rows {"path", "in", "out", "head"} from `peft_core.inspection.describe`) without
importing torch, and `targets.resolve_targets` selects with the same functions on a live
model: one judge for both. A spec is one of

  None          the architecture's default: the caller passes the default paths
                (describe()["methods"]["lora"]["modules"]; on a live model, structure.py)
  "all-linear"  every Linear-like module except the output heads (an LM head, a
                classification head) and anything inside them
  other str     a regex, `re.fullmatch`-ed against the full module path
  tuple         module-name suffixes: a path matches "q_proj" if it is "q_proj" or ends in
                ".q_proj" (the rule HF PEFT uses for a list of names)

`preview_targets(described, spec)` is what apply selects on a model from its stored describe()
JSON. LoRA's trainable parameters are r·(d_in + d_out) per adapted layer, DoRA's
r·(d_in + d_out) + d_out: `lora_trainable` counts them from the rows (a classification head
trained beside the adapter is not counted).
"""

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ALL_LINEAR = "all-linear"  # configs.ALL_LINEAR: the same string
# Leaf names of output heads, for models whose head structure.py cannot find
# (no get_output_embeddings, not a *ForSequenceClassification).
OUTPUT_HEADS = ("lm_head", "classifier", "score")

Spec = tuple[str, ...] | list[str] | str | None


def matches_suffix(path: str, names: Iterable[str]) -> bool:
    return any(path == name or path.endswith("." + name) for name in names)


def is_under(path: str, root: str) -> bool:
    """`path` is `root` or inside it."""
    return path == root or path.startswith(root + ".")


def matches(path: str, spec: str | Sequence[str]) -> bool:
    """A regex full-matches the path; a name matches as a dotted suffix."""
    return bool(re.fullmatch(spec, path)) if isinstance(spec, str) else matches_suffix(path, spec)


def _excluded(path: str, names: Iterable[str]) -> bool:
    """`path`, or a module it sits in, matches one of the suffix `names`."""
    parts = path.split(".")
    return any(matches_suffix(".".join(parts[:i]), names) for i in range(1, len(parts) + 1))


def select_paths(
    paths: Sequence[str],
    spec: Spec,
    *,
    heads: Iterable[str] = (),
    exclude: Iterable[str] = (),
    default: Sequence[str] | None = None,
) -> list[str]:
    """The paths (of `paths`, in their order) that `spec` selects.

    heads: output-head paths, left out (with what is inside them) by "all-linear";
    exclude: names (suffix rule) whose modules and everything inside are never selected
    (a method's modules_to_save); default: the paths spec None stands for.
    """
    exclude = tuple(exclude)
    candidates = [p for p in paths if not _excluded(p, exclude)]
    if spec is None:
        if default is None:
            raise ValueError("target_modules None needs the architecture's default paths")
        chosen = set(default)
        return [p for p in candidates if p in chosen]
    if spec == ALL_LINEAR:
        heads = tuple(heads)
        return [
            p
            for p in candidates
            if not any(is_under(p, h) for h in heads) and not _excluded(p, OUTPUT_HEADS)
        ]
    if isinstance(spec, str):
        return [p for p in candidates if re.fullmatch(spec, p)]
    return [p for p in candidates if matches_suffix(p, tuple(spec))]


def preview_targets(
    described: Mapping[str, Any],
    spec: Spec,
    *,
    method: str = "lora",
    modules_to_save: Iterable[str] = (),
) -> list[str]:
    """The module paths `spec` selects on a model, as `apply` would, from its describe() JSON.

    spec None stands for `method`'s default modules; a sequence-classification head (which
    apply trains in full) and `modules_to_save` are never targeted. Raises ValueError when
    spec is None and the method is refused on this model (with the refusal's reason).
    """
    rows = described["linears"]
    default = None
    if spec is None:
        footprint = described["methods"][method]
        if "refused" in footprint:
            raise ValueError(footprint["refused"])
        default = footprint["modules"]
    head = described.get("classification_head")
    return select_paths(
        [row["path"] for row in rows],
        spec,
        heads=[row["path"] for row in rows if row["head"]],
        exclude=(*modules_to_save, *([head] if head else [])),
        default=default,
    )


def leaf_names(paths: Iterable[str]) -> list[str]:
    """Last path component of each path, deduplicated, first-seen order."""
    return list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))


def compact_names(paths: Sequence[str], all_paths: Sequence[str]) -> list[str]:
    """The shortest list-of-names spec that selects exactly `paths` among `all_paths`.

    Leaf names when they select no extra path, else the full paths (which match exactly).
    """
    names = leaf_names(paths)
    if set(select_paths(all_paths, tuple(names))) == set(paths):
        return sorted(names)
    return sorted(paths)


def lora_trainable(
    rows: Iterable[Mapping[str, Any]], paths: Iterable[str], r: int, *, dora: bool = False
) -> int:
    """LoRA's trainable parameters for the rows at `paths`: r·(in + out) each (+ out for DoRA)."""
    chosen = set(paths)
    sizes = [(row["in"], row["out"]) for row in rows if row["path"] in chosen]
    return sum(r * (d_in + d_out) + (d_out if dora else 0) for d_in, d_out in sizes)
