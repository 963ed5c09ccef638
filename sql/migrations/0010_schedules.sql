-- Schedules: tasks enqueued at the fires of a cron expression (in a time zone)
-- or every so many seconds, by the active sweeper (taskq.fleet.scheduler).
--
-- A fire is an enqueue whose idempotency key names the schedule and the fire
-- time (schedule:<name>:<time>), written in the same statement that moves the
-- schedule's next_fire_at on, guarded by the next_fire_at it read: two
-- sweepers (a failover, a frozen leader that wakes up), a restart or a retry
-- never enqueue a fire twice.

CREATE TABLE taskq.schedules (
    name            text PRIMARY KEY
                    CONSTRAINT schedules_name_format CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$'),
    -- Exactly one of cron (with timezone) and every_seconds says when it fires.
    cron            text,
    timezone        text NOT NULL DEFAULT 'UTC',
    every_seconds   double precision
                    CONSTRAINT schedules_every_positive CHECK (every_seconds >= 1),
    type            text NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}',
    queue           taskq.taskq_queue_name,
    catch_up        text NOT NULL DEFAULT 'once'
                    CONSTRAINT schedules_catch_up CHECK (catch_up IN ('skip', 'once', 'all')),
    catch_up_limit  integer NOT NULL DEFAULT 100
                    CONSTRAINT schedules_catch_up_limit CHECK (catch_up_limit BETWEEN 1 AND 1000),
    overlap         text NOT NULL DEFAULT 'allow'
                    CONSTRAINT schedules_overlap CHECK (overlap IN ('allow', 'skip')),
    paused          boolean NOT NULL DEFAULT false,
    source          text NOT NULL DEFAULT 'api'
                    CONSTRAINT schedules_source CHECK (source IN ('api', 'code')),
    next_fire_at    timestamptz NOT NULL,
    last_fire_at    timestamptz,
    last_task_id    uuid,
    fires           bigint NOT NULL DEFAULT 0,
    skipped         bigint NOT NULL DEFAULT 0,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_when CHECK ((cron IS NULL) <> (every_seconds IS NULL))
);

COMMENT ON TABLE taskq.schedules IS
    'Recurring enqueues fired by the active sweeper; see taskq.fleet.scheduler.';
COMMENT ON COLUMN taskq.schedules.next_fire_at IS
    'The next fire not yet enqueued (or skipped); the sweeper fires it once it is due.';
COMMENT ON COLUMN taskq.schedules.catch_up IS
    'Fires missed while no sweeper ran: skip them, enqueue once for all of them, or each (up to catch_up_limit).';
COMMENT ON COLUMN taskq.schedules.overlap IS
    'skip: no fire while the task of the previous fire is not finished.';
COMMENT ON COLUMN taskq.schedules.source IS
    'code: declared by a handler''s schedule= and kept in step by the workers; api: PUT /schedules.';

-- The sweeper's question every pass: which schedules are due.
CREATE INDEX schedules_due ON taskq.schedules (next_fire_at) WHERE NOT paused;
