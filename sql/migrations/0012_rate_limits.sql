-- Rate limits: at most `rate` starts per `per_seconds` for the tasks of the
-- types that name a limiter, enforced by the worker's `claim` statement.
--
-- A limiter spaces starts by GCRA (the generic cell rate algorithm): each
-- bucket keeps a theoretical arrival time (tat); a task that would be claimed
-- takes the next slot, max(now, tat - burst tolerance), and moves tat on by
-- one emission interval (per_seconds / rate). A slot that is now is claimed;
-- a later slot is a reservation: the task's run_at moves there (its attempts
-- unchanged), tasks.limited_until records it, and the worker sends the task
-- back through the delay levels once; at its slot it is claimed without
-- taking a second slot. No task is claimed, failed or cycled through the
-- broker for being over its limit.
--
-- A limiter is an operator's (PUT /limits/{name}, type_name NULL) or a type's
-- own (`rate_limit={"limit": 100, "per": "1m"}` on the type, named
-- type:<type>, type_name set, kept in step with the type). A type names the
-- limiter its tasks take slots from in task_type.limiter; several types may
-- share one. With `key` set, each value of that payload field has a bucket of
-- its own (e.g. one per customer).

CREATE TABLE taskq.rate_limiters (
    -- An operator's limiter: letters, digits, '.', '_', '-' (no ':', so never
    -- a type's own, which are named type:<type>).
    name          text PRIMARY KEY
                  CONSTRAINT rate_limiters_name_format
                  CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$' OR name = 'type:' || type_name),
    rate          integer NOT NULL
                  CONSTRAINT rate_limiters_rate_range CHECK (rate BETWEEN 1 AND 1000000),
    per_seconds   double precision NOT NULL
                  CONSTRAINT rate_limiters_per_range CHECK (per_seconds > 0 AND per_seconds <= 86400 * 30),
    -- Starts allowed at once after an idle spell (1: evenly spaced).
    burst         integer NOT NULL DEFAULT 1
                  CONSTRAINT rate_limiters_burst_range CHECK (burst BETWEEN 1 AND rate),
    -- A top-level payload field: one bucket per value of it. NULL: one bucket.
    key           text
                  CONSTRAINT rate_limiters_key_format CHECK (key ~ '^[A-Za-z0-9_.-]{1,100}$'),
    type_name     text REFERENCES taskq.task_type (name) ON DELETE CASCADE ON UPDATE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE taskq.rate_limiters IS
    'Rate limits (GCRA) enforced by the claim statement; see sql/migrations/0012_rate_limits.sql.';
COMMENT ON COLUMN taskq.rate_limiters.type_name IS
    'Set for a type''s own limiter (rate_limit on the type), named type:<type>; NULL for an operator''s.';

CREATE TABLE taskq.rate_limit_buckets (
    limiter   text NOT NULL REFERENCES taskq.rate_limiters (name) ON DELETE CASCADE ON UPDATE CASCADE,
    -- The JSON text of the key field's value ('' for a limiter without key;
    -- an md5 for long values).
    key       text NOT NULL,
    tat       timestamptz NOT NULL,
    PRIMARY KEY (limiter, key)
);

COMMENT ON TABLE taskq.rate_limit_buckets IS
    'One row per limiter and key: its GCRA theoretical arrival time. A row whose tat has passed is as good as none (the sweeper deletes them).';
COMMENT ON COLUMN taskq.rate_limit_buckets.tat IS
    'Theoretical arrival time: the next slot is max(now, tat - burst tolerance); each slot taken moves it on by per_seconds / rate.';

-- The sweeper deletes the buckets that have gone idle.
CREATE INDEX rate_limit_buckets_tat ON taskq.rate_limit_buckets (tat);

ALTER TABLE taskq.task_type ADD COLUMN IF NOT EXISTS limiter text
    REFERENCES taskq.rate_limiters (name) ON UPDATE CASCADE;
ALTER TABLE taskq.task_type ADD COLUMN IF NOT EXISTS limiter_source text
    CONSTRAINT task_type_limiter_source CHECK (limiter_source IN ('code', 'api'));

COMMENT ON COLUMN taskq.task_type.limiter IS
    'The rate limiter its tasks take slots from at their claim (NULL: none).';
COMMENT ON COLUMN taskq.task_type.limiter_source IS
    'code: set by a handler''s rate_limit= and kept in step by the workers; api: PUT /types (workers keep it).';

-- Constant defaults: added in the catalog only, no rewrite.
ALTER TABLE taskq.tasks ADD COLUMN IF NOT EXISTS limited_until timestamptz;
ALTER TABLE taskq.tasks ADD COLUMN IF NOT EXISTS limited_by text;

COMMENT ON COLUMN taskq.tasks.limited_until IS
    'The start slot its rate limiter reserved for it (run_at moved there): at its claim it takes no second slot. Cleared by the claim.';
COMMENT ON COLUMN taskq.tasks.limited_by IS
    'The rate limiter that made it wait until limited_until.';
