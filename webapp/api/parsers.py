"""Request bodies that cannot turn into a 500: oversized ones are refused from their
Content-Length before anything reads them (413), JSON nested past Python's recursion limit is
a 400."""

from django.conf import settings
from rest_framework import status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.parsers import JSONParser


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "too_large"


def refuse_oversized_body(request, *, limit: int | None = None, message: str = "") -> None:
    """PayloadTooLarge when the declared body is over `limit` (DATA_UPLOAD_MAX_MEMORY_SIZE).

    Call it before request.data: DRF reads a JSON body whole, and Django's own check of that
    read answers an opaque 400 page. Django reads no more than Content-Length, so the declared
    length bounds what any later read can take.
    """
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE if limit is None else limit
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0  # Django then reads no body at all
    if length > limit:
        raise PayloadTooLarge(message or f"The body is larger than {limit:,} bytes.")


class DepthSafeJSONParser(JSONParser):
    """json's decoder recurses: a body nested deep enough raises RecursionError, which DRF
    would answer with a 500."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply.") from None
