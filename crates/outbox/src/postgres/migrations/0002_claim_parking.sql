-- Parking: pending events whose key cannot move are kept out of the claim's scan, so a claim costs
-- what its batch costs, however many events wait behind a backoff, a destination outage or a dead
-- event. `parked` is still undelivered: it counts everywhere `pending` does for per-key order.
--   parked, available_at finite:     the key's head, waiting out a backoff (attempts > 0) or a
--                                    destination outage (held_for names the destination);
--                                    unparked by the relay when available_at passes or the
--                                    destination is back.
--   parked, available_at 'infinity': a later event of a key whose head is parked or dead
--                                    (block_key); unparked when the head is published, dead
--                                    under `continue`, replayed or deleted.
ALTER TABLE {schema}.outbox_event DROP CONSTRAINT IF EXISTS outbox_event_status_check;
ALTER TABLE {schema}.outbox_event ADD CONSTRAINT outbox_event_status_check
    CHECK (status IN ('pending', 'parked', 'published', 'dead'));

-- The destination a parked head waits for (a destination outage charges no attempt).
ALTER TABLE {schema}.outbox_event ADD COLUMN IF NOT EXISTS held_for text;

-- Parked rows by due time: heads whose backoff ran out are found without scanning the waiting
-- followers ('infinity' sorts last).
CREATE INDEX IF NOT EXISTS outbox_event_parked
    ON {schema}.outbox_event (available_at, seq) WHERE status = 'parked';
-- Dead events: few, looked up by status, dead-letter commands and maintenance.
CREATE INDEX IF NOT EXISTS outbox_event_dead
    ON {schema}.outbox_event (seq) WHERE status = 'dead';
-- Rows held for a destination, released together when it is back.
CREATE INDEX IF NOT EXISTS outbox_event_held_for
    ON {schema}.outbox_event (held_for, seq) WHERE status = 'parked' AND held_for IS NOT NULL;

-- Wake-up, second form: the relay's request for notifications is a sequence value (milliseconds
-- since the epoch until which a relay waits). A sequence is read outside MVCC, so a producer in a
-- REPEATABLE READ or SERIALIZABLE transaction sees a request made after its snapshot was taken
-- (the table of version 1 was invisible to it, and such producers never woke a relay).
CREATE SEQUENCE IF NOT EXISTS {schema}.outbox_wakeup_wanted_ms AS bigint MINVALUE 0 START 0;

CREATE OR REPLACE FUNCTION {schema}.outbox_event_wakeup() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT last_value FROM {schema}.outbox_wakeup_wanted_ms)
       > (extract(epoch FROM clock_timestamp()) * 1000)::bigint THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
    RETURN NULL;
END
$$;

DROP TABLE IF EXISTS {schema}.outbox_relay_wakeup;
