-- taskq initial schema: the task type registry, tasks, and their event history.
--
-- State machine of tasks.status (who moves a task there):
--   ENQUEUED  - the API or client inserted it; a worker gave it back for a retry
--               (last_error says why, run_at says when); the sweeper recovered it
--               from a worker whose lease expired; a graceful shutdown gave it back.
--   RUNNING   - a worker claimed it: attempts was incremented, worker_id and
--               lease_expires_at are set and the heartbeat extends the lease.
--   SUCCEEDED - the worker holding the claim recorded the handler's result. Terminal.
--   FAILED    - attempts are exhausted or the handler failed for good. Terminal.
--   CANCELLED - an operator cancelled it. Terminal.

CREATE TABLE task_type (
    name            text PRIMARY KEY,
    queue           text NOT NULL,
    max_attempts    integer NOT NULL DEFAULT 5,
    timeout_seconds double precision NOT NULL DEFAULT 300,
    -- NULL: the global backoff from settings. Otherwise
    -- {"strategy": "list", "delays": [5, 30]} | {"strategy": "fixed", "delay": 10}
    -- | {"strategy": "exponential", "base": 1, "factor": 2, "max": 3600, "jitter": 0.1}
    backoff         jsonb,
    -- NULL: any JSON object is accepted as payload. Otherwise a JSON Schema.
    payload_schema  jsonb,
    enabled         boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT task_type_name_format CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$'),
    CONSTRAINT task_type_queue_format CHECK (queue ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    CONSTRAINT task_type_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 100),
    CONSTRAINT task_type_timeout_positive CHECK (timeout_seconds > 0),
    CONSTRAINT task_type_backoff_object CHECK (backoff IS NULL OR jsonb_typeof(backoff) = 'object'),
    CONSTRAINT task_type_schema_object
        CHECK (payload_schema IS NULL OR jsonb_typeof(payload_schema) = 'object')
);

COMMENT ON TABLE task_type IS 'Registry of task types: workers upsert the types they handle, admins edit them.';

CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    type             text NOT NULL REFERENCES task_type (name) ON UPDATE CASCADE,
    queue            text NOT NULL,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'ENQUEUED',
    -- Attempts started so far; a claim increments it. Counted here, never in x-death.
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL,
    idempotency_key  text,
    -- Hash of the enqueue request, so a reused key with another request is a conflict.
    request_fingerprint text,
    result           jsonb,
    last_error       text,
    timeout_seconds  double precision NOT NULL,
    -- Not to be started before this moment (delays, scheduled tasks, retry backoff).
    run_at           timestamptz NOT NULL DEFAULT now(),
    -- While RUNNING: the claim holds until then; the heartbeat extends it.
    lease_expires_at timestamptz,
    worker_id        text,
    -- NULL while a publish is owed: to the work or delay queues for ENQUEUED,
    -- to the dead-letter queue for FAILED. The relay pays what is owed.
    published_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CONSTRAINT tasks_status_valid
        CHECK (status IN ('ENQUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    CONSTRAINT tasks_queue_format CHECK (queue ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    CONSTRAINT tasks_payload_object CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT tasks_max_attempts_range CHECK (max_attempts BETWEEN 1 AND 100),
    CONSTRAINT tasks_attempts_range CHECK (attempts BETWEEN 0 AND max_attempts),
    CONSTRAINT tasks_idempotency_key_length
        CHECK (idempotency_key IS NULL OR length(idempotency_key) BETWEEN 1 AND 255),
    CONSTRAINT tasks_timeout_positive CHECK (timeout_seconds > 0),
    CONSTRAINT tasks_running_has_lease
        CHECK (status <> 'RUNNING' OR (lease_expires_at IS NOT NULL AND worker_id IS NOT NULL)),
    CONSTRAINT tasks_terminal_has_finished_at
        CHECK (status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED') OR finished_at IS NOT NULL)
);

COMMENT ON TABLE tasks IS 'One row per task: the source of truth for its state.';

CREATE UNIQUE INDEX tasks_idempotency_key_unique ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The relay's work list: rows whose publish is owed.
CREATE INDEX tasks_publish_owed ON tasks (updated_at)
    WHERE published_at IS NULL AND status IN ('ENQUEUED', 'FAILED');
-- The sweeper's work list: claims whose lease may have expired.
CREATE INDEX tasks_running_lease ON tasks (lease_expires_at) WHERE status = 'RUNNING';
-- Overdue ENQUEUED tasks per queue (broker lost them) and listings.
CREATE INDEX tasks_enqueued_due ON tasks (queue, run_at) WHERE status = 'ENQUEUED';
CREATE INDEX tasks_status_created ON tasks (status, created_at);

CREATE TABLE task_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id         uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    status          text NOT NULL,
    -- NULL for the insert.
    previous_status text,
    -- tasks.attempts after the change: 0 when enqueued, n while attempt n runs.
    attempt         integer NOT NULL,
    -- The error that caused a retry or a failure.
    error           text,
    worker_id       text,
    -- For ENQUEUED: when the task is due.
    run_at          timestamptz,
    at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT task_events_status_valid
        CHECK (status IN ('ENQUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED'))
);

COMMENT ON TABLE task_events IS 'Append-only history of every task, written only by the triggers below.';

CREATE INDEX task_events_task ON task_events (task_id, id);

-- Statement-level triggers with transition tables: a batch insert or a batch
-- outcome writes all of its events in one statement, not one call per row.
CREATE FUNCTION taskq_events_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_events (task_id, status, attempt, run_at)
    SELECT n.id, n.status, n.attempts, n.run_at
    FROM new_rows n;
    RETURN NULL;
END
$$;

CREATE FUNCTION taskq_events_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO task_events (task_id, status, previous_status, attempt, error, worker_id, run_at)
    SELECT n.id, n.status, o.status, n.attempts,
           -- Whoever ends an attempt other than by success sets last_error.
           CASE WHEN o.status = 'RUNNING' AND n.status <> 'SUCCEEDED' OR n.status = 'FAILED'
                THEN n.last_error END,
           CASE WHEN n.status = 'ENQUEUED' THEN o.worker_id ELSE n.worker_id END,
           CASE WHEN n.status = 'ENQUEUED' THEN n.run_at END
    FROM new_rows n
    JOIN old_rows o ON o.id = n.id
    -- A status change, or a new attempt (a claim taking over an expired lease).
    WHERE n.status IS DISTINCT FROM o.status OR n.attempts IS DISTINCT FROM o.attempts
    ORDER BY n.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_events_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION taskq_events_on_insert();

CREATE TRIGGER tasks_events_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION taskq_events_on_update();
