-- SQL producers get the payload limit of the Rust API (events.max_payload_bytes), measured as the
-- relay publishes the payload: the bytes of its text form. A BEFORE INSERT trigger rather than a
-- CHECK: a CHECK is evaluated again on every UPDATE, so a row inserted under a higher limit would
-- make the relay's own updates of it (retry, dead letter, mark published) fail. The WHEN condition
-- is evaluated by the executor, so a payload within the limit costs one expression per row
-- (about 1 ns per byte) and no function call; only a refused row calls the function.
-- `outbox migrate` keeps the limit in sync with the configuration.
CREATE OR REPLACE FUNCTION {schema}.outbox_event_payload_too_large() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'outbox event payload is % bytes, over the limit of % bytes (events.max_payload_bytes)',
            octet_length(NEW.payload::text), TG_ARGV[0]
        USING ERRCODE = 'check_violation',
              CONSTRAINT = 'outbox_event_payload_size',
              HINT = 'store large data elsewhere and reference it from the event, or raise events.max_payload_bytes (with destinations that accept it) and run outbox migrate';
END
$$;

CREATE OR REPLACE TRIGGER outbox_event_payload_size
    BEFORE INSERT ON {schema}.outbox_event
    FOR EACH ROW WHEN (octet_length(NEW.payload::text) > {max_payload_bytes})
    EXECUTE FUNCTION {schema}.outbox_event_payload_too_large('{max_payload_bytes}');
