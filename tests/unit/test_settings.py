"""Settings: parsing, validation messages naming the variable, masking."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from taskq import cli
from taskq._utils import format_duration, mask_url, parse_duration
from taskq.errors import ConfigError
from taskq.settings import load_settings
from tests.support import ROOT
from tests.support.services import subprocess_env


def settings_from(monkeypatch: pytest.MonkeyPatch, **env: str):
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
        ("TASKQ_DATABASE_SESSION_URL", "mysql://x/y"),
        ("TASKQ_DATABASE_SESSION_URL", "postgresql://host:5432/"),
        ("TASKQ_DATABASE_POOLER", "odyssey"),
        ("TASKQ_DATABASE_POOLER", "pgbouncer"),
        ("TASKQ_AMQP_URL", "not a url"),
        ("TASKQ_AMQP_URL", "amqp://host:port/"),
        ("TASKQ_NAMESPACE", "bad name"),
        ("TASKQ_WORKER_PREFETCH", "-1"),
        ("TASKQ_WORKER_PROCESSES", "0"),
        ("TASKQ_LEASE_SECONDS", "0"),
        ("TASKQ_HTTP_PORT", "70000"),
        ("TASKQ_MAX_DELAY", "1 day"),
        ("TASKQ_WORKER_INLINE_WINDOW", "2s"),
        ("TASKQ_WORKER_INLINE_WINDOW", "-5ms"),
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
    text = repr(described) + repr(settings)
    assert "s3cret" not in text and "hunter2" not in text and "key-one" not in text
    assert described["TASKQ_AMQP_URL"] == "amqp://user:***@rabbit:5672/prod"
    assert described["TASKQ_BACKOFFS"] == "5s,30s,2m,10m,1h"
    assert set(described) >= {
        "TASKQ_DATABASE_URL",
        "TASKQ_NAMESPACE",
        "TASKQ_QUEUES",
        "TASKQ_WORKER_SHUTDOWN_GRACE",
    }


def test_the_session_url_defaults_to_the_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://app:hunter2@db:5432/taskq"
    plain = settings_from(monkeypatch, TASKQ_DATABASE_URL=url)
    assert plain.session_database_url == url and plain.statement_cache
    assert plain.describe()["TASKQ_DATABASE_SESSION_URL"] == "(TASKQ_DATABASE_URL)"


def test_pgbouncer_takes_a_session_url_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    pooled = "postgresql://app:hunter2@pgbouncer:6432/taskq"
    direct = "postgresql://app:hunter2@db:5432/taskq"
    with pytest.raises(ConfigError, match="TASKQ_DATABASE_SESSION_URL too"):
        settings_from(monkeypatch, TASKQ_DATABASE_POOLER="pgbouncer", TASKQ_DATABASE_URL=pooled)
    with pytest.raises(ConfigError, match="other than TASKQ_DATABASE_URL") as caught:
        settings_from(monkeypatch, TASKQ_DATABASE_SESSION_URL=pooled)
    assert caught.value.variable == "TASKQ_DATABASE_POOLER"
    settings = settings_from(monkeypatch, TASKQ_DATABASE_SESSION_URL=direct)
    assert settings.database_url == pooled and settings.session_database_url == direct
    assert not settings.statement_cache
    described = settings.describe()
    assert described["TASKQ_DATABASE_SESSION_URL"] == "postgresql://app:***@db:5432/taskq"
    assert "hunter2" not in repr(described) + repr(settings)
    # A session-mode pooler (or none) keeps the cache; the session URL still applies.
    monkeypatch.setenv("TASKQ_DATABASE_POOLER", "none")
    assert settings_from(monkeypatch).statement_cache


def test_mask_url_without_password() -> None:
    assert (
        mask_url("postgresql://postgres@127.0.0.1/taskq") == "postgresql://postgres@127.0.0.1/taskq"
    )


def test_env_example_lists_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    from taskq.settings import ENV_PREFIX, Settings

    root = ROOT
    wanted = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    example = dict(re.findall(r"^# (TASKQ_\w+)=(.*)$", (root / ".env.example").read_text(), re.M))
    assert set(example) == wanted
    # The example's values are the defaults.
    defaults = load_settings(_env_file=None)
    for variable, value in example.items():
        monkeypatch.setenv(variable, value)
    assert load_settings(_env_file=None) == defaults


# A password with characters a URL must percent-encode: written as is, parsers
# split the URL inside it and may call a piece of it the port.
PASSWORD_PIECES = ("Zq9", "Xw7")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9/Xw7@db:5432/taskq"),
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9#Xw7@db:5432/taskq"),
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9?Xw7@db/taskq"),
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9Xw7@db:5432x/taskq"),
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9Xw7@db:99999/taskq"),
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9Xw7@db:0/taskq"),
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9Xw7@db1:5432,db2:x/taskq"),
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9Xw7@[::1/taskq"),
        ("TASKQ_DATABASE_SESSION_URL", "postgresql://app:Zq9/Xw7@db:5432/taskq"),
        ("TASKQ_AMQP_URL", "amqp://app:Zq9/Xw7@rabbit:5672/"),
        ("TASKQ_AMQP_URL", "amqp://app:Zq9#Xw7@rabbit/"),
        ("TASKQ_AMQP_URL", "amqp://app:Zq9Xw7@rabbit:port/"),
        ("TASKQ_AMQP_URL", "amqp://app:Zq9Xw7@rabbit:65536/"),
        ("TASKQ_AMQP_URL", "amqp://app:Zq9Xw7@[::1/"),
    ],
)
def test_a_bad_url_is_refused_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(monkeypatch, **{variable: value})
    assert caught.value.variable == variable
    for piece in PASSWORD_PIECES:
        assert piece not in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:Zq9/Xw7@db/taskq",
        "postgresql://app:Zq9?Xw7@db/taskq",
        "amqp://app:Zq9#Xw7@rabbit/",
        "amqp://app:Zq9:Xw7@rabbit:5672/",
    ],
)
def test_mask_url_hides_a_password_a_parser_misreads(url: str) -> None:
    masked = mask_url(url)
    assert masked.endswith(url.rpartition("@")[2]) and ":***@" in masked
    for piece in PASSWORD_PIECES:
        assert piece not in masked


GOOD_DB = "postgresql://app:Zq9Xw7@127.0.0.1:1/taskq"
GOOD_AMQP = "amqp://app:Zq9Xw7@127.0.0.1:1/"


def assert_no_password(output: str) -> None:
    for piece in PASSWORD_PIECES:
        assert piece not in output, output


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9Xw7@127.0.0.1:54x32/taskq", ["config"]),
        ("TASKQ_DATABASE_URL", "postgresql://app:Zq9/Xw7@127.0.0.1/taskq", ["migrate"]),
        ("TASKQ_AMQP_URL", "amqp://app:Zq9/Xw7@127.0.0.1:5672/", ["rmq-init"]),
        ("TASKQ_AMQP_URL", "amqp://app:Zq9Xw7@127.0.0.1:70000/", ["config"]),
    ],
)
def test_a_bad_url_exits_2_naming_the_variable_never_the_password(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    variable: str,
    value: str,
    command: list[str],
) -> None:
    """A bad URL (or a bad port, in either URL) is refused before anything connects, so
    the command line runs in this process (the unreachable services below need one)."""
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("TASKQ_DATABASE_URL", GOOD_DB)
    monkeypatch.setenv("TASKQ_AMQP_URL", GOOD_AMQP)
    monkeypatch.setenv(variable, value)
    assert cli.main(command) == 2
    stdout, stderr = capsys.readouterr()
    assert stderr.startswith("taskq: ") and variable in stderr, stderr
    assert "Traceback" not in stdout + stderr
    assert_no_password(stdout + stderr)


def test_an_unreachable_service_exits_1_never_printing_the_password(tmp_path: Path) -> None:
    """``python -m taskq``, each service refusing its connection: the driver's own
    message, redacted (in a process of its own: the unit layer refuses connections)."""
    cases = [("TASKQ_DATABASE_URL", ["migrate"]), ("TASKQ_AMQP_URL", ["rmq-init"])]
    # Both at once: each is a Python start-up, most of this test's waiting.
    started = []
    for variable, command in cases:
        env = subprocess_env(TASKQ_DATABASE_URL=GOOD_DB, TASKQ_AMQP_URL=GOOD_AMQP)
        process = subprocess.Popen(
            [sys.executable, "-m", "taskq", *command],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((variable, process))
    try:
        for variable, process in started:
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 1, (variable, stderr)
            output = stdout + stderr
            assert stderr.startswith("taskq: ") and "Traceback" not in output, output
            assert_no_password(output)
    finally:
        for _, process in started:
            process.kill()
            process.communicate()


def test_the_amqp_heartbeat_is_a_duration_of_whole_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from(monkeypatch).amqp_heartbeat == 10
    assert settings_from(monkeypatch, TASKQ_AMQP_HEARTBEAT="0").amqp_heartbeat == 0
    with pytest.raises(ConfigError, match="TASKQ_AMQP_HEARTBEAT"):
        settings_from(monkeypatch, TASKQ_AMQP_HEARTBEAT="500ms")
