"""The settings of a model library (several models behind one endpoint, model/library): where the
models are, how many stay on each device, and how much host memory keeps evicted ones warm.
``Settings`` (service/settings.py) inherits them: one object, read once from the environment."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1 << 30


class ModelSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SD_", extra="ignore", frozen=True, allow_inf_nan=False)

    models: str | None = Field(
        default=None,
        description="A model library: a folder of models, or a comma list of specs (NAME=SPEC names one).",
    )
    max_resident_models: int = Field(
        default=2, ge=1, le=64, description="Library models on each device at once; least recently used out."
    )
    model_host_cache_gb: float = Field(
        default=16, ge=0, description="Host memory that keeps evicted models for a fast switch back."
    )

    @property
    def model_host_cache_bytes(self) -> int:
        return int(self.model_host_cache_gb * GIB)
