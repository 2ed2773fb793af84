"""Small request and error helpers shared by the page, account and API views."""


def client_ip(request) -> str | None:
    """The peer address as the audit log records it (the proxy in front sets REMOTE_ADDR)."""
    return request.META.get("REMOTE_ADDR") or None


def error_text(exc: Exception) -> str:
    """A ValidationError's messages (or any exception's text) as one sentence to show."""
    return " ".join(getattr(exc, "messages", None) or [str(exc)])


def int_or_none(value: str) -> int | None:
    """A query or form value as a non-negative int, or None when it is not one."""
    return int(value) if value.isdigit() else None
