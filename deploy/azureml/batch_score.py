"""Azure ML batch endpoint entry script: ``init()`` once per worker, ``run(mini_batch)`` per mini-batch.

It uses the runner of ``sd-endpoint batch``: every row's image and record go to the job's output
folder (AZUREML_BI_OUTPUT_PATH) as ``images/<file>/<row>.png`` and ``records/<file>/<row>.json``.
A mini-batch that Azure retries (after a timeout or a lost node) only generates the rows that have
no record yet, and returns every image of its files once.

What ``run`` returns: one string per image, already a CSV line of the five columns Azure's
text-to-image notebooks read with ``pd.read_csv(predictions_file, header=None, names=[
"row_number_per_file", "prompt", "generated_image", "nsfw_content_detected", "input_csv_name"])``.
With ``output_action: append_row`` Azure's driver writes each element of a returned list to
predictions.csv as it is, one per line, whereas it writes a returned DataFrame with
``DataFrame.to_csv`` under its own settings (a space as separator by default; the model catalog's
scorers set a comma and the index, the index being how their first column comes about), so a
DataFrame's columns depend on the deployment's driver settings and a list of lines does not.
Failed rows are not images: they are logged, and their records (with the reason) stay in the output.

Configuration: the model from SD_MODEL or AZUREML_MODEL_DIR (service.settings.Settings), the
generation parameters from SD_BATCH_PARAMS (a JSON object with the keys of ``--params``). Without
a ``seed`` there, the job seed is derived from the output folder, so that every worker of a job
agrees on it and another job (another output folder) draws other images. Files are named in the
output by their name alone, so input file names must be unique; files that are not prompt files
(.csv, .jsonl, .parquet/.pqt, .txt) are skipped with a warning in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("batch_score")

OUTPUT_ENV = "AZUREML_BI_OUTPUT_PATH"
PARAMS_ENV = "SD_BATCH_PARAMS"
LOGGED_FAILURES = 20  # failed rows logged one by one per mini-batch

_job: dict[str, Any] = {}


def init() -> None:
    """Load the model and check the parameters and the output, once per worker process."""
    from service.batch.engine import load_job_engine
    from service.batch.params import JobParams
    from service.batch.plan import prepare_output
    from service.batch.process import RetryPolicy
    from service.batch.runner import RunConfig
    from service.logs import configure_logging
    from service.runtime.items import SEED_DRAW_RANGE
    from service.settings import load_settings
    from service.storage import open_storage

    # 1) settings and parameters: a mistake fails init, before any generation
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    params = JobParams.from_file(os.environ.get(PARAMS_ENV) or "{}", PARAMS_ENV)
    params.check(settings.max_steps)
    output_path = os.environ.get(OUTPUT_ENV)
    if not output_path:
        raise RuntimeError(f"{OUTPUT_ENV} is not set: this script runs inside an Azure ML batch deployment")
    output = open_storage(output_path)
    digest = hashlib.sha256(os.path.abspath(output_path).encode("utf-8")).digest()
    params = prepare_output(output, params, new_seed=int.from_bytes(digest[:8], "big") % SEED_DRAW_RANGE)
    # 2) the model, and the parameters checked against it (BatchConfigError says what is wrong)
    engine = load_job_engine(settings, params)
    config = RunConfig(
        batch_size=settings.max_batch_size, retry=RetryPolicy(), write_workers=settings.encode_workers
    )
    _job.update(engine=engine, params=params, output=output, config=config)


def run(mini_batch: list[str]) -> list[str]:
    """Score the files of one mini-batch; one predictions line per image, in file and row order."""
    from service.batch.files.finalize import collect_records
    from service.batch.files.inputs import InputFile, parse_file, skip_reason
    from service.batch.files.records import prediction_lines
    from service.batch.plan import find_finished
    from service.batch.runner import run_rows

    engine, params, output, config = _job["engine"], _job["params"], _job["output"], _job["config"]
    # 1) the rows of every prompt file (named by file name) and those an earlier attempt finished
    rows = []
    for path in map(Path, mini_batch):
        reason = skip_reason(path.name)
        if reason:
            log.warning("skipping %s: %s", path, reason)
            continue
        rows += parse_file(InputFile(path.name), path.read_bytes(), params.seed, str(path))
    keys = {row.key for row in rows}
    finished = find_finished(output, keys=keys)
    pending = [row for row in rows if (row.key, row.row) not in finished]
    # 2) generate what is left, each file's rows with its own folder as where path cells (images
    #    in: image, mask_image) are read
    from service.storage import open_storage

    folder_of = {Path(path).name: str(Path(path).parent) for path in mini_batch}
    generated = failed = 0
    for folder in sorted(set(folder_of.values())):
        here = [row for row in pending if folder_of.get(row.file) == folder]
        result = run_rows(engine, here, output, params, config, images=open_storage(folder))
        generated, failed = generated + result.generated, failed + result.failed
    log.info("mini-batch of %d file(s): %d generated, %d failed, %d already done",
             len(mini_batch), generated, failed, len(rows) - len(pending))  # fmt: skip
    # 3) every row must have its record now; if storage lost some, Azure retries the mini-batch
    records = collect_records(output, keys=keys)
    missing = [row for row in rows if (row.key, row.row) not in records]
    if missing:
        raise RuntimeError(
            f"{len(missing)} row(s) have no record (storage errors); the mini-batch will be retried"
        )
    ordered = [records[(row.key, row.row)] for row in rows]
    failed = [record for record in ordered if not record.ok]
    for record in failed[:LOGGED_FAILURES]:
        log.warning("row %d of %s failed: %s", record.row, record.input_file, record.error)
    if len(failed) > LOGGED_FAILURES:
        log.warning("%d more rows failed; their records say why", len(failed) - LOGGED_FAILURES)
    return prediction_lines(ordered)
