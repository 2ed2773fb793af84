"""/api/v1/ (filled in by the API module)."""

urlpatterns: list = []
