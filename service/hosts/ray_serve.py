"""Ray Serve: the same FastAPI app on every replica of a Ray cluster, one replica per GPU.

``app_builder`` is the application builder that ``serve run``, ``serve deploy`` and KubeRay import
(``import_path: service.hosts.ray_serve:app_builder``). Its ``args`` shape the deployment on Ray (GPUs
and CPUs per replica, replica counts, autoscaling); the server itself is configured as everywhere
else, by the SD_* variables (put them in the application's ``runtime_env``), optionally overridden
by ``args["settings"]``.

Each replica builds its own app with ``create_app``: its own engine, step loop, queue, metrics and
limits, so requests are batched per replica exactly as on a single machine. The app's start-up
(model load and warm-up) runs inside the replica, and Serve counts a replica as started only
once it is ready, so the router never sends a request to a replica that would answer 503.
Every response carries ``x-serve-replica``, the id of the replica that answered.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import MutableHeaders

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-serve-replica"
REQUEST_ID_HEADER = "x-request-id"


class ServeArgs(BaseModel):
    """The ``args`` of the Serve application (serve-config.yaml); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="sd-endpoint", description="The deployment's name.")
    num_gpus: float | None = Field(
        default=None, ge=0, description="GPUs per replica; unset: 1 when the cluster has GPUs, else 0."
    )
    num_cpus: float = Field(default=1, ge=0, description="CPUs per replica (fractions allowed).")
    num_replicas: int | None = Field(default=None, ge=1, description="A fixed count; unset: autoscale.")
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(
        default=8, gt=0, description="Requests per replica the autoscaler aims at (= SD_MAX_BATCH_SIZE)."
    )
    max_ongoing_requests: int = Field(
        default=16,
        ge=1,
        description="Requests a replica holds at once; more wait in Serve for whichever replica frees first.",
    )
    max_queued_requests: int = Field(
        default=-1, ge=-1, description="Requests Serve holds for busy replicas before a 503; -1: no limit."
    )
    graceful_shutdown_timeout_s: float = Field(
        default=90,
        ge=0,
        description="Time a stopping replica has to finish its requests (SD_DRAIN_TIMEOUT_S).",
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Server settings by field name (model, max_batch_size, ...)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeArgs:
        from service.settings import Settings

        unknown = sorted(set(self.settings) - set(Settings.model_fields))
        if unknown:
            raise ValueError(
                f"unknown server setting(s) {', '.join(unknown)} in args.settings; "
                f"use Settings field names such as model, max_batch_size, max_queue_items"
            )
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        if self.num_replicas is None and self.max_ongoing_requests < self.target_ongoing_requests:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) is below target_ongoing_requests "
                f"({self.target_ongoing_requests}): replicas could never reach the autoscaling target"
            )
        return self


def app_builder(args: Mapping[str, Any]) -> Application:
    """The Serve application: one deployment whose replicas each serve ``create_app()``."""
    from ray import serve

    # 1. The arguments, checked here so that a typo fails the deploy instead of a replica.
    try:
        options = ServeArgs.model_validate(dict(args))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in error.errors())
        raise ValueError(f"bad args for {__name__}:app_builder: {problems}") from error
    # 2. The app factory runs in each replica, after the class below has been constructed there.
    overrides = dict(options.settings)

    def build_app() -> FastAPI:
        return replica_app(overrides)

    deployment = serve.deployment(**deployment_options(options))(serve.ingress(build_app)(SdEndpoint))
    return deployment.bind()


def deployment_options(options: ServeArgs) -> dict[str, Any]:
    """The keyword arguments of ``serve.deployment`` for ``options``."""
    actor_options = {"num_cpus": options.num_cpus, "num_gpus": _gpus_per_replica(options)}
    deployment: dict[str, Any] = {
        "name": options.name,
        "ray_actor_options": actor_options,
        "max_ongoing_requests": options.max_ongoing_requests,
        "max_queued_requests": options.max_queued_requests,
        "graceful_shutdown_timeout_s": options.graceful_shutdown_timeout_s,
    }
    if options.num_replicas is not None:
        deployment["num_replicas"] = options.num_replicas
    else:
        deployment["autoscaling_config"] = {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "initial_replicas": options.initial_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
        }
    return deployment


class SdEndpoint:
    """One replica. The FastAPI app (``replica_app``) does the work; Serve asks this class for health."""

    app: FastAPI  # set by Serve's ingress wrapper

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises."""
        from service.runtime.lifecycle import Phase

        lifecycle = self.app.state.lifecycle
        if lifecycle.phase is Phase.FAILED:
            raise RuntimeError(lifecycle.failure)


def replica_app(overrides: Mapping[str, Any]) -> FastAPI:
    """The app of one replica: settings from SD_* and ``overrides``, start-up awaited by Serve."""
    from ray import serve

    from service.logs import configure_logging
    from service.settings import load_settings
    from service.web.app import create_app
    from service.web.guards import ResponseHeadersMiddleware

    # Serve's proxy, not SD_HOST, is what listens; the Host it forwards is the clients': any, unless
    # SD_ALLOWED_HOSTS (or args.settings) lists the names.
    settings = load_settings(**overrides)
    if settings.allowed_hosts is None:
        settings = settings.model_copy(update={"allowed_hosts": "*"})
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    app.router.lifespan_context = _until_ready(app.router.lifespan_context)
    replica = serve.get_replica_context().replica_tag
    app.add_middleware(ResponseHeadersMiddleware, edit=functools.partial(_mark_replica, replica=replica))
    return app


def _until_ready(
    lifespan: Callable[[Any], AbstractAsyncContextManager[Any]],
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    """The app's lifespan, whose start-up returns only once the model is loaded and warmed up.

    Serve runs the start-up while it starts the replica, so a replica takes requests only when
    ready. A model that cannot load fails the replica's start (the reason is in the replica's log),
    and Serve tries a new replica, then marks the deployment failed.
    """
    from service.runtime.lifecycle import Phase

    @asynccontextmanager
    async def lifespan_until_ready(app: Any) -> AsyncIterator[Any]:
        async with lifespan(app) as state:
            lifecycle = app.state.lifecycle
            # Ends READY or FAILED; should the start-up die of anything else, the error propagates
            # and fails the replica rather than leaving it waiting.
            await lifecycle.wait_started()
            if lifecycle.phase is not Phase.READY:
                raise RuntimeError(f"replica start-up failed: {lifecycle.failure or lifecycle.phase.value}")
            yield state

    return lifespan_until_ready


def _mark_replica(headers: MutableHeaders, replica: str) -> None:
    """Adds ``x-serve-replica: <replica id>`` to a response (which replica answered).

    It also takes out the app's ``x-request-id``: Serve's proxy passes the request's id to the
    replica (making one when the client sent none) and adds that same id to the response itself,
    so the app's echo would send the header twice.
    """
    del headers[REQUEST_ID_HEADER]
    headers.append(REPLICA_HEADER, replica)


def _gpus_per_replica(options: ServeArgs) -> float:
    """``num_gpus`` when given, else 1 on a cluster with GPUs (one replica per GPU) and 0 without."""
    if options.num_gpus is not None:
        return options.num_gpus
    import ray

    if not ray.is_initialized():
        log.warning("not connected to Ray: replicas get no GPU; set num_gpus in the args to choose")
        return 0
    gpus = ray.cluster_resources().get("GPU", 0)
    return 1 if gpus > 0 else 0
