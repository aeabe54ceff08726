"""`sd-endpoint batch --ray`: the batch job on a Ray cluster with Ray Data, one engine per GPU.

The same job as on one machine, with the same inputs, outputs and exactly-once rules:
1. the driver plans it (inputs, output, parameters, rows finished by earlier runs), before any
   GPU work and before connecting to Ray;
2. Ray tasks read the rows still to do from the input files, file by file (the driver holds
   no rows), and Ray Data sends them to a pool of actors (``map_batches`` over an
   ``ActorPoolStrategy``), each holding one engine and writing images and records with the
   single-machine runner; the driver counts the records as they come back (progress, the
   error threshold);
3. the driver rebuilds predictions.csv and summary.json from every record.

A row is finished exactly when its record exists, and each row has one image path and one record
path: a Ray task that is retried rewrites the same files, atomically, so no row is ever counted
twice. Tasks read the input and actors write the output directly, so on a cluster of several
machines each must be a blob URI (az://, s3://) or a folder every node mounts at the same path.

Only argparse is imported at module level; Ray, torch and the model load when the job runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    from service.batch.files.inputs import ScannedFile
    from service.batch.files.records import Record
    from service.batch.plan import JobPlan
    from service.batch.runner import RunConfig, RunResult
    from service.settings import Settings
    from service.storage import StorageOptions

log = logging.getLogger(__name__)

# Credentials the storage backends read from the environment. The driver's values travel to the
# actors in the job's runtime_env (Ray shows them to whoever can see the job's details), so that
# `--ray-address` to a remote cluster reaches the same storage as the driver does.
FORWARDED_ENV = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
)
# Engine batches per Ray task: several, so that the runner writes one batch while generating the next.
BATCHES_PER_TASK = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The Ray options of `sd-endpoint batch`."""
    group = parser.add_argument_group("Ray (more than one machine)")
    group.add_argument(
        "--ray", action="store_true", help="run the job on a Ray cluster with Ray Data: one engine per GPU"
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the cluster: HOST:6379, ray://HOST:10001, auto or local (default: RAY_ADDRESS, else the "
        "cluster this machine belongs to, else a new one on this machine)",
    )
    group.add_argument(
        "--ray-actors",
        type=int,
        metavar="N",
        help="engines to run (one per actor); default: one per GPU in the cluster, else 1",
    )


@dataclass(frozen=True)
class RayJob:
    """How the pending rows of a plan run on Ray."""

    settings: Settings
    options: StorageOptions
    config: RunConfig
    address: str | None = None
    actors: int | None = None

    def run(
        self, plan: JobPlan, default_model: tuple[str, dict[str, Any]]
    ) -> tuple[RunResult, tuple[str, dict[str, Any]]]:
        """Generate every pending row; the run's records and (model name, resolved parameters)."""
        import ray

        from service.batch.progress import Progress
        from service.batch.runner import RunResult

        # 1. Connect (or start a local cluster), handing the storage credentials to the actors.
        forwarded = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
        ray.init(
            address=self.address,
            runtime_env={"env_vars": forwarded} if forwarded else None,
            logging_level=logging.WARNING,
        )
        started = time.perf_counter()
        progress = Progress(plan.pending_count)
        result = RunResult(0.0)
        model = default_model
        stopped = ""
        try:
            # 2. Count the records as the actors write them (the output holds them).
            for item in self._dataset(plan).iter_rows():
                record, model = _decode(item)
                progress(record)
                stopped = stopped or self._count(result, record, written=bool(item.get("written", True)))
                if stopped:
                    log.error("stopping: %s", stopped)
                    break
        except KeyboardInterrupt:
            stopped = "interrupted"
        except Exception as error:
            # A model that cannot load, or bad parameters: exit 2 with the reason. Anything else
            # (a node lost for good, say) ends the run; finished rows keep their records.
            _raise_config_error(error)
            log.error("the Ray job failed", exc_info=True)
            first_line = (str(error).strip().splitlines() or [""])[0]
            stopped = f"the Ray job failed: {type(error).__name__}: {first_line}"
        finally:
            progress.close()
            ray.shutdown()  # ends this job's actors (and the cluster, when ray.init started one)
        result.seconds, result.stopped = time.perf_counter() - started, stopped
        return result, model

    def _dataset(self, plan: JobPlan) -> Any:
        """The pending rows through a pool of engine actors; one output row (a record) per input row."""
        import ray
        from ray.data import ActorPoolStrategy, DataContext

        # 1. Resources: one GPU per actor where there are GPUs (or where the device asks for CUDA).
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        device = self.settings.device
        use_gpu = device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)
        actors = self.actors or max(cluster_gpus, 1)
        if not use_gpu and self.actors is None:
            log.warning("no GPUs in the Ray cluster: running 1 engine on CPUs; set --ray-actors for more")
        batch_size = self.config.batch_size
        share = -(-plan.pending_count // actors)
        rows_per_task = max(batch_size, min(BATCHES_PER_TASK * batch_size, share))
        log.info(
            "generating %d image(s) on %d Ray actor(s) (%s), %d rows per task (%d rows already finished)",
            plan.pending_count, actors, "1 GPU each" if use_gpu else "CPU", rows_per_task, plan.skipped,
        )  # fmt: skip
        # 2. Our progress bar instead of one per operator.
        DataContext.get_current().enable_progress_bars = False
        output = plan.output.root if plan.output.is_local else plan.output.uri
        # The driver counts failures against the threshold across all actors.
        actor_config = type(self.config)(
            batch_size=batch_size,
            retry=self.config.retry,
            error_threshold=-1,
            write_workers=self.config.write_workers,
        )
        # 3. The rows themselves are read in Ray tasks, file by file (one small item per file goes
        #    from the driver), so neither the driver nor the object store holds the job's rows.
        items = [
            {"file": index, "done": plan.finished.bitmap(item.file.key)}
            for index, item in enumerate(plan.files)
        ]
        source = plan.input.root if plan.input.is_local else plan.input.uri
        reader = functools.partial(
            _pending_rows, source, self.options, plan.files, plan.params.seed, plan.max_prompt_chars
        )
        return (
            ray.data.from_items(items)
            .flat_map(reader, num_cpus=1)
            .map_batches(
                EngineActor,
                fn_constructor_kwargs={
                    "settings": self.settings,
                    "output": output,
                    "options": self.options,
                    "plan_params": plan.params,
                    "images": source,
                    "config": actor_config,
                },
                batch_size=rows_per_task,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(size=actors),
                num_gpus=1 if use_gpu else 0,
                num_cpus=1,
            )
        )

    def _count(self, result: RunResult, record: Record, *, written: bool) -> str:
        """Count ``record`` into ``result``; why to stop (the error threshold), or ''."""
        from service.batch.errors import threshold_stop

        if not written:
            result.unwritten[(record.key, record.row)] = record
        if record.ok:
            result.generated += 1
            return ""
        result.failed += 1
        return threshold_stop(result.failed, self.config.error_threshold, record.error, len(result.unwritten))


class EngineActor:
    """A Ray Data actor: one engine; each call generates a batch of rows and writes them."""

    def __init__(
        self,
        settings: Settings,
        output: str,
        options: StorageOptions,
        plan_params: Any,
        config: RunConfig,
        images: str | None = None,
    ) -> None:
        from service.batch.engine import load_job_engine
        from service.logs import configure_logging
        from service.storage import open_storage

        configure_logging(settings.log_level, settings.log_format)
        self.params = plan_params
        self.config = config
        self.engine = load_job_engine(settings, plan_params)
        self.output = open_storage(output, options)
        self.images = None if images is None else open_storage(images, options)  # the input folder
        info = self.engine.info
        self.model = json.dumps({"model": info.name, "parameters": plan_params.resolved(info)})

    def __call__(self, batch: Any) -> Any:
        import pyarrow

        from service.batch.files.inputs import InputRow
        from service.batch.files.records import UnwrittenRecord
        from service.batch.runner import process_rows

        rows = [InputRow(**row) for row in batch.to_pylist()]
        records = process_rows(self.engine, rows, self.output, self.params, self.config, self.images)
        return pyarrow.table(
            {
                "record": [r.to_json().decode("utf-8") for r in records],
                "written": [not isinstance(r, UnwrittenRecord) for r in records],
                "model": [self.model] * len(records),
            }
        )


def _pending_rows(
    source: str,
    options: StorageOptions,
    files: list[ScannedFile],
    job_seed: int | None,
    max_chars: int,
    item: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """A Ray task: the rows of one input file (``item["file"]``) that no earlier run finished,
    read from the input as planned (a file changed since is refused)."""
    from service.batch.files.finished import has_row
    from service.batch.files.inputs import iter_rows
    from service.storage import open_storage

    done = item["done"]  # a bitmap of the rows (FinishedRows.bitmap)
    rows = iter_rows(open_storage(source, options), [files[item["file"]]], job_seed, max_chars)
    return (asdict(row) for row in rows if not has_row(done, row.row))


def _decode(item: dict[str, Any]) -> tuple[Record, tuple[str, dict[str, Any]]]:
    from service.batch.files.records import Record

    model = json.loads(item["model"])
    return Record.from_json(item["record"].encode("utf-8")), (model["model"], model["parameters"])


def _raise_config_error(error: BaseException) -> None:
    """Re-raise the BatchConfigError an actor's start raised, so that the job exits 2 with its message.

    Ray reports an actor that failed to start as ActorDiedError, which keeps only the text of the
    actor's traceback; the error's own line is found there.
    """
    from service.batch.errors import BatchConfigError

    marker = f"{BatchConfigError.__module__}.{BatchConfigError.__qualname__}: "
    current: BaseException | None = error
    for _ in range(10):  # a cause chain is short; a cycle must not loop forever
        if current is None:
            return
        for line in reversed(str(current).splitlines()):
            if line.startswith(marker):
                raise BatchConfigError(line[len(marker) :]) from error
        current = current.__cause__ or current.__context__
