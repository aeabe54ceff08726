"""What Azure ML's batch driver does with the entry script (deploy/azureml/batch_score.py), for the
tests: load it as a module, and append what ``run()`` returns to predictions.csv.

With ``output_action: append_row`` the driver writes each element of a list that ``run()``
returns as it is, one per line (a DataFrame it would write with ``DataFrame.to_csv`` under its own
settings instead; the entry script returns a list of CSV lines, so that only the list case occurs).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

AZUREML = Path(__file__).resolve().parents[2] / "deploy" / "azureml"


def entry_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("batch_score", AZUREML / "batch_score.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def append_like_azure(predictions: Path, returned: object) -> None:
    """Append one mini-batch's result to ``predictions`` the way append_row does for a list."""
    assert isinstance(returned, list) and all(isinstance(line, str) for line in returned), type(returned)
    predictions.parent.mkdir(parents=True, exist_ok=True)
    with predictions.open("a", encoding="utf-8", newline="") as handle:
        for line in returned:
            handle.write(f"{line}\n")
