"""Team, membership, invitation, API-token and audit-log pages (filled in by the teams module)."""

urlpatterns: list = []
