"""What the deployment tests share: the environment variables the server's Settings read."""

from __future__ import annotations

import pytest

from service.settings import Settings


def settings_env_names() -> set[str]:
    """The environment variable behind every Settings field (SD_ prefix, or the field's own alias)."""
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias if isinstance(alias, str) else f"SD_{name.upper()}")
    return names


def settings_under(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a server would read with exactly `env` for the variables Settings knows."""
    for name in settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()
