-- taskq:no-transaction
--
-- A WAITING task holds its unique key (issue #17: unique tasks beside the
-- waiting state of 0013).
--
-- A task parked WAITING (its type paused, or its concurrency key without a free
-- slot) has not run: for its unique key it is still queued. The arbiter of
-- 0011 (tasks_unique_key) counted only ENQUEUED, RUNNING and SUCCEEDED rows, so
-- while a task waited a duplicate of its key was inserted. Its successor,
-- tasks_unique_holder, counts WAITING as ENQUEUED:
--   queued         - ENQUEUED or WAITING, and never started (started_at IS NULL).
--   active         - ENQUEUED, WAITING or RUNNING (retries included).
--   until_finished - ENQUEUED, WAITING, RUNNING or SUCCEEDED.
-- The statements that write the predicate out again (enqueue_unique_holders,
-- task_get's unique_held) read it as written here.
--
-- 1. Duplicates let in before: of the rows that hold a key under the new
--    predicate, a WAITING row gives its key up (unique_key NULL, as an
--    operator's retry does: it runs outside its uniqueness) when a row holds
--    it under the old one, or when an older WAITING row holds it too. Both
--    tasks stay as they are otherwise; only the index would refuse them.
-- 2. The new index is built CONCURRENTLY (writes go on meanwhile). Should a
--    process of the older version insert a duplicate of a waiting task's key
--    during the build, either its insert fails or the build does, leaving the
--    index invalid; the next run drops it (taskq.migrate), gives the
--    duplicate's key up (1.) and builds it again.
-- 3. The old index is dropped, CONCURRENTLY. While both exist, an insert must
--    pass both (ON CONFLICT DO NOTHING names no arbiter: it checks every one).
-- Each statement may run again after a failed run.

WITH waiting AS (
    SELECT t.id, t.unique_key,
           row_number() OVER (PARTITION BY t.unique_key ORDER BY t.created_at, t.id) AS n
    FROM taskq.tasks t
    WHERE t.status = 'WAITING' AND t.unique_key IS NOT NULL
      AND (t.unique_while <> 'queued' OR t.started_at IS NULL)
), duplicate AS (
    SELECT w.id FROM waiting w
    WHERE w.n > 1 OR EXISTS (
        SELECT FROM taskq.tasks h
        WHERE h.unique_key = w.unique_key AND h.unique_key IS NOT NULL AND (
            (h.status = 'ENQUEUED' AND (h.unique_while <> 'queued' OR h.started_at IS NULL))
            OR (h.status = 'RUNNING' AND h.unique_while <> 'queued')
            OR (h.status = 'SUCCEEDED' AND h.unique_while = 'until_finished')))
)
UPDATE taskq.tasks t SET unique_key = NULL
WHERE t.id = ANY(ARRAY(SELECT id FROM duplicate)) AND t.status = 'WAITING';

-- The arbiter: one holder per key. Its predicate is written out again where a
-- holder is read (enqueue_unique_holders, task_get).
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS tasks_unique_holder ON taskq.tasks (unique_key)
    WHERE unique_key IS NOT NULL AND (
        (status IN ('ENQUEUED', 'WAITING') AND (unique_while <> 'queued' OR started_at IS NULL))
        OR (status = 'RUNNING' AND unique_while <> 'queued')
        OR (status = 'SUCCEEDED' AND unique_while = 'until_finished'));

COMMENT ON INDEX taskq.tasks_unique_holder IS
    'One holder per unique key: ENQUEUED or WAITING (never started, for queued), RUNNING (active, until_finished), SUCCEEDED (until_finished).';

DROP INDEX CONCURRENTLY IF EXISTS taskq.tasks_unique_key;
