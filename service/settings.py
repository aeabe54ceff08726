"""Every setting of the server and of batch jobs, read once from the environment (prefix ``SD_``,
plus Azure ML's ``AZUREML_MODEL_DIR`` and OpenMP's ``OMP_NUM_THREADS``) at start-up. Command-line
options override these values by passing them to the constructor.

Only these other modules touch the environment, each for a reason outside these settings
(tests/test_layout.py keeps this list true):
- service/cli/client.py reads ``SD_API_KEY``: the `generate` client is not the server and has
  no Settings; the key is a secret better kept out of the shell history than on the command line.
- service/batch/ray_job.py reads the storage credentials (``AZURE_STORAGE_*``, ``AWS_*``) that
  fsspec's backends read themselves, to forward them to the job's Ray actors.
- deploy/azureml/batch_score.py reads ``AZUREML_BI_OUTPUT_PATH`` and ``SD_BATCH_PARAMS``: Azure's
  batch contract hands the output folder and the job's parameters to the entry script that way.
- model/optimizations/torch_compile.py sets (never reads for itself) the variables that point
  torch's compile caches at SD_COMPILE_CACHE_DIR.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "random:tiny"
MAX_MODEL_NAME_CHARS = 200
_DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,3})?|mps|xpu(:[0-9]{1,3})?")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SD_", extra="ignore", frozen=True)

    # Model and device.
    model: str | None = Field(
        default=None, description="Model spec; unset: AZUREML_MODEL_DIR, then random:tiny."
    )
    azureml_model_dir: str | None = Field(default=None, validation_alias="AZUREML_MODEL_DIR")
    model_config_dir: str | None = Field(
        default=None,
        validation_alias="SD_MODEL_CONFIG",
        description="For a single checkpoint file of another architecture: a diffusers folder or hub id.",
    )
    model_variant: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9_-]{1,40}$", description="Weight variant to load (fp16: *.fp16.*)."
    )
    device: str = "auto"
    # One engine per device: "all" (every visible CUDA device), or a list ("cuda:0,cuda:2", "cpu,cpu").
    # Unset: SD_DEVICE's one device, or "all" when that is "auto" and CUDA is present.
    devices: str | None = Field(
        default=None, description="One engine per device: all, or a list such as cuda:0,cuda:1."
    )
    engine_max_failures: int = Field(
        default=3, ge=1, description="Failed steps in a row (not OOM) that take an engine out."
    )
    dtype: str = "auto"
    safety_checker: Path | None = Field(default=None, description="A safety-checker folder for any model.")
    adapters: Path | None = Field(default=None, description="A folder of LoRA adapters (model/adapters.py).")
    accelerator: Literal["none", "deepspeed"] = "none"
    compile: bool = False
    cuda_graphs: bool = False
    compile_cache_dir: Path | None = None
    # Torch's CPU threads per engine ("auto": service/runtime/engines.py cpu_threads_per_engine says
    # how many and why). OMP_NUM_THREADS, when set (Ray sets it per actor), is respected under auto.
    cpu_threads: int | Literal["auto"] = Field(
        default="auto", description="Torch CPU threads per engine: auto, or a number from 1 to 1024."
    )
    omp_num_threads: str | None = Field(default=None, validation_alias="OMP_NUM_THREADS")

    # HTTP.
    host: str = "127.0.0.1"
    port: int = Field(default=5001, ge=0, le=65535)
    api_keys: SecretStr | None = Field(
        default=None, description="Comma-separated bearer keys; two allow rotation."
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    served_model_names: str | None = Field(
        default=None,
        description="Comma-separated ids the OpenAI API answers to (e.g. dall-e-3); unset: the model's name.",
    )
    max_connections: int = Field(
        default=256, ge=1, description="Open connections (and requests) at once; beyond it: 503."
    )
    header_timeout_s: float = Field(
        default=10, gt=0, description="A connection must send a request's headers within this, or is closed."
    )
    body_timeout_s: float = Field(
        default=30, gt=0, description="A request's body must arrive within this (408)."
    )
    keep_alive_timeout_s: float = Field(
        default=5, ge=1, description="Idle keep-alive connections close after this."
    )

    # Batching, backpressure and deadlines. "step": images join and leave the running batch between
    # denoising steps (service/runtime/batching/steploop.py); "request": whole batches
    # (service/runtime/batching/batcher.py).
    batching: Literal["step", "request"] = "step"
    max_batch_size: int = Field(default=8, ge=1)
    max_batch_wait_ms: float = Field(default=20, ge=0)
    max_queue_items: int = Field(default=64, ge=1)
    request_timeout_s: float = Field(default=85, gt=0)
    # At least the request deadline by default, so a rolling update never cuts off a request it took.
    drain_timeout_s: float = Field(default=90, ge=0)
    encode_workers: int = Field(default=4, ge=1)

    # Request limits.
    max_prompts: int = Field(default=16, ge=1)
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_steps: int = Field(default=150, ge=1, le=150)

    # Logs.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("cpu_threads", mode="before")
    @classmethod
    def _check_cpu_threads(cls, value: object) -> object:
        text = value.strip().lower() if isinstance(value, str) else value
        if text == "auto":
            return "auto"
        if isinstance(text, str) and re.fullmatch(r"[0-9]{1,4}", text) and 1 <= int(text) <= 1024:
            return int(text)
        if isinstance(text, int) and not isinstance(text, bool) and 1 <= text <= 1024:
            return text
        raise ValueError("SD_CPU_THREADS: not a thread count; use auto, or a whole number from 1 to 1024")

    @field_validator("api_keys")
    @classmethod
    def _some_key(cls, value: SecretStr | None) -> SecretStr | None:
        # Set but empty (a secret mounted without content, say) must not mean "no authentication".
        if value is not None and not value.get_secret_value().replace(",", "").strip():
            raise ValueError(
                "SD_API_KEYS: set, but holds no key; set a key (comma-separated for several), or unset "
                "the variable to serve without keys"
            )
        return value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str | None) -> str | None:
        if value is None:
            return None
        entries = [entry.strip() for entry in value.split(",")]
        if entries == ["all"]:
            return "all"
        for entry in entries:
            if not _DEVICE.fullmatch(entry):
                raise ValueError(
                    f"SD_DEVICES: {entry[:40]!r} is not a device; use all, or a comma-separated list "
                    "such as cuda:0,cuda:1 (or cpu,cpu)"
                )
        return ",".join(entries)

    @field_validator("served_model_names")
    @classmethod
    def _check_served_names(cls, value: str | None) -> str | None:
        if value is None:
            return None
        names = [name.strip() for name in value.split(",") if name.strip()]
        for name in names:
            if len(name) > MAX_MODEL_NAME_CHARS or not name.isprintable():
                raise ValueError(
                    f"SD_SERVED_MODEL_NAMES: {name[:40]!r} is not a model id; use printable names of at most "
                    f"{MAX_MODEL_NAME_CHARS} characters, comma-separated"
                )
        return ",".join(names) or None

    @property
    def served_model_name_list(self) -> tuple[str, ...]:
        """The ids the OpenAI API answers to, in order (the first is the one it lists first);
        empty: the loaded model's own name."""
        return tuple(self.served_model_names.split(",")) if self.served_model_names else ()

    @property
    def device_list(self) -> tuple[str, ...]:
        """The devices to load one engine on each, in engine order; "all" and "auto" are resolved
        when the engines load (they need torch): see service/runtime/engines.py."""
        if self.devices is not None:
            return tuple(self.devices.split(","))
        if self.device != "auto":
            return (self.device,)
        return ("all",)

    @property
    def model_spec(self) -> str:
        """SD_MODEL, else the Azure ML model folder, else the embedded random-weight default."""
        return self.model or self.azureml_model_dir or DEFAULT_MODEL

    @property
    def api_key_list(self) -> tuple[bytes, ...]:
        """The configured keys as bytes (for constant-time comparison); empty when auth is off."""
        if self.api_keys is None:
            return ()
        keys = (key.strip() for key in self.api_keys.get_secret_value().split(","))
        return tuple(key.encode() for key in keys if key)


class SettingsError(ValueError):
    """A setting is invalid; the message names each variable at fault and why (never its value,
    which may be a key)."""


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment, with ``overrides`` (command-line options) on top.

    Raises SettingsError, one clause per bad variable, instead of pydantic's multi-line report.
    """
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError("; ".join(_describe(problem) for problem in error.errors())) from None


def _describe(problem: Any) -> str:
    field = str(problem["loc"][0]) if problem["loc"] else ""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None and isinstance(info.validation_alias, str) else None
    variable = alias or f"SD_{field.upper()}"
    message = str(problem["msg"]).removeprefix("Value error, ")
    return message if message.startswith(f"{variable}:") else f"{variable}: {message}"
