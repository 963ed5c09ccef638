-- taskq:no-transaction
--
-- The W3C trace context of the enqueuer (docs/operations.md, "Tracing").
--
-- A task enqueued inside an OpenTelemetry span (Client.enqueue, enqueue_many) or
-- by an HTTP request with a `traceparent` header keeps that context here; every
-- envelope published for it carries it as its `traceparent` header, and each
-- attempt's span is a child of it, so an enqueue, its attempts and their retries
-- form one trace. NULL: the task is not traced (the common case, which costs a
-- NULL in each row).
--
-- Adding a nullable column without a default changes the catalogue only: no
-- row is rewritten. The CHECK is added NOT VALID (no scan, under the table's
-- lock for an instant) and validated by a statement of its own (a scan that
-- blocks no writes); every existing row holds NULL, which passes it. Each
-- statement may run again after a failed run.

ALTER TABLE taskq.tasks ADD COLUMN IF NOT EXISTS traceparent text;

COMMENT ON COLUMN taskq.tasks.traceparent IS
    'W3C traceparent of the enqueuer (version-traceid-parentid-flags), NULL when not traced.';

ALTER TABLE taskq.tasks DROP CONSTRAINT IF EXISTS tasks_traceparent_format;
ALTER TABLE taskq.tasks ADD CONSTRAINT tasks_traceparent_format
    CHECK (traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$') NOT VALID;
ALTER TABLE taskq.tasks VALIDATE CONSTRAINT tasks_traceparent_format;
