-- Rate limits: a task whose slot would be past the hold window waits without one.
--
-- The claim (sql/queries.sql, claim_gated) used to give every task over its limit
-- the next slot of its bucket at once, however far. A worker holds a delivery due
-- within the hold window (taskq.ratelimits.HOLD_SECONDS) and sends a later one back
-- through the delay levels; but a delivery sent back while its work queue has a
-- backlog comes back only behind that backlog. When workers take a backlog of a
-- limited type, they read it much faster than its rate: the slots of the first
-- seconds went to deliveries that came back past them, and nobody started then.
--
-- Now a new task takes a slot only within the hold window; a later one waits
-- without a slot (run_at moved, limited_until NULL) until the time its slot would
-- about be: `promised` is where the waits handed out so far end. Back from its
-- wait, it takes the next slot, however far. Meanwhile the slots near now are there
-- for the deliveries the workers still read from the backlog.

ALTER TABLE taskq.rate_limit_buckets ADD COLUMN IF NOT EXISTS promised timestamptz;

COMMENT ON COLUMN taskq.rate_limit_buckets.promised IS
    'Where the waits without a slot handed out so far end (NULL: none): the next such wait ends at max(promised, tat).';
