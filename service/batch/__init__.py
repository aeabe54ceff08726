"""Batch scoring: folders of prompt files in blob storage in, images and predictions out.

Three steps, each usable on its own (a Ray Data job schedules the middle one itself):
- ``service.batch.plan.plan_job``: check the inputs, the output and the parameters; read every
  row; find the rows finished by earlier runs (those with a record in the output).
- ``service.batch.runner.process_rows`` / ``run_job``: generate rows in engine batches, write
  each image and then its record, atomically.
- ``service.batch.files.finalize.finalize``: rebuild predictions.csv (Azure ML's five columns),
  predictions-detailed.csv and summary.json from the records.

Nothing is imported here, so that ``sd-endpoint`` stays light until a command runs.
"""
