-- Time-ordered UUID (version 7) for ids of events inserted by plain SQL; the Rust API makes its own.
CREATE OR REPLACE FUNCTION {schema}.outbox_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- Headers are a flat object of non-empty names to string values: every broker maps them to string attributes.
CREATE OR REPLACE FUNCTION {schema}.outbox_headers_valid(h jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_typeof(h) = 'object'
       AND NOT EXISTS (SELECT 1 FROM jsonb_each(h) AS kv
                       WHERE kv.key = '' OR jsonb_typeof(kv.value) <> 'string')
$$;

CREATE SEQUENCE IF NOT EXISTS {schema}.outbox_event_seq AS bigint;

CREATE TABLE IF NOT EXISTS {schema}.outbox_event (
    seq            bigint      NOT NULL DEFAULT nextval('{schema}.outbox_event_seq'),
    id             uuid        NOT NULL DEFAULT {schema}.outbox_uuid_v7(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    headers        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    destination    text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    status         text        NOT NULL DEFAULT 'pending',
    attempts       integer     NOT NULL DEFAULT 0,
    available_at   timestamptz NOT NULL DEFAULT now(),
    last_error     text,
    published_at   timestamptz,
    CONSTRAINT outbox_event_pkey PRIMARY KEY (seq),
    CONSTRAINT outbox_event_id_key UNIQUE (id),
    CONSTRAINT outbox_event_status_check CHECK (status IN ('pending', 'published', 'dead')),
    CONSTRAINT outbox_event_fields_not_empty CHECK (aggregate_type <> '' AND aggregate_id <> '' AND event_type <> ''),
    CONSTRAINT outbox_event_payload_must_be_object CHECK (jsonb_typeof(payload) = 'object'),
    CONSTRAINT outbox_event_headers_must_be_string_map CHECK ({schema}.outbox_headers_valid(headers))
);
ALTER SEQUENCE {schema}.outbox_event_seq OWNED BY {schema}.outbox_event.seq;

COMMENT ON TABLE {schema}.outbox_event IS
    'Transactional outbox: insert (aggregate_type, aggregate_id, event_type, payload[, headers, destination]) in the same transaction as the business change; the relay publishes and removes or marks it.';

-- The claim walks pending events in seq order.
CREATE INDEX IF NOT EXISTS outbox_event_pending_seq
    ON {schema}.outbox_event (seq) WHERE status = 'pending';
-- Per-key order checks look up a key's undelivered (pending or dead) events before a given seq.
CREATE INDEX IF NOT EXISTS outbox_event_undelivered_key
    ON {schema}.outbox_event (aggregate_type, aggregate_id, seq) WHERE status <> 'published';
-- The claim skips keys blocked by a retried event (in backoff, or dead under block_key); only tried
-- rows (attempts > 0) can block, so this index stays tiny and the check never scans the table.
CREATE INDEX IF NOT EXISTS outbox_event_retried_key
    ON {schema}.outbox_event (aggregate_type, aggregate_id, seq) WHERE status <> 'published' AND attempts > 0;
-- Retention removes the oldest published events first.
CREATE INDEX IF NOT EXISTS outbox_event_published_at
    ON {schema}.outbox_event (published_at) WHERE status = 'published';

-- Wake-up: relays that are about to sleep set wanted_until; producers notify only while it is in the
-- future, so a busy relay costs producers no NOTIFY (which takes a global lock at commit).
CREATE UNLOGGED TABLE IF NOT EXISTS {schema}.outbox_relay_wakeup (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    wanted_until timestamptz NOT NULL DEFAULT '-infinity'
);

CREATE OR REPLACE FUNCTION {schema}.outbox_event_wakeup() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM {schema}.outbox_relay_wakeup WHERE wanted_until > now()) THEN
        PERFORM pg_notify('{channel}', '');
    END IF;
    RETURN NULL;
END
$$;

-- Deferred to commit, so the flag is read when the event becomes visible: a producer whose
-- transaction was open while a relay went idle still wakes it. pg_notify folds the duplicate
-- notifications of one transaction into one.
DROP TRIGGER IF EXISTS outbox_event_wakeup ON {schema}.outbox_event;
CREATE CONSTRAINT TRIGGER outbox_event_wakeup
    AFTER INSERT ON {schema}.outbox_event
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION {schema}.outbox_event_wakeup();

-- Optional (migrate option strict_key_order): serialize enqueues per ordering key and draw seq only
-- after the key's lock is held, so seq order equals commit order within a key even when producers
-- do not serialize writes to an aggregate themselves.
CREATE OR REPLACE FUNCTION {schema}.outbox_event_strict_key_order() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1869968482, hashtext(NEW.aggregate_type || chr(31) || NEW.aggregate_id));
    NEW.seq := nextval('{schema}.outbox_event_seq');
    RETURN NEW;
END
$$;
