"""`sd-endpoint batch`: score folders of prompt files from local paths, az:// or s3:// into an output URI.

Exit codes: 0 every row attempted (failed rows, if any, are in the summary); 1 the job stopped
(error threshold, storage failure, Ctrl+C); 2 nothing ran: bad input, output or parameters.
Only argparse is imported at module level; the rest loads when the command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.batch.params import JobParams
    from service.batch.plan import JobPlan
    from service.batch.runner import RunConfig, RunResult
    from service.runtime.engines import ServingEngine
    from service.settings import Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--input",
        required=True,
        metavar="URI",
        help="a folder or file of prompts (.csv, .jsonl, .parquet/.pqt, .txt): a path, file://, "
        "az://container/prefix or s3://bucket/prefix",
    )
    io.add_argument(
        "--output",
        required=True,
        metavar="URI",
        help="where images, records, predictions.csv, predictions-detailed.csv and summary.json go",
    )
    io.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        help="endpoint of an S3-compatible store (default AWS_ENDPOINT_URL or AWS)",
    )
    gen = parser.add_argument_group("generation (override --params)")
    gen.add_argument(
        "--model",
        help="model spec (SD_MODEL), or the name of a model of SD_MODELS; default AZUREML_MODEL_DIR, "
        "else random:tiny",
    )
    gen.add_argument("--device", help="cuda, cuda:1, cpu... (SD_DEVICE, default auto)")
    gen.add_argument("--dtype", help="fp16, bf16, fp32 (SD_DTYPE, default auto)")
    gen.add_argument(
        "--params",
        metavar="FILE.json",
        help="JSON object with num_inference_steps, guidance_scale, height, width, scheduler, seed, strength",
    )
    gen.add_argument("--steps", type=int, help="denoising steps (default 50)")
    gen.add_argument("--guidance", type=float, help="guidance scale (default 7.5)")
    gen.add_argument(
        "--width", type=int, help="image width, a multiple of 8 (default: the model's native size)"
    )
    gen.add_argument(
        "--height", type=int, help="image height, a multiple of 8 (default: the model's native size)"
    )
    gen.add_argument("--scheduler", help="scheduler name (default: the model's own)")
    gen.add_argument(
        "--strength",
        type=float,
        help="rows with an image: the share of the schedule that runs, in (0, 1] "
        "(default 0.8; 1 with a mask)",
    )
    gen.add_argument(
        "--seed",
        type=int,
        help="job seed: a row without a seed gets one derived from (this, file, row); default: a random "
        "one, kept in job.json for a resume",
    )
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, help="images per engine batch (SD_MAX_BATCH_SIZE, default 8)")
    run.add_argument(
        "--max-retries", type=int, default=2, help="retries per row for engine and storage errors (default 2)"
    )
    run.add_argument(
        "--error-threshold",
        type=int,
        default=-1,
        help="failed rows allowed before the job stops; -1: never stop (default)",
    )
    run.add_argument(
        "--write-workers",
        type=int,
        help="threads encoding and uploading images (SD_ENCODE_WORKERS, default 4)",
    )
    run.add_argument(
        "--retry-failed", action="store_true", help="generate rows that failed in an earlier run again"
    )
    changed = run.add_mutually_exclusive_group()
    changed.add_argument(
        "--continue",
        dest="on_change",
        action="store_const",
        const="continue",
        help="the output was made from another input: keep the rows of unchanged files, remove the "
        "results of changed and removed files, and generate what is missing",
    )
    changed.add_argument(
        "--start-over",
        dest="on_change",
        action="store_const",
        const="start-over",
        help="remove every result in the output (images, records, predictions, summary, job.json) "
        "and run the job anew",
    )
    from service.batch import ray_job  # standard library only at import: the CLI stays light

    ray_job.add_arguments(parser)  # --ray, --ray-address, --ray-actors


def run(args: argparse.Namespace) -> int:
    from service.batch.errors import EXIT_USAGE, BatchConfigError

    try:
        settings = settings_from_args(args)
        from service.logs import configure_logging

        configure_logging(settings.log_level, settings.log_format)
        return _run(args, settings)
    except BatchConfigError as error:
        print(f"sd-endpoint batch: error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from service.batch.errors import EXIT_FAILED, EXIT_OK
    from service.batch.files.finalize import finalize
    from service.batch.plan import plan_job
    from service.storage import StorageError, StorageOptions

    # 1) everything that can be checked without the model (and without importing torch)
    max_retries = at_least(args.max_retries, 0, "--max-retries")
    error_threshold = at_least(args.error_threshold, -1, "--error-threshold")
    if args.ray_actors is not None:
        at_least(args.ray_actors, 1, "--ray-actors")
    params = params_from_args(args)
    options = StorageOptions(args.s3_endpoint_url)
    plan = plan_job(
        args.input,
        args.output,
        params,
        options=options,
        max_steps=settings.max_steps,
        retry_failed=args.retry_failed,
        max_prompt_chars=settings.max_prompt_chars,
        on_change=args.on_change or "refuse",
    )
    # 2) the model, and the parameters checked against it; then the work, here or on a Ray
    #    cluster (which needs no connection when nothing is left to do)
    result: RunResult | None = None
    params = plan.params  # with the job seed
    model, parameters = settings.model_spec, params.as_dict()
    if plan.pending_count:
        from service.batch.process import RetryPolicy
        from service.batch.runner import RunConfig

        config = RunConfig(
            batch_size=settings.max_batch_size,
            retry=RetryPolicy(max_retries=max_retries),
            error_threshold=error_threshold,
            write_workers=settings.encode_workers,
        )
        if args.ray:
            from service.batch.ray_job import RayJob

            job = RayJob(settings, options, config, args.ray_address, args.ray_actors)
            result, (model, parameters) = job.run(plan, default_model=(model, parameters))
        else:
            from service.batch.engine import load_job_engine

            engine = load_job_engine(settings, plan.params)
            model, parameters = engine.info.name, params.resolved(engine.info)
            result = _generate(engine, plan, config)
    else:
        log.info("every row is already finished; rebuilding predictions and summary.json")
        model, parameters = _last_model(plan, (model, parameters))
    # 3) predictions.csv and summary.json from every record
    try:
        summary = finalize(
            plan.output,
            plan.counts,
            model=model,
            parameters=parameters,
            run=result,
            skipped=plan.skipped,
            skipped_files=plan.skipped_files,
        )
    except StorageError as error:
        print(
            f"sd-endpoint batch: error: cannot finalize the output: {error}; run the job again",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(json.dumps(summary, indent=2))
    if result is not None and result.stopped:
        print(
            f"sd-endpoint batch: stopped: {result.stopped}; run the same command again to resume",
            file=sys.stderr,
        )
        return 130 if result.stopped == "interrupted" else EXIT_FAILED
    return EXIT_OK


def settings_from_args(args: argparse.Namespace) -> Settings:
    from service.batch.errors import BatchConfigError
    from service.settings import SettingsError, load_settings

    names = {
        "model": "model",
        "device": "device",
        "dtype": "dtype",
        "batch_size": "max_batch_size",
        "write_workers": "encode_workers",
    }
    overrides: dict[str, Any] = {
        field: value for arg, field in names.items() if (value := getattr(args, arg)) is not None
    }
    try:
        return load_settings(**overrides)
    except SettingsError as error:
        raise BatchConfigError(f"bad setting: {error} (or the option that sets it)") from error


def params_from_args(args: argparse.Namespace) -> JobParams:
    from service.batch.errors import BatchConfigError
    from service.batch.params import JobParams
    from service.storage import StorageError, open_storage

    params = JobParams()
    if args.params:
        try:
            text = open_storage(args.params).read().decode("utf-8")
        except (StorageError, UnicodeDecodeError) as error:
            raise BatchConfigError(f"cannot read --params {args.params}: {error}") from error
        params = JobParams.from_file(text, args.params)
    return params.replace(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        scheduler=args.scheduler,
        seed=args.seed,
        strength=args.strength,
    )


def at_least(value: int, minimum: int, flag: str) -> int:
    from service.batch.errors import BatchConfigError

    if value < minimum:
        raise BatchConfigError(f"{flag} must be {minimum} or more, got {value}")
    return value


def _last_model(plan: JobPlan, default: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """A run with nothing to generate reports the model and resolved parameters of the run that
    made the images (summary.json), when they are this job's."""
    from service.batch.files.finalize import last_model

    found = last_model(plan.output)
    if found is None:
        return default
    mine = plan.params.as_dict()
    same = all(found[1].get(name) == value for name, value in mine.items() if value is not None)
    return found if same and set(found[1]) == set(mine) else default


def _generate(engine: ServingEngine, plan: JobPlan, config: RunConfig) -> RunResult:
    from service.batch.progress import Progress
    from service.batch.runner import run_job

    pending = plan.pending_count
    log.info(
        "generating %d image(s) in batches of %d (%d rows already finished)",
        pending,
        config.batch_size,
        plan.skipped,
    )
    progress = Progress(pending)
    try:
        return run_job(engine, plan, config, on_record=progress)
    finally:
        progress.close()
        engine.close()
