-- What the event history costs per task, made smaller.
--
-- 1. task_events loses its foreign key to tasks. Every event row is written by
--    the tasks triggers from a row of tasks in the same statement, so the
--    reference cannot dangle when it is written; checking it anyway cost a
--    lookup and a key-share lock of the task per event (about a tenth of the
--    database's CPU per task lifecycle). Retention now deletes a task's events
--    itself, and the history can be partitioned or pruned on its own (DESIGN §7).
--
-- 2. The update trigger joins its transition tables (old and new rows) by id.
--    PL/pgSQL caches that query's plan: planned for the first, small statement
--    of a connection as a nested loop, it stayed one for a statement of
--    thousands of rows later (a batch of published markers), which then
--    compared every new row with every old one: 1.4 s instead of 60 ms for
--    4,000 rows. Without nested loops the join is a hash join at any size.

ALTER TABLE task_events DROP CONSTRAINT task_events_task_id_fkey;

COMMENT ON TABLE task_events IS
    'Append-only history of every task, written only by the tasks triggers; deleted with its task by retention.';

ALTER FUNCTION taskq_events_on_update() SET enable_nestloop = off;
