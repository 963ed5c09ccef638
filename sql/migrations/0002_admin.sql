-- taskq admin: cooperative cancel, operator re-enqueues, publish generations,
-- listings, retention, the worker registry, and who did what in the history.

ALTER TABLE tasks
    -- Set by an operator's cancel of a RUNNING task. The worker learns it from
    -- its heartbeat and ends the attempt; while it is set, any outcome of the
    -- attempt (and a lease recovery, and a give-back) records CANCELLED.
    ADD COLUMN cancel_requested_at timestamptz,
    -- How often an operator enqueued the task again with fresh attempts
    -- (POST /tasks/{id}/retry or POST /dlq/replay).
    ADD COLUMN replays integer NOT NULL DEFAULT 0,
    -- Bumped by every statement that makes a publish owed (published_at set to
    -- NULL). A confirmed publish is recorded only if the generation it was sent
    -- for is still the row's, so a late confirm of an older publish can never
    -- hide a newer owed one, even when (attempts, status) repeat: an operator's
    -- retry resets attempts to 0, a give-back decrements them.
    ADD COLUMN generation bigint NOT NULL DEFAULT 0,
    ADD CONSTRAINT tasks_replays_range CHECK (replays >= 0),
    ADD CONSTRAINT tasks_cancel_only_running_or_terminal
        CHECK (cancel_requested_at IS NULL OR status <> 'ENQUEUED');

COMMENT ON COLUMN tasks.generation IS 'Bumped whenever a publish becomes owed; guards published markers.';

-- GET /tasks: newest first, keyset pagination on (created_at, id).
CREATE INDEX tasks_created_keyset ON tasks (created_at DESC, id DESC);
-- Retention, throughput and latency of the last minute: finished tasks by time.
CREATE INDEX tasks_finished ON tasks (finished_at)
    WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED');
-- GET /dlq: FAILED tasks, newest finished first.
CREATE INDEX tasks_failed_keyset ON tasks (finished_at DESC, id DESC) WHERE status = 'FAILED';

ALTER TABLE task_events
    -- Operator actions: cancel, cancel_requested, retry, replay, purge. NULL for
    -- what taskq itself did (enqueue, claims, outcomes, recoveries).
    ADD COLUMN action text,
    -- Who: the API key's label, or 'api' when no keys are configured.
    ADD COLUMN actor text,
    -- The operator's reason, if given.
    ADD COLUMN reason text;

-- The triggers read who and why from settings local to the operator's
-- transaction (SET LOCAL taskq.actor = ...), so they stay statement-level and
-- every batch statement still writes its events in one INSERT.
CREATE OR REPLACE FUNCTION taskq_events_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_action text := nullif(current_setting('taskq.action', true), '');
    v_actor  text := nullif(current_setting('taskq.actor', true), '');
    v_reason text := nullif(current_setting('taskq.reason', true), '');
BEGIN
    INSERT INTO task_events (task_id, status, previous_status, attempt, error, worker_id, run_at,
                             action, actor, reason)
    SELECT n.id, n.status, o.status, n.attempts,
           -- Whoever ends an attempt other than by success sets last_error.
           CASE WHEN o.status = 'RUNNING' AND n.status <> 'SUCCEEDED' OR n.status = 'FAILED'
                THEN n.last_error END,
           CASE WHEN n.status = 'ENQUEUED' THEN o.worker_id ELSE n.worker_id END,
           CASE WHEN n.status = 'ENQUEUED' THEN n.run_at END,
           CASE WHEN n.status = o.status AND n.attempts = o.attempts THEN 'cancel_requested'
                ELSE v_action END,
           v_actor, v_reason
    FROM new_rows n
    JOIN old_rows o ON o.id = n.id
    -- A status change, a new attempt (a claim taking over an expired lease), or
    -- a cancel requested for a running task.
    WHERE n.status IS DISTINCT FROM o.status OR n.attempts IS DISTINCT FROM o.attempts
       OR (n.cancel_requested_at IS NOT NULL AND o.cancel_requested_at IS NULL)
    ORDER BY n.id;
    RETURN NULL;
END
$$;

CREATE TABLE workers (
    id             text PRIMARY KEY,
    hostname       text NOT NULL,
    pid            integer NOT NULL,
    queues         text[] NOT NULL,
    concurrency    integer NOT NULL,
    prefetch       integer NOT NULL,
    -- Attempts running at the last heartbeat.
    in_flight      integer NOT NULL DEFAULT 0,
    -- Seconds between heartbeats: a worker silent for 3 of them counts as dead.
    heartbeat_seconds double precision NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE workers IS 'Live workers: upserted at start and by each heartbeat, deleted at a clean stop.';
