"""A Python service that writes a business row and its event in one transaction, through the
outbox's SQL contract (README, "The SQL contract"). No outbox library: a plain INSERT.

    DATABASE_URL=postgres://... python producer.py > expected.jsonl

The schema must be migrated first (`outbox migrate`). The script creates its own business table
(`orders`), then:
  1. places and pays three orders: two events per key, in order;
  2. retries the transaction of an order whose commit it pretends not to know about: the event id
     is chosen before the first attempt and reused, so `ON CONFLICT (id) DO NOTHING` makes the
     retry a no-op instead of a second event;
  3. shows how a refused event (payload not a JSON object, payload over the table's limit) is told
     apart by its constraint name, and that it rolls back the business row with it.
It prints one JSON line per event it committed, for scripts/examples.sh to compare with what the
relay published.
"""

import json
import os
import sys
import uuid

import psycopg
from psycopg.types.json import Jsonb

# The columns a producer may set (README, "Which columns are whose"). `id` is optional (the table
# draws a time-ordered UUID); pass your own when the transaction may be retried.
INSERT_EVENT = """
    INSERT INTO outbox_event (id, aggregate_type, aggregate_id, event_type, payload, headers)
    VALUES (%(id)s, %(aggregate_type)s, %(aggregate_id)s, %(event_type)s, %(payload)s, %(headers)s)
    ON CONFLICT (id) DO NOTHING
"""

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

committed = []


def add_event(cur, aggregate_id, event_type, payload, event_id=None):
    """Writes one event in the caller's transaction; returns whether a row was inserted."""
    event = {
        "id": event_id or uuid.uuid4(),
        "aggregate_type": "order",
        "aggregate_id": aggregate_id,
        "event_type": event_type,
        # Jsonb() sends the value as jsonb: psycopg would send a dict as json, a str as text.
        "payload": Jsonb(payload),
        "headers": Jsonb({"traceparent": TRACEPARENT, "producer": "python"}),
    }
    cur.execute(INSERT_EVENT, event)
    return event, cur.rowcount == 1


def place_order(conn, order_id, total_cents, event_id=None):
    """The order and its OrderPlaced event commit together or not at all."""
    with conn.transaction(), conn.cursor() as cur:
        # A retried transaction must not fail on its own earlier success either.
        cur.execute(
            "INSERT INTO orders (id, status, total_cents) VALUES (%s, 'placed', %s)"
            " ON CONFLICT (id) DO NOTHING",
            (order_id, total_cents),
        )
        event, inserted = add_event(
            cur, order_id, "OrderPlaced", {"order_id": order_id, "total_cents": total_cents}, event_id
        )
    return event, inserted


def pay_order(conn, order_id):
    with conn.transaction(), conn.cursor() as cur:
        # Updating the order's row locks it: two payments of one order cannot interleave, so the
        # events of a key are committed in the order they were inserted.
        cur.execute("UPDATE orders SET status = 'paid' WHERE id = %s RETURNING total_cents", (order_id,))
        (total_cents,) = cur.fetchone()
        return add_event(cur, order_id, "OrderPaid", {"order_id": order_id, "amount_cents": total_cents})


def record(event):
    committed.append(
        {
            "id": str(event["id"]),
            "aggregate_type": event["aggregate_type"],
            "aggregate_id": event["aggregate_id"],
            "event_type": event["event_type"],
            "payload": event["payload"].obj,
            "headers": event["headers"].obj,
        }
    )


def refused(conn, order_id, payload):
    """Tries to place an order with an event the table refuses; returns the constraint's name."""
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(
                "INSERT INTO orders (id, status, total_cents) VALUES (%s, 'placed', 1)", (order_id,)
            )
            add_event(cur, order_id, "OrderPlaced", payload)
    except psycopg.errors.CheckViolation as e:
        # The constraint names the contract rule the event broke (README, "The SQL contract"):
        #   outbox_event_payload_size           payload over events.max_payload_bytes (an HTTP 413)
        #   outbox_event_payload_must_be_object the payload is not a JSON object
        #   outbox_event_headers_must_be_string_map, outbox_event_fields_not_empty
        return e.diag.constraint_name
    raise SystemExit(f"the table accepted an invalid event for {order_id}")


def main():
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/postgres")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS orders ("
            " id text PRIMARY KEY, status text NOT NULL, total_cents bigint NOT NULL)"
        )

        # 1. Two events per key, interleaved across keys.
        for n in range(1, 4):
            event, _ = place_order(conn, f"py-{n}", 1000 * n)
            record(event)
        for n in range(1, 4):
            event, _ = pay_order(conn, f"py-{n}")
            record(event)

        # 2. An idempotent retry: the id is fixed before the first attempt.
        event_id = uuid.uuid4()
        event, inserted = place_order(conn, "py-retry", 4200, event_id)
        assert inserted
        record(event)
        _, inserted = place_order(conn, "py-retry", 4200, event_id)
        assert not inserted, "a retry with the same id must not add a second event"
        print("retry with the same event id: no second event", file=sys.stderr)

        # 3. Refused events roll back their business row.
        constraint = refused(conn, "py-bad-array", [1, 2, 3])
        assert constraint == "outbox_event_payload_must_be_object", constraint
        constraint = refused(conn, "py-bad-large", {"blob": "x" * 300_000})
        assert constraint == "outbox_event_payload_size", constraint
        left = conn.execute("SELECT count(*) FROM orders WHERE id LIKE 'py-bad-%'").fetchone()[0]
        assert left == 0, "a refused event must roll back its order"
        print("refused events rolled back their orders (payload not an object, payload too large)", file=sys.stderr)

    for event in committed:
        print(json.dumps(event))


if __name__ == "__main__":
    main()
