-- Abuse limits count a customer's (or a walk-in phone's) live rows inside the write
-- that would add one: these keep those counts to the owner's few rows.
CREATE INDEX IF NOT EXISTS holds_live_customer_idx ON holds (customer_id)
    WHERE released_at IS NULL AND customer_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS bookings_active_customer_idx
    ON bookings (customer_id, branch_id, service_id, starts_at)
    WHERE status IN ('pending_payment', 'confirmed') AND customer_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tickets_open_customer_idx ON tickets (customer_id)
    WHERE status IN ('waiting', 'called', 'serving') AND customer_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tickets_open_phone_idx ON tickets (phone)
    WHERE status IN ('waiting', 'called', 'serving') AND phone IS NOT NULL;
