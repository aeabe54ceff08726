"""The engine of a batch job: the one loader (service/runtime/engines.py), with the job's
parameters checked against the model before any row runs. A job draws with one model: SD_MODEL
(``--model``), which may name a model of the library (SD_MODELS) as requests do.

Used by `sd-endpoint batch`, each actor of a Ray job and the Azure ML batch entry script.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from service.batch.errors import BatchConfigError

if TYPE_CHECKING:
    from service.batch.params import JobParams
    from service.runtime.engines import ServingEngine
    from service.settings import Settings

log = logging.getLogger(__name__)


def load_job_engine(settings: Settings, params: JobParams) -> ServingEngine:
    """Load the model and check ``params`` against it; BatchConfigError (exit 2) when either fails."""
    import torch

    from model.errors import InvalidRequestError, ModelLoadError
    from service.runtime.engines import (
        available_cores,
        cpu_threads_per_engine,
        load_serving_engine,
        settings_device,
        use_cpu_threads,
    )

    # 1. This thread's torch CPU threads (the job steps its engine here), by the server's policy.
    device = settings_device(settings)
    kind = device or ("cuda" if torch.cuda.is_available() else None)
    threads = cpu_threads_per_engine(settings, [kind], available_cores())[0]
    if threads is not None:
        use_cpu_threads(threads)
    # 2. The model (a library's, by its name), then the parameters against it.
    named = settings.model_spec
    settings = job_settings(settings)
    try:
        engine = load_serving_engine(settings, device)
    except ModelLoadError as error:
        raise BatchConfigError(f"cannot load the model {named}: {error}") from error
    if not engine.info.safety_checker:
        log.warning(
            "model %s has NO SAFETY CHECKER: its images are written unchecked (nsfw_content_detected "
            "is empty); set SD_SAFETY_CHECKER to a folder with safety_checker/ and feature_extractor/ "
            "to check them",
            engine.info.name,
        )
    try:
        engine.validate([params.item("parameter check", "", 0, engine.info)])
    except InvalidRequestError as error:
        problem = BatchConfigError(f"the parameters do not suit {engine.info.name}: {error}")
        engine.close()
        raise problem from error
    return engine


def job_settings(settings: Settings) -> Settings:
    """The settings of the job's one model: where SD_MODEL (``--model``) is the name of a library
    model (SD_MODELS), that model's spec, config and variant; else SD_MODEL as a spec, as without a
    library. The library's other models are not loaded (a job draws with one)."""
    if not settings.models:
        return settings
    from service.runtime.library import library_of, with_default

    settings = with_default(settings)  # no SD_MODEL: the library's first model

    # No default's name to leave out: every library model is a candidate.
    entry = library_of(settings, default="").entries.get(settings.model_spec)
    if entry is None:
        return settings.model_copy(update={"models": None})
    log.info("model %s of the library: %s", entry.name, entry.spec)
    return settings.model_copy(
        update={
            "model": entry.spec,
            "model_config_dir": entry.config,
            "model_variant": entry.variant,
            "models": None,
        }
    )
