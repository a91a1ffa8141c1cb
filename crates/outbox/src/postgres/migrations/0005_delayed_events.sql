-- Delayed events (issue 13): a producer sets `available_at` (not before) and, optionally,
-- `holds_key = false`.
--
--   holds_key true (the default): the event waits like a head in backoff. It is inserted parked
--     with its finite available_at, so the claim never walks past it, the later events of its key
--     wait behind it (and are parked behind it when it is their key's head), and the relay's
--     maintenance makes it pending when it is due and wakes the relays.
--   holds_key false: the event leaves its key's order while it waits (status 'scheduled', which no
--     per-key check counts), so the later events of its key are published meanwhile. When due it
--     becomes pending with its seq, and from then on it is ordered as usual: it follows the
--     undelivered earlier events of its key and the not yet published later ones wait for it.
ALTER TABLE {schema}.outbox_event ADD COLUMN IF NOT EXISTS holds_key boolean NOT NULL DEFAULT true;

ALTER TABLE {schema}.outbox_event DROP CONSTRAINT IF EXISTS outbox_event_status_check;
ALTER TABLE {schema}.outbox_event ADD CONSTRAINT outbox_event_status_check
    CHECK (status IN ('pending', 'parked', 'scheduled', 'published', 'dead'));

-- Scheduled events by due time, for the maintenance that releases them.
CREATE INDEX IF NOT EXISTS outbox_event_scheduled
    ON {schema}.outbox_event (available_at, seq) WHERE status = 'scheduled';

-- Only a row with a future available_at calls the function (the WHEN condition is evaluated by
-- the executor): an event due now costs one comparison.
CREATE OR REPLACE FUNCTION {schema}.outbox_event_delay() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- 'infinity' is the relay's mark for events parked behind their key's head, not a time.
    IF NEW.available_at = 'infinity' THEN
        RAISE EXCEPTION 'outbox event available_at must be a time, not infinity'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'outbox_event_delay';
    END IF;
    IF NEW.status = 'pending' THEN
        NEW.status := CASE WHEN NEW.holds_key THEN 'parked' ELSE 'scheduled' END;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER outbox_event_delay
    BEFORE INSERT ON {schema}.outbox_event
    FOR EACH ROW WHEN (NEW.available_at > now())
    EXECUTE FUNCTION {schema}.outbox_event_delay();

COMMENT ON COLUMN {schema}.outbox_event.available_at IS
    'Not published before this time. Producers may set it (a delayed event); the relay sets it for retries.';
COMMENT ON COLUMN {schema}.outbox_event.holds_key IS
    'For a delayed event: whether the later events of its key wait for it (true, the default) or pass it while it waits (false).';
