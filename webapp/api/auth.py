"""`Authorization: Bearer <token>` with a personal API token (webapp.accounts.ApiToken).

Refused tokens are counted per client address (webapp.accounts.throttle): past the limit the
address is answered 429 with Retry-After before any token it sends is looked at.
"""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from rest_framework import authentication, exceptions

from webapp.accounts.services import api_token_authenticate
from webapp.accounts.throttle import bearer_failure_record, bearer_locked_out, cooloff_seconds

TOO_MANY_TOKENS = "Too many refused tokens from your address."


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None  # not ours: the session may authenticate the request
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Send `Authorization: Bearer <token>`.")
        if bearer_locked_out(request._request):
            raise self.locked_out()
        try:
            plain = header[1].decode("ascii")
        except UnicodeDecodeError:
            plain = None
        token = api_token_authenticate(plain=plain) if plain else None
        if token is None:
            if bearer_failure_record(request._request):
                raise self.locked_out()
            raise exceptions.AuthenticationFailed("The token is not valid or was revoked.")
        return token.user, token

    def locked_out(self) -> exceptions.Throttled:
        return exceptions.Throttled(wait=cooloff_seconds(), detail=TOO_MANY_TOKENS)

    def authenticate_header(self, request) -> str:
        # Makes DRF answer 401 (not 403) to a request without credentials.
        return self.keyword


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """Tells the OpenAPI schema (and Swagger UI's Authorize button) how the token is sent."""

    target_class = BearerTokenAuthentication
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix="Bearer"
        )
