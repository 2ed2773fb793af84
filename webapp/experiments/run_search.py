"""Search and sort runs by what they measured and how they were configured.

The runs page, GET /api/v1/runs/, the Python client (`Client.runs(q=…, sort=…)`) and
`peftlab runs list --where … --sort …` take the same two parameters:

    q     terms separated by spaces; a run matches when it matches every one:
              eval_loss<1.2  train_loss>=0.1  config.lora.r=8  method=lora  tag=best  alpha
    sort  newest (the default), oldest, or a key, descending with a leading "-":
              -eval_exact_match  config.learning_rate  name  -step

A term is `key op value`, op one of = != < <= > >=. A value with spaces is "quoted", and a
quoted value is always text (config.seed="42" is the string "42"; config.seed=42 the number).
A word without an operator is part of the run's name ("quote" one that holds < > = !).

    run fields   name project dataset method model status tag (text: = and != only,
                 name/project/dataset ignoring case), id step total_steps devices sweep
                 (integers), external (true/false)
    config.P     the value at the dotted path P of the run's configuration: method_config,
                 then train_config where method_config has no P; config.lora.r also matches
                 the runs of method "lora" whose method_config holds r. Paths reach into the
                 nested dicts of external runs' free-form configs.
    anything     a number of the run's summary (summary.K names one whose key is also a field
    else         or starts with "config."). A run without it matches no comparison, and a
                 sort by it puts it last either way. != means "has it, with another value".

Safety. The parser is hand-written: one regular expression per term (no nested quantifiers,
so no backtracking trap) over at most MAX_QUERY_CHARS characters and MAX_TERMS terms; keys,
paths and values are checked, and what comes out are Django ORM expressions (Q, Exists,
FilteredRelation, a Func whose path is a bound parameter): no SQL is built from the text.
A bad query raises QueryError, naming the term: the API answers 400 and the page shows it
above the query it keeps.

Indexes (PostgreSQL; the embedded SQLite answers the same queries by reading the rows).
- Summary numbers. Run.summary is JSON of any shape: a range over it would read every run's
  JSON. So each number of a summary (a JSON number a double holds, under a key of 1-64 of
  A-Z a-z 0-9 _ . / -, as metric keys are; the first 1 000 by key) is also a row of
  RunSummaryValue (run, key, value). A trigger that migration 0019 puts on the run table
  (PostgreSQL and SQLite) rewrites a run's rows in the statement that inserts or changes its
  summary: the worker's finish, the API's external create and finish, an SDK's summary
  update, a bulk insert, all alike, and no writer can forget it, as none can forget an
  index. `eval_loss<1.2` is an EXISTS that PostgreSQL answers with a range scan of the
  (key, value, run) btree, the run id read from the index itself
  (tests/webapp/test_run_search.py shows the plan on 20 000 runs). A sort by a metric is a
  LEFT JOIN on the unique (run, key) index. Rejected: an expression index per summary key
  (one DDL per key a user invents), a GIN index on summary (containment answers =, not <),
  and writes from each service (every new writer would have to know).
- Config equality. `config.lora.r=8` is jsonb containment (method_config @> '{"r": 8}'),
  which the GIN indexes (jsonb_path_ops) of migration 0019 on method_config and
  train_config answer. Comparisons and sorts on a config value (config.learning_rate<0.01)
  read the number at the path in each run the other terms leave: not indexed, so on a large
  team pair them with an indexed term.
"""

import math
import re
from dataclasses import dataclass
from typing import Any

from django.db import connection
from django.db.models import (
    Case,
    Exists,
    F,
    FilteredRelation,
    FloatField,
    Func,
    OuterRef,
    Q,
    QuerySet,
    When,
)
from django.db.models.fields.json import KeyTransform
from django.db.models.functions import Coalesce
from django.db.models.lookups import IsNull

from webapp.experiments.models import RunStatus, RunSummaryValue, Tag

MAX_QUERY_CHARS = 500
MAX_TERMS = 12
MAX_SORT_CHARS = 100
MAX_VALUE_CHARS = 200
MAX_PATH_DEPTH = 8
INT_BOUND = 2**31  # run integers are 32-bit columns

OPS = ("=", "!=", "<", "<=", ">", ">=")
METRIC_KEY = re.compile(r"[A-Za-z0-9_./-]{1,64}\Z")
PATH_PART = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
TERM = re.compile(
    r"""\s*(?:
      (?P<key>[A-Za-z0-9_./-]+)\s*(?P<op><=|>=|!=|=|<|>)\s*(?P<value>"[^"]*"|[^\s"]+)
    | (?P<word>"[^"]*"|[^\s"]+)
    )""",
    re.VERBOSE | re.ASCII,
)
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
OPERATOR_CHARS = re.compile(r"[<>=!]")


class QueryError(ValueError):
    """A query or sort that cannot be read; the message says which part and why."""


@dataclass(frozen=True)
class Term:
    kind: str  # "word", "field", "config" or "metric"
    key: str  # the field, the metric key, or the config path joined by dots
    op: str = "="
    value: Any = None


@dataclass(frozen=True)
class Sort:
    kind: str  # "named", "field", "config" or "metric"
    key: str
    descending: bool = False


# ---- parsing --------------------------------------------------------------------------------

TEXT_FIELDS = {
    "name": "name__iexact",
    "project": "project__name__iexact",
    "dataset": "dataset__name__iexact",
    "method": "method",
    "model": "base_model",
    "base_model": "base_model",
    "status": "status",
}
INT_FIELDS = {
    "id": "id",
    "step": "step",
    "total_steps": "total_steps",
    "devices": "devices",
    "sweep": "sweep_id",
}
FIELDS = (*TEXT_FIELDS, *INT_FIELDS, "tag", "external")


def parse_query(text: str) -> list[Term]:
    """The terms of `text`, every one checked; QueryError for the first that is not right."""
    text = _checked_text(text, MAX_QUERY_CHARS, "The query")
    if text.count('"') % 2:
        raise QueryError('A quote is not closed: write "…" around text with spaces.')
    terms, position = [], 0
    while text[position:].strip():
        match = TERM.match(text, position)
        if match is None or not match.group(0).strip():  # "a""b": quotes glued together
            raise QueryError(f"Cannot read the query from “{text[position:][:40]}”.")
        position = match.end()
        terms.append(_term(match))
        if len(terms) > MAX_TERMS:
            raise QueryError(f"At most {MAX_TERMS} terms in a query.")
    return terms


def _checked_text(text: str, limit: int, what: str) -> str:
    if len(text) > limit:
        raise QueryError(f"{what} is {len(text):,} characters long; at most {limit}.")
    if CONTROL.search(text):
        raise QueryError(f"{what} holds a control character.")
    return text


def _term(match: re.Match) -> Term:
    if match.group("word") is not None:
        word = match.group("word")
        if word.startswith('"'):
            return Term("word", "name", value=_bounded(word[1:-1]))
        if OPERATOR_CHARS.search(word):
            raise QueryError(
                f"“{word[:80]}” is not a term: write key, operator and value together, e.g. "
                'eval_loss<1.2, or "quote" a name that has < > = ! in it.'
            )
        return Term("word", "name", value=_bounded(word))
    key, op, raw = match.group("key"), match.group("op"), match.group("value")
    quoted = raw.startswith('"')
    value = _bounded(raw[1:-1] if quoted else raw)
    if key.startswith("config."):
        path = _config_path(key)
        return Term("config", ".".join(path), op, _config_value(key, op, value, quoted))
    if key in FIELDS:
        return Term("field", key, op, _field_value(key, op, value))
    metric = key.removeprefix("summary.")
    if not METRIC_KEY.match(metric):
        raise QueryError(f"{key[:80]}: a metric key is 1-64 of A-Z a-z 0-9 _ . / -.")
    return Term("metric", metric, op, _number(key, value))


def _bounded(value: str) -> str:
    if len(value) > MAX_VALUE_CHARS:
        raise QueryError(f"A value is at most {MAX_VALUE_CHARS} characters.")
    return value


def _config_path(key: str) -> list[str]:
    path = key.removeprefix("config.").split(".")
    if len(path) > MAX_PATH_DEPTH:
        raise QueryError(f"{key[:80]}: a config path has at most {MAX_PATH_DEPTH} parts.")
    if not all(PATH_PART.match(part) for part in path):
        raise QueryError(
            f"{key[:80]}: write config.<name>, or config.<a>.<b> into nested settings "
            "(names of A-Z a-z 0-9 _ -)."
        )
    return path


def _config_value(key: str, op: str, value: str, quoted: bool):
    if op not in ("=", "!="):
        return _number(key, value)
    if quoted:
        return value
    if value in ("true", "false"):
        return value == "true"
    try:
        return int(value) if re.fullmatch(r"[+-]?[0-9]{1,30}", value) else _finite(value)
    except ValueError:
        return value


def _field_value(key: str, op: str, value: str):
    if key in INT_FIELDS:
        number = _number(key, value)
        if number != int(number) or abs(number) >= INT_BOUND:
            raise QueryError(f"{key}: {value[:80]} is not a whole number in range.")
        return int(number)
    if op not in ("=", "!="):
        raise QueryError(f"{key} is text: compare it with = or !=, not {op}.")
    if key == "status" and value not in RunStatus.values:
        raise QueryError(f"status is one of {', '.join(RunStatus.values)}; not {value[:80]}.")
    if key == "external":
        if value not in ("true", "false"):
            raise QueryError("external is true or false.")
        return value == "true"
    return value


def _number(key: str, value: str) -> float:
    try:
        return _finite(value)
    except ValueError:
        raise QueryError(f"{key[:80]}: {value[:80]} is not a number.") from None


def _finite(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(value)
    return number


NAMED_SORTS = {
    "newest": ("-created_at", "-id"),
    "oldest": ("created_at", "id"),
}
FIELD_SORTS = {
    "name": "name",
    "method": "method",
    "model": "base_model",
    "status": "status",
    "created": "created_at",
    "id": "id",
    "step": "step",
    "total_steps": "total_steps",
}


def parse_sort(text: str) -> Sort:
    """newest, oldest, or `[-]key` of a field, a config path or a summary metric."""
    text = _checked_text(text.strip(), MAX_SORT_CHARS, "The sort").strip() or "newest"
    if text in NAMED_SORTS:
        return Sort("named", text)
    descending = text.startswith("-")
    key = text.lstrip("+-")
    if key in FIELD_SORTS:
        return Sort("field", key, descending)
    if key.startswith("config."):
        return Sort("config", ".".join(_config_path(key)), descending)
    metric = key.removeprefix("summary.")
    if not METRIC_KEY.match(metric):
        raise QueryError(
            f"Sort by newest, oldest, a field ({', '.join(FIELD_SORTS)}), config.<name> or a "
            f"metric key (1-64 of A-Z a-z 0-9 _ . / -), with - for descending; not {text[:80]}."
        )
    return Sort("metric", metric, descending)


def sort_text(sort: Sort) -> str:
    """The `sort` parameter that names `sort` (what a column header links to)."""
    if sort.kind == "named":
        return sort.key
    prefix = "config." if sort.kind == "config" else ""
    if sort.kind == "metric" and parse_sort(sort.key).kind != "metric":
        prefix = "summary."  # a metric named like a field (status) or a sort (newest)
    return f"{'-' if sort.descending else ''}{prefix}{sort.key}"


# ---- the ORM ----------------------------------------------------------------------------------


def runs_matching(runs: QuerySet, terms: list[Term]) -> QuerySet:
    """`runs` narrowed by every term (runs comes from a *_for_user selector: nothing widens)."""
    for index, term in enumerate(terms):
        if term.kind == "word":
            runs = runs.filter(name__icontains=term.value)
        elif term.kind == "field":
            runs = runs.filter(_field_condition(term))
        elif term.kind == "metric":
            runs = runs.filter(_metric_condition(term))
        elif term.op in ("=", "!="):
            runs = runs.filter(_config_condition(term))
        else:
            alias = f"config_term_{index}"
            runs = runs.alias(**{alias: config_number(term.key)})
            runs = runs.filter(**{f"{alias}__{LOOKUPS[term.op]}": term.value})
    return runs


LOOKUPS = {"=": "exact", "<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}


def _compare(lookup_prefix: str, op: str, value) -> Q:
    """`prefix op value` as a Q; != as "not equal" (the caller decides about absent values)."""
    if op == "!=":
        return ~Q(**{f"{lookup_prefix}__exact": value})
    return Q(**{f"{lookup_prefix}__{LOOKUPS[op]}": value})


def _field_condition(term: Term) -> Q:
    if term.key == "tag":
        tagged = Exists(Tag.objects.filter(run=OuterRef("pk"), name=term.value))
        return ~Q(tagged) if term.op == "!=" else Q(tagged)
    if term.key == "external":
        return _compare("external", term.op, term.value)
    if term.key in TEXT_FIELDS:
        lookup = TEXT_FIELDS[term.key]
        equal = Q(**{lookup: term.value})
        return ~equal if term.op == "!=" else equal
    return _compare(INT_FIELDS[term.key], term.op, term.value)


def _metric_condition(term: Term) -> Q:
    """EXISTS over the (key, value, run) index: runs that have the key, compared."""
    values = RunSummaryValue.objects.filter(run=OuterRef("pk"), key=term.key)
    return Q(Exists(values.filter(_compare("value", term.op, term.value))))


def _places(path: list[str]) -> list[tuple[str, list[str], Q]]:
    """Where config.<path> looks: (column, path inside it, condition on the run)."""
    places = [
        ("method_config", path, Q()),
        # train_config only where method_config does not hold the path.
        ("train_config", path, Q(IsNull(_key(path, "method_config"), True))),
    ]
    if len(path) > 1:
        places.append(("method_config", path[1:], Q(method=path[0])))
    return places


def _config_condition(term: Term) -> Q:
    path = term.key.split(".")
    equal = Q()
    for column, inner, condition in _places(path):
        equal |= condition & _json_equal(column, inner, term.value)
    if term.op == "=":
        return equal
    present = Q()
    for column, inner, condition in _places(path):
        present |= condition & Q(IsNull(_key(inner, column), False))
    return present & ~equal


def _json_equal(column: str, path: list[str], value) -> Q:
    """The JSON at `path` equals value: containment on PostgreSQL (its GIN indexes answer it),
    the extracted value elsewhere."""
    if connection.features.supports_json_field_contains:
        nested = value
        for part in reversed(path):
            nested = {part: nested}
        return Q(**{f"{column}__contains": nested})
    # The final __exact keeps a path part named like a lookup (in, lt) a key of the JSON.
    return Q(**{"__".join([column, *path, "exact"]): value})


def _key(path: list[str], column: str) -> KeyTransform:
    expression = F(column)
    for part in path:
        expression = KeyTransform(part, expression)
    return expression


class JSONNumber(Func):
    """The number at `path` in a JSON column; NULL where it holds anything else (text, a
    boolean, a dict, nothing) or a number a float cannot hold. The path is a parameter."""

    output_field = FloatField()

    def __init__(self, column: str, path: list[str]):
        super().__init__(F(column))
        self.path = list(path)

    def as_postgresql(self, compiler, connection, **extra):
        column, params = compiler.compile(self.source_expressions[0])
        value = f"({column} #> %s::text[])"
        sql = (
            f"CASE WHEN jsonb_typeof({value}) = 'number' THEN CASE WHEN abs({value}::numeric) "
            f"< 1e300 THEN {value}::numeric::double precision END END"
        )
        return sql, (*params, self.path) * 3

    def as_sqlite(self, compiler, connection, **extra):
        column, params = compiler.compile(self.source_expressions[0])
        path = "$" + "".join(f'."{part}"' for part in self.path)  # parts are [A-Za-z0-9_-]
        sql = (
            f"CASE WHEN json_type({column}, %s) IN ('integer', 'real') "
            f"THEN json_extract({column}, %s) END"
        )
        return sql, (*params, path, *params, path)


def config_number(key: str):
    """config.<key> as a number, looked up in the order _places gives."""
    numbers = [
        Case(When(condition, then=JSONNumber(column, inner)), output_field=FloatField())
        if condition
        else JSONNumber(column, inner)
        for column, inner, condition in _places(key.split("."))
    ]
    return Coalesce(*numbers, output_field=FloatField())


def runs_sorted(runs: QuerySet, sort: Sort) -> QuerySet:
    """`runs` in the sort's order, runs without the value last either way, newest first
    among equals."""
    if sort.kind == "named":
        return runs.order_by(*NAMED_SORTS[sort.key])
    if sort.kind == "field":
        expression = F(FIELD_SORTS[sort.key])
    elif sort.kind == "config":
        runs = runs.alias(sort_config=config_number(sort.key))
        expression = F("sort_config")
    else:
        metric = FilteredRelation("summary_values", condition=Q(summary_values__key=sort.key))
        runs = runs.alias(sort_metric=metric)
        expression = F("sort_metric__value")
    ordered = (
        expression.desc(nulls_last=True) if sort.descending else expression.asc(nulls_last=True)
    )
    return runs.order_by(ordered, "-created_at", "-id")


# ---- the summary index and the list's columns -------------------------------------------------


def summary_values_for(*, run_ids: list[int], keys: list[str]) -> dict[int, dict[str, float]]:
    """{run id: {key: value}} of these runs' summary numbers under these keys."""
    found: dict[int, dict[str, float]] = {run_id: {} for run_id in run_ids}
    rows = RunSummaryValue.objects.filter(run_id__in=run_ids, key__in=keys)
    for run_id, key, value in rows.values_list("run_id", "key", "value"):
        found[run_id][key] = value
    return found


def summary_keys_for(*, run_ids: list[int], limit: int = 200) -> list[str]:
    """The summary keys these runs have numbers for, in order (what the column picker offers)."""
    keys = RunSummaryValue.objects.filter(run_id__in=run_ids).values_list("key", flat=True)
    return list(keys.order_by("key").distinct()[:limit])
