-- Every claim gets a token of its own, and heartbeats and outcomes name it.
--
-- They were guarded by (id, attempt, worker), which can repeat: an operator's
-- retry starts the attempts again from 0, so the worker that ran attempt 1
-- before may claim attempt 1 again while its earlier run is still finishing
-- (its lease had expired, the sweeper failed the task, the operator retried it);
-- that run's outcome then matched the new claim and was recorded for it.
--
-- The claim sets a fresh random token; every statement that ends the claim
-- (an outcome, the sweeper's recovery) clears it, so a token is only ever
-- found on the RUNNING row of its own claim.
--
-- A nullable column without a default is added in the catalog only: no table
-- rewrite, no scan, the table's lock is held for an instant.

ALTER TABLE tasks ADD COLUMN claim_token uuid;

COMMENT ON COLUMN tasks.claim_token IS
    'While RUNNING: the token of the claim; heartbeats and outcomes must name it. NULL otherwise.';
