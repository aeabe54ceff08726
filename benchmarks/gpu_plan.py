"""What benchmarks/gpu_suite.py and its stage processes share: the plan, the stages' order and
caps, and each stage's record (``<out>/NN-name.json``), written atomically and read back.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the stage processes import the project (model) and benchmarks/flops.py by name
sys.path[:0] = [str(ROOT), str(HERE)]

PROMPT = "a photograph of an astronaut riding a horse"
PEAK_TFLOPS = 790.0  # the H200's measured dense bf16/fp16 matmul rate
MAX_MEAN_ABS_DIFF = 0.01
ENGINE_VARIANTS = ("engine", "compiled", "deepspeed")

# name, title, cap in seconds (the most the stage may take), in the order the suite runs them and
# the report lists them; gpu_stages.STAGES maps each name to the function that runs it
STAGES: tuple[tuple[str, str, float], ...] = (
    ("environment", "environment: GPU, driver, versions, free memory", 30),
    ("diffusers", "stock diffusers StableDiffusionPipeline, fp16, SDPA", 100),
    ("engine", "this engine, eager", 90),
    ("compiled", "this engine, torch.compile + CUDA graphs", 210),
    ("profile", "per-step profile of the fastest variant (top 10 kernels)", 75),
    ("deepspeed", "DeepSpeed-Inference kernels (SD_ACCELERATOR=deepspeed)", 150),
    ("sd2", "random:sd-2-base with the fastest variant", 150),
    ("tests", "tests/engine/test_gpu.py", 240),
)


@dataclass
class Plan:
    """What the suite decided; written by the suite, read by each stage process."""

    out: str
    work: str
    dry_run: bool
    device: str
    dtype: str
    model: str
    sd2_model: str
    size: int
    steps: int
    batch_sizes: list[int]
    repeats: int
    warm_steps: int
    profile_steps: int
    compile_backend: str
    deepspeed_site: str | None
    tests: list[str]
    flops_file: str
    init_on_device: bool
    cpu_threads: int = 0  # torch's intra-op threads; 0: torch's default
    stage: str = ""
    index: int = 0
    title: str = ""
    deadline: float = 0.0  # time.time() by which the stage must have ended
    budget_s: float = 0.0
    fastest: str = "engine"
    fastest_reason: str = ""
    sd2_variant: str = "engine"
    extra: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def reference_dir(self) -> Path:
        return Path(self.work) / "reference"

    @property
    def compile_cache(self) -> Path:
        return Path(self.work) / "compile-cache"


def stage_file(out: str | Path, index: int, name: str) -> Path:
    return Path(out) / f"{index:02d}-{name}.json"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Record:
    """A stage's JSON record, saved after every change."""

    def __init__(self, plan: Plan) -> None:
        self.path = stage_file(plan.out, plan.index, plan.stage)
        self.data: dict[str, Any] = {
            "stage": plan.index,
            "name": plan.stage,
            "title": plan.title,
            "status": "running",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "dry_run": plan.dry_run,
            "budget_s": round(plan.budget_s, 1),
            "config": {},
            "cases": [],
            "skipped_for_time": [],
            "notes": [],
        }
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def config(self, **values: Any) -> None:
        self.data["config"].update(values)
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def skipped(self, text: str) -> None:
        self.data["skipped_for_time"].append(text)
        self.save()

    def case(self, row: dict[str, Any]) -> dict[str, Any]:
        self.data["cases"].append(row)
        self.save()
        return row

    def finish(self, status: str, **values: Any) -> None:
        self.data.update(values, status=status)
        self.save()


def read_record(out: str, index: int, name: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(stage_file(out, index, name).read_text())
        return data
    except (OSError, ValueError):
        return None
