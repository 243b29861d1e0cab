-- How far the capacity ledger has been pruned. Safe to run twice.
--
-- The worker deletes the units of the past (`resource_capacity_units` rows that
-- ended before `purged_before`) in small batches, except units that a live
-- commitment (an unreleased hold, a pending or confirmed booking) still covers:
-- those may still give their seats back. Before `purged_before` the invariant
-- query checks only the unit rows that remain; from it on, every unit.
-- One row at most (the key can only be true); no row means nothing was pruned.

CREATE TABLE IF NOT EXISTS capacity_ledger_purge (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    purged_before  timestamptz NOT NULL
        CHECK (extract(epoch FROM purged_before) % 300 = 0),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The purge walks old units oldest first, across resources.
CREATE INDEX IF NOT EXISTS resource_capacity_units_unit_start_idx
    ON resource_capacity_units (unit_start);
