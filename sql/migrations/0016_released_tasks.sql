-- taskq:no-transaction
--
-- The sweeper's repair of missed releases (taskq.fleet.sweeper, repair_waiting)
-- tells a key whose waiting tasks were never released from one whose released
-- tasks are on their way: a task released from WAITING is ENQUEUED with its
-- concurrency key still set (as is one retried, given back or recovered after
-- holding a slot), and once due it will take a slot of that key when claimed.
-- A key has room for more only while its running tasks and those on their way
-- are fewer than its limit; this index counts the latter per key without
-- reading any other ENQUEUED task.
--
-- Only ENQUEUED rows of limited types that were parked or held a slot enter it:
-- tasks of types without a concurrency limit never do (their concurrency_key is
-- NULL). Built CONCURRENTLY (writes to tasks go on meanwhile); the statement may
-- run again after a failed run.

CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_released
    ON taskq.tasks (type, concurrency_key, run_at)
    WHERE status = 'ENQUEUED' AND concurrency_key IS NOT NULL;

COMMENT ON INDEX taskq.tasks_released IS
    'ENQUEUED tasks with a concurrency key (released from WAITING, or retried after holding a slot): the slots they will take, per key.';
