"""Failed credentials counted per client address, on top of django-axes' per-username count.

django-axes locks a username at one address after AXES_FAILURE_LIMIT failures; a password
spray (one password over many usernames) never trips that. The handler below also locks the
whole address once its failures across usernames reach LOGIN_ADDRESS_FAILURE_LIMIT within the
cool-off. A refused bearer token is recorded as a failed login of BEARER_NAME, which no
username can be (Django's allow only letters, digits and @.+-_), so token guessing is limited
per address by the same counts, in the same table, seen by every web process.
"""

from axes.attempts import get_cool_off_threshold
from axes.handlers.database import AxesDatabaseHandler
from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_failure_limit
from axes.models import AccessAttempt
from django.conf import settings
from django.contrib.auth.signals import user_login_failed
from django.db.models import Sum

BEARER_NAME = "(bearer token)"
BEARER_CREDENTIALS = {"username": BEARER_NAME}


def cooloff_seconds() -> int:
    return int(settings.AXES_COOLOFF_TIME.total_seconds())


def address_failures(request) -> int:
    """Failures from the request's address within the cool-off, whatever the username."""
    attempts = AccessAttempt.objects.filter(
        ip_address=request.axes_ip_address,
        attempt_time__gte=get_cool_off_threshold(request),
    )
    return attempts.aggregate(n=Sum("failures_since_start"))["n"] or 0


class PairAndAddressHandler(AxesDatabaseHandler):
    """axes' database handler; an address over its own limit counts as a pair at the limit."""

    def get_failures(self, request, credentials: dict | None = None) -> int:
        pair = super().get_failures(request, credentials)
        if address_failures(request) >= settings.LOGIN_ADDRESS_FAILURE_LIMIT:
            return max(pair, get_failure_limit(request, credentials))
        return pair


def bearer_locked_out(request) -> bool:
    """Whether the request's address may not try a bearer token now (`request`: Django's)."""
    return AxesProxyHandler.is_locked(request, BEARER_CREDENTIALS)


def bearer_failure_record(request) -> bool:
    """Counts a refused bearer token against the request's address (`request`: Django's);
    True when that failure locked the address out.

    axes marks the request it locked; the mark is taken off so that its middleware leaves
    the API's JSON answer alone instead of rendering the login page.
    """
    user_login_failed.send(__name__, credentials=BEARER_CREDENTIALS, request=request)
    locked = getattr(request, "axes_locked_out", False)
    request.axes_locked_out = False
    return locked
