"""Writes about people: the audit log and API tokens (team management builds on these)."""

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from webapp.accounts.models import ApiToken, AuditEvent, Team
from webapp.accounts.secrets import secret_digest, secret_new

API_TOKEN_PREFIX = "plt"


def audit_record(
    *,
    actor,
    action: str,
    team: Team | None = None,
    target: str = "",
    detail: dict | None = None,
    ip: str | None = None,
) -> AuditEvent:
    return AuditEvent.objects.create(
        team=team,
        actor=actor if getattr(actor, "is_authenticated", False) else None,
        action=action,
        target=str(target)[:200],
        detail=detail or {},
        ip=ip or None,
    )


def api_token_create(*, user, name: str, ip: str | None = None) -> tuple[ApiToken, str]:
    """A new token and its secret, which is shown this once and never stored."""
    plain, digest = secret_new(API_TOKEN_PREFIX)
    token = ApiToken.objects.create(
        user=user, name=name.strip()[:100] or "token", prefix=plain[:12], digest=digest
    )
    audit_record(actor=user, action="api_token.create", target=str(token), ip=ip)
    return token, plain


def api_token_revoke(*, user, token: ApiToken, ip: str | None = None) -> None:
    """Revoke one of the user's own tokens (a token of someone else is the caller's 404)."""
    if token.user_id != user.id:
        raise ApiToken.DoesNotExist
    if token.revoked_at is None:
        ApiToken.objects.filter(id=token.id).update(revoked_at=timezone.now())
        audit_record(actor=user, action="api_token.revoke", target=str(token), ip=ip)


def api_token_authenticate(*, plain: str) -> ApiToken | None:
    """The live token with this secret (its user loaded), or None; notes when it was used."""
    if not plain.startswith(f"{API_TOKEN_PREFIX}_") or len(plain) > 100:
        return None
    token = (
        ApiToken.objects.select_related("user")
        .filter(digest=secret_digest(plain), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    if token is None:
        return None
    now = timezone.now()
    stale = now - timedelta(seconds=settings.API_TOKEN_TOUCH_SECONDS)
    if token.last_used_at is None or token.last_used_at < stale:
        ApiToken.objects.filter(id=token.id).update(last_used_at=now)
        token.last_used_at = now
    return token
