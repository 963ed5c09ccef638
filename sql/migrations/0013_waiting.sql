-- taskq:no-transaction
--
-- One waiting state: a task that exists, is visible and cancellable,
-- but must not be claimed. Paused types and concurrency limits use it now;
-- workflows ('parents') and other gates are meant to join them.
--
-- 1. tasks.status gains WAITING, with the reason in tasks.wait_reason:
--      paused      - its type is paused (POST /types/{t}/pause): the claim parked it;
--                    resuming the type releases it.
--      concurrency - its type's concurrency limit was reached for its key when a
--                    claim took it; an attempt of that key ending releases the
--                    oldest waiting ones, as many as there are free slots.
--    A WAITING task owes no publish and has no envelope in the broker (the claim
--    that parked it acked its delivery). It is released to ENQUEUED with a publish
--    owed, in the transaction that frees it, and the relay is woken then.
--    Retention, lease recovery and the relay leave WAITING tasks alone; an
--    operator's cancel ends them.
--
-- 2. task_type gains `paused` and an optional concurrency limit: at most
--    concurrency_limit tasks RUNNING per value of the payload field
--    concurrency_key (NULL key: one limit for the whole type), across the fleet.
--
-- 3. concurrency_slots counts, per (type, key), the tasks RUNNING under a limit:
--    a claim takes slots by an upsert of the key's row (which waits for and reads
--    the row's latest version, so two claims can never both take the last slot),
--    and whatever ends such an attempt gives its slot back (taskq.store).
--
-- The CHECK constraints are swapped in one statement each (dropped and added NOT
-- VALID: the table's lock for an instant, no scan) and validated by statements of
-- their own (a scan that blocks no writes). The indexes are built CONCURRENTLY.
-- Each statement may run again after a failed run.

ALTER TABLE taskq.tasks
    ADD COLUMN IF NOT EXISTS wait_reason text,
    ADD COLUMN IF NOT EXISTS concurrency_key text;

COMMENT ON COLUMN taskq.tasks.wait_reason IS
    'Why a WAITING task may not be claimed: paused (its type), concurrency (its key''s limit), parents. NULL otherwise.';
COMMENT ON COLUMN taskq.tasks.concurrency_key IS
    'The concurrency key the claim computed for a task of a limited type; a RUNNING task with one holds a slot of concurrency_slots.';

ALTER TABLE taskq.tasks
    DROP CONSTRAINT IF EXISTS tasks_status_valid,
    ADD CONSTRAINT tasks_status_valid
        CHECK (status IN ('ENQUEUED', 'WAITING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED'))
        NOT VALID;
ALTER TABLE taskq.tasks VALIDATE CONSTRAINT tasks_status_valid;

ALTER TABLE taskq.tasks
    DROP CONSTRAINT IF EXISTS tasks_waiting_has_reason,
    ADD CONSTRAINT tasks_waiting_has_reason
        CHECK ((status = 'WAITING') = (wait_reason IS NOT NULL)
               AND (wait_reason IS NULL OR wait_reason IN ('paused', 'concurrency', 'parents')))
        NOT VALID;
ALTER TABLE taskq.tasks VALIDATE CONSTRAINT tasks_waiting_has_reason;

ALTER TABLE taskq.task_events
    DROP CONSTRAINT IF EXISTS task_events_status_valid,
    ADD CONSTRAINT task_events_status_valid
        CHECK (status IN ('ENQUEUED', 'WAITING', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED'))
        NOT VALID;
ALTER TABLE taskq.task_events VALIDATE CONSTRAINT task_events_status_valid;

ALTER TABLE taskq.task_type
    ADD COLUMN IF NOT EXISTS paused boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS concurrency_limit integer,
    ADD COLUMN IF NOT EXISTS concurrency_key text,
    ADD COLUMN IF NOT EXISTS concurrency_source text;

ALTER TABLE taskq.task_type
    DROP CONSTRAINT IF EXISTS task_type_concurrency,
    ADD CONSTRAINT task_type_concurrency
        CHECK ((concurrency_limit IS NULL OR concurrency_limit BETWEEN 1 AND 10000)
               AND (concurrency_limit IS NOT NULL OR concurrency_key IS NULL)
               AND (concurrency_limit IS NULL) = (concurrency_source IS NULL)
               AND (concurrency_source IS NULL OR concurrency_source IN ('code', 'api'))
               AND (concurrency_key IS NULL OR length(concurrency_key) BETWEEN 1 AND 200));

COMMENT ON COLUMN taskq.task_type.paused IS
    'POST /types/{name}/pause: claims park its tasks WAITING (reason paused) until it is resumed.';
COMMENT ON COLUMN taskq.task_type.concurrency_limit IS
    'At most this many of its tasks RUNNING per concurrency key across the fleet (NULL: no limit).';
COMMENT ON COLUMN taskq.task_type.concurrency_key IS
    'The payload field whose value is a task''s concurrency key (NULL: one limit for the type).';
COMMENT ON COLUMN taskq.task_type.concurrency_source IS
    'code: declared by a handler''s concurrency= (workers keep it in step); api: PUT /types.';

CREATE TABLE IF NOT EXISTS taskq.concurrency_slots (
    type     text NOT NULL,
    key      text NOT NULL,
    -- Tasks of (type, key) RUNNING with this key in tasks.concurrency_key.
    running  integer NOT NULL DEFAULT 0 CONSTRAINT concurrency_slots_running CHECK (running >= 0),
    -- The limit the last claim of the key applied.
    lim      integer NOT NULL,
    -- How many slots the last claim that wrote the row took (read by its RETURNING).
    granted  integer NOT NULL DEFAULT 0,
    PRIMARY KEY (type, key)
);

COMMENT ON TABLE taskq.concurrency_slots IS
    'Slots of the concurrency limits, per (type, key): taken by claims, given back when attempts end.';

-- The tasks waiting, by type and key, oldest first: what a resume and a freed
-- slot release. Only WAITING rows enter it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_waiting
    ON taskq.tasks (type, concurrency_key, created_at, id) WHERE status = 'WAITING';

-- GET /tasks?status=WAITING, newest first, without walking every newer task.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_waiting_created
    ON taskq.tasks (created_at DESC, id DESC) WHERE status = 'WAITING';

-- The types with a gate, which every claim reads: empty while none is paused or limited.
CREATE INDEX CONCURRENTLY IF NOT EXISTS task_type_gated
    ON taskq.task_type (name) WHERE paused OR concurrency_limit IS NOT NULL;
