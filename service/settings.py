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

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import EnvSettingsSource, SettingsConfigDict

from service.settings_jobs import JobSettings
from service.settings_models import ModelSettings

DEFAULT_MODEL = "random:tiny"
MAX_MODEL_NAME_CHARS = 200
_DTYPES = ("auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")  # model/options.py's
_DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,3})?|mps|xpu(:[0-9]{1,3})?")
# A host name (RFC 1123 labels) or an IP address; the address is checked again when it is bound.
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_ALLOWED_HOST = re.compile(r"\*|(\*\.)?[A-Za-z0-9.-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_NO_EFFECT = "No effect: kept so that older deployments that set it still start."


class Settings(JobSettings, ModelSettings):
    model_config = SettingsConfigDict(env_prefix="SD_", extra="ignore", frozen=True, allow_inf_nan=False)

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
    adapters: Path | None = Field(default=None, description="A folder of LoRA adapters (model/adapters).")
    max_adapters: int = Field(
        default=8, ge=1, le=256, description="LoRA adapters on the device at once; least recently used out."
    )
    accelerator: Literal["none", "deepspeed"] = "none"
    compile: bool = False
    cuda_graphs: bool = False
    compile_cache_dir: Path | None = None
    preview_decoder: Path | None = Field(
        default=None,
        description="An AutoencoderTiny (TAESD) folder for previews; unset: a linear approximation.",
    )
    # Torch's CPU threads per engine ("auto": service/runtime/engines.py cpu_threads_per_engine says
    # how many and why). OMP_NUM_THREADS, when set (Ray sets it per actor), is respected under auto.
    cpu_threads: int | Literal["auto"] = Field(
        default="auto", description="Torch CPU threads per engine: auto, or a number from 1 to 1024."
    )
    omp_num_threads: str | None = Field(default=None, validation_alias="OMP_NUM_THREADS")

    # HTTP.
    host: str = "127.0.0.1"
    port: int = Field(default=5001, ge=0, le=65535)
    api_keys: SecretStr | None = Field(default=None, description="Comma-separated bearer keys (rotation).")
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)  # images in come in the body
    fetch_image_urls: str | None = Field(default=None, description="Hosts whose image URLs may be fetched.")
    served_model_names: str | None = Field(
        default=None,
        description="Comma-separated ids the OpenAI API answers to (e.g. dall-e-3); unset: the model's name.",
    )
    # OpenAI's url answers (web/clients/links.py): a link's life, the store's bytes, its folder.
    image_link_ttl_s: float = Field(default=3600, gt=0, le=7 * 86400)
    image_link_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    image_link_dir: Path | None = Field(default=None, description="A folder for them; unset: memory.")
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
        default=5, ge=1, le=3600, description="Idle keep-alive connections close after this."
    )
    send_timeout_s: float = Field(
        default=30, gt=0, le=3600,
        description="A client that reads none of its answer for this long is disconnected.",
    )  # fmt: skip
    max_header_count: int = Field(default=100, ge=8, le=10_000, description="Header lines per request.")
    max_header_bytes: int = Field(
        default=65_536, ge=1024, le=16_777_216, description="A request's line and headers, in bytes."
    )
    allowed_hosts: str | None = Field(
        default=None,
        description="Comma-separated names the Host header may carry (*.example.com, *); unset: the "
        "loopback names when SD_HOST is loopback, else any.",
    )

    # Batching, backpressure and deadlines: images join and leave the running batch between
    # denoising steps (service/runtime/batching/steploop.py). SD_BATCHING and SD_MAX_BATCH_WAIT_MS
    # belonged to the request-level batcher, which is gone: older deployments may still set them,
    # so they are accepted and do nothing ("request" logs a warning at start-up).
    batching: Literal["step", "request"] = Field(default="step", description=_NO_EFFECT)
    max_batch_size: int = Field(default=8, ge=1)
    max_batch_wait_ms: float = Field(default=20, ge=0, description=_NO_EFFECT)
    max_queue_items: int = Field(default=64, ge=1)
    # A fair share per caller (service/runtime/batching/fairness.py; docs/settings.md).
    max_images_per_key: int | None = Field(default=None, ge=1)
    key_weights: str | None = Field(default=None, description="One weight per key of SD_API_KEYS, in order.")
    max_groups_per_step: int = Field(default=4, ge=1)
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

    @field_validator("preview_decoder")
    @classmethod
    def _decoder_folder(cls, value: Path | None) -> Path | None:
        if value is not None and not (value / "config.json").is_file():
            raise ValueError(
                "SD_PREVIEW_DECODER: not a folder with a config.json; give the folder an AutoencoderTiny was "
                "saved to (save_pretrained), or unset it for the linear preview"
            )
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: SecretStr | None) -> SecretStr | None:
        keys = "" if value is None else value.get_secret_value()
        # Set but empty (a secret mounted without content, say) must not mean "no authentication".
        if value is not None and not keys.replace(",", "").strip():
            raise ValueError(
                "SD_API_KEYS: set, but holds no key; set a key (comma-separated for several), or unset "
                "the variable to serve without keys"
            )
        # A header carries ASCII only: any other key could never be sent, so never match.
        if not all(" " <= char <= "~" for char in keys):
            raise ValueError(
                "SD_API_KEYS: a key holds a character other than printable ASCII, which no client can "
                "send in a header; use letters, digits and punctuation only"
            )
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto" and not _DEVICE.fullmatch(value):
            raise ValueError(f"SD_DEVICE: {value[:40]!r} is not a device; use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in _DTYPES:
            raise ValueError(f"SD_DTYPE: {value[:40]!r} is not a dtype; use one of {', '.join(_DTYPES)}")
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        value = value.strip()
        if _looks_numeric(value):
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(
                    f"SD_HOST: {value[:60]!r} is not an IP address; use one such as 127.0.0.1 or 0.0.0.0"
                ) from None
        elif not _HOST_NAME.fullmatch(value):
            raise ValueError(
                f"SD_HOST: {value[:60]!r} is neither an IP address nor a host name; use one such as "
                "127.0.0.1, 0.0.0.0 or ::"
            )
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: str | None) -> str | None:
        if value is None:
            return None
        names = [name.strip().lower() for name in value.split(",") if name.strip()]
        for name in names:
            if not _ALLOWED_HOST.fullmatch(name):
                raise ValueError(
                    f"SD_ALLOWED_HOSTS: {name[:60]!r} is not a host name; use names such as "
                    "api.example.com, *.example.com, 10.0.0.5, or * for any"
                )
        if not names:
            raise ValueError("SD_ALLOWED_HOSTS: set, but names no host; name one, or * for any")
        return ",".join(names)

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
    def listens_on_loopback(self) -> bool:
        """Whether only this machine can reach the server (SD_HOST is a loopback address or name)."""
        if self.host.lower() == "localhost":
            return True
        return _looks_numeric(self.host) and ipaddress.ip_address(self.host).is_loopback

    @property
    def allowed_host_list(self) -> tuple[str, ...]:
        """The names the Host header may carry: SD_ALLOWED_HOSTS, else the loopback names when the
        server listens on loopback (a page on another site, rebound to 127.0.0.1, sends its own), else
        any ("*": a container or VM is reached by names the server cannot know)."""
        if self.allowed_hosts is not None:
            return tuple(self.allowed_hosts.split(","))
        return LOOPBACK_NAMES if self.listens_on_loopback else ("*",)

    @property
    def model_spec(self) -> str:
        """SD_MODEL, else the Azure ML model folder, else the embedded random-weight default."""
        return self.model or self.azureml_model_dir or DEFAULT_MODEL

    @model_validator(mode="after")
    def _one_weight_per_key(self) -> Settings:
        if self.key_weights is None:
            return self
        weights = [weight.strip() for weight in self.key_weights.split(",")]
        if not all(re.fullmatch(r"[0-9]{1,6}(\.[0-9]{1,6})?", w) and float(w) > 0 for w in weights):
            raise ValueError("SD_KEY_WEIGHTS: expected comma-separated positive numbers (e.g. 2,1,1)")
        if len(weights) != len(keys := self.api_key_list):
            raise ValueError(
                f"SD_KEY_WEIGHTS: {len(weights)} weights for {len(keys)} keys of SD_API_KEYS; give one each"
            )
        return self

    @property
    def api_key_list(self) -> tuple[bytes, ...]:
        """The configured keys as bytes (for constant-time comparison); empty when auth is off."""
        if self.api_keys is None:
            return ()
        keys = (key.strip() for key in self.api_keys.get_secret_value().split(","))
        return tuple(key.encode() for key in keys if key)


def _looks_numeric(host: str) -> bool:
    """An IPv4 address (digits and dots) or an IPv6 one (it has a colon)."""
    return ":" in host or bool(re.fullmatch(r"[0-9.]+", host))


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


# SD_* variables that are not server settings but are read elsewhere (see the module docstring).
_OTHER_VARIABLES = frozenset({"SD_API_KEY", "SD_BATCH_PARAMS"})


def _variable(field: str) -> str:
    """The environment variable that sets ``field`` (its alias where it has one, e.g. SD_MODEL_CONFIG)."""
    alias = Settings.model_fields[field].validation_alias
    return alias.upper() if isinstance(alias, str) else f"SD_{field.upper()}"


def check_server_environment() -> list[str]:
    """What `sd-endpoint serve` says about the environment before it starts: the warnings to log.

    Raises SettingsError for SD_API_KEY (the client's variable; set on a server it looks like a key
    but protects nothing). Unknown SD_* variables (a typo such as SD_API_KEYZ) are named, never
    their values, in one warning.
    """
    # The environment as the settings read it (names folded to lower case, as they match).
    environment = EnvSettingsSource(Settings, case_sensitive=False).env_vars
    names = sorted(name.upper() for name in environment if name.upper().startswith("SD_"))
    if "SD_API_KEY" in names:
        raise SettingsError(
            "SD_API_KEY: set, but the server reads its keys from SD_API_KEYS (SD_API_KEY is the generate "
            "client's variable): rename it, or unset it to serve without keys"
        )
    known = {_variable(field) for field in Settings.model_fields} | _OTHER_VARIABLES
    unknown = [name for name in names if name not in known]
    if not unknown:
        return []
    shown = ", ".join(name[:60] for name in unknown[:20]) + (", ..." if len(unknown) > 20 else "")
    return [f"unknown SD_* variables, ignored (a typo?): {shown}; docs/settings.md lists the settings"]
