"""The `sd-endpoint` command line: the dispatcher (main.py), `make-model` and the `generate` client.

`serve` lives with its host (service/hosts/server.py) and `batch` with the jobs
(service/batch/command.py); main.py imports each sub-command only when it runs.
"""
