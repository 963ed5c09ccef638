-- Named query blocks, run only by taskq.store and taskq.migrate.
-- Each block lists its $n parameters in its header comment.

-- name: migrations_lock
-- Serialises concurrent `taskq migrate` runs on one database.
-- $1: advisory lock key (bigint)
SELECT pg_advisory_lock($1);

-- name: migrations_unlock
-- $1: advisory lock key (bigint)
SELECT pg_advisory_unlock($1);

-- name: migrations_table
CREATE TABLE IF NOT EXISTS taskq_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_applied
SELECT version, name, checksum FROM taskq_migrations ORDER BY version;

-- name: migrations_record
-- $1: version, $2: name, $3: sha256 of the file
INSERT INTO taskq_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- ---------------------------------------------------------------- task types

-- name: types_all
SELECT name, queue, max_attempts, timeout_seconds, backoff::text, payload_schema::text,
       enabled, created_at, updated_at
FROM task_type ORDER BY name;

-- name: type_put
-- Creates or replaces one task type (the admin API).
-- $1: name, $2: queue, $3: max_attempts, $4: timeout_seconds, $5: backoff (json text or NULL),
-- $6: payload_schema (json text or NULL), $7: enabled
INSERT INTO task_type AS t (name, queue, max_attempts, timeout_seconds, backoff, payload_schema, enabled)
VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7)
ON CONFLICT (name) DO UPDATE SET
    queue = EXCLUDED.queue, max_attempts = EXCLUDED.max_attempts,
    timeout_seconds = EXCLUDED.timeout_seconds, backoff = EXCLUDED.backoff,
    payload_schema = EXCLUDED.payload_schema, enabled = EXCLUDED.enabled, updated_at = now()
RETURNING name, queue, max_attempts, timeout_seconds, backoff::text, payload_schema::text,
          enabled, created_at, updated_at, (xmax = 0) AS created;

-- name: types_register
-- Workers register the types they handle at start: a new type is created from
-- the handler's options; an existing one takes the handler's options but keeps
-- what only admins set (payload_schema, enabled).
-- $1: names text[], $2: queues text[], $3: max_attempts int[], $4: timeouts float8[],
-- $5: backoffs text[] (json or NULL)
INSERT INTO task_type AS t (name, queue, max_attempts, timeout_seconds, backoff)
SELECT r.name, r.queue, r.max_attempts, r.timeout_seconds, r.backoff::jsonb
FROM unnest($1::text[], $2::text[], $3::int[], $4::float8[], $5::text[])
    AS r(name, queue, max_attempts, timeout_seconds, backoff)
ON CONFLICT (name) DO UPDATE SET
    queue = EXCLUDED.queue, max_attempts = EXCLUDED.max_attempts,
    timeout_seconds = EXCLUDED.timeout_seconds, backoff = EXCLUDED.backoff, updated_at = now()
WHERE (t.queue, t.max_attempts, t.timeout_seconds, t.backoff)
    IS DISTINCT FROM (EXCLUDED.queue, EXCLUDED.max_attempts, EXCLUDED.timeout_seconds, EXCLUDED.backoff);

-- ---------------------------------------------------------------- enqueue

-- name: enqueue
-- Inserts a batch of tasks; defaults come from the (enabled) task type. Rows whose
-- idempotency key exists already are skipped (see enqueue_existing); rows whose
-- type is unknown or disabled are skipped too. `delay` is the time until run_at
-- measured on the database's clock, which is what the publish into the delay
-- levels needs.
-- $1: ids uuid[], $2: types text[], $3: queues text[] (NULL: the type's),
-- $4: payloads text[] (json), $5: max_attempts int[] (NULL: the type's),
-- $6: idempotency keys text[], $7: request fingerprints text[],
-- $8: timeouts float8[] (NULL: the type's), $9: run_at timestamptz[] (NULL: now + delay),
-- $10: delays float8[] (NULL: 0)
INSERT INTO tasks (id, type, queue, payload, max_attempts, idempotency_key,
                   request_fingerprint, timeout_seconds, run_at)
SELECT r.id, r.type, coalesce(r.queue, t.queue), r.payload::jsonb,
       coalesce(r.max_attempts, t.max_attempts), r.idempotency_key, r.fingerprint,
       coalesce(r.timeout_seconds, t.timeout_seconds),
       coalesce(r.run_at, now() + make_interval(secs => coalesce(r.delay, 0)))
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[],
            $7::text[], $8::float8[], $9::timestamptz[], $10::float8[])
    WITH ORDINALITY AS r(id, type, queue, payload, max_attempts, idempotency_key,
                         fingerprint, timeout_seconds, run_at, delay, n)
JOIN task_type t ON t.name = r.type AND t.enabled
ORDER BY r.n
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id, type, queue, status, attempts, max_attempts, run_at, created_at,
          greatest(0, extract(epoch FROM run_at - clock_timestamp()))::float8 AS delay;

-- name: enqueue_existing
-- The tasks that already hold some idempotency keys, with the answer their
-- enqueue gave (status ENQUEUED, attempts 0 and the original run_at).
-- $1: idempotency keys text[]
SELECT t.id, t.type, t.queue, 'ENQUEUED' AS status, 0 AS attempts, t.max_attempts,
       coalesce((SELECT e.run_at FROM task_events e WHERE e.task_id = t.id ORDER BY e.id LIMIT 1),
                t.run_at) AS run_at,
       t.created_at, t.idempotency_key, t.request_fingerprint
FROM tasks t WHERE t.idempotency_key = ANY($1::text[]);

-- name: enqueue_notify
-- Wakes the relay when the enclosing transaction commits (notifications are
-- delivered only on commit): how a task enqueued inside a caller's own
-- transaction gets published without waiting for the relay's next pass.
-- Outside a transaction it wakes the relay at once (an outbox that fell
-- behind hands its oldest rows over this way).
-- $1: channel, $2: payload (comma-separated task ids)
SELECT pg_notify($1, $2);

-- name: mark_published
-- Records confirmed publishes. The (attempts, status) guard makes a late marker
-- of an older publish unable to hide a newer one that is still owed.
-- $1: ids uuid[], $2: attempts int[], $3: statuses text[]
UPDATE tasks t SET published_at = now()
FROM unnest($1::uuid[], $2::int[], $3::text[]) AS r(id, attempts, status)
WHERE t.id = r.id AND t.published_at IS NULL AND t.attempts = r.attempts AND t.status = r.status;

-- ---------------------------------------------------------------- reading

-- name: task_get
-- $1: id
SELECT id, type, queue, payload::text, status, attempts, max_attempts, idempotency_key,
       result::text, last_error, timeout_seconds, run_at, lease_expires_at, worker_id,
       published_at, created_at, updated_at, started_at, finished_at
FROM tasks WHERE id = $1;

-- name: task_events
-- $1: task id
SELECT id, status, previous_status, attempt, error, worker_id, run_at, at
FROM task_events WHERE task_id = $1 ORDER BY id;

-- name: unpublished_count
SELECT count(*) FROM tasks WHERE published_at IS NULL AND status IN ('ENQUEUED', 'FAILED');

-- ---------------------------------------------------------------- relay and sweeper

-- name: session_lock
-- One relay and one sweeper are active across the fleet: the holders of these
-- session locks (each has its own key), held as long as their connection lives.
-- $1: advisory lock key (bigint)
SELECT pg_try_advisory_lock($1);

-- name: publish_owed
-- Rows whose publish is owed and that nobody is publishing right now (older
-- than the grace period), oldest first. FAILED rows are owed to the DLQ.
-- $1: grace seconds, $2: limit
SELECT id, type, queue, status, attempts, last_error,
       greatest(0, extract(epoch FROM run_at - clock_timestamp()))::float8 AS delay
FROM tasks
WHERE published_at IS NULL AND status IN ('ENQUEUED', 'FAILED')
  AND updated_at < now() - make_interval(secs => $1)
ORDER BY updated_at
LIMIT $2;

-- name: publish_owed_ids
-- The owed publishes among some ids (woken by a notification).
-- $1: ids uuid[]
SELECT id, type, queue, status, attempts, last_error,
       greatest(0, extract(epoch FROM run_at - clock_timestamp()))::float8 AS delay
FROM tasks
WHERE id = ANY($1::uuid[]) AND published_at IS NULL AND status IN ('ENQUEUED', 'FAILED');

-- name: recover_expired
-- Takes back claims whose lease expired (the worker died or hung): back to
-- ENQUEUED, due now, or FAILED if no attempt is left. Either way a publish is owed;
-- the rows returned have what taskq.relay.publish_row needs to pay it at once.
-- $1: limit
UPDATE tasks t SET
    status = CASE WHEN t.attempts >= t.max_attempts THEN 'FAILED' ELSE 'ENQUEUED' END,
    last_error = 'lease expired: worker ' || t.worker_id || ' stopped heartbeating',
    finished_at = CASE WHEN t.attempts >= t.max_attempts THEN now() END,
    run_at = now(), lease_expires_at = NULL, worker_id = NULL,
    published_at = NULL, updated_at = now()
WHERE t.id IN (SELECT id FROM tasks WHERE status = 'RUNNING' AND lease_expires_at < now()
               ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING t.id, t.type, t.queue, t.status, t.attempts, t.last_error, 0::float8 AS delay;

-- name: overdue_enqueued
-- ENQUEUED tasks of one queue, published long ago and due for a while: when
-- their work queue holds no ready message, the broker has lost them.
-- $1: queue, $2: seconds overdue, $3: limit
SELECT id FROM tasks
WHERE status = 'ENQUEUED' AND queue = $1 AND published_at IS NOT NULL
  AND run_at < now() - make_interval(secs => $2)
  AND published_at < now() - make_interval(secs => $2)
ORDER BY run_at LIMIT $3;

-- name: republish
-- Marks publishes owed again so that the relay sends them.
-- $1: ids uuid[]
UPDATE tasks SET published_at = NULL, updated_at = now() - interval '1 hour'
WHERE id = ANY($1::uuid[]) AND status = 'ENQUEUED';

-- ---------------------------------------------------------------- worker

-- name: claim
-- Claims a batch of deliveries in one statement. Each id gets a decision:
--   claimed   - now RUNNING under this worker's lease, attempts + 1: run it;
--   terminal  - SUCCEEDED, FAILED or CANCELLED already: drop the delivery;
--   duplicate - RUNNING under a live lease: the lease holder (or the sweeper) owns it;
--   early     - run_at is in the future: send it back through the delay levels;
--   exhausted - no attempt left: now FAILED, owed to the DLQ;
--   missing   - no such task.
-- A claim of a RUNNING task whose lease expired takes it over.
-- Returns one row per distinct id: id, decision, and for rows that exist type,
-- queue, attempts (after the claim), max_attempts, run_at and delay (seconds
-- until run_at, for `early`); payload (json text), timeout_seconds and
-- created_at for `claimed`; last_error for `exhausted` (the DLQ reason).
-- $1: ids uuid[], $2: worker id, $3: lease seconds
WITH input AS (
    SELECT DISTINCT id FROM unnest($1::uuid[]) AS id
), locked AS (
    SELECT t.id, t.type, t.queue, t.status, t.lease_expires_at, t.attempts, t.max_attempts,
           t.run_at, t.worker_id
    FROM tasks t JOIN input i ON i.id = t.id
    ORDER BY t.id
    FOR UPDATE OF t
), decided AS (
    SELECT l.id,
           CASE
               WHEN l.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN 'terminal'
               WHEN l.status = 'RUNNING' AND l.lease_expires_at > now() THEN 'duplicate'
               WHEN l.attempts >= l.max_attempts THEN 'exhausted'
               WHEN l.run_at > clock_timestamp() THEN 'early'
               ELSE 'claimed'
           END AS decision
    FROM locked l
), claimed AS (
    UPDATE tasks t SET
        status = 'RUNNING', attempts = t.attempts + 1, worker_id = $2,
        lease_expires_at = now() + make_interval(secs => $3),
        started_at = now(), updated_at = now(),
        published_at = coalesce(t.published_at, now()),
        last_error = CASE WHEN t.status = 'RUNNING'
                          THEN 'lease expired: worker ' || t.worker_id || ' stopped heartbeating'
                          ELSE t.last_error END
    FROM decided d
    WHERE d.id = t.id AND d.decision = 'claimed'
    RETURNING t.id, t.type, t.queue, t.payload::text AS payload, t.attempts, t.max_attempts,
              t.timeout_seconds, t.run_at, t.created_at
), exhausted AS (
    UPDATE tasks t SET
        status = 'FAILED', finished_at = now(), updated_at = now(), lease_expires_at = NULL,
        last_error = coalesce(t.last_error, 'no attempt left'), published_at = NULL
    FROM decided d
    WHERE d.id = t.id AND d.decision = 'exhausted'
    RETURNING t.id, t.last_error
)
SELECT i.id, coalesce(d.decision, 'missing') AS decision, l.type, l.queue,
       c.payload, coalesce(c.attempts, l.attempts) AS attempts, l.max_attempts,
       c.timeout_seconds, l.run_at, c.created_at, x.last_error,
       greatest(0, extract(epoch FROM l.run_at - clock_timestamp()))::float8 AS delay
FROM input i
LEFT JOIN decided d ON d.id = i.id
LEFT JOIN locked l ON l.id = i.id
LEFT JOIN claimed c ON c.id = i.id
LEFT JOIN exhausted x ON x.id = i.id;

-- name: heartbeat
-- Extends the leases this worker holds.
-- $1: ids uuid[], $2: worker id, $3: lease seconds
UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $3)
WHERE id = ANY($1::uuid[]) AND status = 'RUNNING' AND worker_id = $2
RETURNING id;

-- name: complete
-- Records successes, guarded by the claim (id, attempt, worker): a stale worker
-- whose claim was taken over updates nothing.
-- $1: ids uuid[], $2: attempts int[], $3: results text[] (json), $4: worker id
UPDATE tasks t SET status = 'SUCCEEDED', result = r.result::jsonb, finished_at = now(),
                   updated_at = now(), lease_expires_at = NULL
FROM unnest($1::uuid[], $2::int[], $3::text[]) AS r(id, attempt, result)
WHERE t.id = r.id AND t.status = 'RUNNING' AND t.attempts = r.attempt AND t.worker_id = $4
RETURNING t.id;

-- name: retry
-- Records retryable failures: back to ENQUEUED, due after the backoff, publish owed.
-- $1: ids uuid[], $2: attempts int[], $3: errors text[], $4: delays float8[], $5: worker id
UPDATE tasks t SET status = 'ENQUEUED', last_error = r.error,
                   run_at = now() + make_interval(secs => r.delay),
                   lease_expires_at = NULL, worker_id = NULL, published_at = NULL,
                   updated_at = now()
FROM unnest($1::uuid[], $2::int[], $3::text[], $4::float8[]) AS r(id, attempt, error, delay)
WHERE t.id = r.id AND t.status = 'RUNNING' AND t.attempts = r.attempt AND t.worker_id = $5
RETURNING t.id, t.type, t.queue, t.attempts,
          greatest(0, extract(epoch FROM t.run_at - clock_timestamp()))::float8 AS delay;

-- name: fail
-- Records terminal failures: FAILED, owed to the DLQ.
-- $1: ids uuid[], $2: attempts int[], $3: errors text[], $4: worker id
UPDATE tasks t SET status = 'FAILED', last_error = r.error, finished_at = now(),
                   lease_expires_at = NULL, published_at = NULL, updated_at = now()
FROM unnest($1::uuid[], $2::int[], $3::text[]) AS r(id, attempt, error)
WHERE t.id = r.id AND t.status = 'RUNNING' AND t.attempts = r.attempt AND t.worker_id = $4
RETURNING t.id, t.type, t.queue, t.attempts;

-- name: give_back
-- A worker shutting down gives back tasks it could not finish: ENQUEUED, due
-- now, and the attempt does not count.
-- $1: ids uuid[], $2: attempts int[], $3: worker id
UPDATE tasks t SET status = 'ENQUEUED', attempts = t.attempts - 1,
                   last_error = 'given back by worker ' || t.worker_id || ' at shutdown',
                   run_at = now(), lease_expires_at = NULL, worker_id = NULL,
                   published_at = NULL, updated_at = now()
FROM unnest($1::uuid[], $2::int[]) AS r(id, attempt)
WHERE t.id = r.id AND t.status = 'RUNNING' AND t.attempts = r.attempt AND t.worker_id = $3
RETURNING t.id, t.type, t.queue, t.attempts;

-- name: session_alive
-- Run on the lock's connection every pass: an error means the lock is gone too.
SELECT 1;
