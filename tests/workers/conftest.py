import pytest


@pytest.fixture(autouse=True)
def _lease_thread_quiet(request, settings):
    """In-process runs live in a test's open transaction, which the lease thread (a
    connection of its own) cannot see: it would find the run gone and stop the training.
    Tests on committed rows (transaction=True) keep the real cadence."""
    marker = request.node.get_closest_marker("django_db")
    if not (marker and marker.kwargs.get("transaction")):
        settings.RUN_HEARTBEAT_EVERY_S = 3600
