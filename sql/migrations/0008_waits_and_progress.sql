-- Results a caller can wait for, and the progress handlers report.
--
-- 1. Waiting. `Client.wait` and `GET /tasks/{id}?wait=` are woken by a
--    NOTIFY on the channel <schema>_finished when a task they wait for ends.
--    NOTIFY takes a database-wide lock at commit, so only tasks somebody waits
--    for may send one: a waiter first sets tasks.wait_requested (the
--    `wait_request` statement, which also tells it whether the task has ended
--    already), and tasks_notify_finished fires only for such rows. Its WHEN
--    clause is checked as the row is written; for a row nobody waits for no
--    trigger event is queued and no function runs. A transaction's
--    notifications are sent together at its commit, under one lock.
--    The flag stays set (an operator's retry that ends again notifies again).
--    A column with a constant default is added in the catalog only: no table
--    rewrite, the table's lock held for an instant; it is not indexed, so
--    setting it is a HOT update.
--
-- 2. Progress. `ctx.progress(fraction, details)` is written to task_progress,
--    one row per task (the latest report), by the worker in batches: the
--    task's own row gets no new version for it. `seq` grows with every write,
--    so that the event stream finds the reports it has not sent yet. It has
--    no foreign key to tasks (as task_events): retention deletes a task's
--    progress with it.

ALTER TABLE taskq.tasks ADD COLUMN IF NOT EXISTS wait_requested boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN taskq.tasks.wait_requested IS
    'Somebody waits for this task to end: its terminal transition sends a NOTIFY (tasks_notify_finished).';

CREATE OR REPLACE FUNCTION taskq.taskq_notify_finished() RETURNS trigger LANGUAGE plpgsql
SET search_path = taskq, pg_temp AS $$
BEGIN
    -- The channel of this install (taskq.store.finished_channel): <schema>_finished.
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_finished', NEW.id::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS tasks_notify_finished ON taskq.tasks;

CREATE TRIGGER tasks_notify_finished AFTER UPDATE OF status ON taskq.tasks
    FOR EACH ROW
    WHEN (NEW.wait_requested AND NEW.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION taskq.taskq_notify_finished();

CREATE SEQUENCE IF NOT EXISTS taskq.task_progress_seq;

CREATE TABLE IF NOT EXISTS taskq.task_progress (
    task_id    uuid PRIMARY KEY,
    -- The attempt that reported it.
    attempt    integer NOT NULL,
    fraction   double precision NOT NULL
        CONSTRAINT task_progress_fraction_range CHECK (fraction >= 0 AND fraction <= 1),
    -- A JSON object the handler gave, or NULL.
    details    jsonb,
    -- From task_progress_seq at every write (migrations run with the schema as
    -- their search_path, so the name resolves to this install's sequence).
    seq        bigint NOT NULL DEFAULT nextval('task_progress_seq'),
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE taskq.task_progress IS
    'The latest progress each task''s handler reported (ctx.progress), written by workers in batches.';

CREATE INDEX IF NOT EXISTS task_progress_seq_idx ON taskq.task_progress (seq);
