-- Paused work queues: POST /queues/{q}/pause and /resume (taskq queues pause|resume).
--
-- A row here means no worker consumes that work queue. Enqueues go on: the
-- queue's tasks stay ENQUEUED and their envelopes wait in RabbitMQ until the
-- queue is resumed (its row deleted). The claim never reads this table; the
-- workers do, at their start (a worker starting while a queue is paused never
-- consumes it) and whenever a pause or a resume changes it: the statement
-- that changes a row sends a NOTIFY on the channel <schema>_queues
-- (taskq.store.queues_channel), and each worker also reads the table again
-- every heartbeat interval on its listening connection, in case a
-- notification was lost with a connection. On a pause a worker cancels its
-- consumer of the queue and gives the deliveries it had prefetched back to
-- the broker unclaimed; tasks already running finish normally.
--
-- Only paused queues have a row, so the table holds at most as many rows as
-- there are queues, and a pause outlives any process.

CREATE TABLE taskq.queue_pauses (
    queue      taskq.taskq_queue_name PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT now(),
    -- The API key's label (or api), or cli.
    paused_by  text NOT NULL
               CONSTRAINT queue_pauses_paused_by_length CHECK (length(paused_by) <= 200),
    reason     text
               CONSTRAINT queue_pauses_reason_length CHECK (length(reason) <= 1000)
);

COMMENT ON TABLE taskq.queue_pauses IS
    'Work queues no worker consumes until they are resumed; see taskq.worker.pauses.';
COMMENT ON COLUMN taskq.queue_pauses.paused_by IS
    'Who paused it: the API key''s label, api without keys, or cli.';
COMMENT ON COLUMN taskq.queue_pauses.reason IS
    'Why, as the operator said (optional).';
