"""Settings: parsing, validation messages naming the variable, masking."""

from __future__ import annotations

import pytest

from taskq._utils import format_duration, mask_url, parse_duration
from taskq.errors import ConfigError
from taskq.settings import load_settings


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str):  # type: ignore[no-untyped-def]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings(_env_file=None)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5),
        ("2m", 120),
        ("1h", 3600),
        ("30d", 2592000),
        ("7", 7),
        ("1.5", 1.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-1", "1 h 2", "s", "nan", "inf"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0.5, 5, 120, 3600, 2592000, 90, 1.25])
def test_format_duration_reads_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


def test_defaults_point_at_local_services(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(monkeypatch)
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/taskq"
    assert settings.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.queues == ["critical", "high", "default", "low"]
    assert settings.queue_type == "quorum"
    assert settings.backoffs == [5, 30, 120, 600, 3600]
    assert settings.max_delay >= 30 * 86400
    assert settings.default_queue == "default"


def test_environment_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(
        monkeypatch,
        TASKQ_QUEUES=" fast , slow ",
        TASKQ_BACKOFFS="500ms,2m",
        TASKQ_LEASE_SECONDS="1m",
        TASKQ_API_KEYS="a,b",
        TASKQ_QUEUE_TYPE="classic",
    )
    assert settings.queues == ["fast", "slow"]
    assert settings.backoffs == [0.5, 120]
    assert settings.lease_seconds == 60
    assert settings.api_keys == ["a", "b"]
    assert settings.default_queue == "slow"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKQ_QUEUES", ""),
        ("TASKQ_QUEUES", "a,a"),
        ("TASKQ_QUEUES", "has.dot"),
        ("TASKQ_QUEUES", "dlq"),
        ("TASKQ_QUEUE_TYPE", "stream"),
        ("TASKQ_BACKOFFS", "5s,soon"),
        ("TASKQ_BACKOFFS", ","),
        ("TASKQ_BACKOFF_STRATEGY", "random"),
        ("TASKQ_DATABASE_URL", "mysql://x/y"),
        ("TASKQ_DATABASE_URL", "postgresql://host:5432/"),
        ("TASKQ_AMQP_URL", "not a url"),
        ("TASKQ_AMQP_URL", "amqp://host:port/"),
        ("TASKQ_NAMESPACE", "bad name"),
        ("TASKQ_WORKER_PREFETCH", "0"),
        ("TASKQ_WORKER_PROCESSES", "0"),
        ("TASKQ_LEASE_SECONDS", "0"),
        ("TASKQ_HTTP_PORT", "70000"),
        ("TASKQ_MAX_DELAY", "1 day"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(monkeypatch, **{variable: value})
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"invalid {variable}: ")
    assert "\n" not in str(caught.value)


def test_describe_masks_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_from(
        monkeypatch,
        TASKQ_AMQP_URL="amqp://user:s3cret@rabbit:5672/prod",
        TASKQ_DATABASE_URL="postgresql://app:hunter2@db:5432/taskq",
        TASKQ_API_KEYS="key-one,key-two",
    )
    described = settings.describe()
    text = repr(described)
    assert "s3cret" not in text and "hunter2" not in text and "key-one" not in text
    assert described["TASKQ_AMQP_URL"] == "amqp://user:***@rabbit:5672/prod"
    assert described["TASKQ_BACKOFFS"] == "5s,30s,2m,10m,1h"
    assert set(described) >= {
        "TASKQ_DATABASE_URL",
        "TASKQ_NAMESPACE",
        "TASKQ_QUEUES",
        "TASKQ_WORKER_SHUTDOWN_GRACE",
    }


def test_mask_url_without_password() -> None:
    assert (
        mask_url("postgresql://postgres@127.0.0.1/taskq") == "postgresql://postgres@127.0.0.1/taskq"
    )


def test_env_example_and_readme_list_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    from pathlib import Path

    from taskq.settings import ENV_PREFIX, Settings

    root = Path(__file__).resolve().parent.parent
    wanted = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    example = dict(re.findall(r"^# (TASKQ_\w+)=(.*)$", (root / ".env.example").read_text(), re.M))
    assert set(example) == wanted
    readme = (root / "README.md").read_text()
    for variable in wanted:
        assert f"| `{variable}` |" in readme, variable
    # The example's values are the defaults.
    defaults = load_settings(_env_file=None)
    for variable, value in example.items():
        monkeypatch.setenv(variable, value)
    assert load_settings(_env_file=None) == defaults
