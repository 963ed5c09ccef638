-- taskq's objects move into a schema of their own: `taskq` unless
-- TASKQ_DB_SCHEMA names another (the word taskq below names it; see taskq.sql).
--
-- Transactional enqueue puts taskq's tables into the application's own
-- database, where unprefixed names such as `tasks` or `workers` may clash with
-- the application's. The names stay; the schema keeps them apart.
--
-- taskq migrate runs this file (as every file before it) with search_path set
-- to where taskq's objects are: the schema itself for a new install, whose
-- objects 0001-0006 created there, so every SET SCHEMA below is a no-op; or,
-- for an install made before this file (into the schema the connection's
-- search_path named, `public` as a rule), that schema, from which the objects
-- move. Moving a table moves its indexes, constraints, triggers, row type and
-- the sequences of its identity columns; rows are kept, nothing is rewritten,
-- and each statement takes its table's lock for an instant.
--
-- The trigger functions named task_events unqualified, which the caller's
-- search_path resolved: an enqueue on an application's connection whose
-- search_path does not name the schema would fail in the trigger. Each now
-- runs with the schema as its own search_path (pg_temp last, so that no
-- temporary table can stand in for taskq's).
--
-- The schema exists already: taskq migrate creates it before any file runs.

ALTER TABLE taskq_migrations SET SCHEMA taskq;
ALTER TABLE task_type SET SCHEMA taskq;
ALTER TABLE tasks SET SCHEMA taskq;
ALTER TABLE task_events SET SCHEMA taskq;
ALTER TABLE workers SET SCHEMA taskq;
ALTER TABLE queue_purges SET SCHEMA taskq;
ALTER DOMAIN taskq_queue_name SET SCHEMA taskq;
ALTER FUNCTION taskq_events_on_insert() SET SCHEMA taskq;
ALTER FUNCTION taskq_events_on_update() SET SCHEMA taskq;

ALTER FUNCTION taskq.taskq_events_on_insert() SET search_path = taskq, pg_temp;
ALTER FUNCTION taskq.taskq_events_on_update() SET search_path = taskq, pg_temp;
