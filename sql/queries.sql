-- Named query blocks, run only by taskq.store and taskq.migrate.
-- Each block names its parameters (:ids) and lists them in its header comment,
-- on lines starting with "-- :", in the order the store passes them: taskq.sql
-- numbers them $1, $2, ... in that order. The word taskq names taskq's schema
-- (TASKQ_DB_SCHEMA); see taskq.sql.

-- name: migrations_lock
-- Serialises concurrent `taskq migrate` runs on one database. A run that does
-- not get it polls again later, rather than wait inside a statement (whose
-- snapshot CREATE INDEX CONCURRENTLY in the run holding it would wait for).
-- :key advisory lock key (bigint)
SELECT pg_try_advisory_lock(:key);

-- name: migrations_lock_timeout
-- How long each migration statement may wait for a lock, for this session.
-- :milliseconds (text)
SELECT set_config('lock_timeout', :milliseconds, false);

-- name: migrations_history_partition
-- The length in seconds of the task history's partitions that migration 0021
-- creates (TASKQ_HISTORY_PARTITION), for this session.
-- :seconds (text)
SELECT set_config('taskq.history_partition', :seconds, false);

-- name: migrations_invalid_indexes
-- Which of these indexes exist but are invalid: a CREATE INDEX CONCURRENTLY
-- that failed (a lock timeout, a cancel) leaves its index so.
-- :index_names text[], :schema the schema the migrations run in
SELECT n.nspname AS schema, c.relname AS name
FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT i.indisvalid AND c.relname = ANY(:index_names::text[]) AND n.nspname = :schema;

-- name: migrations_search_path
-- Where the migration files' unqualified names resolve, for this session: the
-- schema taskq's objects are in (files before 0007 name them unqualified).
-- :schema the schema, quoted as an identifier (text)
SELECT set_config('search_path', :schema, false);

-- name: migrations_schema_exists
-- :schema_name
SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = :schema_name);

-- name: migrations_schema
-- The schema of taskq's objects (TASKQ_DB_SCHEMA), created by taskq migrate
-- when missing (which takes the CREATE privilege on the database; a schema
-- made beforehand by its owner needs none).
CREATE SCHEMA taskq;

-- name: migrations_table_in
-- Whether a schema holds taskq's migrations table.
-- :schema_name
SELECT EXISTS (
    SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = :schema_name AND c.relname = 'taskq_migrations' AND c.relkind = 'r'
);

-- name: migrations_table_found
-- The schema of the migrations table this session's search_path finds (NULL:
-- none): where taskq put its objects before they had a schema of their own.
SELECT n.nspname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass('taskq_migrations');

-- name: migrations_unlock
-- :key advisory lock key (bigint)
SELECT pg_advisory_unlock(:key);

-- name: migrations_table
CREATE TABLE IF NOT EXISTS taskq.taskq_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_applied
SELECT version, name, checksum FROM taskq.taskq_migrations ORDER BY version;

-- name: migrations_record
-- :version, :name, :checksum sha256 of the file
INSERT INTO taskq.taskq_migrations (version, name, checksum) VALUES (:version, :name, :checksum);

-- ---------------------------------------------------------------- task types

-- name: types_all
-- With the limiter each names, and the limit of a type's own (rate_limit, JSON text).
SELECT t.name, t.queue, t.max_attempts, t.timeout_seconds, t.backoff::text,
       t.payload_schema::text, t.enabled, t.created_at, t.updated_at, t.unique_spec::text,
       t.paused, t.limiter, t.limiter_source,
       CASE WHEN r.type_name = t.name
            THEN json_build_object('limit', r.rate, 'per', r.per_seconds, 'burst', r.burst,
                                   'key', r.key)::text
       END AS rate_limit,
       t.concurrency_limit, t.concurrency_key, t.concurrency_source
FROM taskq.task_type t LEFT JOIN taskq.rate_limiters r ON r.name = t.limiter
ORDER BY t.name;

-- name: type_put
-- Creates or replaces one task type (the admin API).
-- :name, :queue, :max_attempts, :timeout_seconds, :backoff (json text or NULL),
-- :payload_schema (json text or NULL), :enabled, :unique_spec (json text or NULL),
-- :concurrency_limit (NULL: none), :concurrency_key (NULL: one limit for the type)
-- The pause is kept (POST /types/{name}/pause and resume set it).
INSERT INTO taskq.task_type AS t (name, queue, max_attempts, timeout_seconds, backoff, payload_schema,
                                  enabled, unique_spec, concurrency_limit, concurrency_key,
                                  concurrency_source)
VALUES (:name, :queue, :max_attempts, :timeout_seconds, :backoff::jsonb, :payload_schema::jsonb,
        :enabled, :unique_spec::jsonb, :concurrency_limit, :concurrency_key,
        CASE WHEN :concurrency_limit::int IS NOT NULL THEN 'api' END)
ON CONFLICT (name) DO UPDATE SET
    queue = EXCLUDED.queue, max_attempts = EXCLUDED.max_attempts,
    timeout_seconds = EXCLUDED.timeout_seconds, backoff = EXCLUDED.backoff,
    payload_schema = EXCLUDED.payload_schema, enabled = EXCLUDED.enabled,
    unique_spec = EXCLUDED.unique_spec,
    concurrency_limit = EXCLUDED.concurrency_limit, concurrency_key = EXCLUDED.concurrency_key,
    concurrency_source = EXCLUDED.concurrency_source, updated_at = now()
RETURNING name, queue, max_attempts, timeout_seconds, backoff::text, payload_schema::text,
          enabled, created_at, updated_at, unique_spec::text, paused, limiter, limiter_source,
          (SELECT json_build_object('limit', r.rate, 'per', r.per_seconds, 'burst', r.burst,
                                    'key', r.key)::text
           FROM taskq.rate_limiters r WHERE r.name = t.limiter AND r.type_name = t.name)
              AS rate_limit,
          concurrency_limit, concurrency_key, concurrency_source, (xmax = 0) AS created;

-- name: types_lock
-- Serialises the writers of the registry for the check against TASKQ_MAX_TASK_TYPES
-- (until the transaction ends).
-- :key advisory lock key (bigint)
SELECT pg_advisory_xact_lock(:key);

-- name: types_count_with
-- How many task types the registry would hold with these names in it.
-- :names text[]
SELECT (SELECT count(*) FROM taskq.task_type)
     + (SELECT count(DISTINCT n.name) FROM unnest(:names::text[]) AS n(name)
        WHERE NOT EXISTS (SELECT 1 FROM taskq.task_type t WHERE t.name = n.name)) AS total;

-- name: types_register
-- Workers register the types they handle at start: a new type is created from
-- the handler's options; an existing one takes the handler's options but keeps
-- what only admins set (enabled, and a payload_schema an operator wrote). The
-- payload_schema a worker writes is its handler's payload model's (NULL: none);
-- it replaces a stored schema only when that one is NULL or a worker's too (it
-- holds the key x-taskq-generated), so an operator's schema stays. Likewise a
-- handler's concurrency limit (NULL: none) replaces a stored one set by code or
-- none; one set through the API stays.
-- Returns the types whose concurrency limit changed (their waiting tasks may
-- have free slots now).
-- :names text[], :queues text[], :max_attempts int[], :timeouts float8[],
-- :backoffs text[] (json or NULL), :payload_schemas text[] (json or NULL),
-- :unique_specs text[] (json or NULL: the handler's unique=),
-- :concurrency_limits int[], :concurrency_keys text[]
WITH before AS (
    SELECT t.name, t.concurrency_limit, t.concurrency_key FROM taskq.task_type t
    WHERE t.name = ANY(:names::text[])
), registered AS (
    INSERT INTO taskq.task_type AS t (name, queue, max_attempts, timeout_seconds, backoff,
                                      payload_schema, unique_spec, concurrency_limit,
                                      concurrency_key, concurrency_source)
    SELECT r.name, r.queue, r.max_attempts, r.timeout_seconds, r.backoff::jsonb,
           r.payload_schema::jsonb, r.unique_spec::jsonb, r.lim, r.key,
           CASE WHEN r.lim IS NOT NULL THEN 'code' END
    FROM unnest(:names::text[], :queues::text[], :max_attempts::int[], :timeouts::float8[],
                :backoffs::text[], :payload_schemas::text[], :unique_specs::text[],
                :concurrency_limits::int[], :concurrency_keys::text[])
        AS r(name, queue, max_attempts, timeout_seconds, backoff, payload_schema, unique_spec,
             lim, key)
    ON CONFLICT (name) DO UPDATE SET
        queue = EXCLUDED.queue, max_attempts = EXCLUDED.max_attempts,
        timeout_seconds = EXCLUDED.timeout_seconds, backoff = EXCLUDED.backoff,
        payload_schema = CASE WHEN t.payload_schema IS NULL OR t.payload_schema ? 'x-taskq-generated'
                              THEN EXCLUDED.payload_schema ELSE t.payload_schema END,
        unique_spec = EXCLUDED.unique_spec,
        concurrency_limit = CASE WHEN t.concurrency_source = 'api' THEN t.concurrency_limit
                                 ELSE EXCLUDED.concurrency_limit END,
        concurrency_key = CASE WHEN t.concurrency_source = 'api' THEN t.concurrency_key
                               ELSE EXCLUDED.concurrency_key END,
        concurrency_source = CASE WHEN t.concurrency_source = 'api' THEN t.concurrency_source
                                  ELSE EXCLUDED.concurrency_source END,
        updated_at = now()
    WHERE (t.queue, t.max_attempts, t.timeout_seconds, t.backoff, t.unique_spec, t.payload_schema,
           t.concurrency_limit, t.concurrency_key)
        IS DISTINCT FROM (EXCLUDED.queue, EXCLUDED.max_attempts, EXCLUDED.timeout_seconds,
                          EXCLUDED.backoff, EXCLUDED.unique_spec,
                          CASE WHEN t.payload_schema IS NULL OR t.payload_schema ? 'x-taskq-generated'
                               THEN EXCLUDED.payload_schema ELSE t.payload_schema END,
                          CASE WHEN t.concurrency_source = 'api' THEN t.concurrency_limit
                               ELSE EXCLUDED.concurrency_limit END,
                          CASE WHEN t.concurrency_source = 'api' THEN t.concurrency_key
                               ELSE EXCLUDED.concurrency_key END)
    RETURNING t.name, t.concurrency_limit, t.concurrency_key
)
SELECT r.name FROM registered r JOIN before b ON b.name = r.name
WHERE (r.concurrency_limit, r.concurrency_key)
    IS DISTINCT FROM (b.concurrency_limit, b.concurrency_key);

-- ---------------------------------------------------------------- waiting (paused types, concurrency limits)
-- A WAITING task is released (ENQUEUED, a publish owed, the relay woken) in the
-- transaction that frees it: a resume, or an attempt of its key ending.

-- name: type_pause
-- Pauses or resumes a type (claims park its tasks WAITING while it is paused).
-- A resume commits this first, then releases the parked tasks (type_release_paused)
-- in transactions of their own: a claim parking tasks of the type holds a share
-- lock on the type's row, which this update waits for.
-- :name, :paused
UPDATE taskq.task_type t SET paused = :paused, updated_at = now()
WHERE t.name = :name
RETURNING t.name, t.queue, t.max_attempts, t.timeout_seconds, t.backoff::text,
          t.payload_schema::text, t.enabled, t.created_at, t.updated_at, t.unique_spec::text,
          t.paused, t.limiter, t.limiter_source,
          (SELECT json_build_object('limit', r.rate, 'per', r.per_seconds, 'burst', r.burst,
                                    'key', r.key)::text
           FROM taskq.rate_limiters r WHERE r.name = t.limiter AND r.type_name = t.name)
              AS rate_limit,
          t.concurrency_limit, t.concurrency_key, t.concurrency_source;

-- name: type_concurrency
-- :name
SELECT concurrency_limit, concurrency_key FROM taskq.task_type WHERE name = :name;

-- name: type_release_paused
-- Releases up to :limit tasks parked by a pause of a type that is not paused (any
-- more), locked in id order. Returns their ids; called again until fewer come back.
-- :name, :limit
WITH released AS (
    SELECT t.id FROM taskq.tasks t
    WHERE t.status = 'WAITING' AND t.type = :name AND t.wait_reason = 'paused'
      AND NOT EXISTS (SELECT FROM taskq.task_type g WHERE g.name = :name AND g.paused)
    ORDER BY t.id
    LIMIT :limit
    FOR UPDATE
)
UPDATE taskq.tasks t SET
    status = 'ENQUEUED', wait_reason = NULL, published_at = NULL,
    generation = t.generation + 1, updated_at = now()
WHERE t.id = ANY(ARRAY(SELECT id FROM released))
RETURNING t.id;

-- name: slots_release
-- Gives back the concurrency slots of attempts that just ended, in the transaction
-- that recorded their end: those among :ids that hold a key and are not RUNNING
-- now. The slots are locked in key order, as claims take them. Returns each key
-- whose slots were given back.
-- :ids uuid[]
WITH ended AS (
    SELECT t.type, t.concurrency_key AS key, count(*) AS n
    FROM unnest(:ids::uuid[]) AS i(id)
    JOIN taskq.tasks t ON t.id = i.id
    WHERE t.concurrency_key IS NOT NULL AND t.status <> 'RUNNING'
    GROUP BY t.type, t.concurrency_key
), held AS (
    SELECT s.type, s.key, e.n
    FROM taskq.concurrency_slots s JOIN ended e ON e.type = s.type AND e.key = s.key
    ORDER BY s.type, s.key
    FOR UPDATE OF s
)
UPDATE taskq.concurrency_slots s SET running = greatest(0, s.running - h.n)
FROM held h
WHERE s.type = h.type AND s.key = h.key
RETURNING s.type, s.key;

-- name: slots_handoff
-- Passes the concurrency slots of attempts that just ended straight to the oldest
-- tasks WAITING for them, claimed for the worker that recorded the outcome (a
-- handoff, see taskq.model.Handoff), and gives back the slots that do not pass, in
-- the outcome's transaction. Those among :ids that hold a key and are not RUNNING
-- now count, as in slots_release.
-- A slot passes when its type still has a limit, is neither paused nor rate
-- limited and its key runs no more than the limit; the key's oldest waiting
-- tasks (one per slot, rows another transaction holds skipped, as in
-- slots_promote) are then taken when they are of :queues, due, with an attempt
-- left and the key their payload gives now (a debounce may have replaced it), at
-- most :room of them, oldest first. A passed slot's row is not written: the key's
-- running count stays as it was, one attempt ending as another begins, so neither
-- the claims nor the releases of the key wait for this transaction. The slots left
-- are given back as slots_release gives them (slot rows locked in key order, after
-- the waiting rows, which nobody waits for while holding a slot row); the waiting
-- tasks of those keys, including any picked here and not taken, are released by
-- slots_promote, a statement of its own.
-- Returns the tasks claimed, as claim_gated returns them (decision 'claimed'), and
-- one row per key whose slots were given back (decision 'freed', with the key's
-- type and concurrency_key).
-- :ids uuid[], :worker_id, :lease_seconds, :queues text[], :room
WITH ended AS (
    SELECT t.type, t.concurrency_key AS key, count(*) AS n
    FROM unnest(:ids::uuid[]) AS i(id)
    JOIN taskq.tasks t ON t.id = i.id
    WHERE t.concurrency_key IS NOT NULL AND t.status <> 'RUNNING'
    GROUP BY t.type, t.concurrency_key
), passing AS (
    SELECT e.type, e.key, e.n, g.concurrency_key AS field
    FROM ended e
    JOIN taskq.task_type g ON g.name = e.type
    JOIN taskq.concurrency_slots s ON s.type = e.type AND s.key = e.key
    WHERE g.concurrency_limit IS NOT NULL AND NOT g.paused AND g.limiter IS NULL
      AND s.running <= g.concurrency_limit
), picked AS (
    -- Locked: the columns are those of each row's latest version.
    SELECT p.key, w.*
    FROM passing p
    CROSS JOIN LATERAL (
        SELECT t.id, t.queue, t.created_at, t.run_at, t.attempts, t.max_attempts,
               coalesce(CASE WHEN p.field IS NULL THEN '' ELSE t.payload ->> p.field END,
                        '') AS payload_key
        FROM taskq.tasks t
        WHERE t.status = 'WAITING' AND t.type = p.type AND t.concurrency_key = p.key
          AND t.wait_reason = 'concurrency'
        ORDER BY t.created_at, t.id
        LIMIT p.n
        FOR UPDATE SKIP LOCKED
    ) w
), clock AS MATERIALIZED (
    -- The clock once the waiting rows are locked: the claims' start.
    SELECT clock_timestamp() AS at FROM (SELECT count(*) FROM picked) locked_all
), chosen AS (
    SELECT c.id FROM (
        SELECT p.id, row_number() OVER (ORDER BY p.created_at, p.id) AS rank
        FROM picked p CROSS JOIN clock
        WHERE p.queue = ANY(:queues::text[]) AND p.run_at <= clock.at
          AND p.attempts < p.max_attempts AND p.payload_key = p.key
    ) c
    WHERE c.rank <= :room
), claimed AS (
    UPDATE taskq.tasks t SET
        status = 'RUNNING', wait_reason = NULL, attempts = t.attempts + 1,
        worker_id = :worker_id, claim_token = gen_random_uuid(),
        lease_expires_at = clock.at + make_interval(secs => :lease_seconds),
        started_at = clock.at, updated_at = clock.at,
        published_at = coalesce(t.published_at, clock.at),
        limited_until = NULL, limited_by = NULL
    FROM clock
    WHERE t.id = ANY(ARRAY(SELECT id FROM chosen))
    RETURNING t.id, t.type, t.queue, t.payload::text AS payload, t.attempts, t.max_attempts,
              t.timeout_seconds, t.run_at, t.created_at, t.claim_token, t.traceparent,
              t.concurrency_key, t.workflow_id
), passed AS (
    SELECT c.type, c.concurrency_key AS key, count(*) AS n FROM claimed c GROUP BY 1, 2
), held AS (
    SELECT s.type, s.key, e.n - coalesce(p.n, 0) AS n
    FROM taskq.concurrency_slots s
    JOIN ended e ON e.type = s.type AND e.key = s.key
    LEFT JOIN passed p ON p.type = s.type AND p.key = s.key
    WHERE e.n > coalesce(p.n, 0)
    ORDER BY s.type, s.key
    FOR UPDATE OF s
), freed AS (
    UPDATE taskq.concurrency_slots s SET running = greatest(0, s.running - h.n)
    FROM held h
    WHERE s.type = h.type AND s.key = h.key
    RETURNING s.type, s.key
)
SELECT c.id, 'claimed' AS decision, c.type, c.queue, c.payload, c.attempts, c.max_attempts,
       c.timeout_seconds, c.run_at, c.created_at, c.claim_token, NULL::text AS last_error,
       NULL::bigint AS generation, 0::float8 AS delay, c.traceparent, c.concurrency_key,
       c.workflow_id
FROM claimed c
UNION ALL
SELECT NULL, 'freed', f.type, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, f.key, NULL
FROM freed f;

-- name: slots_lock
-- Locks the slots of some keys (all of a type's with :keys NULL), in key order,
-- before their waiting tasks are released (slots_promote).
-- :type, :keys text[]
SELECT s.type, s.key FROM taskq.concurrency_slots s
WHERE s.type = :type AND (:keys::text[] IS NULL OR s.key = ANY(:keys::text[]))
ORDER BY s.type, s.key
FOR UPDATE;

-- name: slots_promote
-- Releases the oldest tasks WAITING for a slot of some keys, as many as each key
-- has free slots under its type's limit (all of them once the type has none).
-- Runs after slots_release or slots_lock in the same transaction, as a statement
-- of its own: its snapshot then shows every task a claim parked for these keys
-- before this transaction took their slots. A waiting row another transaction
-- holds is skipped, never waited for: a row this snapshot still shows WAITING may
-- be ENQUEUED since and held by a claim that waits for these slots. Returns, per
-- key, the slots free, the ids released and whether a waiting task remains (the
-- store runs it again for a key that released fewer than it could while some
-- remain: a skipped row, or one the snapshot showed that has moved on), and the
-- work queue of each id released (`queues`, in the order of `ids`).
-- :types text[], :keys text[]
WITH free AS (
    SELECT s.type, s.key,
           CASE WHEN g.concurrency_limit IS NULL THEN 2147483647
                ELSE greatest(0, g.concurrency_limit - s.running) END AS n
    FROM unnest(:types::text[], :keys::text[]) AS f(type, key)
    JOIN taskq.concurrency_slots s ON s.type = f.type AND s.key = f.key
    LEFT JOIN taskq.task_type g ON g.name = s.type
), picked AS (
    SELECT f.type, f.key, w.id, w.queue
    FROM free f
    CROSS JOIN LATERAL (
        SELECT t.id, t.queue FROM taskq.tasks t
        WHERE t.status = 'WAITING' AND t.type = f.type AND t.concurrency_key = f.key
          AND t.wait_reason = 'concurrency'
        ORDER BY t.created_at, t.id
        LIMIT f.n
        FOR UPDATE SKIP LOCKED
    ) w
), released AS (
    UPDATE taskq.tasks t SET
        status = 'ENQUEUED', wait_reason = NULL, published_at = NULL,
        generation = t.generation + 1, updated_at = now()
    WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING t.id
)
SELECT f.type, f.key, f.n AS free,
       ARRAY(SELECT p.id FROM picked p WHERE p.type = f.type AND p.key = f.key
             ORDER BY p.id) AS ids,
       ARRAY(SELECT p.queue FROM picked p WHERE p.type = f.type AND p.key = f.key
             ORDER BY p.id) AS queues,
       EXISTS (SELECT FROM taskq.tasks t
               WHERE t.status = 'WAITING' AND t.type = f.type AND t.concurrency_key = f.key
                 AND t.wait_reason = 'concurrency'
                 AND NOT t.id = ANY(ARRAY(SELECT id FROM picked))) AS more
FROM free f;

-- name: slots_list
-- The concurrency keys of a type with tasks running or waiting, busiest first.
-- :type, :limit
SELECT s.key, s.running,
       (SELECT count(*) FROM taskq.tasks t
        WHERE t.status = 'WAITING' AND t.type = s.type AND t.concurrency_key = s.key) AS waiting
FROM taskq.concurrency_slots s
WHERE s.type = :type AND (s.running > 0 OR EXISTS (
    SELECT FROM taskq.tasks t
    WHERE t.status = 'WAITING' AND t.type = s.type AND t.concurrency_key = s.key))
ORDER BY s.running DESC, s.key
LIMIT :limit;

-- name: waiting_any
-- Whether any task waits: the sweeper's repair probe, an index-only scan of an
-- index that holds WAITING rows alone (nothing to read when none waits).
SELECT EXISTS (SELECT FROM taskq.tasks t WHERE t.status = 'WAITING') AS waiting;

-- name: waiting_keys
-- The sweeper's repair walk: the next :limit distinct (type, key) pairs with tasks
-- WAITING for a concurrency slot after (:after_type, :after_key), in order (one
-- probe of tasks_waiting per pair, whatever the tasks behind each), with whether
-- the key has room under its type's limit (or its type has none now): fewer
-- tasks running than the limit, counting those released and due (ENQUEUED with
-- the key, through tasks_released: each takes a slot when it is claimed). A pair
-- with room and tasks waiting missed its release (slots_promote skips rows
-- another transaction holds); the store releases them as a freed slot does. Read
-- without locks: the release locks the slots and decides again.
-- :after_type, :after_key, :limit
WITH RECURSIVE walk AS (
    (SELECT t.type, t.concurrency_key AS key, 1 AS n FROM taskq.tasks t
     WHERE t.status = 'WAITING' AND t.concurrency_key IS NOT NULL
       AND (t.type, t.concurrency_key) > (:after_type::text, :after_key::text)
     ORDER BY t.type, t.concurrency_key
     LIMIT 1)
    UNION ALL
    SELECT x.type, x.key, w.n + 1
    FROM walk w
    CROSS JOIN LATERAL (
        SELECT t.type, t.concurrency_key AS key FROM taskq.tasks t
        WHERE t.status = 'WAITING' AND t.concurrency_key IS NOT NULL
          AND (t.type, t.concurrency_key) > (w.type, w.key)
        ORDER BY t.type, t.concurrency_key
        LIMIT 1
    ) x
    WHERE w.n < :limit
)
SELECT w.type, w.key,
       EXISTS (SELECT FROM taskq.concurrency_slots s
               LEFT JOIN taskq.task_type g ON g.name = s.type
               WHERE s.type = w.type AND s.key = w.key
                 AND (g.concurrency_limit IS NULL
                      OR s.running + (SELECT count(*) FROM (
                                          SELECT FROM taskq.tasks e
                                          WHERE e.status = 'ENQUEUED' AND e.type = w.type
                                            AND e.concurrency_key = w.key
                                            AND e.run_at <= now()
                                          LIMIT g.concurrency_limit) due)
                         < g.concurrency_limit)) AS room
FROM walk w
ORDER BY w.type, w.key;

-- name: waiting_resumed_types
-- The types not paused that still have tasks parked by a pause (a resume whose
-- releases never ran: its process died after the resume committed).
SELECT g.name FROM taskq.task_type g
WHERE NOT g.paused
  AND EXISTS (SELECT FROM taskq.tasks t
              WHERE t.status = 'WAITING' AND t.type = g.name AND t.concurrency_key IS NULL
                AND t.wait_reason = 'paused')
ORDER BY g.name;

-- name: stats_waiting
-- WAITING tasks by type and reason.
SELECT type, wait_reason, count(*) AS n FROM taskq.tasks WHERE status = 'WAITING'
GROUP BY type, wait_reason;

-- ---------------------------------------------------------------- enqueue

-- name: enqueue
-- Inserts a batch of tasks; defaults come from the (enabled) task type. Rows whose
-- idempotency key exists already are skipped (see enqueue_existing); rows whose
-- type is unknown or disabled are skipped too. `delay` is the time until run_at
-- measured on the database's clock, which is what the publish into the delay
-- levels needs.
-- :ids uuid[], :types text[], :queues text[] (NULL: the type's),
-- :payloads text[] (json), :max_attempts int[] (NULL: the type's),
-- :idempotency_keys text[], :request_fingerprints text[],
-- :timeouts float8[] (NULL: the type's), :run_at timestamptz[] (NULL: now + delay),
-- :delays float8[] (NULL: 0), :traceparents text[] (NULL: not traced)
INSERT INTO taskq.tasks (id, type, queue, payload, max_attempts, idempotency_key,
                   request_fingerprint, timeout_seconds, run_at, traceparent)
SELECT r.id, r.type, coalesce(r.queue, t.queue), r.payload::jsonb,
       coalesce(r.max_attempts, t.max_attempts), r.idempotency_key, r.fingerprint,
       coalesce(r.timeout_seconds, t.timeout_seconds),
       coalesce(r.run_at, now() + make_interval(secs => coalesce(r.delay, 0))), r.traceparent
FROM unnest(:ids::uuid[], :types::text[], :queues::text[], :payloads::text[],
            :max_attempts::int[], :idempotency_keys::text[], :request_fingerprints::text[],
            :timeouts::float8[], :run_at::timestamptz[], :delays::float8[],
            :traceparents::text[])
    WITH ORDINALITY AS r(id, type, queue, payload, max_attempts, idempotency_key,
                         fingerprint, timeout_seconds, run_at, delay, traceparent, n)
JOIN taskq.task_type t ON t.name = r.type AND t.enabled
ORDER BY r.n
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id, type, queue, status, attempts, max_attempts, run_at, created_at, generation,
          greatest(0, extract(epoch FROM run_at - clock_timestamp()))::float8 AS delay;

-- name: enqueue_unique
-- `enqueue` for a batch that holds a unique task (taskq.unique): the same insert,
-- with the unique key, the states that hold it and its bound in time. Rows whose
-- unique key a task holds already are skipped too (see enqueue_unique_holders),
-- also one inserted earlier in the same batch. Batches without a unique task run
-- `enqueue`, which pays none of this.
-- :ids uuid[], :types text[], :queues text[] (NULL: the type's),
-- :payloads text[] (json), :max_attempts int[] (NULL: the type's),
-- :idempotency_keys text[], :request_fingerprints text[],
-- :timeouts float8[] (NULL: the type's), :run_at timestamptz[] (NULL: now + delay),
-- :delays float8[] (NULL: 0), :traceparents text[] (NULL: not traced),
-- :unique_keys text[] (NULL: not unique), :unique_whiles text[],
-- :unique_fors float8[] (seconds the key is held at most; NULL: no bound)
INSERT INTO taskq.tasks (id, type, queue, payload, max_attempts, idempotency_key,
                   request_fingerprint, timeout_seconds, run_at, traceparent,
                   unique_key, unique_while, unique_until)
SELECT r.id, r.type, coalesce(r.queue, t.queue), r.payload::jsonb,
       coalesce(r.max_attempts, t.max_attempts), r.idempotency_key, r.fingerprint,
       coalesce(r.timeout_seconds, t.timeout_seconds),
       coalesce(r.run_at, now() + make_interval(secs => coalesce(r.delay, 0))), r.traceparent,
       r.unique_key, r.unique_while, now() + make_interval(secs => r.unique_for)
FROM unnest(:ids::uuid[], :types::text[], :queues::text[], :payloads::text[],
            :max_attempts::int[], :idempotency_keys::text[], :request_fingerprints::text[],
            :timeouts::float8[], :run_at::timestamptz[], :delays::float8[],
            :traceparents::text[], :unique_keys::text[], :unique_whiles::text[],
            :unique_fors::float8[])
    WITH ORDINALITY AS r(id, type, queue, payload, max_attempts, idempotency_key,
                         fingerprint, timeout_seconds, run_at, delay, traceparent,
                         unique_key, unique_while, unique_for, n)
JOIN taskq.task_type t ON t.name = r.type AND t.enabled
-- Unique keys in one order: two statements inserting the same keys in their
-- transactions (batches) wait for each other in turn, never both ways (a deadlock).
ORDER BY r.unique_key, r.n
-- Every arbiter: the idempotency key's index and the unique key's (tasks_unique_holder).
ON CONFLICT DO NOTHING
RETURNING id, type, queue, status, attempts, max_attempts, run_at, created_at, generation,
          greatest(0, extract(epoch FROM run_at - clock_timestamp()))::float8 AS delay;

-- name: enqueue_unique_holders
-- The tasks that hold some unique keys (the predicate is tasks_unique_holder's, see
-- migration 0015), with the enqueue's answer, whether their hold has expired
-- (unique_until passed: enqueue_unique_release frees it) and whether a duplicate
-- may replace their payload and run_at (ENQUEUED or WAITING, and never started).
-- Each key is looked up through that index, one lookup per key (the LATERAL, kept
-- apart by its LIMIT: a key has one holder): as a join the planner may read the
-- whole index ANDed with the indexes of each status instead.
-- :unique_keys text[]
SELECT t.id, t.type, t.queue, t.status, t.attempts, t.max_attempts, t.run_at, t.created_at,
       t.unique_key, coalesce(t.unique_until <= now(), false) AS expired,
       t.status IN ('ENQUEUED', 'WAITING') AND t.started_at IS NULL AS replaceable
FROM unnest(:unique_keys::text[]) AS k(key)
CROSS JOIN LATERAL (
    SELECT * FROM taskq.tasks t
    WHERE t.unique_key = k.key AND t.unique_key IS NOT NULL AND (
        (t.status IN ('ENQUEUED', 'WAITING') AND (t.unique_while <> 'queued' OR t.started_at IS NULL))
        OR (t.status = 'RUNNING' AND t.unique_while <> 'queued')
        OR (t.status = 'SUCCEEDED' AND t.unique_while = 'until_finished'))
    LIMIT 1
) t;

-- name: enqueue_unique_release
-- Frees the unique keys of holders whose time ("for") has passed, so that the
-- enqueue that found them can insert: unique_key NULL takes a row out of
-- tasks_unique_holder for good. Only the key changes; the task goes on as it was.
-- Rows are locked in id order through the primary key, as `claim` locks them.
-- :ids uuid[]
WITH expired AS (
    SELECT t.id
    FROM (SELECT DISTINCT id FROM unnest(:ids::uuid[]) AS id ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT t.id, t.unique_until FROM taskq.tasks t WHERE t.id = i.id
        OFFSET 0 FOR UPDATE
    ) t
    WHERE t.unique_until <= now()
)
UPDATE taskq.tasks SET unique_key = NULL
WHERE id = ANY(ARRAY(SELECT id FROM expired));

-- name: enqueue_replace
-- Debounce (on_conflict "replace"): holders still ENQUEUED or WAITING and never
-- started take a duplicate's payload and run_at. When the run_at of an ENQUEUED
-- one moves earlier, a publish is owed (a new generation: the envelope in the
-- broker is due later and stays harmless, the claim drops it); when it moves
-- later, the envelope in the broker comes early and the claim sends it back
-- through the delay queues. A WAITING one has no envelope and owes nothing: its
-- release owes the publish, delayed until its run_at then. But one WAITING for a
-- concurrency slot whose new payload names another key (`rekeyed`) would wait for
-- the old key's slot: it goes back to ENQUEUED, owing a publish, and its claim
-- decides again under the new key. Rows are locked in id order, as `claim` locks
-- them; one claimed meanwhile is left alone (no row back).
-- :ids uuid[] (distinct), :payloads text[] (json), :run_at timestamptz[] (NULL: now + delay),
-- :delays float8[] (NULL: 0)
WITH r AS (
    SELECT r.id, r.payload,
           coalesce(r.run_at, now() + make_interval(secs => coalesce(r.delay, 0))) AS run_at
    FROM unnest(:ids::uuid[], :payloads::text[], :run_at::timestamptz[], :delays::float8[])
        AS r(id, payload, run_at, delay)
    ORDER BY r.id
), held AS (
    SELECT t.id, r.payload, r.run_at,
           t.status = 'ENQUEUED' AND r.run_at < t.run_at AS republish,
           -- The key as the claim computes it (claim_gated's concurrency_wanted).
           t.wait_reason = 'concurrency'
               AND t.concurrency_key IS DISTINCT FROM coalesce(
                   (SELECT CASE WHEN g.concurrency_key IS NULL THEN ''
                                ELSE r.payload::jsonb ->> g.concurrency_key END
                    FROM taskq.task_type g WHERE g.name = t.type), '') AS rekeyed
    FROM r CROSS JOIN LATERAL (
        SELECT t.id, t.type, t.status, t.run_at, t.wait_reason, t.concurrency_key
        FROM taskq.tasks t
        WHERE t.id = r.id AND t.status IN ('ENQUEUED', 'WAITING') AND t.started_at IS NULL
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET
    payload = h.payload::jsonb, run_at = h.run_at, updated_at = now(),
    status = CASE WHEN h.rekeyed THEN 'ENQUEUED' ELSE t.status END,
    wait_reason = CASE WHEN h.rekeyed THEN NULL ELSE t.wait_reason END,
    concurrency_key = CASE WHEN h.rekeyed THEN NULL ELSE t.concurrency_key END,
    published_at = CASE WHEN h.republish OR h.rekeyed THEN NULL ELSE t.published_at END,
    generation = CASE WHEN h.republish OR h.rekeyed THEN t.generation + 1 ELSE t.generation END
FROM held h
WHERE t.id = ANY(ARRAY(SELECT id FROM held)) AND t.id = h.id
RETURNING t.id, t.type, t.queue, t.status, t.attempts, t.max_attempts, t.run_at, t.created_at,
          t.generation, t.traceparent, h.republish OR h.rekeyed AS republish,
          greatest(0, extract(epoch FROM t.run_at - clock_timestamp()))::float8 AS delay;

-- name: enqueue_existing
-- The tasks that already hold some idempotency keys, with the answer their
-- enqueue gave (status ENQUEUED, attempts 0 and the original run_at).
-- :idempotency_keys text[]
SELECT t.id, t.type, t.queue, 'ENQUEUED' AS status, 0 AS attempts, t.max_attempts,
       coalesce((SELECT e.run_at FROM taskq.task_events e WHERE e.task_id = t.id ORDER BY e.id LIMIT 1),
                t.run_at) AS run_at,
       t.created_at, t.idempotency_key, t.request_fingerprint
FROM taskq.tasks t WHERE t.idempotency_key = ANY(:idempotency_keys::text[]);

-- name: enqueue_savepoint
-- A batch enqueued in a caller's open transaction is all or nothing: it runs under
-- this savepoint, which is rolled back to when a task of the batch is refused (an
-- idempotency conflict, an unknown type) or its statement fails, so that the
-- caller's transaction holds none of the batch and can go on.
SAVEPOINT taskq_enqueue;

-- name: enqueue_savepoint_release
RELEASE SAVEPOINT taskq_enqueue;

-- name: enqueue_savepoint_rollback
ROLLBACK TO SAVEPOINT taskq_enqueue;

-- name: enqueue_begin
-- The same for a batch given a caller's connection with no transaction open (in
-- autocommit): a transaction of its own, committed or rolled back as a whole.
BEGIN;

-- name: enqueue_commit
COMMIT;

-- name: enqueue_rollback
ROLLBACK;

-- name: enqueue_notify
-- Wakes the relay when the enclosing transaction commits (notifications are
-- delivered only on commit): how a task enqueued inside a caller's own
-- transaction gets published without waiting for the relay's next pass.
-- Outside a transaction it wakes the relay at once (an outbox that fell
-- behind hands its oldest rows over this way).
-- :channel, :payload (comma-separated task ids)
SELECT pg_notify(:channel, :payload);

-- name: mark_published
-- Records confirmed publishes. The generation guard makes a late marker of an
-- older publish unable to hide a newer one that is still owed (every statement
-- that makes a publish owed bumps the generation).
-- A row another transaction has locked is skipped, not waited for: that is a
-- worker claiming it (which records the publish itself), or a statement making
-- the publish owed again (a newer generation). Waiting instead queued claims
-- behind markers of thousands of rows for seconds.
-- Each id is looked up through the primary key (the LATERAL, in id order, as
-- `claim` locks): joined as a whole, the planner may hash the table instead,
-- and re-check that whole join for every row a concurrent claim changed.
-- :ids uuid[], :generations bigint[]
WITH owed AS (
    SELECT t.id
    FROM (SELECT * FROM unnest(:ids::uuid[], :generations::bigint[])
                       AS r(id, generation) ORDER BY id) r
    CROSS JOIN LATERAL (
        SELECT t.id FROM taskq.tasks t
        WHERE t.id = r.id AND t.published_at IS NULL AND t.generation = r.generation
        FOR UPDATE SKIP LOCKED
    ) t
)
UPDATE taskq.tasks SET published_at = now()
WHERE id = ANY(ARRAY(SELECT id FROM owed));

-- ---------------------------------------------------------------- reading

-- name: task_get
-- With the latest progress its handler reported (NULLs if none).
-- :id
SELECT id, type, queue, payload::text, status, attempts, max_attempts, idempotency_key,
       result::text, last_error, timeout_seconds, run_at, lease_expires_at, worker_id,
       published_at, created_at, t.updated_at, started_at, finished_at, cancel_requested_at,
       replays, status = 'ENQUEUED' AND run_at > now() AS scheduled, wait_reason,
       -- Why the relay set the owed publish aside, and when it tries again.
       CASE WHEN published_at IS NULL AND set_aside_generation = generation
            THEN publish_error END AS publish_error,
       CASE WHEN published_at IS NULL AND set_aside_generation = generation
            THEN publish_retry_at END AS publish_retry_at,
       p.fraction AS progress,
       -- The rate limiter it waits for, and the slot it holds (taskq.ratelimits).
       CASE WHEN status = 'ENQUEUED' THEN limited_by END AS limited_by,
       CASE WHEN status = 'ENQUEUED' THEN limited_until END AS limited_until,
       workflow_id,
       p.details::text AS progress_details,
       p.attempt AS progress_attempt, p.updated_at AS progress_at,
       -- Its unique key, and whether it holds it now (tasks_unique_holder's predicate,
       -- and unique_until not passed).
       unique_key, unique_while, unique_until,
       unique_key IS NOT NULL AND coalesce(unique_until > now(), true) AND (
           (status IN ('ENQUEUED', 'WAITING') AND (unique_while <> 'queued' OR started_at IS NULL))
           OR (status = 'RUNNING' AND unique_while <> 'queued')
           OR (status = 'SUCCEEDED' AND unique_while = 'until_finished')) AS unique_held
FROM taskq.tasks t LEFT JOIN taskq.task_progress p ON p.task_id = t.id
WHERE t.id = :id;

-- name: wait_request
-- A waiter marks the tasks it waits for, so that their terminal transition sends
-- a NOTIFY (the trigger tasks_notify_finished). Returns the ids it marked, those
-- ENQUEUED, WAITING or RUNNING in their latest version (a concurrent outcome is waited
-- for and re-checked): an id missing from the answer has ended, or does not exist.
-- A task marked here and ending later notifies, since its outcome's row version
-- is built on this one.
-- Rows are locked in id order, through the primary key, as `claim` locks them:
-- a wait for several tasks and a claim of some of them cannot deadlock.
-- :ids uuid[]
WITH held AS (
    SELECT t.id
    FROM (SELECT DISTINCT id FROM unnest(:ids::uuid[]) AS id ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT t.id FROM taskq.tasks t
        WHERE t.id = i.id AND t.status IN ('ENQUEUED', 'WAITING', 'RUNNING')
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET wait_requested = true
WHERE t.id = ANY(ARRAY(SELECT id FROM held))
RETURNING t.id;

-- name: progress_write
-- Records the latest progress of running tasks, one row per task (the worker's
-- batches; each id once per batch). Every write takes a new seq (the column's
-- default, through EXCLUDED), which the event stream reads by.
-- :ids uuid[], :attempts int[], :fractions float8[], :details text[] (json or NULL)
INSERT INTO taskq.task_progress AS p (task_id, attempt, fraction, details)
SELECT r.id, r.attempt, r.fraction, r.details::jsonb
FROM unnest(:ids::uuid[], :attempts::int[], :fractions::float8[], :details::text[])
    AS r(id, attempt, fraction, details)
ORDER BY r.id
ON CONFLICT (task_id) DO UPDATE SET
    attempt = EXCLUDED.attempt, fraction = EXCLUDED.fraction, details = EXCLUDED.details,
    seq = EXCLUDED.seq, updated_at = now();

-- name: progress_last_seq
SELECT coalesce(max(seq), 0) FROM taskq.task_progress;

-- name: progress_since
-- Progress written after :after_seq, oldest first, with the task's type and queue
-- (the event stream).
-- :after_seq, :limit
SELECT p.seq, p.task_id, t.type, t.queue, p.attempt, p.fraction, p.details::text AS details,
       p.updated_at
FROM taskq.task_progress p JOIN taskq.tasks t ON t.id = p.task_id
WHERE p.seq > :after_seq
ORDER BY p.seq LIMIT :limit;

-- name: task_events
-- :task_id
SELECT id, status, previous_status, attempt, error, worker_id, run_at, at, action, actor, reason
FROM taskq.task_events WHERE task_id = :task_id ORDER BY id;

-- name: unpublished_count
-- Owed publishes: those due (tasks_publish_due) and those set aside (tasks_publish_set_aside).
SELECT (SELECT count(*) FROM taskq.tasks
        WHERE published_at IS NULL AND status IN ('ENQUEUED', 'FAILED')
          AND set_aside_generation IS DISTINCT FROM generation)
     + (SELECT count(*) FROM taskq.tasks
        WHERE published_at IS NULL AND status IN ('ENQUEUED', 'FAILED')
          AND set_aside_generation = generation);

-- ---------------------------------------------------------------- relay and sweeper

-- name: session_lock
-- One relay and one sweeper are active across the fleet: the holders of these
-- session locks (each has its own key), held as long as their connection lives.
-- :key advisory lock key (bigint)
SELECT pg_try_advisory_lock(:key);

-- name: session_limits
-- Bounds a lock session on the server's side (see taskq.fleet.leader): the server
-- ends it once it is idle that long (only a frozen leader is) or its peer stops
-- answering. Settings this server does not know (idle_session_timeout before
-- Postgres 14) are skipped; the rows returned name those that were set.
-- :idle_session_timeout (ms), :tcp_keepalives_idle (s),
-- :tcp_keepalives_interval (s), :tcp_keepalives_count, :tcp_user_timeout (ms)
SELECT s.name, set_config(s.name, v.value, false) AS value
FROM (VALUES ('idle_session_timeout', :idle_session_timeout::text),
             ('tcp_keepalives_idle', :tcp_keepalives_idle::text),
             ('tcp_keepalives_interval', :tcp_keepalives_interval::text),
             ('tcp_keepalives_count', :tcp_keepalives_count::text),
             ('tcp_user_timeout', :tcp_user_timeout::text)) AS v(name, value)
JOIN pg_settings s ON s.name = v.name;

-- name: publish_owed
-- Rows whose publish is owed and that nobody is publishing right now (older
-- than the grace period), oldest first. FAILED rows are owed to the DLQ.
-- Rows the relay set aside (see set_aside) are not among them: the index
-- tasks_publish_due holds none, so any number of them costs this nothing.
-- :grace_seconds, :limit
SELECT id, type, queue, status, attempts, last_error, generation,
       greatest(0, extract(epoch FROM run_at - clock_timestamp()))::float8 AS delay, traceparent
FROM taskq.tasks
WHERE published_at IS NULL AND status IN ('ENQUEUED', 'FAILED')
  AND set_aside_generation IS DISTINCT FROM generation
  AND updated_at < now() - make_interval(secs => :grace_seconds)
ORDER BY updated_at
LIMIT :limit;

-- name: set_aside
-- Sets owed publishes aside that failed for the row alone (no route to its
-- queue, a delay beyond the levels, ...), with the reason. Keyed by the
-- generation: a newer owed publish (any statement that bumps the generation) is
-- not set aside. Retried after as long as the publish has been owed (updated_at
-- is when it became owed), within :retry_min and :retry_max seconds. A row
-- another transaction has locked is skipped (it is changing anyway); rows are
-- locked in id order.
-- Returns each row set aside, and whether it was not set aside before.
-- :ids uuid[], :generations bigint[], :reasons text[],
-- :retry_min least seconds until the retry,
-- :retry_max most seconds until the retry
WITH aside AS (
    SELECT t.id, t.before, r.reason
    FROM (SELECT * FROM unnest(:ids::uuid[], :generations::bigint[], :reasons::text[])
                       AS r(id, generation, reason) ORDER BY id) r
    CROSS JOIN LATERAL (
        SELECT t.id, t.set_aside_generation AS before FROM taskq.tasks t
        WHERE t.id = r.id AND t.published_at IS NULL AND t.generation = r.generation
          AND t.status IN ('ENQUEUED', 'FAILED')
        FOR UPDATE SKIP LOCKED
    ) t
)
UPDATE taskq.tasks t SET
    set_aside_generation = t.generation, publish_error = a.reason,
    publish_retry_at = now() + make_interval(secs => least(:retry_max::float8,
        greatest(:retry_min::float8, extract(epoch FROM now() - t.updated_at)::float8)))
FROM aside a
WHERE t.id = a.id AND t.id = ANY(ARRAY(SELECT id FROM aside))
RETURNING t.id, t.queue, a.before IS DISTINCT FROM t.generation AS newly;

-- name: publish_set_aside_due
-- Set-aside publishes whose retry is due, the earliest first.
-- :limit
SELECT id, type, queue, status, attempts, last_error, generation,
       greatest(0, extract(epoch FROM run_at - clock_timestamp()))::float8 AS delay, traceparent
FROM taskq.tasks
WHERE published_at IS NULL AND status IN ('ENQUEUED', 'FAILED')
  AND set_aside_generation = generation AND publish_retry_at <= now()
ORDER BY publish_retry_at
LIMIT :limit;

-- name: publish_owed_ids
-- The owed publishes among some ids (woken by a notification). Every lookup
-- by a list of ids joins the list to the primary key: written as
-- `id = ANY(:ids)` the planner may rather scan a partial index that matches the
-- other conditions (here tasks_publish_owed, every owed row, thousands in a
-- backlog) and test each row against the whole list.
-- :ids uuid[]
SELECT t.id, t.type, t.queue, t.status, t.attempts, t.last_error, t.generation,
       greatest(0, extract(epoch FROM t.run_at - clock_timestamp()))::float8 AS delay,
       t.traceparent
FROM unnest(:ids::uuid[]) AS i(id)
JOIN taskq.tasks t ON t.id = i.id
WHERE t.published_at IS NULL AND t.status IN ('ENQUEUED', 'FAILED')
  AND t.set_aside_generation IS DISTINCT FROM t.generation;

-- name: recover_expired
-- Takes back claims whose lease expired (the worker died or hung): back to
-- ENQUEUED, due now, or FAILED if no attempt is left. Either way a publish is owed;
-- the rows returned have what taskq.fleet.relay.publish_row needs to pay it at once.
-- A task whose cancel was requested is CANCELLED instead (nothing owed).
-- :limit
UPDATE taskq.tasks t SET
    status = CASE WHEN t.cancel_requested_at IS NOT NULL THEN 'CANCELLED'
                  WHEN t.attempts >= t.max_attempts THEN 'FAILED' ELSE 'ENQUEUED' END,
    last_error = 'lease expired: worker ' || t.worker_id || ' stopped heartbeating',
    finished_at = CASE WHEN t.cancel_requested_at IS NOT NULL OR t.attempts >= t.max_attempts
                       THEN now() END,
    run_at = now(), lease_expires_at = NULL, worker_id = NULL, claim_token = NULL,
    published_at = NULL, generation = t.generation + 1, updated_at = now()
WHERE t.id IN (SELECT id FROM taskq.tasks WHERE status = 'RUNNING' AND lease_expires_at < now()
               ORDER BY lease_expires_at LIMIT :limit FOR UPDATE SKIP LOCKED)
RETURNING t.id, t.type, t.queue, t.status, t.attempts, t.last_error, t.generation,
          0::float8 AS delay, t.traceparent;

-- name: overdue_enqueued
-- ENQUEUED tasks of one queue, published long ago and due for a while: when
-- their work queue holds no ready message, the broker has lost them.
-- :queue, :seconds_overdue, :limit
SELECT id FROM taskq.tasks
WHERE status = 'ENQUEUED' AND queue = :queue AND published_at IS NOT NULL
  AND run_at < now() - make_interval(secs => :seconds_overdue)
  AND published_at < now() - make_interval(secs => :seconds_overdue)
ORDER BY run_at LIMIT :limit;

-- name: republish
-- Marks publishes owed again so that the relay sends them. Rows are locked in
-- id order, as `claim` locks them, so the two cannot deadlock.
-- :ids uuid[]
WITH owed AS (
    SELECT t.id
    FROM (SELECT id FROM unnest(:ids::uuid[]) AS id ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT t.id FROM taskq.tasks t WHERE t.id = i.id AND t.status = 'ENQUEUED'
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET published_at = NULL, generation = t.generation + 1,
                   updated_at = now() - interval '1 hour'
FROM owed
WHERE t.id = owed.id AND t.id = ANY(ARRAY(SELECT id FROM owed));

-- ---------------------------------------------------------------- worker

-- name: claim
-- Claims a batch of deliveries in one statement, for types without a gate: the
-- statement a worker runs for every batch. Each id gets a decision as in
-- `claim_gated`, or
--   gated     - it would be claimed but its type is gated (paused, or with a
--               concurrency limit or a rate limiter): nothing changed; claim it
--               with `claim_gated` (the store does, at once).
-- The gates are read in the same snapshot as the rows, so a row of a type gated
-- before this statement began is never claimed here. Keeping the gates out of
-- this statement keeps its plan small: Postgres settles on a generic plan for
-- it, where the whole `claim_gated` statement is planned anew at each call.
-- Returns what `claim_gated` returns.
-- :ids uuid[], :worker_id, :lease_seconds
WITH input AS (
    SELECT DISTINCT id FROM unnest(:ids::uuid[]) AS id
), gated_types AS MATERIALIZED (
    -- Usually none: a few rows of a small table, read once.
    SELECT g.name FROM taskq.task_type g
    WHERE g.paused OR g.concurrency_limit IS NOT NULL OR g.limiter IS NOT NULL
), locked AS (
    -- One primary-key lookup per id, locked in id order (see mark_published).
    SELECT t.*
    FROM (SELECT id FROM input ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT t.id, t.type, t.queue, t.status, t.lease_expires_at, t.attempts,
               t.max_attempts, t.run_at, t.worker_id, t.cancel_requested_at, t.traceparent,
               t.concurrency_key
        FROM taskq.tasks t WHERE t.id = i.id AND t.status <> 'WAITING'
        FOR UPDATE
    ) t
), decided AS (
    -- `at`: the clock when the row is decided (after its lock): the claim's start.
    SELECT l.id, c.at,
           CASE
               WHEN l.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN 'terminal'
               WHEN l.status = 'RUNNING' AND (l.lease_expires_at > c.at
                                              OR l.cancel_requested_at IS NOT NULL
                                              OR l.concurrency_key IS NOT NULL)
                   THEN 'duplicate'
               WHEN l.attempts >= l.max_attempts THEN 'exhausted'
               WHEN l.run_at > c.at THEN 'early'
               WHEN l.type IN (SELECT name FROM gated_types) THEN 'gated'
               ELSE 'claimed'
           END AS decision
    FROM locked l CROSS JOIN LATERAL (SELECT clock_timestamp() AS at) c
), claimed AS (
    -- The decision's clock, not the transaction's (see claim_gated).
    UPDATE taskq.tasks t SET
        status = 'RUNNING', attempts = t.attempts + 1, worker_id = :worker_id,
        claim_token = gen_random_uuid(),
        lease_expires_at = d.at + make_interval(secs => :lease_seconds),
        started_at = d.at, updated_at = d.at,
        published_at = coalesce(t.published_at, d.at),
        last_error = CASE WHEN t.status = 'RUNNING'
                          THEN 'lease expired: worker ' || t.worker_id || ' stopped heartbeating'
                          ELSE t.last_error END,
        -- No slot: a takeover holding one is a duplicate (above).
        concurrency_key = NULL, limited_until = NULL, limited_by = NULL
    FROM decided d
    WHERE d.id = t.id AND d.decision = 'claimed'
      AND t.id = ANY(ARRAY(SELECT id FROM decided WHERE decision = 'claimed'))
    RETURNING t.id, t.type, t.queue, t.payload::text AS payload, t.attempts, t.max_attempts,
              t.timeout_seconds, t.run_at, t.created_at, t.claim_token, t.concurrency_key,
              t.workflow_id
), exhausted AS (
    UPDATE taskq.tasks t SET
        status = 'FAILED', finished_at = now(), updated_at = now(), lease_expires_at = NULL,
        claim_token = NULL, last_error = coalesce(t.last_error, 'no attempt left'),
        published_at = NULL, generation = t.generation + 1
    FROM decided d
    WHERE d.id = t.id AND d.decision = 'exhausted'
      AND t.id = ANY(ARRAY(SELECT id FROM decided WHERE decision = 'exhausted'))
    RETURNING t.id, t.last_error, t.generation
)
SELECT i.id,
       CASE WHEN d.decision IS NOT NULL THEN d.decision
            -- Not locked: WAITING, or no such task (see claim_gated).
            WHEN (SELECT true FROM taskq.tasks w WHERE w.id = i.id) THEN 'parked'
            ELSE 'missing' END AS decision,
       l.type, l.queue,
       c.payload, coalesce(c.attempts, l.attempts) AS attempts, l.max_attempts,
       c.timeout_seconds, l.run_at, c.created_at, c.claim_token, x.last_error, x.generation,
       greatest(0, extract(epoch FROM l.run_at - clock_timestamp()))::float8 AS delay,
       l.traceparent, c.concurrency_key, c.workflow_id
FROM input i
LEFT JOIN decided d ON d.id = i.id
LEFT JOIN locked l ON l.id = i.id
LEFT JOIN claimed c ON c.id = i.id
LEFT JOIN exhausted x ON x.id = i.id;

-- name: claim_gated
-- Claims a batch of deliveries in one statement, gates and all (the worker runs
-- `claim` first, and this for the ids it finds gated). Each id gets a decision:
--   claimed   - now RUNNING under this worker's lease, attempts + 1: run it;
--   terminal  - SUCCEEDED, FAILED or CANCELLED already: drop the delivery;
--   duplicate - RUNNING under a live lease: the lease holder (or the sweeper) owns it,
--               or RUNNING with a cancel requested (the sweeper cancels it), or
--               RUNNING under an expired lease while holding a concurrency slot
--               (the sweeper's recovery gives the slot back);
--   early     - run_at is in the future: send it back through the delay levels;
--   limited   - its type's rate limiter has no slot now: run_at moved to the slot
--               reserved for it (limited_until), or, when that slot would be past
--               the hold window, to the end of a wait without a slot (limited_until
--               NULL); hold it, or send it back through the delay levels (see the
--               rate_* CTEs);
--   exhausted - no attempt left: now FAILED, owed to the DLQ;
--   parked    - WAITING: its type is paused, or its concurrency key has no free slot
--               (parked now, or already): drop the delivery; it is released later;
--   missing   - no such task.
-- A claim of a RUNNING task whose lease expired takes it over.
-- Returns one row per distinct id: id, decision, and for rows that exist type,
-- queue, attempts (after the claim), max_attempts, run_at and delay (seconds
-- until run_at, for `early` and `limited`; for `claimed`, seconds until its start:
-- a rate-limited task is claimed up to `ahead` before its slot); payload (json
-- text), timeout_seconds, created_at and claim_token for `claimed`; last_error for `exhausted` (the DLQ reason);
-- traceparent (the enqueuer's trace context, NULL when not traced);
-- concurrency_key for `claimed` (NULL: it holds no concurrency slot).
-- Every claim sets a fresh claim_token: heartbeats and outcomes must name it.
-- WAITING rows are not locked (only resumes, freed slots and operators change
-- them, and a freed slot's release waits for their locks while it holds the
-- slot: a claim holding one and waiting for that slot would deadlock with it).
-- :ids uuid[], :worker_id, :lease_seconds,
-- :hold_seconds how far ahead a worker holds a delivery (the others it sends back),
-- :ahead_seconds how long before its slot a rate-limited task is claimed
WITH input AS (
    SELECT DISTINCT id FROM unnest(:ids::uuid[]) AS id
), locked AS (
    -- One primary-key lookup per id, locked in id order (see mark_published).
    SELECT t.*
    FROM (SELECT id FROM input ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT t.id, t.type, t.queue, t.status, t.lease_expires_at, t.attempts,
               t.max_attempts, t.run_at, t.worker_id, t.cancel_requested_at, t.traceparent,
               t.created_at, t.concurrency_key, t.limited_until, t.limited_by
        FROM taskq.tasks t WHERE t.id = i.id AND t.status <> 'WAITING'
        FOR UPDATE
    ) t
), decided AS (
    -- `at`: the clock when the row is decided (after its lock): the claim's start.
    SELECT l.id, c.at,
           CASE
               WHEN l.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN 'terminal'
               WHEN l.status = 'RUNNING' AND (l.lease_expires_at > c.at
                                              OR l.cancel_requested_at IS NOT NULL
                                              OR l.concurrency_key IS NOT NULL)
                   THEN 'duplicate'
               WHEN l.attempts >= l.max_attempts THEN 'exhausted'
               WHEN l.run_at > c.at THEN 'early'
               ELSE 'claimed'
           END AS decision,
           l.type, l.status, l.created_at
    FROM locked l CROSS JOIN LATERAL (SELECT clock_timestamp() AS at) c
), gated_types AS (
    -- Gates: the types paused or limited (task_type_gated; none, usually).
    SELECT g.name, g.paused, g.concurrency_limit, g.concurrency_key
    FROM taskq.task_type g WHERE g.paused OR g.concurrency_limit IS NOT NULL
), gate_candidates AS (
    -- Rows that would be claimed, of a gated type (a takeover keeps what it holds).
    -- With no gated type (the EXISTS, run once) nothing here runs at all.
    SELECT d.id, d.type, d.created_at, g.paused, g.concurrency_limit, g.concurrency_key
    FROM decided d
    JOIN gated_types g ON g.name = d.type
    WHERE d.decision = 'claimed' AND d.status = 'ENQUEUED' AND EXISTS (SELECT FROM gated_types)
), paused_gate AS (
    -- The paused types among them, share-locked, so that a resume (which updates
    -- the type first) waits for this claim, and then releases what it parked. A
    -- type resumed meanwhile is not paused any more when its row is locked.
    SELECT g.name FROM taskq.task_type g
    WHERE g.name IN (SELECT type FROM gate_candidates WHERE paused) AND g.paused
    FOR SHARE
), rate_limited_types AS MATERIALIZED (
    -- Rate limits (GCRA, sql/migrations/0012_rate_limits.sql): the types that name a
    -- limiter, usually none or few. Tasks of other types join nothing below (a hash
    -- join on this, skipped when it is empty).
    SELECT ty.name AS type, r.name AS limiter, r.per_seconds / r.rate AS spacing,
           (r.burst - 1) * r.per_seconds / r.rate AS tolerance, r.key AS key_field
    FROM taskq.task_type ty JOIN taskq.rate_limiters r ON r.name = ty.limiter
    WHERE ty.limiter IS NOT NULL
), rate_wanted AS (
    -- The tasks about to be claimed whose type names a limiter, but for those holding
    -- a reservation that came due on time (late by at most one spacing, so that a
    -- window of `per` never holds more than limit + 1 starts): those are claimed now
    -- without a slot. `back`: a late one (it lost its slot), or one back from a wait
    -- without a slot (limited_by set, limited_until NULL) at most the hold window
    -- late: it takes the next slot, however far (those that waited go before new
    -- ones). The others take a slot only within the hold window (rate_plan), for the
    -- deliveries a worker holds: a later slot would go to a delivery sent back through
    -- the broker, and one sent back while its work queue has a backlog comes back only
    -- behind that backlog, past its slot. (Back from a wait later than that, a task
    -- came back behind a backlog too: it asks as a new one does.)
    SELECT d.id, lt.limiter, lt.spacing, lt.tolerance, l.run_at,
           CASE WHEN lt.key_field IS NULL THEN ''
                ELSE (SELECT CASE WHEN length(v) > 200 THEN 'md5:' || md5(v) ELSE v END
                      FROM (SELECT coalesce(p.payload -> lt.key_field, 'null')::text AS v
                            FROM taskq.tasks p WHERE p.id = d.id) k)
           END AS key,
           (l.limited_until IS NOT NULL
            OR (l.limited_by IS NOT NULL
                AND l.run_at >= d.at - make_interval(secs => :hold_seconds))) AS back
    FROM locked l
    JOIN rate_limited_types lt ON lt.type = l.type
    JOIN decided d ON d.id = l.id
    WHERE d.decision = 'claimed' AND l.type NOT IN (SELECT name FROM paused_gate)
      AND (l.limited_until IS NULL
           OR l.limited_until < d.at - make_interval(secs => lt.spacing))
), rate_numbered AS (
    -- The order of the tasks within each bucket (k from 0): those back from a wait
    -- first, then the earliest due.
    SELECT w.*,
           row_number() OVER (PARTITION BY w.limiter, w.key
                              ORDER BY w.back DESC, w.run_at, w.id) - 1 AS k,
           count(*) FILTER (WHERE w.back) OVER (PARTITION BY w.limiter, w.key) AS n_back,
           count(*) OVER (PARTITION BY w.limiter, w.key) AS n
    FROM rate_wanted w
), rate_buckets AS (
    SELECT DISTINCT limiter, key, n, n_back, spacing, tolerance FROM rate_numbered
), rate_old AS MATERIALIZED (
    -- The buckets in use, locked in (limiter, key) order (concurrent claims lock them
    -- in one order, and after all their tasks): once locked, their latest version.
    SELECT b.limiter, b.key, b.tat, b.promised
    FROM taskq.rate_limit_buckets b
    WHERE (b.limiter, b.key) IN (SELECT limiter, key FROM rate_buckets)
    ORDER BY b.limiter, b.key
    FOR UPDATE
), rate_at AS MATERIALIZED (
    -- The clock once every bucket is locked (the count reads them all first).
    SELECT clock_timestamp() AS at FROM (SELECT count(*) FROM rate_old) locked_all
), rate_plan AS MATERIALIZED (
    -- Per bucket: a = max(tat, now) is where its slots go on; the first `taken` tasks
    -- (those back from a wait, then new ones while their slot is within the hold
    -- window) take slots a, a + spacing, ... less the tolerance; the rest wait without
    -- a slot until p, p + spacing, ... where p = max(promised, new tat): promised is
    -- where the waits handed out so far end.
    SELECT y.*, y.a + make_interval(secs => y.taken * y.spacing) AS new_tat,
           greatest(y.promised, y.a + make_interval(secs => y.taken * y.spacing)) AS p
    FROM (
        SELECT x.*,
               x.n_back + least(x.n - x.n_back, greatest(0,
                   floor((extract(epoch FROM x.at - x.a) + :hold_seconds + x.tolerance)
                         / x.spacing)::bigint - x.n_back + 1)) AS taken
        FROM (
            SELECT r.limiter, r.key, r.n, r.n_back, r.spacing, r.tolerance, o.promised,
                   o.limiter IS NOT NULL AS existed, c.at, greatest(o.tat, c.at) AS a
            FROM rate_buckets r
            CROSS JOIN rate_at c
            LEFT JOIN rate_old o ON o.limiter = r.limiter AND o.key = r.key
        ) x
    ) y
), rate_taken AS (
    -- Writes each bucket's new tat and promised. A bucket that another claim created
    -- after this one looked (its first use, by two claims at once) is left alone:
    -- its tasks are decided `early` and claimed again at once.
    INSERT INTO taskq.rate_limit_buckets AS b (limiter, key, tat, promised)
    SELECT limiter, key, new_tat,
           CASE WHEN taken < n THEN p + make_interval(secs => (n - taken) * spacing)
                ELSE promised END
    FROM rate_plan ORDER BY limiter, key
    ON CONFLICT (limiter, key) DO UPDATE SET tat = EXCLUDED.tat, promised = EXCLUDED.promised
    WHERE EXISTS (SELECT FROM rate_old o WHERE o.limiter = b.limiter AND o.key = b.key)
    RETURNING b.limiter, b.key
), rate_slots AS (
    -- Task k's slot (k < taken; not before now) or the end of its wait (k >= taken).
    SELECT w.id, w.limiter, p.at,
           CASE WHEN w.k < p.taken
                THEN greatest(p.at, p.a + make_interval(secs => w.k * w.spacing - w.tolerance))
           END AS slot,
           CASE WHEN w.k >= p.taken
                THEN p.p + make_interval(secs => (w.k - p.taken) * w.spacing)
           END AS wait_until
    FROM rate_numbered w
    JOIN rate_plan p ON p.limiter = w.limiter AND p.key = w.key
    JOIN rate_taken t ON t.limiter = w.limiter AND t.key = w.key
), rate_raced AS (
    SELECT w.id FROM rate_numbered w
    WHERE NOT EXISTS (SELECT FROM rate_taken t WHERE t.limiter = w.limiter AND t.key = w.key)
), rate_limited AS (
    -- A slot later than now (and than the claim's lead, `ahead`) is the task's
    -- reservation, limited_until (attempts unchanged): run_at moves `ahead` before it,
    -- when it is claimed without taking another slot, to start at its slot (a claim
    -- takes a few milliseconds, more on a loaded machine: claimed at its slot, it
    -- would start late). A wait without a slot moves run_at only: back then, the task
    -- takes the next slot.
    UPDATE taskq.tasks t SET
        run_at = coalesce(s.slot - make_interval(secs => :ahead_seconds), s.wait_until),
        limited_until = s.slot,
        limited_by = s.limiter, updated_at = s.at
    FROM rate_slots s
    WHERE s.id = t.id AND (s.slot IS NULL OR s.slot > s.at + make_interval(secs => :ahead_seconds))
      AND t.id = ANY(ARRAY(SELECT id FROM rate_slots
                           WHERE slot IS NULL OR slot > at + make_interval(secs => :ahead_seconds)))
    RETURNING t.id, t.run_at
), concurrency_wanted AS (
    -- The others of a limited type, with their key (from the payload) and their
    -- rank among the batch's rows of that key, oldest first.
    SELECT c.id, c.type, k.key, c.concurrency_limit AS lim,
           row_number() OVER (PARTITION BY c.type, k.key ORDER BY c.created_at, c.id) AS rank
    FROM gate_candidates c
    CROSS JOIN LATERAL (
        SELECT coalesce(CASE WHEN c.concurrency_key IS NULL THEN ''
                             ELSE t.payload ->> c.concurrency_key END, '') AS key
        FROM taskq.tasks t WHERE t.id = c.id
    ) k
    WHERE c.concurrency_limit IS NOT NULL AND c.type NOT IN (SELECT name FROM paused_gate)
      -- A task the rate limiter delays takes no slot (it is not claimed now).
      AND c.id NOT IN (SELECT id FROM rate_limited) AND c.id NOT IN (SELECT id FROM rate_raced)
), concurrency_taken AS (
    -- Takes the free slots of each key, in key order (claims lock slots in one order).
    -- The upsert reads each slot's latest version: of two claims, the second waits
    -- for the first and sees the slots it took.
    INSERT INTO taskq.concurrency_slots AS s (type, key, running, lim, granted)
    SELECT w.type, w.key, least(count(*), max(w.lim)), max(w.lim), least(count(*), max(w.lim))
    FROM concurrency_wanted w
    GROUP BY w.type, w.key
    ORDER BY w.type, w.key
    ON CONFLICT (type, key) DO UPDATE SET
        running = s.running + greatest(0, least(EXCLUDED.running, EXCLUDED.lim - s.running)),
        granted = greatest(0, least(EXCLUDED.running, EXCLUDED.lim - s.running)),
        lim = EXCLUDED.lim
    RETURNING s.type, s.key, s.granted
), granted AS MATERIALIZED (
    -- The slots each key took, as one map read by each row. (Joined to the batch's
    -- rows, a CTE is scanned again for each row when the planner, which cannot see
    -- how many rows these CTEs hold, takes them for one or two: the cost of a batch
    -- would grow with its square. The maps below are for the same reason.)
    SELECT coalesce(jsonb_object_agg(jsonb_build_array(k.type, k.key)::text, k.granted),
                    '{}') AS slots
    FROM concurrency_taken k
), gated AS (
    -- The gated rows' decisions: parked (and why), or claimed with a slot's key.
    SELECT w.id,
           CASE WHEN w.rank > (m.slots ->> jsonb_build_array(w.type, w.key)::text)::bigint
                THEN 'concurrency' END AS wait_reason,
           w.key
    FROM concurrency_wanted w CROSS JOIN granted m
    UNION ALL
    SELECT c.id, 'paused', NULL FROM gate_candidates c
    WHERE c.type IN (SELECT name FROM paused_gate)
), slot_keys AS MATERIALIZED (
    -- The key of each row claimed with a slot, by id.
    SELECT coalesce(jsonb_object_agg(g.id::text, g.key), '{}') AS by_id
    FROM gated g WHERE g.wait_reason IS NULL
), claimed AS (
    -- The decision's clock, not the transaction's: an inline claim's transaction
    -- (taskq.worker.inline) begins before this statement, so a task due at run_at
    -- would otherwise show a start before it.
    UPDATE taskq.tasks t SET
        status = 'RUNNING', attempts = t.attempts + 1, worker_id = :worker_id,
        claim_token = gen_random_uuid(),
        -- A task that took a slot, or holds one, starts at it: the worker waits until
        -- then (`delay`).
        lease_expires_at = greatest(d.at, s.slot, t.limited_until)
                           + make_interval(secs => :lease_seconds),
        started_at = greatest(d.at, s.slot, t.limited_until),
        updated_at = greatest(d.at, s.slot, t.limited_until),
        published_at = coalesce(t.published_at, d.at),
        last_error = CASE WHEN t.status = 'RUNNING'
                          THEN 'lease expired: worker ' || t.worker_id || ' stopped heartbeating'
                          ELSE t.last_error END,
        concurrency_key = CASE WHEN t.status = 'RUNNING' THEN t.concurrency_key
                               ELSE k.by_id ->> t.id::text END,
        limited_until = NULL, limited_by = NULL
    FROM decided d CROSS JOIN slot_keys k LEFT JOIN rate_slots s ON s.id = d.id
    WHERE d.id = t.id AND d.decision = 'claimed'
      AND t.id = ANY(ARRAY(SELECT d.id FROM decided d
                           WHERE d.decision = 'claimed'
                             AND d.id NOT IN (SELECT id FROM gated
                                              WHERE wait_reason IS NOT NULL)
                             AND NOT EXISTS (SELECT FROM rate_slots s
                                             WHERE s.id = d.id
                                               AND (s.slot IS NULL
                                                    OR s.slot > s.at + make_interval(
                                                        secs => :ahead_seconds)))
                             AND d.id NOT IN (SELECT id FROM rate_raced)))
    RETURNING t.id, t.type, t.queue, t.payload::text AS payload, t.attempts, t.max_attempts,
              t.timeout_seconds, t.run_at, t.created_at, t.claim_token, t.concurrency_key,
              t.started_at, t.workflow_id
), parked AS (
    -- WAITING, its delivery acked: nothing owed until it is released.
    UPDATE taskq.tasks t SET
        status = 'WAITING', wait_reason = g.wait_reason, concurrency_key = g.key,
        published_at = coalesce(t.published_at, now()), updated_at = now()
    FROM gated g
    WHERE g.id = t.id AND g.wait_reason IS NOT NULL
      AND t.id = ANY(ARRAY(SELECT id FROM gated WHERE wait_reason IS NOT NULL))
    RETURNING t.id
), exhausted AS (
    UPDATE taskq.tasks t SET
        status = 'FAILED', finished_at = now(), updated_at = now(), lease_expires_at = NULL,
        claim_token = NULL, last_error = coalesce(t.last_error, 'no attempt left'),
        published_at = NULL, generation = t.generation + 1
    FROM decided d
    WHERE d.id = t.id AND d.decision = 'exhausted'
      AND t.id = ANY(ARRAY(SELECT id FROM decided WHERE decision = 'exhausted'))
    RETURNING t.id, t.last_error, t.generation
)
SELECT i.id,
       CASE WHEN p.id IS NOT NULL THEN 'parked'
            WHEN rl.id IS NOT NULL THEN 'limited'
            -- Its bucket was created meanwhile by another claim: claim it again.
            WHEN d.decision = 'claimed' AND i.id IN (SELECT id FROM rate_raced) THEN 'early'
            WHEN d.decision IS NOT NULL THEN d.decision
            -- Not locked: WAITING (or parked by a concurrent claim), or no such task.
            -- (A scalar subquery, looked up by its key: an EXISTS may be hashed over a
            -- scan of the whole table.)
            WHEN (SELECT true FROM taskq.tasks w WHERE w.id = i.id) THEN 'parked'
            ELSE 'missing' END AS decision,
       l.type, l.queue,
       c.payload, coalesce(c.attempts, l.attempts) AS attempts, l.max_attempts,
       c.timeout_seconds, coalesce(rl.run_at, l.run_at) AS run_at, c.created_at, c.claim_token,
       x.last_error, x.generation,
       greatest(0, extract(epoch FROM coalesce(c.started_at, rl.run_at, l.run_at)
                                      - clock_timestamp()))::float8 AS delay,
       l.traceparent, c.concurrency_key, c.workflow_id
FROM input i
LEFT JOIN decided d ON d.id = i.id
LEFT JOIN locked l ON l.id = i.id
LEFT JOIN claimed c ON c.id = i.id
LEFT JOIN exhausted x ON x.id = i.id
LEFT JOIN parked p ON p.id = i.id
LEFT JOIN rate_limited rl ON rl.id = i.id;

-- name: heartbeat
-- One per worker every few seconds: records the worker as alive (with its
-- in-flight count) and extends the leases of the claims it holds, named by
-- (id, claim token). Returns the tokens of the claims it still holds, each
-- saying whether an operator asked to cancel the task. Rows are locked in id
-- order, as `claim` locks them (another worker may be claiming a duplicate
-- delivery of one).
-- :ids uuid[], :worker_id, :lease_seconds, :hostname, :pid,
-- :queues text[], :concurrency, :prefetch, :heartbeat_seconds,
-- :claim_tokens uuid[] (one per id)
WITH presence AS (
    INSERT INTO taskq.workers AS w (id, hostname, pid, queues, concurrency, prefetch, in_flight,
                              heartbeat_seconds)
    VALUES (:worker_id, :hostname, :pid, :queues, :concurrency, :prefetch,
            cardinality(:ids::uuid[]), :heartbeat_seconds)
    ON CONFLICT (id) DO UPDATE SET
        in_flight = EXCLUDED.in_flight, heartbeat_seconds = EXCLUDED.heartbeat_seconds,
        last_heartbeat = now()
), held AS (
    SELECT t.id
    FROM (SELECT * FROM unnest(:ids::uuid[], :claim_tokens::uuid[]) AS r(id, token) ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT t.id FROM taskq.tasks t
        WHERE t.id = i.id AND t.status = 'RUNNING' AND t.claim_token = i.token
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET lease_expires_at = now() + make_interval(secs => :lease_seconds)
FROM held
WHERE t.id = held.id AND t.id = ANY(ARRAY(SELECT id FROM held))
RETURNING t.claim_token, t.cancel_requested_at IS NOT NULL AS cancel_requested;

-- name: worker_gone
-- A worker stopping cleanly leaves the registry.
-- :worker_id
DELETE FROM taskq.workers WHERE id = :worker_id;

-- Outcomes are guarded by the claim's token: an outcome of a claim that was
-- taken over (its lease expired; the sweeper, another worker or an operator's
-- retry moved the task on) updates nothing, even if the task is RUNNING again
-- under the same attempt number and worker. Each ends the claim: the token is
-- cleared. A cancel requested while the attempt ran wins over its outcome: the
-- task ends CANCELLED, nothing is owed.

-- name: complete
-- Records successes. finished_at is the statement's time, not the transaction's:
-- an inline attempt's success is written in its claim's transaction, which
-- began before the handler ran (taskq.worker.inline).
-- :ids uuid[], :claim_tokens uuid[], :results text[] (json)
WITH held AS (
    -- The claims still held (by their token), each found through the primary
    -- key and locked in id order (see mark_published).
    SELECT r.*
    FROM (SELECT * FROM unnest(:ids::uuid[], :claim_tokens::uuid[], :results::text[])
                       AS r(id, token, result) ORDER BY id) r
    CROSS JOIN LATERAL (
        SELECT FROM taskq.tasks t
        WHERE t.id = r.id AND t.status = 'RUNNING' AND t.claim_token = r.token
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET
    status = CASE WHEN t.cancel_requested_at IS NULL THEN 'SUCCEEDED' ELSE 'CANCELLED' END,
    last_error = CASE WHEN t.cancel_requested_at IS NULL THEN t.last_error
                      ELSE 'Cancelled: the handler returned after a cancel was requested' END,
    result = r.result::jsonb, finished_at = statement_timestamp(),
    updated_at = statement_timestamp(), lease_expires_at = NULL, claim_token = NULL
FROM held r
WHERE t.id = r.id AND t.id = ANY(ARRAY(SELECT id FROM held))
RETURNING t.id, t.status;

-- name: retry
-- Records retryable failures: back to ENQUEUED, due after the backoff, publish owed.
-- Returns the rows recorded as the publish each owes (taskq.model.COLUMNS["owed"]).
-- :ids uuid[], :claim_tokens uuid[], :errors text[], :delays float8[]
WITH held AS (
    -- The claims still held (by their token), each found through the primary
    -- key and locked in id order (see mark_published).
    SELECT r.*
    FROM (SELECT * FROM unnest(:ids::uuid[], :claim_tokens::uuid[], :errors::text[],
                               :delays::float8[])
                       AS r(id, token, error, delay) ORDER BY id) r
    CROSS JOIN LATERAL (
        SELECT FROM taskq.tasks t
        WHERE t.id = r.id AND t.status = 'RUNNING' AND t.claim_token = r.token
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET
    status = CASE WHEN t.cancel_requested_at IS NULL THEN 'ENQUEUED' ELSE 'CANCELLED' END,
    finished_at = CASE WHEN t.cancel_requested_at IS NULL THEN NULL ELSE now() END,
    run_at = CASE WHEN t.cancel_requested_at IS NULL THEN now() + make_interval(secs => r.delay)
                  ELSE t.run_at END,
    last_error = r.error, lease_expires_at = NULL, worker_id = NULL, claim_token = NULL,
    published_at = NULL, generation = t.generation + 1, updated_at = now()
FROM held r
WHERE t.id = r.id AND t.id = ANY(ARRAY(SELECT id FROM held))
RETURNING t.id, t.type, t.queue, t.status, t.attempts, NULL::text AS last_error, t.generation,
          greatest(0, extract(epoch FROM t.run_at - clock_timestamp()))::float8 AS delay,
          t.traceparent;

-- name: fail
-- Records terminal failures: FAILED, owed to the DLQ.
-- Returns the rows recorded as the publish each owes (taskq.model.COLUMNS["owed"]).
-- :ids uuid[], :claim_tokens uuid[], :errors text[]
WITH held AS (
    -- The claims still held (by their token), each found through the primary
    -- key and locked in id order (see mark_published).
    SELECT r.*
    FROM (SELECT * FROM unnest(:ids::uuid[], :claim_tokens::uuid[], :errors::text[])
                       AS r(id, token, error) ORDER BY id) r
    CROSS JOIN LATERAL (
        SELECT FROM taskq.tasks t
        WHERE t.id = r.id AND t.status = 'RUNNING' AND t.claim_token = r.token
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET
    status = CASE WHEN t.cancel_requested_at IS NULL THEN 'FAILED' ELSE 'CANCELLED' END,
    last_error = r.error, finished_at = now(), lease_expires_at = NULL, claim_token = NULL,
    published_at = NULL, generation = t.generation + 1, updated_at = now()
FROM held r
WHERE t.id = r.id AND t.id = ANY(ARRAY(SELECT id FROM held))
RETURNING t.id, t.type, t.queue, t.status, t.attempts, t.last_error, t.generation,
          0::float8 AS delay, t.traceparent;

-- name: give_back
-- A worker shutting down gives back tasks it could not finish: ENQUEUED, due
-- now, and the attempt does not count.
-- Returns the rows recorded as the publish each owes (taskq.model.COLUMNS["owed"]).
-- :ids uuid[], :claim_tokens uuid[]
WITH held AS (
    -- The claims still held (by their token), each found through the primary
    -- key and locked in id order (see mark_published).
    SELECT r.*
    FROM (SELECT * FROM unnest(:ids::uuid[], :claim_tokens::uuid[])
                       AS r(id, token) ORDER BY id) r
    CROSS JOIN LATERAL (
        SELECT FROM taskq.tasks t
        WHERE t.id = r.id AND t.status = 'RUNNING' AND t.claim_token = r.token
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET
    status = CASE WHEN t.cancel_requested_at IS NULL THEN 'ENQUEUED' ELSE 'CANCELLED' END,
    finished_at = CASE WHEN t.cancel_requested_at IS NULL THEN NULL ELSE now() END,
    attempts = t.attempts - 1,
    last_error = 'given back by worker ' || t.worker_id || ' at shutdown',
    run_at = now(), lease_expires_at = NULL, worker_id = NULL, claim_token = NULL,
    published_at = NULL, generation = t.generation + 1, updated_at = now()
FROM held r
WHERE t.id = r.id AND t.id = ANY(ARRAY(SELECT id FROM held))
RETURNING t.id, t.type, t.queue, t.status, t.attempts, NULL::text AS last_error, t.generation,
          0::float8 AS delay, t.traceparent;

-- name: cancel_running
-- Records attempts the worker stopped because a cancel was requested: CANCELLED.
-- Returns the rows recorded as the publish each owes (taskq.model.COLUMNS["owed"]).
-- :ids uuid[], :claim_tokens uuid[]
WITH held AS (
    -- The claims still held (by their token), each found through the primary
    -- key and locked in id order (see mark_published).
    SELECT r.*
    FROM (SELECT * FROM unnest(:ids::uuid[], :claim_tokens::uuid[])
                       AS r(id, token) ORDER BY id) r
    CROSS JOIN LATERAL (
        SELECT FROM taskq.tasks t
        WHERE t.id = r.id AND t.status = 'RUNNING' AND t.claim_token = r.token
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET
    status = 'CANCELLED', finished_at = now(), lease_expires_at = NULL, claim_token = NULL,
    updated_at = now(), last_error = 'Cancelled: the handler was stopped after a cancel was requested'
FROM held r
WHERE t.id = r.id AND t.id = ANY(ARRAY(SELECT id FROM held))
RETURNING t.id, t.type, t.queue, t.status, t.attempts, NULL::text AS last_error, t.generation,
          0::float8 AS delay, t.traceparent;

-- name: session_alive
-- Run on the lock's connection every pass: an error means the lock is gone too.
SELECT 1;

-- ---------------------------------------------------------------- admin

-- name: admin_context
-- Who does what and why, for the event triggers; local to the transaction.
-- :action, :actor, :reason (NULL: none)
SELECT set_config('taskq.action', :action, true), set_config('taskq.actor', :actor, true),
       set_config('taskq.reason', coalesce(:reason, ''), true);

-- name: tasks_list
-- Newest first, keyset-paginated on (created_at, id). NULL filters match all.
-- Payloads and results are read only when asked for (each can be a MiB).
-- :statuses text[], :type, :queue, :created_after, :created_before,
-- :scheduled (bool), :cursor_created_at, :cursor_id, :limit,
-- :with_payloads (bool), :with_results (bool)
SELECT id, type, queue, CASE WHEN :with_payloads::boolean THEN payload::text END AS payload, status,
       attempts, max_attempts, idempotency_key,
       CASE WHEN :with_results::boolean THEN result::text END AS result,
       last_error, timeout_seconds, run_at, lease_expires_at, worker_id,
       published_at, created_at, updated_at, started_at, finished_at, cancel_requested_at,
       replays, status = 'ENQUEUED' AND run_at > now() AS scheduled, wait_reason
FROM taskq.tasks
WHERE (:statuses::text[] IS NULL OR status = ANY(:statuses::text[]))
  AND (:type::text IS NULL OR type = :type)
  AND (:queue::text IS NULL OR queue = :queue)
  AND (:created_after::timestamptz IS NULL OR created_at > :created_after)
  AND (:created_before::timestamptz IS NULL OR created_at < :created_before)
  AND (:scheduled::boolean IS NULL OR (status = 'ENQUEUED' AND run_at > now()) = :scheduled)
  AND (:cursor_created_at::timestamptz IS NULL
       OR (created_at, id) < (:cursor_created_at, :cursor_id::uuid))
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: dlq_list
-- FAILED tasks, newest finished first, keyset-paginated on (finished_at, id).
-- :type, :queue, :cursor_finished_at, :cursor_id, :limit,
-- :with_payloads (bool), :with_results (bool)
SELECT id, type, queue, CASE WHEN :with_payloads::boolean THEN payload::text END AS payload, status,
       attempts, max_attempts, idempotency_key,
       CASE WHEN :with_results::boolean THEN result::text END AS result,
       last_error, timeout_seconds, run_at, lease_expires_at, worker_id,
       published_at, created_at, updated_at, started_at, finished_at, cancel_requested_at,
       replays, false AS scheduled, NULL::text AS wait_reason
FROM taskq.tasks
WHERE status = 'FAILED'
  AND (:type::text IS NULL OR type = :type)
  AND (:queue::text IS NULL OR queue = :queue)
  AND (:cursor_finished_at::timestamptz IS NULL
       OR (finished_at, id) < (:cursor_finished_at, :cursor_id::uuid))
ORDER BY finished_at DESC, id DESC
LIMIT :limit;

-- name: cancel
-- ENQUEUED (scheduled or not) and WAITING become CANCELLED at once: an envelope,
-- wherever it is, is dropped by the claim. RUNNING gets a cancel request, which
-- the worker learns from its heartbeat (a concurrency slot it holds is given back
-- when its attempt stops). Anything else is left alone (no row back).
-- :id
UPDATE taskq.tasks t SET
    status = CASE WHEN t.status = 'RUNNING' THEN t.status ELSE 'CANCELLED' END,
    finished_at = CASE WHEN t.status = 'RUNNING' THEN t.finished_at ELSE now() END,
    cancel_requested_at = CASE WHEN t.status = 'RUNNING'
                               THEN coalesce(t.cancel_requested_at, now()) END,
    wait_reason = NULL, updated_at = now()
WHERE t.id = :id AND t.status IN ('ENQUEUED', 'WAITING', 'RUNNING')
RETURNING t.id, t.status;

-- name: requeue
-- An operator's retry or DLQ replay: ENQUEUED again, due now, with fresh
-- attempts; replays counts it; a publish is owed (published after commit). A
-- unique task runs again outside its uniqueness (unique_key NULL): another task
-- may hold its key by now.
-- Rows are locked in id order, through the primary key, as `claim` locks them:
-- a replay of thousands of tasks and a worker claiming some of them (duplicate
-- envelopes, a concurrent retry) cannot deadlock. The status is tested once the
-- row is locked (OFFSET 0 keeps the test out of the lookup): inside it, the
-- planner may read the partial index of failures, whose id is its last column,
-- along all entries of a status for every id.
-- :ids uuid[], :statuses_allowed text[]
WITH held AS (
    SELECT t.id
    FROM (SELECT DISTINCT id FROM unnest(:ids::uuid[]) AS id ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT t.id, t.status FROM taskq.tasks t WHERE t.id = i.id
        OFFSET 0 FOR UPDATE
    ) t
    WHERE t.status = ANY(:statuses_allowed::text[])
)
UPDATE taskq.tasks t SET
    status = 'ENQUEUED', attempts = 0, run_at = now(), result = NULL, finished_at = NULL,
    lease_expires_at = NULL, worker_id = NULL, cancel_requested_at = NULL,
    published_at = NULL, generation = t.generation + 1, replays = t.replays + 1,
    unique_key = NULL, updated_at = now()
WHERE t.id = ANY(ARRAY(SELECT id FROM held))
RETURNING t.id, t.type, t.queue, t.status, t.attempts, t.last_error, t.generation,
          0::float8 AS delay, t.traceparent;

-- name: dlq_pick
-- FAILED tasks to replay, oldest failure first; ids NULL: any.
-- :type, :queue, :ids uuid[], :limit
SELECT id FROM taskq.tasks
WHERE status = 'FAILED'
  AND (:type::text IS NULL OR type = :type)
  AND (:queue::text IS NULL OR queue = :queue)
  AND (:ids::uuid[] IS NULL OR id = ANY(:ids::uuid[]))
ORDER BY finished_at, id
LIMIT :limit;

-- name: queue_cancel_enqueued
-- A queue purge's first step: cancels up to :limit ENQUEUED and WAITING tasks
-- (scheduled ones too) of one queue whose id is above :after_id, locked in id order as claims lock
-- them, so the two cannot deadlock. Called again with the last id returned
-- until none is left. Returns the ids cancelled.
-- :queue, :limit, :after_id ids above this one only (NULL: from the start)
WITH doomed AS (
    SELECT id FROM taskq.tasks
    WHERE queue = :queue AND status IN ('ENQUEUED', 'WAITING')
      AND (:after_id::uuid IS NULL OR id > :after_id::uuid)
    ORDER BY id
    LIMIT :limit
    FOR UPDATE
)
UPDATE taskq.tasks t SET status = 'CANCELLED', finished_at = now(), updated_at = now(),
                         wait_reason = NULL
FROM doomed d
WHERE t.id = d.id AND t.id = ANY(ARRAY(SELECT id FROM doomed))
RETURNING t.id;

-- name: purge_begin
-- Records a broker purge about to start (see purge_end).
-- :queue
INSERT INTO taskq.queue_purges (queue) VALUES (:queue) RETURNING id;

-- name: purge_end
-- The purge's dropped publishes are owed again: it is done.
-- :purge_id
DELETE FROM taskq.queue_purges WHERE id = :purge_id;

-- name: purges_unfinished
-- Purges begun more than :seconds seconds ago and never ended: their process or
-- the database failed in between; the sweeper ends them.
-- :seconds
SELECT id, queue FROM taskq.queue_purges
WHERE started_at < now() - make_interval(secs => :seconds)
ORDER BY id;

-- name: republish_queue
-- A queue purge's last step: the ENQUEUED tasks of the queue that are due may
-- have lost their envelope to the broker purge (they became ENQUEUED after the
-- purge cancelled the others), so their publishes are owed again, for the
-- relay to pay at once (see republish). Some had not lost it: a duplicate,
-- which the claim drops. Rows are locked in id order, as claims lock them.
-- :queue
WITH owed AS (
    SELECT id FROM taskq.tasks
    WHERE queue = :queue AND status = 'ENQUEUED' AND run_at <= now()
    ORDER BY id
    FOR UPDATE
)
UPDATE taskq.tasks t SET published_at = NULL, generation = t.generation + 1,
                   updated_at = now() - interval '1 hour'
FROM owed
WHERE t.id = owed.id AND t.id = ANY(ARRAY(SELECT id FROM owed));

-- name: stats_counts
-- Tasks by status, by (queue, status) and by (type, status), in one scan;
-- the grouping column left NULL says which set a row belongs to. Read while the
-- table is small (see stats_succeeded_estimate).
SELECT queue, type, status, count(*) AS n,
       GROUPING(queue) AS no_queue, GROUPING(type) AS no_type
FROM taskq.tasks
GROUP BY GROUPING SETS ((status), (queue, status), (type, status));

-- name: stats_status_estimates
-- The planner's estimate of the tasks in each status (the table's estimated rows
-- times the status's frequency, both from the last ANALYZE; statuses too rare to
-- be among its most common values are missing): no row of the table is read.
-- :schema the install's schema, as a value
SELECT s.status, (c.reltuples * s.freq)::bigint AS n
FROM pg_class c
JOIN pg_namespace ns ON ns.oid = c.relnamespace
CROSS JOIN LATERAL (
    SELECT u.status, u.freq
    FROM pg_stats p,
         unnest(p.most_common_vals::text::text[], p.most_common_freqs) AS u(status, freq)
    WHERE p.schemaname = :schema AND p.tablename = 'tasks' AND p.attname = 'status'
) s
WHERE ns.nspname = :schema AND c.relname = 'tasks' AND c.reltuples >= 0;

-- name: stats_counts_others
-- As stats_counts, but for the terminal statuses in :skip (counted by their
-- estimate instead), each status read through its own partial index: the cost
-- follows the live tasks and the history not skipped, not all the history kept.
-- :skip text[]
WITH t AS (
    SELECT queue, type, status FROM taskq.tasks WHERE status = 'ENQUEUED'
    UNION ALL
    SELECT queue, type, status FROM taskq.tasks WHERE status = 'RUNNING'
    UNION ALL
    SELECT queue, type, status FROM taskq.tasks WHERE status = 'WAITING'
    UNION ALL
    SELECT queue, type, status FROM taskq.tasks
    WHERE status = 'FAILED' AND NOT 'FAILED' = ANY(:skip::text[])
    UNION ALL
    SELECT queue, type, status FROM taskq.tasks
    WHERE status = 'CANCELLED' AND NOT 'CANCELLED' = ANY(:skip::text[])
    UNION ALL
    SELECT queue, type, status FROM taskq.tasks
    WHERE status = 'SUCCEEDED' AND NOT 'SUCCEEDED' = ANY(:skip::text[])
)
SELECT queue, type, status, count(*) AS n,
       GROUPING(queue) AS no_queue, GROUPING(type) AS no_type
FROM t
GROUP BY GROUPING SETS ((status), (queue, status), (type, status));

-- name: stats_scheduled
SELECT count(*) FROM taskq.tasks WHERE status = 'ENQUEUED' AND run_at > now();

-- name: stats_window
-- Over the last :window_seconds seconds: tasks created, finished by status, and
-- percentiles of queue wait (due to start) and duration (start to finish) of
-- finished attempts.
-- :window_seconds
WITH finished AS (
    SELECT status, started_at, finished_at, run_at
    FROM taskq.tasks
    WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
      AND finished_at > now() - make_interval(secs => :window_seconds)
)
SELECT
    (SELECT count(*) FROM taskq.tasks
     WHERE created_at > now() - make_interval(secs => :window_seconds)) AS enqueued,
    count(*) FILTER (WHERE status = 'SUCCEEDED') AS succeeded,
    count(*) FILTER (WHERE status = 'FAILED') AS failed,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - run_at))
        FILTER (WHERE started_at >= run_at) AS wait_p50,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - run_at))
        FILTER (WHERE started_at >= run_at) AS wait_p95,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))
        FILTER (WHERE started_at IS NOT NULL) AS duration_p50,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at))
        FILTER (WHERE started_at IS NOT NULL) AS duration_p95
FROM finished;

-- name: workers_list
-- :heartbeats a worker may miss before it is listed as not alive
SELECT id, hostname, pid, queues, concurrency, prefetch, in_flight, started_at, last_heartbeat,
       last_heartbeat > now() - make_interval(secs => :heartbeats * heartbeat_seconds) AS alive
FROM taskq.workers ORDER BY started_at, id;

-- name: workers_prune
-- Forgets workers silent for longer than :seconds seconds (they died without a
-- clean stop).
-- :seconds
DELETE FROM taskq.workers WHERE last_heartbeat < now() - make_interval(secs => :seconds);

-- name: events_last_id
SELECT coalesce(max(id), 0) AS last_id FROM taskq.task_events;

-- name: events_since
-- Task events after an id, oldest first, for the live stream.
-- :after_id, :limit
SELECT e.id, e.task_id, t.type, t.queue, e.status, e.attempt, e.at
FROM taskq.task_events e JOIN taskq.tasks t ON t.id = e.task_id
WHERE e.id > :after_id
ORDER BY e.id
LIMIT :limit;

-- name: retention_delete
-- Deletes terminal tasks finished more than :seconds seconds ago, at most :limit of
-- them, their progress and their places in workflows. Returns how many tasks it
-- deleted. Their events go with the history's partitions (history_drop).
-- :seconds, :limit
WITH gone AS (
    DELETE FROM taskq.tasks
    WHERE id IN (SELECT id FROM taskq.tasks
                 WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
                   AND finished_at < now() - make_interval(secs => :seconds)
                 ORDER BY finished_at LIMIT :limit FOR UPDATE SKIP LOCKED)
    RETURNING id
), progress AS (
    DELETE FROM taskq.task_progress p USING gone WHERE p.task_id = gone.id
), nodes AS (
    -- A workflow node's place and its edges (none for a task enqueued alone).
    DELETE FROM taskq.workflow_nodes n USING gone WHERE n.task_id = gone.id
), edges AS (
    DELETE FROM taskq.workflow_edges e USING gone WHERE e.child_id = gone.id
)
SELECT count(*) FROM gone;

-- name: history_create
-- Creates the task history's partitions of :step seconds up to :ahead seconds from
-- now (migration 0021); returns how many it created.
-- :step, :ahead
SELECT taskq.history_create(:step, :ahead);

-- name: history_drop
-- Drops the task history's oldest partition if it ended more than :seconds seconds
-- ago, and deletes up to :batch such events from the default partition.
-- :seconds, :batch
SELECT dropped, trimmed FROM taskq.history_drop(now() - make_interval(secs => :seconds), :batch);

-- ---------------------------------------------------------------- schedules

-- name: schedule_put
-- Creates or replaces a schedule. A replaced schedule whose timing (cron,
-- timezone, every_seconds) and pause are unchanged keeps its next_fire_at, so
-- that a worker re-declaring the schedules of its code at each start neither
-- moves nor repeats a fire; other changes take the new one. `created` says which.
-- :name, :cron, :timezone, :every_seconds, :type, :payload (json text), :queue,
-- :catch_up, :catch_up_limit, :overlap, :source, :next_fire_at
INSERT INTO taskq.schedules AS s (name, cron, timezone, every_seconds, type, payload, queue,
                                  catch_up, catch_up_limit, overlap, source, next_fire_at)
VALUES (:name, :cron, :timezone, :every_seconds, :type, :payload::jsonb, :queue,
        :catch_up, :catch_up_limit, :overlap, :source, :next_fire_at)
ON CONFLICT (name) DO UPDATE SET
    cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, every_seconds = EXCLUDED.every_seconds,
    type = EXCLUDED.type, payload = EXCLUDED.payload, queue = EXCLUDED.queue,
    catch_up = EXCLUDED.catch_up, catch_up_limit = EXCLUDED.catch_up_limit,
    overlap = EXCLUDED.overlap, source = EXCLUDED.source,
    next_fire_at = CASE
        WHEN (s.cron, s.timezone, s.every_seconds)
             IS NOT DISTINCT FROM (EXCLUDED.cron, EXCLUDED.timezone, EXCLUDED.every_seconds)
        THEN s.next_fire_at ELSE EXCLUDED.next_fire_at END,
    last_error = NULL, updated_at = now()
RETURNING s.*, (xmax = 0) AS created,
          (SELECT t.status FROM taskq.tasks t WHERE t.id = s.last_task_id) AS last_task_status;

-- name: schedule_get
-- :name
SELECT s.*, false AS created,
       (SELECT t.status FROM taskq.tasks t WHERE t.id = s.last_task_id) AS last_task_status
FROM taskq.schedules s WHERE s.name = :name;

-- name: schedules_list
-- Schedules in name order, after a name (keyset pagination).
-- :after_name, :limit
SELECT s.*, false AS created,
       (SELECT t.status FROM taskq.tasks t WHERE t.id = s.last_task_id) AS last_task_status
FROM taskq.schedules s
WHERE s.name > :after_name
ORDER BY s.name
LIMIT :limit;

-- name: schedules_count
SELECT count(*) FROM taskq.schedules;

-- name: schedules_count_with
-- How many schedules there would be with this one.
-- :name
SELECT (SELECT count(*) FROM taskq.schedules)
     + (NOT EXISTS (SELECT 1 FROM taskq.schedules WHERE name = :name))::int AS total;

-- name: schedule_delete
-- :name
DELETE FROM taskq.schedules WHERE name = :name;

-- name: schedules_delete_code
-- The schedules a worker's code no longer declares: declared in code for one of
-- its types, and not among the names it declares now.
-- :types text[], :keep text[]
DELETE FROM taskq.schedules
WHERE source = 'code' AND type = ANY(:types::text[]) AND NOT name = ANY(:keep::text[])
RETURNING name;

-- name: schedule_pause
-- Pauses or resumes a schedule. Resuming takes a new next_fire_at (the first
-- fire after now): the fires of the pause are not caught up.
-- :name, :paused, :next_fire_at (NULL: keep it)
UPDATE taskq.schedules s SET
    paused = :paused, next_fire_at = coalesce(:next_fire_at, s.next_fire_at), updated_at = now()
WHERE s.name = :name
RETURNING s.*, false AS created,
          (SELECT t.status FROM taskq.tasks t WHERE t.id = s.last_task_id) AS last_task_status;

-- name: schedules_due
-- The schedules whose next fire is due, soonest first, with the database's clock.
-- :limit
SELECT s.*, false AS created,
       (SELECT t.status FROM taskq.tasks t WHERE t.id = s.last_task_id) AS last_task_status,
       now() AS now
FROM taskq.schedules s
WHERE NOT s.paused AND s.next_fire_at <= now()
ORDER BY s.next_fire_at
LIMIT :limit;

-- name: schedules_next
-- Seconds until the soonest next fire of a schedule that is not paused (NULL: none).
SELECT extract(epoch FROM min(next_fire_at) - now())::float8 FROM taskq.schedules WHERE NOT paused;

-- name: db_now
-- The database's clock (the one next_fire_at is compared with).
SELECT now();

-- name: schedule_fire
-- Enqueues the fires of one schedule and moves its next_fire_at on, in one
-- statement, if the schedule still has the next_fire_at its planner read (and
-- is not paused): otherwise another sweeper fired it meanwhile, and nothing
-- happens. Each fire's idempotency key names the schedule and the fire time, so
-- no fire is enqueued twice however the statement is repeated. Defaults come
-- from the (enabled) task type; with none, the fires are skipped and
-- last_error says why. Returns the tasks it created (the owed columns).
-- A manual fire (POST /schedules/{name}/trigger) fires a paused schedule too.
-- :name, :expected_next_fire_at, :manual boolean, :ids uuid[], :idempotency_keys text[],
-- :next_fire_at, :last_fire_at, :skipped, :fingerprint
WITH s AS (
    SELECT * FROM taskq.schedules
    WHERE name = :name AND next_fire_at = :expected_next_fire_at AND (NOT paused OR :manual)
    FOR UPDATE
), type AS (
    SELECT t.* FROM taskq.task_type t JOIN s ON t.name = s.type AND t.enabled
), inserted AS (
    INSERT INTO taskq.tasks (id, type, queue, payload, max_attempts, idempotency_key,
                             request_fingerprint, timeout_seconds, run_at)
    SELECT r.id, type.name, coalesce(s.queue, type.queue), s.payload, type.max_attempts, r.key,
           :fingerprint, type.timeout_seconds, now()
    FROM unnest(:ids::uuid[], :idempotency_keys::text[]) WITH ORDINALITY AS r(id, key, n)
    CROSS JOIN s CROSS JOIN type
    ORDER BY r.n
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, type, queue, status, attempts, last_error, generation, 0::float8 AS delay,
              traceparent
), moved AS (
    UPDATE taskq.schedules sc SET
        next_fire_at = :next_fire_at,
        last_fire_at = coalesce(:last_fire_at, sc.last_fire_at),
        last_task_id = coalesce(
            (SELECT i.id FROM inserted i
             WHERE i.id = (:ids::uuid[])[cardinality(:ids::uuid[])]), sc.last_task_id),
        fires = sc.fires + (SELECT count(*) FROM inserted),
        skipped = sc.skipped + :skipped
                  + CASE WHEN EXISTS (SELECT FROM type) THEN 0 ELSE cardinality(:ids::uuid[]) END,
        last_error = CASE WHEN cardinality(:ids::uuid[]) = 0 THEN sc.last_error
                          WHEN EXISTS (SELECT FROM type) THEN NULL
                          ELSE 'task type ' || sc.type || ' is unknown or disabled: fires skipped'
                     END,
        updated_at = now()
    FROM s WHERE sc.name = s.name
)
SELECT id, type, queue, status, attempts, last_error, generation, delay, traceparent
FROM inserted;

-- ---------------------------------------------------------------- queue pauses

-- name: queue_pause
-- Pauses a work queue unless it is paused already (then it returns nothing and
-- the pause keeps its time, author and reason). A new pause notifies the
-- workers on :channel (<schema>_queues) when it commits.
-- :queue, :paused_by, :reason, :channel
WITH paused AS (
    INSERT INTO taskq.queue_pauses (queue, paused_by, reason)
    VALUES (:queue, :paused_by, :reason)
    ON CONFLICT (queue) DO NOTHING
    RETURNING queue, paused_at, paused_by, reason
)
SELECT p.queue, p.paused_at, p.paused_by, p.reason, pg_notify(:channel, p.queue) AS notified
FROM paused p;

-- name: queue_resume
-- Resumes a work queue; returns its pause if it was paused, and then notifies
-- the workers on :channel when it commits.
-- :queue, :channel
WITH resumed AS (
    DELETE FROM taskq.queue_pauses WHERE queue = :queue
    RETURNING queue, paused_at, paused_by, reason
)
SELECT r.queue, r.paused_at, r.paused_by, r.reason, pg_notify(:channel, r.queue) AS notified
FROM resumed r;

-- name: queue_pause_get
-- :queue
SELECT queue, paused_at, paused_by, reason FROM taskq.queue_pauses WHERE queue = :queue;

-- name: queue_pauses
-- Every paused queue, by name (at most one row per queue).
SELECT queue, paused_at, paused_by, reason FROM taskq.queue_pauses ORDER BY queue;

-- ---------------------------------------------------------------- rate limits

-- name: limiter_put
-- Creates or replaces a rate limiter (an operator's, or a type's own when
-- type_name is set); its buckets keep their place.
-- :name, :rate, :per_seconds, :burst, :key (NULL: one bucket), :type_name
INSERT INTO taskq.rate_limiters AS r (name, rate, per_seconds, burst, key, type_name)
VALUES (:name, :rate, :per_seconds, :burst, :key, :type_name)
ON CONFLICT (name) DO UPDATE SET
    rate = EXCLUDED.rate, per_seconds = EXCLUDED.per_seconds, burst = EXCLUDED.burst,
    key = EXCLUDED.key, updated_at = now()
WHERE (r.rate, r.per_seconds, r.burst, r.key)
    IS DISTINCT FROM (EXCLUDED.rate, EXCLUDED.per_seconds, EXCLUDED.burst, EXCLUDED.key)
RETURNING (xmax = 0) AS created;

-- name: limiters_list
-- Rate limiters in name order (one, when :name is set), with the types that use
-- each and, for one without key, when its bucket's slots (and the waits for
-- one handed out) are taken until.
-- :name (NULL: all)
SELECT r.name, r.rate, r.per_seconds, r.burst, r.key, r.type_name, r.created_at, r.updated_at,
       ARRAY(SELECT t.name FROM taskq.task_type t WHERE t.limiter = r.name ORDER BY t.name)
           AS types,
       CASE WHEN r.key IS NULL THEN
           (SELECT greatest(b.tat, b.promised) FROM taskq.rate_limit_buckets b
            WHERE b.limiter = r.name AND b.key = '')
       END AS busy_until
FROM taskq.rate_limiters r
WHERE :name::text IS NULL OR r.name = :name
ORDER BY r.name;

-- name: limiters_count
-- How many limiters operators made (a type's own are not counted).
SELECT count(*) FROM taskq.rate_limiters WHERE type_name IS NULL;

-- name: limiter_lock
-- Locks an operator's limiter for its delete (a type naming it meanwhile waits).
-- :name
SELECT r.name, r.type_name,
       ARRAY(SELECT t.name FROM taskq.task_type t WHERE t.limiter = r.name ORDER BY t.name)
           AS types
FROM taskq.rate_limiters r WHERE r.name = :name
FOR UPDATE;

-- name: limiter_delete
-- :name
DELETE FROM taskq.rate_limiters WHERE name = :name AND type_name IS NULL;

-- name: type_limiters
-- The limiter each of these types names, and who set it.
-- :names text[]
SELECT name, limiter, limiter_source FROM taskq.task_type WHERE name = ANY(:names::text[]);

-- name: type_limiter_set
-- Names the limiter of a type (NULL: none) and who set it (code or api).
-- :name, :limiter, :source
UPDATE taskq.task_type SET limiter = :limiter, limiter_source = :source, updated_at = now()
WHERE name = :name
  AND (limiter, limiter_source) IS DISTINCT FROM (:limiter::text, :source::text);

-- name: type_limiters_prune
-- Deletes the own limiters of these types that their type no longer names.
-- :names text[]
DELETE FROM taskq.rate_limiters r
WHERE r.type_name = ANY(:names::text[])
  AND NOT EXISTS (SELECT FROM taskq.task_type t WHERE t.limiter = r.name);

-- name: rate_buckets_prune
-- Deletes up to :batch buckets whose tat (and promised) passed over :idle_seconds
-- ago (a passed tat is as good as none); the sweeper runs it. Buckets a claim holds are skipped.
-- :idle_seconds, :batch
DELETE FROM taskq.rate_limit_buckets b
USING (SELECT limiter, key FROM taskq.rate_limit_buckets
       WHERE tat < now() - make_interval(secs => :idle_seconds)
         AND (promised IS NULL OR promised < now() - make_interval(secs => :idle_seconds))
       ORDER BY tat LIMIT :batch FOR UPDATE SKIP LOCKED) old
WHERE b.limiter = old.limiter AND b.key = old.key;

-- ---------------------------------------------------------------- workflows
-- Workflows (migration 0019): a workflows row, a task per node (WAITING for its
-- parents, or ENQUEUED), workflow_nodes and workflow_edges. What ends a node
-- settles its workflow in the same statement: the trigger tasks_workflow_settle.

-- name: workflow_insert
-- A new workflow, unless its idempotency key names one already (no row back).
-- :id, :name, :on_failure, :nodes, :idempotency_key, :request_fingerprint
INSERT INTO taskq.workflows (id, name, on_failure, nodes, idempotency_key, request_fingerprint)
VALUES (:id, :name, :on_failure, :nodes, :idempotency_key, :request_fingerprint)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id;

-- name: workflow_by_key
-- The workflow holding an idempotency key, with the fingerprint of its request.
-- :idempotency_key
SELECT id, request_fingerprint FROM taskq.workflows WHERE idempotency_key = :idempotency_key;

-- name: workflow_insert_nodes
-- The nodes of a new workflow, in one statement: a task per node (ENQUEUED when
-- it has no parent, else WAITING for its parents), its workflow_nodes row, and an
-- edge per dependency. Defaults come from the (enabled) task type, as `enqueue`'s;
-- a node of an unknown or disabled type is left out (the store then rolls back).
-- Returns the tasks inserted, in the nodes' order.
-- :workflow_id, :ids uuid[], :names text[], :types text[], :queues text[],
-- :payloads text[] (json), :max_attempts int[], :timeouts float8[],
-- :run_at timestamptz[], :delays float8[], :traceparents text[], :parents_left int[],
-- :edge_children uuid[], :edge_positions int[], :edge_parents uuid[]
WITH r AS (
    SELECT * FROM unnest(:ids::uuid[], :names::text[], :types::text[], :queues::text[],
                         :payloads::text[], :max_attempts::int[], :timeouts::float8[],
                         :run_at::timestamptz[], :delays::float8[], :traceparents::text[],
                         :parents_left::int[])
        WITH ORDINALITY AS r(id, name, type, queue, payload, max_attempts, timeout_seconds,
                             run_at, delay, traceparent, parents_left, n)
), inserted AS (
    INSERT INTO taskq.tasks (id, type, queue, payload, max_attempts, timeout_seconds, run_at,
                             traceparent, status, wait_reason, workflow_id)
    SELECT r.id, r.type, coalesce(r.queue, t.queue), r.payload::jsonb,
           coalesce(r.max_attempts, t.max_attempts), coalesce(r.timeout_seconds, t.timeout_seconds),
           coalesce(r.run_at, now() + make_interval(secs => coalesce(r.delay, 0))), r.traceparent,
           CASE WHEN r.parents_left > 0 THEN 'WAITING' ELSE 'ENQUEUED' END,
           CASE WHEN r.parents_left > 0 THEN 'parents' END, :workflow_id::uuid
    FROM r JOIN taskq.task_type t ON t.name = r.type AND t.enabled
    ORDER BY r.n
    RETURNING id, type, queue, status, attempts, max_attempts, run_at, created_at, generation,
              greatest(0, extract(epoch FROM run_at - clock_timestamp()))::float8 AS delay
), nodes AS (
    INSERT INTO taskq.workflow_nodes (task_id, workflow_id, name, position, parents_left)
    SELECT r.id, :workflow_id::uuid, r.name, r.n - 1, r.parents_left FROM r
), edges AS (
    INSERT INTO taskq.workflow_edges (child_id, position, parent_id, workflow_id)
    SELECT e.child_id, e.position, e.parent_id, :workflow_id::uuid
    FROM unnest(:edge_children::uuid[], :edge_positions::int[], :edge_parents::uuid[])
        AS e(child_id, position, parent_id)
)
SELECT i.* FROM inserted i JOIN r ON r.id = i.id ORDER BY r.n;

-- name: workflow_get
-- :id
SELECT id, name, status, on_failure, nodes, succeeded, failed, cancelled, idempotency_key,
       cancel_requested_at, created_at, updated_at, finished_at
FROM taskq.workflows WHERE id = :id;

-- name: workflow_nodes
-- A workflow's nodes in their order, with their tasks (each through its primary
-- key), and the names of each node's parents in the order of its depends_on.
-- :id
SELECT n.name, n.task_id, t.type, t.queue, t.status, t.wait_reason, t.attempts,
       t.max_attempts, n.parents_left, n.skipped, t.last_error, t.created_at, t.started_at,
       t.finished_at,
       ARRAY(SELECT p.name FROM taskq.workflow_edges e
             JOIN taskq.workflow_nodes p ON p.task_id = e.parent_id
             WHERE e.child_id = n.task_id ORDER BY e.position) AS depends_on
FROM taskq.workflow_nodes n
LEFT JOIN taskq.tasks t ON t.id = n.task_id
WHERE n.workflow_id = :id
ORDER BY n.position;

-- name: workflows_list
-- Newest first, keyset-paginated on (created_at, id). NULL filters match all.
-- :status, :name, :cursor_created_at, :cursor_id, :limit
SELECT id, name, status, on_failure, nodes, succeeded, failed, cancelled, idempotency_key,
       cancel_requested_at, created_at, updated_at, finished_at
FROM taskq.workflows
WHERE (:status::text IS NULL OR status = :status)
  AND (:name::text IS NULL OR name = :name)
  AND (:cursor_created_at::timestamptz IS NULL
       OR (created_at, id) < (:cursor_created_at, :cursor_id::uuid))
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: workflow_lock_nodes
-- The first step of a workflow's cancel: locks its nodes that have not ended, in
-- id order as claims lock tasks (before the workflow's row, which settling a node
-- takes after its task's). Returns their ids.
-- :id
SELECT t.id
FROM (SELECT n.task_id FROM taskq.workflow_nodes n WHERE n.workflow_id = :id
      ORDER BY n.task_id) n
CROSS JOIN LATERAL (
    SELECT t.id FROM taskq.tasks t
    WHERE t.id = n.task_id AND t.status IN ('ENQUEUED', 'WAITING', 'RUNNING')
    FOR UPDATE
) t;

-- name: workflow_cancel
-- Marks a workflow cancelled (nothing more is released), unless it has ended.
-- Returns its id if it was running.
-- :id
UPDATE taskq.workflows f SET
    cancel_requested_at = coalesce(f.cancel_requested_at, now()), updated_at = now()
WHERE f.id = :id AND f.status = 'RUNNING'
RETURNING f.id;

-- name: workflow_cancel_nodes
-- A workflow's cancel, once its nodes are locked (workflow_lock_nodes) and the
-- workflow marked: nodes not started are CANCELLED, running ones get a cancel
-- request (their workers stop them, as for POST /tasks/{id}/cancel). The workflow
-- ends when its last node does (tasks_workflow_settle).
-- :ids uuid[]
WITH held AS (
    SELECT t.id
    FROM (SELECT DISTINCT id FROM unnest(:ids::uuid[]) AS id ORDER BY id) i
    CROSS JOIN LATERAL (
        SELECT t.id FROM taskq.tasks t
        WHERE t.id = i.id AND t.status IN ('ENQUEUED', 'WAITING', 'RUNNING')
        FOR UPDATE
    ) t
)
UPDATE taskq.tasks t SET
    status = CASE WHEN t.status = 'RUNNING' THEN t.status ELSE 'CANCELLED' END,
    finished_at = CASE WHEN t.status = 'RUNNING' THEN t.finished_at ELSE now() END,
    cancel_requested_at = CASE WHEN t.status = 'RUNNING'
                               THEN coalesce(t.cancel_requested_at, now()) END,
    wait_reason = NULL, updated_at = now()
WHERE t.id = ANY(ARRAY(SELECT id FROM held));

-- name: workflow_released
-- The children of the nodes :ids (successes recorded in this transaction) that
-- the settle released (ENQUEUED, not published yet, due), of the :queues, at
-- most :limit of them, for the worker that recorded them to claim (a handoff).
-- By the edges' parent index, then each child by the tasks' primary key (never a
-- scan of the queue's ENQUEUED tasks, however many there are).
-- :ids uuid[], :queues text[], :limit
SELECT DISTINCT c.id
FROM taskq.workflow_edges e
CROSS JOIN LATERAL (
    SELECT t.id, t.status, t.published_at, t.run_at, t.queue FROM taskq.tasks t
    WHERE t.id = e.child_id
    LIMIT 1  -- one row at most: keeps the planner from making this a join
) c
WHERE e.parent_id = ANY(:ids::uuid[])
  AND c.status = 'ENQUEUED' AND c.published_at IS NULL AND c.run_at <= now()
  AND c.queue = ANY(:queues::text[])
ORDER BY c.id
LIMIT :limit;

-- name: parent_results
-- The results of a node's parents, in the order of its depends_on (a worker reads
-- them before it runs a node: ctx.parent_results), each with the size of them all
-- in bytes of JSON text; none of the results (NULL) when that is over :max_bytes,
-- so that a callback of a wide group cannot fill its worker's memory.
-- :task_id, :max_bytes
WITH parents AS (
    SELECT e.position, p.result::text AS result
    FROM taskq.workflow_edges e JOIN taskq.tasks p ON p.id = e.parent_id
    WHERE e.child_id = :task_id
), size AS (
    SELECT coalesce(sum(octet_length(result)), 0) AS bytes FROM parents
)
SELECT CASE WHEN s.bytes <= :max_bytes THEN p.result END AS result, s.bytes
FROM parents p CROSS JOIN size s
ORDER BY p.position;

-- name: workflow_missed_any
-- Whether the trigger noted a node it had to skip (the sweeper's probe of an
-- empty table, migration 0020).
SELECT EXISTS (SELECT FROM taskq.workflow_missed) AS missed;

-- name: workflow_repair
-- Decides again up to :limit nodes the trigger skipped (migration 0020), each
-- under its lock (one still held stays noted for the next pass): a node that has
-- not started and can no longer run (its workflow cancelled or failing fast, or a
-- parent FAILED or CANCELLED) is CANCELLED and marked skipped, as the trigger
-- would have (and settles its workflow in turn); a node WAITING for parents that
-- have all succeeded is ENQUEUED with its publish owed; any other has moved on.
-- Each decided node, and each whose task is gone, is forgotten. Returns the nodes
-- changed with their new status.
-- :limit
WITH noted AS (
    SELECT m.task_id AS id FROM taskq.workflow_missed m ORDER BY m.noted_at, m.task_id
    LIMIT :limit
), held AS (
    SELECT t.id, t.status, t.wait_reason
    FROM noted i
    CROSS JOIN LATERAL (
        SELECT t.id, t.status, t.wait_reason FROM taskq.tasks t
        WHERE t.id = i.id FOR UPDATE SKIP LOCKED
    ) t
), judged AS (
    SELECT h.id,
           CASE
               WHEN h.status NOT IN ('ENQUEUED', 'WAITING') THEN NULL
               WHEN f.cancel_requested_at IS NOT NULL
                    OR (f.on_failure = 'fail_fast' AND f.failed > 0)
                    OR EXISTS (SELECT FROM taskq.workflow_edges e
                               JOIN taskq.tasks p ON p.id = e.parent_id
                               WHERE e.child_id = h.id AND p.status IN ('FAILED', 'CANCELLED'))
                   THEN 'CANCELLED'
               WHEN h.status = 'WAITING' AND h.wait_reason = 'parents' AND n.parents_left = 0
                   THEN 'ENQUEUED'
           END AS status
    FROM held h
    JOIN taskq.workflow_nodes n ON n.task_id = h.id
    JOIN taskq.workflows f ON f.id = n.workflow_id
), forgotten AS (
    DELETE FROM taskq.workflow_missed m
    USING noted i
    WHERE m.task_id = i.id
      AND (i.id IN (SELECT id FROM held)
           OR NOT EXISTS (SELECT FROM taskq.tasks t WHERE t.id = i.id))
), skipped AS (
    UPDATE taskq.workflow_nodes n SET skipped = true
    FROM judged j WHERE n.task_id = j.id AND j.status = 'CANCELLED'
)
UPDATE taskq.tasks t SET
    status = j.status,
    wait_reason = NULL,
    published_at = CASE WHEN j.status = 'ENQUEUED' THEN NULL ELSE t.published_at END,
    run_at = CASE WHEN j.status = 'ENQUEUED' THEN greatest(t.run_at, now()) ELSE t.run_at END,
    generation = t.generation + (j.status = 'ENQUEUED')::int,
    finished_at = CASE WHEN j.status = 'CANCELLED' THEN now() END,
    last_error = CASE WHEN j.status = 'CANCELLED'
                      THEN 'Skipped: its workflow will not run it (a node it depends on did not'
                           ' succeed, a failure under fail_fast, or a cancel)'
                      ELSE t.last_error END,
    updated_at = now()
FROM judged j
WHERE t.id = j.id AND j.status IS NOT NULL
RETURNING t.id, t.status;

-- name: workflows_prune
-- Retention: deletes up to :limit workflows that ended more than :seconds seconds
-- ago (their nodes' tasks ended before them, and go by retention_delete).
-- :seconds, :limit
DELETE FROM taskq.workflows
WHERE id IN (SELECT id FROM taskq.workflows
             WHERE status <> 'RUNNING' AND finished_at < now() - make_interval(secs => :seconds)
             ORDER BY finished_at LIMIT :limit FOR UPDATE SKIP LOCKED);

-- name: workflows_by_status
-- Workflows by status (GET /metrics).
SELECT status, count(*) AS n FROM taskq.workflows GROUP BY status;
