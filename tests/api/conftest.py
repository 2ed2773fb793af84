"""API clients of the cast: `api(user)` is a DRF APIClient holding a fresh personal token."""

import pytest
from rest_framework.test import APIClient

from webapp.accounts.services import api_token_create


@pytest.fixture
def api(cast):
    def client_for(user) -> APIClient:
        _, plain = api_token_create(user=user, name="t")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
        return client

    return client_for
