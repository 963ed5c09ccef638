-- taskq:no-transaction
--
-- Owed publishes the relay sets aside, and queue purges that must finish.
--
-- 1. A publish that fails for the row alone (its queue was removed from the
--    topology, its delay exceeds the delay levels, the broker refuses it
--    while it confirms others) is set aside by the relay with the reason, and
--    retried now and then, so the rows behind it keep flowing. Set-aside rows
--    leave the relay's work list: tasks_publish_due replaces tasks_publish_owed
--    and holds no set-aside row, however many there are; they wait in
--    tasks_publish_set_aside, ordered by their next try. The two hold every owed
--    publish between them.
--
-- 2. A queue purge cancels the queue's ENQUEUED tasks, then purges the broker
--    queue. A task that became ENQUEUED meanwhile may lose its envelope to the
--    purge: the purge marks such tasks' publishes owed again once the broker
--    queue is purged. queue_purges records a purge until then, so that if the
--    process or the database fails in between, the sweeper does it instead.
--
-- The indexes are built CONCURRENTLY (writes to tasks go on meanwhile); each
-- statement may run again after a failed run (IF NOT EXISTS, IF EXISTS).

ALTER TABLE tasks
    ADD COLUMN IF NOT EXISTS set_aside_generation bigint,
    ADD COLUMN IF NOT EXISTS publish_error text,
    ADD COLUMN IF NOT EXISTS publish_retry_at timestamptz;

COMMENT ON COLUMN tasks.set_aside_generation IS
    'The generation whose owed publish the relay set aside; set aside while it equals generation.';
COMMENT ON COLUMN tasks.publish_error IS
    'Why the relay set the owed publish aside (the publish failed for this row alone).';
COMMENT ON COLUMN tasks.publish_retry_at IS
    'When the relay tries a set-aside publish again.';

CREATE TABLE IF NOT EXISTS queue_purges (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue      taskq_queue_name NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE queue_purges IS
    'Broker purges begun and not yet followed by owing again the publishes they may have dropped.';

CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_publish_due ON tasks (updated_at)
    WHERE published_at IS NULL AND status IN ('ENQUEUED', 'FAILED')
      AND set_aside_generation IS DISTINCT FROM generation;

CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_publish_set_aside ON tasks (publish_retry_at)
    WHERE published_at IS NULL AND status IN ('ENQUEUED', 'FAILED')
      AND set_aside_generation = generation;

DROP INDEX CONCURRENTLY IF EXISTS tasks_publish_owed;
