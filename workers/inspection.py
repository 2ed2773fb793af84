"""A registered model's inspection: fetch it where the Hub is reachable, check its files,
build it on the meta device and record what the model page shows (peft_core.pretrained).

Idempotent: the row is claimed by its attempt number, and only that attempt's outcome is
written. A model transformers cannot build, one that needs its own code, one with pickle
weights only, is refused with the reason.
"""

import logging

from peft_core.pretrained import inspect_directory
from peft_core.sources import ModelSourceError, hub_commit
from webapp.registry import services
from webapp.registry.models import ModelSource
from workers.models import weights_directory

logger = logging.getLogger(__name__)


def inspect_registered_model(model_id: int) -> str:
    model = services.model_inspection_claim(model_id=model_id)
    if model is None:
        return "not waiting for inspection"
    try:
        directory = weights_directory(
            {**model.weights(), "content_sha256": ""}, download=model.source == ModelSource.HUB
        )
        facts = inspect_directory(directory)
    except ModelSourceError as error:
        services.model_inspection_refuse(model=model, error=str(error))
        return "refused"
    except Exception as error:  # a config transformers' own code chokes on
        logger.exception("inspecting model %s failed", model_id)
        services.model_inspection_refuse(
            model=model, error=f"transformers could not build this model: {error}"
        )
        return "refused"
    commit = hub_commit(directory) if model.source == ModelSource.HUB else ""
    services.model_inspection_finish(
        model=model, facts=facts, commit=commit, content_sha256=facts["content_sha256"]
    )
    return "ready"
