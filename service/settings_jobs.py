"""The settings of jobs that outlive their request (service/jobstore, service/web/jobs): where they
are kept, for how long, how many, and how their webhooks are signed and sent. ``Settings``
(service/settings.py) inherits them: one object, read once from the environment at start-up."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """Where jobs are kept without SD_DATA_DIR: the user's data folder, as other servers keep their
    state; containers set SD_DATA_DIR to a volume."""
    return Path.home() / ".local" / "share" / "sd-endpoint"


class JobSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SD_", extra="ignore", frozen=True, allow_inf_nan=False)

    data_dir: Path | None = Field(
        default=None, description="Jobs' store and results; unset: the XDG data folder."
    )
    job_store: str | None = Field(
        default=None, description='"sqlite" (the default, in SD_DATA_DIR), "redis://HOST:PORT/DB", or "off".'
    )
    job_ttl_s: float = Field(default=86_400, gt=0, description="Finished jobs are kept this long.")
    job_lease_s: float = Field(
        default=15, ge=1, le=3600, description="A replica that stops renewing loses its jobs."
    )
    job_timeout_s: float = Field(
        default=3600, gt=0, description="A job must finish within this once started."
    )
    job_concurrency: int = Field(default=8, ge=1, le=1024, description="Jobs one replica runs at once.")
    max_jobs_per_key: int = Field(
        default=100, ge=1, description="Queued and running jobs of one caller (429)."
    )
    max_jobs: int = Field(default=10_000, ge=1, description="Queued and running jobs in all (429).")
    job_store_max_bytes: int = Field(
        default=2 << 30, ge=1 << 20, description="Bodies and results kept (429)."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="whsec_... secrets that sign webhooks, comma-separated (rotation)."
    )
    webhook_allowed_hosts: str | None = Field(
        default=None, description="Webhook hosts allowed to be loopback or private addresses."
    )
    webhook_progress_s: float = Field(
        default=5, ge=0.5, description="At most one progress webhook this often."
    )

    @field_validator("job_store")
    @classmethod
    def _known_store(cls, value: str | None) -> str | None:
        if (
            value is None
            or value in ("sqlite", "off")
            or value.startswith(("redis://", "rediss://", "sqlite:///"))
        ):
            return value
        raise ValueError('SD_JOB_STORE: use "sqlite", "sqlite:///PATH", "redis://HOST:PORT/DB" or "off"')

    @property
    def jobs_folder(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_data_dir()
