"""Turn what services and forms raise into DRF answers: 403, 400/409 and 429 with a readable
text.

Services raise Django's PermissionDenied and ValidationError; selectors raise Http404, which
DRF already answers with 404.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from django import forms
from django.core.exceptions import NON_FIELD_ERRORS
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, status

from webapp.experiments.quotas import QuotaExceeded
from webapp.http import error_text


class OverQuota(exceptions.APIException):
    status_code = status.HTTP_429_TOO_MANY_REQUESTS
    default_detail = "Over a quota."
    default_code = "over_quota"


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object is not in a state that allows this."
    default_code = "conflict"


@contextmanager
def service_errors(*, conflict: bool = False) -> Iterator[None]:
    """PermissionDenied → 403 {"detail"}; ValidationError → 400 {"detail"}, or 409 if `conflict`;
    a launch over a quota → 429 {"detail"} naming the limit."""
    try:
        yield
    except QuotaExceeded as exc:
        raise OverQuota(str(exc)) from None
    except DjangoPermissionDenied as exc:
        raise exceptions.PermissionDenied(error_text(exc)) from None
    except DjangoValidationError as exc:
        if conflict:
            raise Conflict(error_text(exc)) from None
        raise exceptions.ValidationError({"detail": error_text(exc)}) from None


def form_errors(form: forms.Form) -> dict[str, list[str]]:
    """A bound form's errors as DRF writes them: {"field": ["message"]}."""
    return {
        "non_field_errors" if field == NON_FIELD_ERRORS else field: list(messages)
        for field, messages in form.errors.items()
    }
