-- Workflow nodes whose release or cancel was missed, repaired by the sweeper.
--
-- The trigger tasks_workflow_settle (migration 0019) locks the nodes it releases
-- or cancels SKIP LOCKED: a node another transaction holds at that moment (a
-- cancel, an operator's bulk action) is skipped, and a release tries again only a
-- few times. Such a node could wait for ever (a ready child never released) or
-- keep its workflow RUNNING for ever (a descendant of a failed node never
-- cancelled). Now the trigger notes each node it had to skip in
-- `workflow_missed`, in the transaction that skipped it, and the sweeper
-- (Sweeper.repair_waiting, sql/queries.sql workflow_repair) decides each again
-- under its lock: it releases a node whose parents have all succeeded, cancels
-- one that can no longer run, and forgets one that has moved on. Nothing is read
-- while nothing was missed: one probe of an empty table per repair pass.
--
-- The function below is 0019's, with the two notes added, and the resume of a
-- workflow (a retried node's) skipping the skipped nodes another transaction
-- holds: two operators retrying a failed node and its skipped child at once
-- deadlocked (each held its node and waited for the other's).

CREATE TABLE IF NOT EXISTS taskq.workflow_missed (
    task_id     uuid PRIMARY KEY,
    workflow_id uuid NOT NULL,
    noted_at    timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE taskq.workflow_missed IS
    'Workflow nodes whose release or cancel the trigger skipped (held by another transaction): the sweeper decides them again (migration 0020).';

CREATE OR REPLACE FUNCTION taskq.taskq_workflows_on_update() RETURNS trigger LANGUAGE plpgsql
SET search_path = taskq, pg_temp AS $$
DECLARE
    v_ids      uuid[];
    v_wfs      uuid[];
    v_before   text[];
    v_after    text[];
    v_blocked  uuid[];
    v_ready    uuid[];
    v_released uuid[];
    v_doomed   uuid[];
    v_resumed  uuid[];
    v_channel  text := TG_TABLE_SCHEMA || '_enqueued';
    v_try      integer;
    v_i        integer;
BEGIN
    -- A statement of tasks outside workflows: one scan of its new rows.
    IF NOT EXISTS (SELECT FROM new_rows WHERE workflow_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    -- The nodes that ended, or were made to run again (claims and releases, which
    -- move nodes between ENQUEUED, WAITING and RUNNING, settle nothing). Planned at each call (EXECUTE): the join of
    -- the transition tables must be a hash join for a statement of many rows
    -- (migration 0003), and lookups below must stay index scans.
    EXECUTE 'SELECT coalesce(array_agg(n.id ORDER BY n.id), ''{}''),
                    coalesce(array_agg(n.workflow_id ORDER BY n.id), ''{}''),
                    coalesce(array_agg(o.status ORDER BY n.id), ''{}''),
                    coalesce(array_agg(n.status ORDER BY n.id), ''{}'')
             FROM new_rows n JOIN old_rows o ON o.id = n.id
             WHERE n.workflow_id IS NOT NULL AND n.status IS DISTINCT FROM o.status
               AND (n.status IN (''SUCCEEDED'', ''FAILED'', ''CANCELLED'')
                    OR o.status IN (''SUCCEEDED'', ''FAILED'', ''CANCELLED''))'
        INTO v_ids, v_wfs, v_before, v_after;
    IF cardinality(v_ids) = 0 THEN
        RETURN NULL;
    END IF;

    -- The workflows' rows first, in id order: whatever settles a workflow takes
    -- its row before the rows of its nodes (the lock order of migration 0019).
    PERFORM 1 FROM (SELECT DISTINCT w FROM unnest(v_wfs) AS w ORDER BY w) i
    CROSS JOIN LATERAL (SELECT f.id FROM taskq.workflows f WHERE f.id = i.w FOR UPDATE) f;

    -- The counts.
    UPDATE taskq.workflows f SET
        succeeded = f.succeeded + d.succeeded, failed = f.failed + d.failed,
        cancelled = f.cancelled + d.cancelled, updated_at = now()
    FROM (SELECT c.wf,
                 sum((c.after = 'SUCCEEDED')::int - (c.before = 'SUCCEEDED')::int) AS succeeded,
                 sum((c.after = 'FAILED')::int - (c.before = 'FAILED')::int) AS failed,
                 sum((c.after = 'CANCELLED')::int - (c.before = 'CANCELLED')::int) AS cancelled
          FROM unnest(v_wfs, v_before, v_after) AS c(wf, before, after)
          GROUP BY c.wf) d
    WHERE f.id = d.wf;

    -- Workflows that release nothing now: cancelled, or failing fast.
    SELECT coalesce(array_agg(f.id), '{}') INTO v_blocked
    FROM taskq.workflows f
    WHERE f.id = ANY(v_wfs)
      AND (f.cancel_requested_at IS NOT NULL OR (f.on_failure = 'fail_fast' AND f.failed > 0));

    -- Successes in the others: their children have a parent fewer to wait for.
    WITH done AS (
        SELECT c.id FROM unnest(v_ids, v_wfs, v_after) AS c(id, wf, after)
        WHERE c.after = 'SUCCEEDED' AND NOT c.wf = ANY(v_blocked)
    ), owed AS (
        SELECT e.child_id, count(*) AS n
        FROM done d JOIN taskq.workflow_edges e ON e.parent_id = d.id
        GROUP BY e.child_id
    ), counted AS (
        UPDATE taskq.workflow_nodes n SET parents_left = greatest(0, n.parents_left - o.n)
        FROM owed o
        WHERE n.task_id = o.child_id
        RETURNING n.task_id, n.parents_left
    )
    SELECT coalesce(array_agg(c.task_id ORDER BY c.task_id), '{}') INTO v_ready
    FROM counted c WHERE c.parents_left = 0;

    -- Release the ready children: ENQUEUED, publish owed, the relay woken at commit.
    v_try := 0;
    WHILE cardinality(v_ready) > 0 LOOP
        WITH held AS (
            SELECT t.id
            FROM unnest(v_ready) AS i(id)
            CROSS JOIN LATERAL (
                SELECT t.id FROM taskq.tasks t
                WHERE t.id = i.id AND t.status = 'WAITING' AND t.wait_reason = 'parents'
                FOR UPDATE SKIP LOCKED
            ) t
        ), released AS (
            UPDATE taskq.tasks t SET
                status = 'ENQUEUED', wait_reason = NULL, published_at = NULL,
                run_at = greatest(t.run_at, now()), generation = t.generation + 1,
                updated_at = now()
            WHERE t.id = ANY(ARRAY(SELECT id FROM held))
            RETURNING t.id
        )
        SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO v_released FROM released;
        FOR v_i IN 0 .. (cardinality(v_released) - 1) / 200 LOOP
            IF cardinality(v_released) > 0 THEN
                PERFORM pg_notify(v_channel,
                    array_to_string(v_released[v_i * 200 + 1 : v_i * 200 + 200], ','));
            END IF;
        END LOOP;
        -- Still WAITING for parents and not released: held by another transaction.
        SELECT coalesce(array_agg(t.id ORDER BY t.id), '{}') INTO v_ready
        FROM unnest(v_ready) AS i(id) JOIN taskq.tasks t ON t.id = i.id
        WHERE t.status = 'WAITING' AND t.wait_reason = 'parents' AND NOT t.id = ANY(v_released);
        v_try := v_try + 1;
        EXIT WHEN v_try >= 5;
        IF cardinality(v_ready) > 0 THEN
            PERFORM pg_sleep(0.005 * v_try);
        END IF;
    END LOOP;
    IF cardinality(v_ready) > 0 THEN
        INSERT INTO taskq.workflow_missed (task_id, workflow_id)
        SELECT n.task_id, n.workflow_id FROM taskq.workflow_nodes n WHERE n.task_id = ANY(v_ready)
        ON CONFLICT (task_id) DO NOTHING;
        RAISE WARNING 'taskq: workflow nodes % are ready but were held by another transaction'
                      ' (the sweeper releases them)', v_ready;
    END IF;

    -- What can no longer run: the not-started nodes of blocked workflows, and the
    -- not-started descendants of nodes that failed or were cancelled.
    WITH RECURSIVE ended AS (
        SELECT c.id FROM unnest(v_ids, v_wfs, v_after) AS c(id, wf, after)
        WHERE c.after IN ('FAILED', 'CANCELLED') AND NOT c.wf = ANY(v_blocked)
    ), below AS (
        SELECT e.child_id AS id FROM ended d JOIN taskq.workflow_edges e ON e.parent_id = d.id
        UNION
        SELECT e.child_id FROM below b JOIN taskq.workflow_edges e ON e.parent_id = b.id
    ), candidates AS (
        SELECT id FROM below
        UNION
        SELECT n.task_id FROM taskq.workflow_nodes n WHERE n.workflow_id = ANY(v_blocked)
    )
    SELECT coalesce(array_agg(c.id ORDER BY c.id), '{}') INTO v_doomed FROM candidates c;

    IF cardinality(v_doomed) > 0 THEN
        WITH held AS (
            SELECT t.id
            FROM unnest(v_doomed) AS i(id)
            CROSS JOIN LATERAL (
                SELECT t.id FROM taskq.tasks t
                WHERE t.id = i.id AND t.status IN ('ENQUEUED', 'WAITING')
                FOR UPDATE SKIP LOCKED
            ) t
        ), skipped AS (
            UPDATE taskq.workflow_nodes n SET skipped = true
            WHERE n.task_id = ANY(ARRAY(SELECT id FROM held))
        )
        UPDATE taskq.tasks t SET
            status = 'CANCELLED', wait_reason = NULL, finished_at = now(), updated_at = now(),
            last_error = 'Skipped: its workflow will not run it (a node it depends on did not'
                         ' succeed, a failure under fail_fast, or a cancel)'
        WHERE t.id = ANY(ARRAY(SELECT id FROM held));
        -- Those still not started were held by another transaction: noted for the sweeper.
        INSERT INTO taskq.workflow_missed (task_id, workflow_id)
        SELECT t.id, t.workflow_id FROM taskq.tasks t
        WHERE t.id = ANY(v_doomed) AND t.status IN ('ENQUEUED', 'WAITING')
        ON CONFLICT (task_id) DO NOTHING;
    END IF;

    -- Nodes made ENQUEUED again (an operator's retry) wait for their parents that
    -- have not succeeded, as their enqueue had them wait.
    WITH again AS (
        SELECT c.id FROM unnest(v_ids, v_before, v_after) AS c(id, before, after)
        WHERE c.before IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND c.after = 'ENQUEUED'
    ), waiting AS (
        SELECT a.id, (SELECT count(*) FROM taskq.workflow_edges e
                      JOIN taskq.tasks p ON p.id = e.parent_id
                      WHERE e.child_id = a.id AND p.status <> 'SUCCEEDED') AS n
        FROM again a
    ), counted AS (
        UPDATE taskq.workflow_nodes n SET parents_left = w.n, skipped = false
        FROM waiting w WHERE n.task_id = w.id
        RETURNING n.task_id, n.parents_left
    )
    UPDATE taskq.tasks t SET status = 'WAITING', wait_reason = 'parents', updated_at = now()
    FROM counted c
    WHERE t.id = c.task_id AND c.parents_left > 0 AND t.status = 'ENQUEUED';

    -- Resume the workflows of those retried nodes, if nothing blocks them now: their
    -- skipped nodes below no FAILED node and no node an operator cancelled.
    WITH RECURSIVE resuming AS (
        SELECT DISTINCT f.id FROM unnest(v_wfs, v_before, v_after) AS c(wf, before, after)
        JOIN taskq.workflows f ON f.id = c.wf
        WHERE c.before IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
          AND c.after NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
          AND f.cancel_requested_at IS NULL AND NOT (f.on_failure = 'fail_fast' AND f.failed > 0)
    ), blockers AS (
        SELECT n.task_id AS id FROM resuming r
        JOIN taskq.workflow_nodes n ON n.workflow_id = r.id
        JOIN taskq.tasks t ON t.id = n.task_id
        WHERE t.status = 'FAILED' OR (t.status = 'CANCELLED' AND NOT n.skipped)
    ), below AS (
        SELECT e.child_id AS id FROM blockers b JOIN taskq.workflow_edges e ON e.parent_id = b.id
        UNION
        SELECT e.child_id FROM below b JOIN taskq.workflow_edges e ON e.parent_id = b.id
    ), resumable AS (
        SELECT n.task_id AS id,
               (SELECT count(*) FROM taskq.workflow_edges e
                JOIN taskq.tasks p ON p.id = e.parent_id
                WHERE e.child_id = n.task_id AND p.status <> 'SUCCEEDED') AS n
        FROM resuming r
        JOIN taskq.workflow_nodes n ON n.workflow_id = r.id
        WHERE n.skipped AND NOT EXISTS (SELECT FROM below b WHERE b.id = n.task_id)
    ), held AS (
        -- SKIP LOCKED: a skipped node another transaction holds is being moved by
        -- it (an operator's retry of that node, which waits for this workflow's
        -- row: waiting for it here would deadlock) or deleted (retention).
        SELECT r.id, r.n
        FROM resumable r
        CROSS JOIN LATERAL (
            SELECT t.id FROM taskq.tasks t
            WHERE t.id = r.id AND t.status = 'CANCELLED'
            FOR UPDATE SKIP LOCKED
        ) t
    ), counted AS (
        UPDATE taskq.workflow_nodes n SET parents_left = r.n, skipped = false
        FROM held r WHERE n.task_id = r.id
        RETURNING n.task_id, n.parents_left
    ), back AS (
        UPDATE taskq.tasks t SET
            status = CASE WHEN c.parents_left > 0 THEN 'WAITING' ELSE 'ENQUEUED' END,
            wait_reason = CASE WHEN c.parents_left > 0 THEN 'parents' END,
            finished_at = NULL, last_error = NULL, run_at = greatest(t.run_at, now()),
            published_at = NULL, generation = t.generation + 1, updated_at = now()
        FROM counted c
        WHERE t.id = c.task_id AND t.status = 'CANCELLED'
        RETURNING t.id, t.status
    )
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO v_resumed
    FROM back WHERE status = 'ENQUEUED';
    FOR v_i IN 0 .. (cardinality(v_resumed) - 1) / 200 LOOP
        IF cardinality(v_resumed) > 0 THEN
            PERFORM pg_notify(v_channel,
                array_to_string(v_resumed[v_i * 200 + 1 : v_i * 200 + 200], ','));
        END IF;
    END LOOP;

    -- The workflows' statuses, from their counts (after every change above).
    UPDATE taskq.workflows f SET
        status = CASE
            WHEN f.succeeded + f.failed + f.cancelled < f.nodes THEN 'RUNNING'
            WHEN f.cancel_requested_at IS NOT NULL THEN 'CANCELLED'
            WHEN f.failed > 0 THEN 'FAILED'
            WHEN f.cancelled > 0 THEN 'CANCELLED'
            ELSE 'SUCCEEDED' END,
        finished_at = CASE WHEN f.succeeded + f.failed + f.cancelled < f.nodes THEN NULL
                           ELSE coalesce(f.finished_at, now()) END
    WHERE f.id = ANY(v_wfs);
    RETURN NULL;
END
$$;
