"""Search and sort by metric (webapp/experiments/run_search.py): the parser, alone and against
hostile text; the summary index the database keeps; filters and sorts on PostgreSQL, never
across teams; the plan that uses the index; the runs page, its columns and live cells."""

import re

import pytest
from django.db import connection
from django.urls import reverse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webapp.experiments import leases, selectors, services
from webapp.experiments.models import Run, RunStatus, RunSummaryValue, Tag
from webapp.experiments.run_search import (
    MAX_QUERY_CHARS,
    MAX_TERMS,
    QueryError,
    Sort,
    Term,
    parse_query,
    parse_sort,
    sort_text,
)

# ---- the parser ---------------------------------------------------------------------------


def test_terms_words_and_quotes():
    assert parse_query('eval_loss<1.2  train_loss >= 0.1 alpha "two words"') == [
        Term("metric", "eval_loss", "<", 1.2),
        Term("metric", "train_loss", ">=", 0.1),
        Term("word", "name", value="alpha"),
        Term("word", "name", value="two words"),
    ]
    assert parse_query("summary.status!=3 custom/x.y-z=1e-3") == [
        Term("metric", "status", "!=", 3.0),
        Term("metric", "custom/x.y-z", "=", 0.001),
    ]
    assert parse_query("method=lora status=succeeded tag!=draft step>=10 external=true") == [
        Term("field", "method", "=", "lora"),
        Term("field", "status", "=", "succeeded"),
        Term("field", "tag", "!=", "draft"),
        Term("field", "step", ">=", 10),
        Term("field", "external", "=", True),
    ]
    assert parse_query("") == [] and parse_query("   ") == []


def test_config_values_are_typed_and_quotes_keep_text():
    assert parse_query('config.lora.r=8 config.seed="42" config.lr=1e-3 config.fp16=true') == [
        Term("config", "lora.r", "=", 8),
        Term("config", "seed", "=", "42"),
        Term("config", "lr", "=", 0.001),
        Term("config", "fp16", "=", True),
    ]
    assert parse_query("config.init=gaussian config.learning_rate<0.01") == [
        Term("config", "init", "=", "gaussian"),
        Term("config", "learning_rate", "<", 0.01),
    ]


def test_sorts():
    assert parse_sort("") == Sort("named", "newest")
    assert parse_sort("oldest") == Sort("named", "oldest")
    assert parse_sort("-eval_exact_match") == Sort("metric", "eval_exact_match", True)
    assert parse_sort("name") == Sort("field", "name", False)
    assert parse_sort("-config.lora.r") == Sort("config", "lora.r", True)
    assert parse_sort("summary.status") == Sort("metric", "status", False)
    for text in ("-eval_loss", "summary.status", "-summary.newest", "config.lora.r", "-name"):
        assert sort_text(parse_sort(text)) == text  # what a column header links to


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("x" * (MAX_QUERY_CHARS + 1), "at most 500"),
        (" ".join(["a"] * (MAX_TERMS + 1)), f"At most {MAX_TERMS} terms"),
        ("eval_loss<", "is not a term"),
        ("eval_loss<abc", "abc is not a number"),
        ("eval_loss<1e999", "is not a number"),
        ("eval_loss=nan", "is not a number"),
        ("eval_loss<inf", "is not a number"),
        ('name="unclosed', "quote is not closed"),
        ("a\x00b", "control character"),
        ("status=exploded", "status is one of"),
        ("method<lora", "compare it with = or !="),
        ("id=99999999999999999999", "not a whole number in range"),
        ("step=1.5", "not a whole number"),
        ("external=maybe", "true or false"),
        ("config.=1", "write config.<name>"),
        ("config.a..b=1", "write config.<name>"),
        ("config.lr<fast", "is not a number"),
        ("config." + ".".join("a" * 9) + "=1", "at most 8 parts"),
        ("x" * 65 + "=1", "a metric key is 1-64"),
        ("eval_loss<1;DROP", "is not a number"),
        (f'name="{"x" * 201}"', "at most 200 characters"),
    ],
)
def test_hostile_queries_are_refused_with_a_reason(text, says):
    with pytest.raises(QueryError, match=re.escape(says)):
        parse_query(text)


@pytest.mark.parametrize("text", ["-", "'; DROP TABLE x;--", "-" * 101, "eval loss", "a\x00"])
def test_hostile_sorts_are_refused(text):
    with pytest.raises(QueryError):
        parse_sort(text)


QUERY_PIECES = st.sampled_from(
    ["eval_loss", "config.", "lora", ".", "r", "summary.", "tag", "status", "step", "name"]
    + ["<", ">", "=", "!", "<=", ">=", "!=", " ", "  ", '"', "'", "\\", "-", "/", "1", "8"]
    + ["1e-3", "1e999", "-0", "nan", "true", "\x00", "\t", "é", "😀", "%", "%s", ";", "("]
    + ["succeeded", "9" * 25, "[", "{", "*", "?", "$1", "--"]
)
HOSTILE = st.one_of(st.text(max_size=80), st.lists(QUERY_PIECES, max_size=30).map("".join))


@settings(max_examples=200, derandomize=True, deadline=None)
@given(HOSTILE)
def test_any_text_gives_terms_or_a_query_error(text):
    try:
        terms = parse_query(text)
    except QueryError as exc:
        assert str(exc)
    else:
        assert len(terms) <= MAX_TERMS


@pytest.mark.django_db
@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(query=HOSTILE, sort=st.one_of(st.sampled_from(["-x", "config.a.b", "name"]), HOSTILE))
def test_whatever_parses_runs_on_the_database_without_error(cast, query, sort):
    """The text that gets past the parser becomes a query PostgreSQL accepts: no 500."""
    try:
        runs = selectors.run_filter_for_user(user=cast.alice, query=query, sort=sort)
    except QueryError:
        return
    list(runs[:5])


# ---- the index the database keeps ------------------------------------------------------------


def _indexed(run: Run) -> dict[str, float]:
    return dict(RunSummaryValue.objects.filter(run=run).values_list("key", "value"))


@pytest.mark.django_db
def test_every_write_of_a_summary_rewrites_its_numbers(cast, make_run):
    run = make_run(
        summary={
            "eval_loss": 0.5,
            "steps": 12,
            "note": "text is shown, not searched",
            "ok": True,
            "nested": {"a": 1},
            "bad key!": 3,
            "huge": 10**400,  # no double holds it
            "small": 1e-12,
        }
    )
    assert _indexed(run) == {"eval_loss": 0.5, "steps": 12.0, "small": 1e-12}

    Run.objects.filter(id=run.id).update(summary={"eval_loss": 0.25})
    assert _indexed(run) == {"eval_loss": 0.25}
    Run.objects.filter(id=run.id).update(summary=[1, 2])  # not an object: nothing to search
    assert _indexed(run) == {}


@pytest.mark.django_db
def test_the_workers_finish_and_the_apis_finish_index_the_summary(cast, make_run):
    launched = make_run()
    fence = leases.run_claim(run_id=launched.id, worker="w1")
    leases.run_finish(
        run_id=launched.id,
        fence=fence,
        status=RunStatus.SUCCEEDED,
        summary={"eval_loss": 0.7, "base_eval_loss": 2.1},
    )
    assert _indexed(launched) == {"eval_loss": 0.7, "base_eval_loss": 2.1}

    external = make_run(external=True, status=RunStatus.RUNNING)
    services.run_finish_external(
        user=cast.alice, run=external, status=RunStatus.SUCCEEDED, summary={"eval_loss": 0.3}
    )
    assert _indexed(external) == {"eval_loss": 0.3}


@pytest.mark.django_db
def test_a_deleted_run_takes_its_numbers_along(cast, make_run):
    run = make_run(status=RunStatus.SUCCEEDED, summary={"eval_loss": 0.5})
    services.run_delete(user=cast.alice, run=run)
    assert not RunSummaryValue.objects.exists()


# ---- filters and sorts --------------------------------------------------------------------


@pytest.fixture
def runs(cast, make_run):
    """Four Acme runs, and one of Umbrella's that would match every query."""
    made = {
        "lora8": make_run(
            name="lora r8",
            summary={"eval_loss": 0.9, "eval_exact_match": 0.40},
            train_config={"steps": 5, "learning_rate": 0.001},
        ),
        "lora16": make_run(
            name="lora r16",
            method_config={"r": 16},
            summary={"eval_loss": 1.5, "eval_exact_match": 0.55},
            train_config={"steps": 5, "learning_rate": 0.0002},
        ),
        "ia3": make_run(name="ia3 run", method="ia3", method_config={}, summary={"eval_loss": 1.1}),
        "external": make_run(
            name="their trl run",
            method="full",
            external=True,
            method_config={"lora": {"r": 8, "target_modules": ["q_proj"]}},
            train_config={"args": {"learning_rate": 0.01, "seed": "42"}},
            summary={"train_loss": 0.2},
        ),
    }
    made["theirs"] = make_run(
        name="umbrella lora r8",
        project=cast.umbrella_project,
        created_by=cast.mallory,
        summary={"eval_loss": 0.1, "eval_exact_match": 0.99, "train_loss": 0.2},
        train_config={"steps": 5, "learning_rate": 0.001},
    )
    Tag.objects.create(run=made["lora8"], name="best")
    return made


def _names(user, query: str = "", sort: str = "newest") -> list[str]:
    found = selectors.run_filter_for_user(user=user, query=query, sort=sort)
    return [run.name for run in found]


@pytest.mark.django_db
def test_metric_filters(cast, runs):
    assert _names(cast.bob, "eval_loss<1.2", "name") == ["ia3 run", "lora r8"]
    assert _names(cast.bob, "eval_loss<=0.9") == ["lora r8"]
    assert _names(cast.bob, "eval_loss>=1.1 eval_exact_match>0.5") == ["lora r16"]
    assert _names(cast.bob, "eval_loss!=0.9", "name") == ["ia3 run", "lora r16"]
    assert _names(cast.bob, "train_loss>=0.1") == ["their trl run"]
    assert _names(cast.bob, "eval_loss=1.1") == ["ia3 run"]


@pytest.mark.django_db
def test_config_filters_read_method_then_train_config_and_nested_paths(cast, runs):
    assert _names(cast.bob, "config.lora.r=8", "name") == ["lora r8", "their trl run"]
    assert _names(cast.bob, "config.r=16") == ["lora r16"]
    assert _names(cast.bob, "config.r!=16") == ["lora r8"]  # runs with an r, another one
    assert _names(cast.bob, "config.learning_rate=0.001") == ["lora r8"]
    assert _names(cast.bob, "config.learning_rate<0.001") == ["lora r16"]
    assert _names(cast.bob, "config.args.learning_rate>=0.01") == ["their trl run"]
    assert _names(cast.bob, 'config.args.seed="42"') == ["their trl run"]
    assert _names(cast.bob, "config.args.seed=42") == []  # the number is not the text
    assert _names(cast.bob, "config.lora.target_modules=q_proj") == []  # a list is no string


@pytest.mark.django_db
def test_field_terms_and_words(cast, runs):
    assert _names(cast.bob, "method=lora lora", "name") == ["lora r16", "lora r8"]
    assert _names(cast.bob, "tag=best") == ["lora r8"]
    assert _names(cast.bob, "tag!=best method=lora") == ["lora r16"]
    assert _names(cast.bob, "external=true") == ["their trl run"]
    assert _names(cast.bob, '"R1"') == ["lora r16"]
    assert _names(cast.bob, "name=LORA\\ r8") == []  # a name term is whole, quoted if spaced
    assert _names(cast.bob, 'name="LORA R8"') == ["lora r8"]
    assert _names(cast.bob, "status=succeeded") == []
    assert _names(cast.bob, f"id={runs['ia3'].id}") == ["ia3 run"]


@pytest.mark.django_db
def test_sorts_put_runs_without_the_value_last_either_way(cast, runs):
    assert _names(cast.bob, "", "eval_loss") == ["lora r8", "ia3 run", "lora r16", "their trl run"]
    assert _names(cast.bob, "", "-eval_loss") == ["lora r16", "ia3 run", "lora r8", "their trl run"]
    assert _names(cast.bob, "", "-eval_exact_match")[:2] == ["lora r16", "lora r8"]
    assert _names(cast.bob, "", "config.learning_rate")[:2] == ["lora r16", "lora r8"]
    assert _names(cast.bob, "", "-name")[0] == "their trl run"


@pytest.mark.django_db
def test_no_query_reaches_another_teams_runs(cast, runs):
    """Umbrella's run matches each of these better than any of Acme's, and stays out."""
    for query in ["eval_loss<0.5", "eval_exact_match>0.9", "config.learning_rate=0.001", "lora"]:
        assert "umbrella lora r8" not in _names(cast.bob, query), query
    assert _names(cast.bob, "", "eval_loss")[0] == "lora r8"
    assert _names(cast.mallory, "eval_loss<1.2") == ["umbrella lora r8"]
    assert _names(cast.mallory, f"id={runs['lora8'].id}") == []


# ---- the plan -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_metric_and_config_filters_use_their_indexes_on_a_populated_table(cast):
    """20 000 runs with two summary numbers each (the database's own trigger fills the index
    as a bulk INSERT writes them), statistics gathered: `eval_loss<0.01` picks 0.1 % of them,
    and PostgreSQL reads those from the (key, value, run) index; `config.r=64` as many, from
    the GIN index on method_config. No planner setting is changed: the plans are the ones
    the cost model chooses."""
    with connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO experiments_run (project_id, name, created_by_id, base_model,
                base_weights, method, method_config, train_config, status, cancel_requested,
                attempt, fence, worker, step, total_steps, error, failure_class, log,
                summary, profile, external, notes, devices, gpu_class, priority, lineage,
                created_at)
            SELECT %s, 'bulk ' || i, %s, 'tiny-llama', '{}', 'lora',
                jsonb_build_object('r', CASE WHEN i %% 1000 = 0 THEN 64 ELSE 8 END), '{}',
                'succeeded', false, 0, 0, '', 0, 0, '', '', '',
                jsonb_build_object('eval_loss', (i %% 1000) / 10.0, 'train_loss', 1),
                '{}', false, '', 1, 'any', 0, '{}', now()
            FROM generate_series(1, 20000) AS i""",
            [cast.acme_project.id, cast.alice.id],
        )
        cursor.execute("ANALYZE experiments_run")
        cursor.execute("ANALYZE experiments_runsummaryvalue")
    assert RunSummaryValue.objects.count() == 40_000
    found = selectors.run_filter_for_user(user=cast.bob, query="eval_loss<0.01")
    assert found.count() == 20  # i % 1000 == 0
    plan = found.explain()
    assert "summary_value_key_value" in plan, plan
    assert "Seq Scan on experiments_runsummaryvalue" not in plan, plan

    config = selectors.run_filter_for_user(user=cast.bob, query="config.r=64")
    assert config.count() == 20
    assert "Bitmap Index Scan on run_method_config_gin" in config.explain()


# ---- the page and its live cells ---------------------------------------------------------------


@pytest.mark.django_db
def test_the_page_filters_sorts_and_shows_the_chosen_columns(client, cast, runs):
    client.force_login(cast.bob)
    page = client.get(reverse("runs"), {"q": "eval_loss<1.2", "sort": "-eval_loss"})
    body = page.content.decode()
    assert page.status_code == 200
    assert body.index("ia3 run") < body.index("lora r8") and "lora r16" not in body
    assert "umbrella" not in body
    # eval_loss is a column until bob picks others; its header sorts and says how
    assert 'aria-sort="descending"' in body and "sort=eval_loss" in body
    assert '<span title="0.9">0.9</span>' in body

    back = "q=eval_loss%3C1.2&sort=-eval_loss"
    answer = client.post(
        reverse("runs_columns"),
        {"columns": ["eval_exact_match", "eval_loss"], "add": "train_loss", "back": back},
    )
    assert answer.status_code == 302 and answer.url == f"{reverse('runs')}?{back}"
    assert selectors.run_list_columns_for_user(user=cast.bob) == [
        "eval_exact_match",
        "eval_loss",
        "train_loss",
    ]
    assert selectors.run_list_columns_for_user(user=cast.alice) == ["eval_loss"]
    body = client.get(reverse("runs")).content.decode()
    assert '<span title="0.55">0.55</span>' in body  # lora r16's eval_exact_match
    assert 'value="eval_exact_match" checked' in body


@pytest.mark.django_db
def test_a_bad_query_is_a_400_that_keeps_the_text_and_says_why(client, cast, runs):
    client.force_login(cast.bob)
    page = client.get(reverse("runs"), {"q": "eval_loss<abc lora"})
    body = page.content.decode()
    assert page.status_code == 400
    assert "eval_loss: abc is not a number." in body
    assert 'value="eval_loss&lt;abc lora"' in body
    assert "lora r8" not in body


@pytest.mark.django_db
def test_compare_all_matching_takes_the_query_and_says_when_it_cannot(client, cast, runs):
    client.force_login(cast.bob)
    page = client.get(reverse("compare"), {"q": "eval_loss<1.2", "sort": "eval_loss"})
    assert [run.name for run in page.context["runs"]] == ["lora r8", "ia3 run"]
    page = client.get(reverse("compare"), {"q": "eval_loss<"}, follow=True)
    assert page.context["runs"] == []
    assert "No runs compared: “eval_loss&lt;” is not a term" in page.content.decode()


@pytest.mark.django_db
def test_a_bad_column_is_refused_and_nothing_changes(client, cast):
    client.force_login(cast.bob)
    answer = client.post(reverse("runs_columns"), {"add": "no such key!"}, follow=True)
    assert "is not a metric key" in answer.content.decode()
    assert selectors.run_list_columns_for_user(user=cast.bob) == ["eval_loss"]
    too_many = {"columns": [f"k{i}" for i in range(services.MAX_RUN_LIST_COLUMNS + 1)]}
    client.post(reverse("runs_columns"), too_many)
    assert selectors.run_list_columns_for_user(user=cast.bob) == ["eval_loss"]


@pytest.mark.django_db
def test_the_live_fragment_follows_active_runs_and_stops_when_none_is(client, cast, make_run):
    running = make_run(name="moving", status=RunStatus.QUEUED)
    done = make_run(name="done", status=RunStatus.SUCCEEDED, summary={"eval_loss": 0.5})
    theirs = make_run(project=cast.umbrella_project, status=RunStatus.RUNNING)
    client.force_login(cast.bob)
    page = client.get(reverse("runs")).content.decode()
    assert f'hx-get="{reverse("runs_live")}?ids={running.id}"' in page  # only the active one

    url = f"{reverse('runs_live')}?ids={running.id},{done.id},{theirs.id}"
    fragment = client.get(url)
    assert fragment.status_code == 200
    assert f'id="run-{running.id}-status" hx-swap-oob="true"' in fragment.content.decode()
    assert f"run-{theirs.id}-" not in fragment.content.decode()

    Run.objects.filter(id=running.id).update(
        status=RunStatus.SUCCEEDED, step=5, summary={"eval_loss": 0.25}
    )
    fragment = client.get(url)
    body = fragment.content.decode()
    assert fragment.status_code == 286  # nothing left moving: htmx stops polling
    assert "Succeeded" in body and "5/5" in body
    assert f'<span id="run-{running.id}-m0" hx-swap-oob="true"><span title="0.25">' in body
    assert "hx-get" not in body


# ---- the migration ------------------------------------------------------------------------

BEFORE_SEARCH = ("experiments", "0018_artifact_file_kind")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("leaves_every_app_migrated")
def test_migration_0019_backfills_the_summaries_already_stored_and_goes_back(make_run):
    from django.db.migrations.executor import MigrationExecutor

    first = make_run(summary={"eval_loss": 0.5})
    executor = MigrationExecutor(connection)
    executor.migrate([BEFORE_SEARCH])  # the table and the triggers go
    Run.objects.filter(id=first.id).update(summary={"eval_loss": 0.25, "note": "x"})
    second = make_run(summary={"eval_exact_match": 0.75, "ok": True})

    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    assert _indexed(first) == {"eval_loss": 0.25}
    assert _indexed(second) == {"eval_exact_match": 0.75}
    Run.objects.filter(id=second.id).update(summary={"eval_exact_match": 0.5})
    assert _indexed(second) == {"eval_exact_match": 0.5}  # the trigger is back
