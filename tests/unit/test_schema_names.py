"""TASKQ_DB_SCHEMA: which names it takes, where the SQL says it, what each schema owns."""

from __future__ import annotations

import pytest

from taskq import sql
from taskq.errors import ConfigError
from taskq.fleet.leader import lock_key
from taskq.fleet.relay import LOCK_KEY as RELAY_KEY
from taskq.fleet.sweeper import LOCK_KEY as SWEEPER_KEY
from tests.support.services import make_settings


@pytest.mark.parametrize("name", ["taskq", "jobs", "_queue", "taskq_2", "public", "a" * 50])
def test_plain_lower_case_identifiers_name_the_schema(name: str) -> None:
    assert make_settings(db_schema=name).db_schema == name


@pytest.mark.parametrize(
    "name", ["", "Taskq", "2jobs", "task-q", "task q", 'x"y', "pg_taskq", "a" * 51, "tasks.x"]
)
def test_other_schema_names_are_refused_clearly(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_settings(db_schema=name)
    assert "TASKQ_DB_SCHEMA" in str(caught.value)
    assert "lower-case letters, digits or '_'" in str(caught.value)


def test_the_schema_word_is_replaced_only_where_it_names_the_schema() -> None:
    text = (
        "-- taskq.tasks in a comment\n"
        "SELECT set_config('taskq.actor', $1, true), \"taskq\".x FROM taskq.tasks t\n"
        "JOIN taskq.task_events e ON true, taskq_queue_name;\n"
        "ALTER FUNCTION f() SET search_path = taskq, pg_temp; -- 'unbalanced\n"
        "SELECT 'it''s taskq' FROM taskq.workers"
    )
    assert sql.compile_schema(text, "jobs") == (
        "-- taskq.tasks in a comment\n"
        'SELECT set_config(\'taskq.actor\', $1, true), "taskq".x FROM "jobs".tasks t\n'
        'JOIN "jobs".task_events e ON true, taskq_queue_name;\n'
        'ALTER FUNCTION f() SET search_path = "jobs", pg_temp; -- \'unbalanced\n'
        "SELECT 'it''s taskq' FROM \"jobs\".workers"
    )


def test_each_schema_has_its_own_relay_and_sweeper_locks_and_channel() -> None:
    assert lock_key(RELAY_KEY, "taskq") == RELAY_KEY  # what earlier versions take
    keys = {lock_key(key, schema) for key in (RELAY_KEY, SWEEPER_KEY) for schema in ("a", "b")}
    assert len(keys) == 4 and not keys & {RELAY_KEY, SWEEPER_KEY}
    assert all(-(2**63) <= key < 2**63 for key in keys)  # a Postgres bigint
