"""Small request and error helpers shared by the page, account and API views."""

import ipaddress

from django.conf import settings


def client_ip(request) -> str | None:
    """The client's address, as the audit log records it and login throttling counts it.

    Behind our proxy the peer is the proxy: the client is the last X-Forwarded-For entry, the
    one the proxy itself wrote (entries before it are whatever the client sent). A value that
    is no address falls back to the peer: it is stored in inet columns.
    """
    if settings.BEHIND_PROXY:
        forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            pass
    return request.META.get("REMOTE_ADDR") or None


def error_text(exc: Exception) -> str:
    """A ValidationError's messages (or any exception's text) as one sentence to show."""
    return " ".join(getattr(exc, "messages", None) or [str(exc)])


def int_or_none(value: str) -> int | None:
    """A query or form value as a non-negative int, or None when it is not one."""
    return int(value) if value.isdigit() else None
