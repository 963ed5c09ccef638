-- task_events loses its foreign key to tasks.
--
-- Every event row is written by the tasks triggers from a row of tasks in the
-- same statement, so the reference cannot dangle when it is written; checking
-- it anyway cost a lookup and a key-share lock of the task per event (about a
-- tenth of the database's CPU per task lifecycle). Deleting a task's events is
-- now explicit: the retention statement deletes both. Without the key, the
-- history can also be partitioned or pruned on its own (DESIGN §7).

ALTER TABLE task_events DROP CONSTRAINT task_events_task_id_fkey;

COMMENT ON TABLE task_events IS
    'Append-only history of every task, written only by the tasks triggers; deleted with its task by retention.';
