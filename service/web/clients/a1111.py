"""AUTOMATIC1111's web UI API, so that Open WebUI, SillyTavern, the Krita and GIMP plugins and
``webuiapi`` scripts work by pointing them at this server: ``POST /sdapi/v1/txt2img``, the GETs
their handshakes read (options, samplers, schedulers, upscalers, loras; sd-models and the lists of
what this server has none of are in a1111_lists.py), and
following and stopping generations (progress, interrupt, skip).

The checkpoint: ``override_settings.sd_model_checkpoint`` picks one request's model;
``POST /sdapi/v1/options`` with ``sd_model_checkpoint`` sets the caller's own default for these
routes (A1111 switches its one model for everyone; here each caller, by its API key, has its own
choice, which no other caller sees or changes), and ``GET /sdapi/v1/options`` shows it.

Generation goes through ``answer_generation``, /score's path (limits, keys, request ids, metrics,
deadline, disconnects). On a shared server, progress, interrupt and skip act on the caller's own
txt2img requests only (the caller is its API key; on a server without keys, everyone is one
caller, as on A1111 itself). Errors on /sdapi/* carry A1111's ``detail`` (service/web/errors.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic_core import PydanticCustomError

from model.types import ModelInfo
from schemas.a1111 import NEUTRAL_OPTIONS, SAMPLE_TXT2IMG, Txt2ImgRequest, check_checkpoint
from schemas.a1111_img2img import SAMPLE_IMG2IMG, Img2ImgRequest
from schemas.samplers import SAMPLERS, SCHEDULE_SEPARATOR, SCHEDULES, scheduler_for
from service.runtime.images import encode_png_base64
from service.runtime.jobs import Job
from service.runtime.lifecycle import Runtime
from service.runtime.protocols import FieldError, ask_of
from service.runtime.protocols.a1111 import a1111_info, answer, checkpoint_name
from service.runtime.scoring import parse_body_off_loop, parse_document_off_loop
from service.web.clients.a1111_images import finished, prepared_ask
from service.web.clients.a1111_lists import checkpoints_of
from service.web.clients.common import CallerChoices, app_state, caller, jobs_of, lifecycle_of
from service.web.errors import error_responses, json_body
from service.web.routes import answer_generation

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])
CLIENT = "a1111"
_ERRORS = error_responses(
    {
        400: "The body is not JSON.",
        422: "A field this server cannot honour at its value (the detail names it), or off the contract.",
    }
)


def _chosen(request: Request) -> CallerChoices[str]:
    """Each caller's checkpoint (POST /sdapi/v1/options), by its canonical model name."""
    return app_state(request, "a1111_chosen", CallerChoices)


# ----------------------------------------------------------------------------- generation


async def _generate(
    runtime: Runtime, body: bytes, job: Job, request: Request, model: type[Txt2ImgRequest]
) -> dict[str, Any]:
    """txt2img and img2img: A1111's body -> its answer, through /score's generation path."""
    # 1. Parse with /score's rules and limits; the checkpoint is the request's, else the caller's.
    what = "an img2img object" if model is Img2ImgRequest else "a txt2img object"
    parsed = await parse_body_off_loop(body, model, runtime.scorer.limits, expected=what)
    info = runtime.engine.info
    ask, prepared = ask_of(parsed, info), None
    if ask.model is None:  # none in override_settings: the caller's checkpoint (None: the default)
        ask = dataclasses.replace(ask, model=_chosen(request).get(caller(request)))
    if isinstance(parsed, Img2ImgRequest):  # the image fitted, the mask made, as A1111 does
        ask, prepared = await prepared_ask(ask, parsed, runtime.scorer.image_urls)
    items = await runtime.scorer.items_for(ask)
    parsed.width, parsed.height = items[0].width, items[0].height  # as drawn, in the answer
    # 2. The shared path; an interrupted request answers with the images it has.
    results, images = await runtime.scorer.generate(items, prompts=1, job=job)
    if prepared is not None:  # pasted back into the whole image, the kept pixels laid over
        images = await finished(results, images, prepared)
    seeds = [result.seed for result in results]
    echoed = parsed.model_dump(include=set(model.model_fields) - {"init_images", "mask"})
    echoed["seed"] = seeds[0] if seeds else items[0].seed
    shown = checkpoints_of(request).of(lifecycle_of(request), items[0].model).name
    details = a1111_info(parsed, seeds, shown, [result.nsfw_content_detected for result in results])
    return answer(images, echoed, details)


def _generation_route(model: type[Txt2ImgRequest]) -> Callable[[Request], Awaitable[Response]]:
    """txt2img's or img2img's route: the same path, the body read as ``model``. (The route itself has
    no docstring: FastAPI would show it as the operation's description.)"""

    async def route(request: Request) -> Response:
        async def work(runtime: Runtime, body: bytes, job: Job) -> dict[str, Any]:
            return await _generate(runtime, body, job, request, model)

        return await answer_generation(request, work, client=CLIENT)

    return route


# Both registered as @router.post would (``name`` keeps their operation ids), each with its schema.
for _name, _summary, _model, _sample in (
    ("txt2img", "Generate images (AUTOMATIC1111's txt2img)", Txt2ImgRequest, SAMPLE_TXT2IMG),
    ("img2img", "Image to image and inpainting (AUTOMATIC1111's img2img)", Img2ImgRequest, SAMPLE_IMG2IMG),
):
    router.add_api_route(
        f"/{_name}",
        _generation_route(_model),
        methods=["POST"],
        name=_name,
        summary=_summary,
        responses={200: {"description": "{images: [base64 PNG], parameters, info: JSON string}"}, **_ERRORS},
        openapi_extra=json_body(_model, _sample),
    )


# ----------------------------------------------------------------------------- the handshake
def _options(request: Request) -> dict[str, Any]:
    """The options A1111's clients read, at the values this server uses: the caller's checkpoint."""
    fixed = {name: allowed[0] for name, allowed in NEUTRAL_OPTIONS.items() if allowed}
    lifecycle = lifecycle_of(request)
    checkpoint = checkpoints_of(request).of(lifecycle, _chosen(request).get(caller(request)))
    return {**fixed, "sd_model_checkpoint": checkpoint.title, "sd_checkpoint_hash": checkpoint.sha256}


@router.get("/options", summary="Options: the caller's checkpoint and the settings in force")
def get_options(request: Request) -> dict[str, Any]:
    return _options(request)


@router.post(
    "/options",
    summary="Set options: sd_model_checkpoint sets the caller's checkpoint; the others are accepted "
    "where they are what the server uses (clients post them back)",
    responses={
        **{key: value for key, value in _ERRORS.items() if key in (400, 401, 422, 503)},
        **error_responses({404: "sd_model_checkpoint names no served checkpoint (GET /sdapi/v1/sd-models)."}),
    },
)
async def set_options(request: Request) -> None:
    runtime = lifecycle_of(request).require_ready()
    document = await parse_document_off_loop(await request.body(), runtime.scorer.limits, "an options object")
    if not isinstance(document, dict):
        raise FieldError("the body must be an object of options (GET /sdapi/v1/options)", param=None)
    current, chosen = _options(request), False
    for name, value in document.items():
        if name == "sd_model_checkpoint":
            try:
                check_checkpoint(value)
            except PydanticCustomError as error:
                raise FieldError(error.message(), param="sd_model_checkpoint") from None
            # An unknown one: 404 (A1111 itself fails with a 500); nothing is set.
            chosen, model = True, runtime.scorer.library.resolve(checkpoint_name(value or ""), name)
        elif name == "sd_checkpoint_hash":  # what GET answers, posted back: derived from the checkpoint
            continue
        elif name not in current or value != current[name] or isinstance(value, bool):
            shown = name if name in current else "an option"
            raise FieldError(
                f"{shown} cannot be changed on this server (GET /sdapi/v1/options shows what it uses)",
                param=None,
            )
    if chosen:  # only once every option passed
        _chosen(request).set(caller(request), model)


def _samplers(info: ModelInfo) -> list[dict[str, Any]]:
    """A1111's shape; ``options`` says what each runs here: this server's scheduler (the one
    "Automatic" picks) and the schedules this model offers with it."""
    listed = []
    for name, sampler in SAMPLERS.items():
        if sampler.scheduler not in info.schedulers:
            continue
        schedules = [
            label
            for key, (label, flag) in SCHEDULES.items()
            if flag is None or f"{sampler.scheduler}{SCHEDULE_SEPARATOR}{flag}" in info.schedulers
        ]
        options = {"scheduler": scheduler_for(name, None), "schedules": schedules}
        listed.append({"name": name, "aliases": list(sampler.aliases), "options": options})
    return listed


@router.get("/samplers", summary="Samplers, each with the scheduler of this server it runs")
def samplers(request: Request) -> list[dict[str, Any]]:
    return _samplers(lifecycle_of(request).require_ready().engine.info)


@router.get("/schedulers", summary="Schedules: Automatic (each sampler's own), Uniform, Karras...")
def schedulers(request: Request) -> list[dict[str, Any]]:
    lifecycle_of(request).require_ready()
    return [
        {"name": key, "label": label, "aliases": None, "default_rho": 7.0 if key == "karras" else -1}
        | {"need_inner_model": key == "uniform"}
        for key, (label, _) in SCHEDULES.items()
    ]


@router.get("/upscalers", summary='Upscalers: only "None" (no high-resolution pass here)')
def upscalers(request: Request) -> list[dict[str, Any]]:
    lifecycle_of(request).require_ready()
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 1}]


@router.get("/loras", summary="The LoRA adapters of SD_ADAPTERS, for <lora:NAME:SCALE> in a prompt")
def loras(request: Request) -> list[dict[str, Any]]:
    info = lifecycle_of(request).require_ready().engine.info
    return [{"name": name, "alias": name, "path": name, "metadata": {}} for name in info.adapters]


# ----------------------------------------------------------------------------- follow and stop
def _idle() -> dict[str, Any]:
    state: dict[str, Any] = {"skipped": False, "interrupted": False, "stopping_generation": False}
    state |= {"job": "", "job_count": 0}
    state |= {"job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}


@router.get("/progress", summary="The caller's current txt2img request: progress, ETA and a preview")
def progress(request: Request, skip_current_image: str = "false") -> dict[str, Any]:
    """``skip_current_image`` is read as A1111's clients send it ("true"/"false"); anything else is false."""
    running = jobs_of(request).of(caller(request), CLIENT)
    if not running or not running[0].totals:
        return _idle() | {"current_task": None}
    job = running[0]
    # 1. Where it is: the first image not done, and the whole request's fraction.
    image = next((index for index, done in enumerate(job.steps) if done < job.totals[index]), 0)
    step, total = job.step_of(image)
    done = job.progress
    elapsed = time.monotonic() - job.started
    # 2. A preview: the latest one now, and one more at the next step (only while someone looks).
    current = None
    if skip_current_image.lower() not in ("true", "1"):
        job.ask_preview()
        current = encode_png_base64(job.latest) if job.latest is not None else None
    state: dict[str, Any] = {"skipped": False, "interrupted": job.interrupted, "stopping_generation": False}
    state |= {"job": f"request {job.request_id}", "job_count": len(running), "job_timestamp": "0"}
    state |= {"job_no": image, "sampling_step": step, "sampling_steps": total}
    return {
        "progress": done,
        "eta_relative": elapsed / done - elapsed if done > 0 else 0.0,
        "state": state,
        "current_image": current,
        "textinfo": f"image {image + 1} of {len(job.totals)}: step {step} of {total}",
        "current_task": job.request_id,
    }


@router.post("/interrupt", summary="End the caller's txt2img requests now, with the images they have")
def interrupt(request: Request) -> None:
    for job in jobs_of(request).of(caller(request), CLIENT):
        job.interrupt(waiting_too=True)


@router.post("/skip", summary="End the running images of the caller's current request; the rest go on")
def skip(request: Request) -> None:
    running = jobs_of(request).of(caller(request), CLIENT)
    if running:
        running[0].interrupt(waiting_too=False)
