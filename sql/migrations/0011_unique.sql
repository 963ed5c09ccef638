-- taskq:no-transaction
--
-- Unique tasks and debounce (issue #17 item 2; taskq.unique).
--
-- A task enqueued with `unique` carries a unique_key (its type and a key taken
-- from its payload or given with the enqueue) and the states in which it holds
-- that key (unique_while). A partial unique index over the rows that hold their
-- key makes Postgres the arbiter: of concurrent enqueues of one key, one row
-- is inserted and the others conflict with it (ON CONFLICT DO NOTHING), in one
-- statement or many, in the callers' own transactions or not. The enqueue then
-- answers with the holder ("duplicate"), or, to debounce, moves the holder's
-- run_at and payload ("replace").
--
-- Which states hold the key (unique_while):
--   queued         - ENQUEUED and never started (started_at IS NULL): the first
--                    claim frees the key for good, so a retry of a started task
--                    never competes for it.
--   active         - ENQUEUED or RUNNING (retries included).
--   until_finished - ENQUEUED, RUNNING or SUCCEEDED: only a FAILED or CANCELLED
--                    task (or one retention deleted) frees it.
-- unique_until bounds the holding in time ("for"): once past, the next enqueue of
-- the key releases the holder (sets its unique_key to NULL) and inserts anew.
-- An operator's retry (requeue) clears unique_key: the task runs again outside
-- its uniqueness (it neither waits for the key nor takes it).
--
-- Rows without unique_key (every task of a type without `unique`) are outside
-- the index: their inserts and updates add no entry to it.
--
-- The index is built CONCURRENTLY (writes to tasks go on meanwhile); each
-- statement may run again after a failed run (IF NOT EXISTS, IF EXISTS).

ALTER TABLE taskq.tasks
    ADD COLUMN IF NOT EXISTS unique_key text,
    ADD COLUMN IF NOT EXISTS unique_while text,
    ADD COLUMN IF NOT EXISTS unique_until timestamptz;

COMMENT ON COLUMN taskq.tasks.unique_key IS
    'type/key of a unique task (NULL: not unique, or released); held as unique_while says.';
COMMENT ON COLUMN taskq.tasks.unique_while IS
    'The states that hold unique_key: queued (ENQUEUED, never started), active (ENQUEUED, RUNNING) or until_finished (also SUCCEEDED).';
COMMENT ON COLUMN taskq.tasks.unique_until IS
    'When the key stops being held whatever the state (the unique "for"); NULL: no bound.';

ALTER TABLE taskq.tasks DROP CONSTRAINT IF EXISTS tasks_unique_valid;
ALTER TABLE taskq.tasks ADD CONSTRAINT tasks_unique_valid CHECK (
    (unique_key IS NULL OR octet_length(unique_key) BETWEEN 3 AND 2048)
    AND (unique_while IS NULL OR unique_while IN ('queued', 'active', 'until_finished'))
    AND (unique_key IS NULL OR unique_while IS NOT NULL)
) NOT VALID;
ALTER TABLE taskq.tasks VALIDATE CONSTRAINT tasks_unique_valid;

ALTER TABLE taskq.task_type ADD COLUMN IF NOT EXISTS unique_spec jsonb;

COMMENT ON COLUMN taskq.task_type.unique_spec IS
    'The type''s unique (key, while, for, on_conflict) for enqueues that give none; NULL: not unique.';

ALTER TABLE taskq.task_type DROP CONSTRAINT IF EXISTS task_type_unique_object;
ALTER TABLE taskq.task_type ADD CONSTRAINT task_type_unique_object
    CHECK (unique_spec IS NULL OR jsonb_typeof(unique_spec) = 'object');

-- The arbiter: one holder per key. Its predicate is the "holds" of the table
-- above, written out again where a holder is read (enqueue_unique_holders, task_get).
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS tasks_unique_key ON taskq.tasks (unique_key)
    WHERE unique_key IS NOT NULL AND (
        (status = 'ENQUEUED' AND (unique_while <> 'queued' OR started_at IS NULL))
        OR (status = 'RUNNING' AND unique_while <> 'queued')
        OR (status = 'SUCCEEDED' AND unique_while = 'until_finished'));
