"""Every URL pattern, asked with no credentials, refuses: 401/403 or a redirect to a login
page. The exceptions are this reviewed allowlist; each entry says why it may answer."""

import re

import pytest
from django.conf import settings
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

pytestmark = pytest.mark.django_db

# url name -> why an anonymous visitor may get an answer other than "log in first"
ALLOWLIST = {
    "login": "the login form itself",
    "logout": "ends a session; reveals nothing (GET is refused with 405)",
    "health": "liveness probe for load balancers; returns {'status': 'ok'} only",
    "admin:login": "the admin site's own login form",
    "admin:logout": "the admin site's logout; ends a session, reveals nothing",
    "share_view": "share link: the 256-bit secret in the URL is the credential",
    "share_live": "share link: the secret is the credential",
    "share_adapter": "share link: the secret is the credential",
    "share_metrics_csv": "share link: the secret is the credential",
    "share_metrics_parquet": "share link: the secret is the credential",
    "share_merged": "share link: the secret is the credential",
    "share_merged_status": "share link: the secret is the credential",
    "invitation_accept": "invitation link: the secret is the credential; signs a person up",
    "api-auth-token": "exchanges a username and password for an API token (a login)",
}
# Allowlisted routes with a secret in them must treat a made-up secret as unknown.
SECRET_ROUTES = {
    "share_view",
    "share_live",
    "share_adapter",
    "share_metrics_csv",
    "share_metrics_parquet",
    "share_merged",
    "share_merged_status",
    "invitation_accept",
}


def _walk(patterns, prefix="", namespace=""):
    for entry in patterns:
        if isinstance(entry, URLResolver):
            ns = f"{namespace}{entry.namespace}:" if entry.namespace else namespace
            yield from _walk(entry.url_patterns, prefix + str(entry.pattern), ns)
        elif isinstance(entry, URLPattern):
            name = f"{namespace}{entry.name}" if entry.name else ""
            yield name, prefix + str(entry.pattern)


def _sample(route: str, ids: dict[str, int]) -> str:
    """A concrete path: ids of real objects where the parameter names one, strings 'pls_x',
    the first alternative of a regex group."""
    path = re.sub(r"<int:(\w+)>", lambda m: str(ids.get(m.group(1), 1)), route)
    path = re.sub(r"<(?:str|slug|path|uuid):\w+>", "pls_x", path)
    path = re.sub(r"<\w+>", "pls_x", path)
    path = re.sub(r"\(\?P<\w+>([^)|]*)(?:\|[^)]*)?\)", lambda m: m.group(1) or "x", path)
    path = path.replace(".*", "x").replace("\\", "")
    return "/" + re.sub(r"[\^$?]", "", path)


def _all_routes() -> list[tuple[str, str]]:
    return sorted(set(_walk(get_resolver().url_patterns)))


def _refuses(response) -> bool:
    if response.status_code in (401, 403):
        return True
    if response.status_code == 302:
        location = response["Location"]
        return location.startswith((reverse("login"), settings.LOGIN_URL, reverse("admin:login")))
    return False


def test_every_route_is_walked():
    names = {name for name, _ in _all_routes()}
    # A sanity check that the walk reaches the app's pages, the API and the admin.
    for expected in ("runs", "run_detail", "run_estimate", "compare", "share_view", "admin:index"):
        assert expected in names
    assert any(route.startswith("api/v1/") for _, route in _all_routes())


def _objects(cast, make_run) -> dict[str, int]:
    """Real rows of every kind, so that each id in a walked URL names something that exists."""
    from webapp.accounts.models import ApiToken, Invitation
    from webapp.accounts.services import api_token_create
    from webapp.experiments import services
    from webapp.experiments.models import Artifact, PlaygroundPrompt, Sweep

    run = make_run(status="succeeded")
    sweep = Sweep.objects.create(
        project=cast.acme_project, name="s", base_model="tiny-llama", dataset=run.dataset
    )
    comment = services.comment_create(user=cast.bob, run=run, body="hi")
    link, _ = services.share_link_create(user=cast.bob, team=cast.acme, scope="run", run=run)
    artifact = Artifact.objects.create(run=run, name="adapter_config.json", size=0, sha256="0")
    token, _ = api_token_create(user=cast.alice, name="t")
    invitation = Invitation.objects.create(
        team=cast.acme, digest="0" * 64, expires_at=link.expires_at
    )
    prompt = PlaygroundPrompt.objects.create(
        team=cast.acme, base_model="tiny-llama", task="causal-lm", text="hi"
    )
    membership = cast.bob.memberships.get()
    ids = {"run_id": run.id, "sweep_id": sweep.id, "dataset_id": run.dataset_id}
    ids |= {"comment_id": comment.id, "link_id": link.id, "artifact_id": artifact.id}
    ids |= {"team_id": cast.acme.id, "project_id": cast.acme_project.id}
    ids |= {"token_id": token.id, "invitation_id": invitation.id}
    ids |= {"membership_id": membership.id, "pk": run.id, "id": run.id, "prompt_id": prompt.id}
    assert ApiToken.objects.exists()
    return ids


def test_anonymous_requests_are_refused(cast, make_run):
    ids = _objects(cast, make_run)
    client, failures, walked = Client(), [], 0
    for name, route in _all_routes():
        if name in ALLOWLIST:
            continue
        url = _sample(route, ids)
        for method in ("get", "post"):
            response = getattr(client, method)(url)
            walked += 1
            if not _refuses(response):
                failures.append(f"{method.upper()} {url} ({name}) → {response.status_code}")
    assert walked > 100
    assert not failures, "\n".join(failures)


def test_allowlisted_pages_answer_without_credentials(cast):
    client = Client()
    assert client.get(reverse("login")).status_code == 200
    assert client.get(reverse("health")).json() == {"status": "ok"}
    assert client.get(reverse("logout")).status_code == 405


@pytest.mark.parametrize("name", sorted(SECRET_ROUTES))
def test_allowlisted_secret_routes_treat_made_up_secrets_as_unknown(name, cast):
    url = reverse(name, args=["pls_" + "A" * 43])
    assert Client().get(url).status_code == 404


def test_allowlist_names_real_routes():
    names = {name for name, _ in _all_routes()}
    assert set(ALLOWLIST) <= names, set(ALLOWLIST) - names
