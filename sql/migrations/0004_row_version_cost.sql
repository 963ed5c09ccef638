-- What each new version of a tasks row costs, made smaller. A task's row gets
-- three versions in its life (enqueued, claimed, finished), none of them a HOT
-- update (the status is indexed), so every table CHECK and every index that is
-- not partial is paid three times per task.
--
-- 1. The queue name's format moves from a table CHECK to a domain. A table
--    CHECK is evaluated for every new row version, whatever the UPDATE set;
--    the regular expression was a twentieth of the database's CPU per task,
--    for a column no status change touches. A domain's CHECK runs where a
--    value is written into the column (INSERT, or an UPDATE that sets it), so
--    the rule holds as before, under the same constraint name.
--    The column changes type without a table rewrite (a domain without
--    constraints over the same type); Postgres rebuilds the one index on the
--    column, tasks_enqueued_due (ENQUEUED rows only). Then the constraint is
--    added and checked in one scan of the table. The whole migration took
--    3.5 s for 1,000,000 tasks on the project's 2-core machine, with writes
--    to tasks blocked meanwhile.
--
-- 2. tasks_status_created (status, created_at) got an entry for every version
--    of every row. Listings filtered by status now find ENQUEUED and RUNNING
--    tasks through the partial indexes those states already have, SUCCEEDED
--    ones (the bulk) along tasks_created_keyset, and FAILED and CANCELLED ones,
--    which may be rare among millions, through a partial index that only
--    their final version enters.

CREATE DOMAIN taskq_queue_name AS text;

ALTER TABLE tasks ALTER COLUMN queue TYPE taskq_queue_name;

ALTER DOMAIN taskq_queue_name
    ADD CONSTRAINT tasks_queue_format CHECK (VALUE ~ '^[a-z0-9][a-z0-9_-]{0,62}$') NOT VALID;

ALTER TABLE tasks DROP CONSTRAINT tasks_queue_format;

ALTER DOMAIN taskq_queue_name VALIDATE CONSTRAINT tasks_queue_format;

COMMENT ON DOMAIN taskq_queue_name IS
    'A work queue name, checked when written (not for every new row version, as a table CHECK is).';

DROP INDEX tasks_status_created;

CREATE INDEX tasks_unsuccessful_created ON tasks (status, created_at DESC, id DESC)
    WHERE status IN ('FAILED', 'CANCELLED');
