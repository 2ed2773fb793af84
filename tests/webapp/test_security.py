"""Deployment security: check --deploy is clean with the production environment, every page
carries the security headers and a CSP without inline scripts, and logins are rate limited
(the login page and the API's token endpoint alike)."""

import os
import re
import secrets
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from webapp.accounts.models import AuditEvent
from webapp.accounts.services import api_token_create

ROOT = Path(__file__).resolve().parents[2]
LIMIT = settings.AXES_FAILURE_LIMIT


# ---- manage.py check --deploy ----------------------------------------------------------------


def _deploy_check(tmp_path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PEFTLAB_"))}
    environ |= {"PEFTLAB_VAR_DIR": str(tmp_path), "DJANGO_DEBUG": "0", **env}
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_deploy_check_is_clean_with_the_production_environment(tmp_path):
    result = _deploy_check(
        tmp_path,
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="peftlab.example.com",
        DJANGO_CSRF_TRUSTED_ORIGINS="https://peftlab.example.com",
        PEFTLAB_HTTPS="1",
    )
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_deploy_check_fails_without_https(tmp_path):
    result = _deploy_check(tmp_path, DJANGO_SECRET_KEY=secrets.token_urlsafe(50), PEFTLAB_HTTPS="0")
    assert result.returncode != 0
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in result.stderr


# ---- headers and the policy ------------------------------------------------------------------


def _policy(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    return {name: values for name, *values in (part.split() for part in header.split(";"))}


@pytest.mark.django_db
def test_pages_carry_the_security_headers(client):
    response = client.get(reverse("login"))
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"
    assert response["Referrer-Policy"] == "same-origin"
    policy = _policy(response)
    assert policy["default-src"] == policy["script-src"] == ["'self'"]
    assert policy["object-src"] == policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == policy["form-action"] == ["'self'"]


@pytest.mark.django_db
def test_https_redirects_every_page_but_the_health_check(client, settings):
    settings.SECURE_SSL_REDIRECT = True
    response = client.get(reverse("login"))
    assert response.status_code == 301 and response["Location"].startswith("https://")
    assert client.get(reverse("health")).status_code == 200


def test_only_the_compare_page_allows_eval(client, cast, make_run):
    run = make_run()
    client.force_login(cast.alice)
    run_page = _policy(client.get(reverse("run_detail", args=[run.id])))
    compare = _policy(client.get(reverse("compare") + f"?runs={run.id}"))
    assert run_page["script-src"] == ["'self'"]
    assert compare["script-src"] == ["'self'", "'unsafe-eval'"]


INLINE = [
    re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I),  # an inline script
    re.compile(r"\son[a-z]+\s*=", re.I),  # onclick=, onsubmit=, …
    re.compile(r"hx-on|javascript:", re.I),
]


def test_templates_hold_no_inline_script_or_handler():
    found = [
        f"{path.relative_to(ROOT)}: {match.group(0)}"
        for path in (ROOT / "templates").rglob("*.html")
        for pattern in INLINE
        for match in pattern.finditer(path.read_text())
    ]
    assert found == []


# ---- login rate limiting ---------------------------------------------------------------------


def _page_login(client, username: str, password: str):
    return client.post(reverse("login"), {"username": username, "password": password})


def _api_login(username: str, password: str, ip: str = "127.0.0.1"):
    body = {"username": username, "password": password, "name": "t"}
    return APIClient().post(reverse("api-auth-token"), body, format="json", REMOTE_ADDR=ip)


def _cool_off_passes():
    earlier = settings.AXES_COOLOFF_TIME + timedelta(seconds=1)
    for attempt in AccessAttempt.objects.all():
        attempt.attempt_time -= earlier
        attempt.save(update_fields=["attempt_time"])


def test_the_login_page_locks_a_username_and_address_after_failures(client, cast):
    for _ in range(LIMIT - 1):
        assert _page_login(client, "bob", "guess").status_code == 200
    locked = _page_login(client, "bob", "guess")
    assert locked.status_code == 429
    assert "Too many failed logins" in locked.text and int(locked["Retry-After"]) > 0
    # Even the right password is refused now, and that refusal is audited too.
    assert _page_login(client, "bob", "bob-pw-9").status_code == 429
    assert AuditEvent.objects.filter(action="login.failed", target="bob").count() == LIMIT + 1
    # Another user from the same address, and the same user from elsewhere, are unaffected.
    assert _page_login(Client(), "carol", "carol-pw-9").status_code == 302
    elsewhere = Client(REMOTE_ADDR="10.0.0.2")
    assert _page_login(elsewhere, "bob", "bob-pw-9").status_code == 302

    _cool_off_passes()
    assert _page_login(client, "bob", "bob-pw-9").status_code == 302


def test_a_successful_login_resets_the_count(client, cast):
    for _ in range(LIMIT - 1):
        _page_login(client, "bob", "guess")
    assert _page_login(client, "bob", "bob-pw-9").status_code == 302
    for _ in range(LIMIT - 1):
        assert _page_login(Client(), "bob", "guess").status_code == 200


def test_the_token_endpoint_answers_429_in_json(cast):
    for _ in range(LIMIT - 1):
        assert _api_login("bob", "guess").status_code == 400
    locked = _api_login("bob", "guess")
    assert locked.status_code == 429
    assert locked.json()["detail"].startswith("Too many failed logins")
    assert int(locked["Retry-After"]) > 0
    assert _api_login("bob", "bob-pw-9").status_code == 429
    assert _api_login("carol", "carol-pw-9").status_code == 201
    assert _api_login("bob", "bob-pw-9", ip="10.0.0.2").status_code == 201

    _cool_off_passes()
    assert _api_login("bob", "bob-pw-9").status_code == 201


def test_failures_on_the_page_and_the_api_add_up(client, cast):
    for _ in range(LIMIT - 1):
        _api_login("bob", "guess")
    assert _page_login(client, "bob", "guess").status_code == 429


ADDRESS_LIMIT = settings.LOGIN_ADDRESS_FAILURE_LIMIT


def test_a_password_spray_from_one_address_is_locked_out(client, cast):
    # 23 usernames × 1 password: no username fails twice, the address fails 23 times.
    assert ADDRESS_LIMIT <= 20
    codes = [_page_login(client, f"user{n}", "Summer2026!").status_code for n in range(23)]
    assert codes == [200] * (ADDRESS_LIMIT - 1) + [429] * (23 - ADDRESS_LIMIT + 1)
    assert _api_login("alice", "alice-pw-9").status_code == 429  # the right password too
    # Another address is unaffected, on the page and on the API.
    assert _page_login(Client(REMOTE_ADDR="10.0.0.2"), "alice", "alice-pw-9").status_code == 302
    assert _api_login("bob", "bob-pw-9", ip="10.0.0.2").status_code == 201

    _cool_off_passes()
    assert _page_login(client, "alice", "alice-pw-9").status_code == 302


def test_behind_the_proxy_the_forwarded_address_is_counted(cast, settings):
    # Every request comes from the proxy's address; the client is in X-Forwarded-For.
    settings.BEHIND_PROXY = True
    proxy = {"REMOTE_ADDR": "172.18.0.5"}
    sprayer = Client(**proxy, HTTP_X_FORWARDED_FOR="198.51.100.7")
    for n in range(ADDRESS_LIMIT):
        _page_login(sprayer, f"user{n}", "Summer2026!")
    assert _page_login(sprayer, "alice", "alice-pw-9").status_code == 429
    # A forged entry before the proxy's own does not change the address counted.
    forged = Client(**proxy, HTTP_X_FORWARDED_FOR="203.0.113.9, 198.51.100.7")
    assert _page_login(forged, "alice", "alice-pw-9").status_code == 429
    colleague = Client(**proxy, HTTP_X_FORWARDED_FOR="198.51.100.8")
    assert _page_login(colleague, "alice", "alice-pw-9").status_code == 302
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {"198.51.100.7"}


def _bearer_get(token: str, ip: str = "127.0.0.1"):
    return APIClient().get(reverse("api-me"), HTTP_AUTHORIZATION=f"Bearer {token}", REMOTE_ADDR=ip)


def test_refused_bearer_tokens_are_throttled_per_address(cast):
    _, plain = api_token_create(user=cast.bob, name="t")
    assert _bearer_get(plain).status_code == 200
    for _ in range(LIMIT - 1):
        assert _bearer_get(secrets.token_urlsafe(32)).status_code == 401
    locked = _bearer_get(secrets.token_urlsafe(32))
    assert locked.status_code == 429
    assert locked.json()["detail"].startswith("Too many refused tokens from your address.")
    assert int(locked["Retry-After"]) == settings.AXES_COOLOFF_TIME.total_seconds()
    # A valid token from that address waits too; from another address it works.
    assert _bearer_get(plain).status_code == 429
    assert _bearer_get(plain, ip="10.0.0.2").status_code == 200
    # Token guesses do not lock any user's login, only add to the address's count.
    assert _api_login("bob", "bob-pw-9", ip="127.0.0.1").status_code == 201

    _cool_off_passes()
    assert _bearer_get(plain).status_code == 200
