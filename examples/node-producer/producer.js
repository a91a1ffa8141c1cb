// A Node.js service that writes a business row and its event in one transaction, through the
// outbox's SQL contract (README, "The SQL contract"). No outbox library: a plain INSERT.
//
//     DATABASE_URL=postgres://... node producer.js > expected.jsonl
//
// The schema must be migrated first (`outbox migrate`). The script creates its own business table
// (`orders`), then:
//   1. places and pays three orders: two events per key, in order;
//   2. retries the transaction of an order whose commit it pretends not to know about: the event
//      id is chosen before the first attempt and reused, so `ON CONFLICT (id) DO NOTHING` makes the
//      retry a no-op instead of a second event;
//   3. shows how a refused event (payload not a JSON object, payload over the table's limit) is
//      told apart by its constraint name, and that it rolls back the business row with it.
// It prints one JSON line per event it committed, for scripts/examples.sh to compare with what
// the relay published.
'use strict';

const crypto = require('node:crypto');
const assert = require('node:assert/strict');
const { Client } = require('pg');

// The columns a producer may set (README, "Which columns are whose"). `id` is optional (the table
// draws a time-ordered UUID); pass your own when the transaction may be retried.
// `pg` sends parameters as untyped text, which the server casts to the column's type; `::jsonb`
// says so explicitly and keeps working with drivers that type strings (JDBC, pgx). Always pass
// JSON.stringify(...): `pg` would turn a JavaScript array into a PostgreSQL array literal.
const INSERT_EVENT = `
    INSERT INTO outbox_event (id, aggregate_type, aggregate_id, event_type, payload, headers)
    VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb)
    ON CONFLICT (id) DO NOTHING`;

const TRACEPARENT = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';

const committed = [];

// Writes one event in the caller's transaction; returns the event and whether a row was inserted.
async function addEvent(client, aggregateId, eventType, payload, eventId = crypto.randomUUID()) {
  const event = {
    id: eventId,
    aggregate_type: 'order',
    aggregate_id: aggregateId,
    event_type: eventType,
    payload,
    headers: { traceparent: TRACEPARENT, producer: 'node' },
  };
  const result = await client.query(INSERT_EVENT, [
    event.id,
    event.aggregate_type,
    event.aggregate_id,
    event.event_type,
    JSON.stringify(event.payload),
    JSON.stringify(event.headers),
  ]);
  return { event, inserted: result.rowCount === 1 };
}

// Runs `work` in a transaction on `client`: COMMIT if it returns, ROLLBACK if it throws.
async function inTransaction(client, work) {
  await client.query('BEGIN');
  try {
    const result = await work();
    await client.query('COMMIT');
    return result;
  } catch (e) {
    await client.query('ROLLBACK');
    throw e;
  }
}

// The order and its OrderPlaced event commit together or not at all.
function placeOrder(client, orderId, totalCents, eventId) {
  return inTransaction(client, async () => {
    // A retried transaction must not fail on its own earlier success either.
    await client.query(
      `INSERT INTO orders (id, status, total_cents) VALUES ($1, 'placed', $2)
       ON CONFLICT (id) DO NOTHING`,
      [orderId, totalCents],
    );
    return addEvent(client, orderId, 'OrderPlaced', { order_id: orderId, total_cents: totalCents }, eventId);
  });
}

function payOrder(client, orderId) {
  return inTransaction(client, async () => {
    // Updating the order's row locks it: two payments of one order cannot interleave, so the
    // events of a key are committed in the order they were inserted.
    const { rows } = await client.query(
      `UPDATE orders SET status = 'paid' WHERE id = $1 RETURNING total_cents`,
      [orderId],
    );
    // bigint comes back as a string from `pg` (it may not fit a JavaScript number).
    const amount = Number(rows[0].total_cents);
    return addEvent(client, orderId, 'OrderPaid', { order_id: orderId, amount_cents: amount });
  });
}

// Tries to place an order with an event the table refuses; returns the constraint's name.
async function refused(client, orderId, payload) {
  try {
    await inTransaction(client, async () => {
      await client.query(`INSERT INTO orders (id, status, total_cents) VALUES ($1, 'placed', 1)`, [orderId]);
      await addEvent(client, orderId, 'OrderPlaced', payload);
    });
  } catch (e) {
    // 23514 is check_violation; the constraint names the contract rule the event broke:
    //   outbox_event_payload_size           payload over events.max_payload_bytes (an HTTP 413)
    //   outbox_event_payload_must_be_object the payload is not a JSON object
    //   outbox_event_headers_must_be_string_map, outbox_event_fields_not_empty
    if (e.code === '23514') return e.constraint;
    throw e;
  }
  throw new Error(`the table accepted an invalid event for ${orderId}`);
}

async function main() {
  const url = process.env.DATABASE_URL;
  if (!url) {
    console.error('set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/postgres');
    process.exit(2);
  }
  const client = new Client({ connectionString: url });
  await client.connect();
  try {
    await client.query(
      `CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, status text NOT NULL, total_cents bigint NOT NULL)`,
    );

    // 1. Two events per key, interleaved across keys.
    for (const n of [1, 2, 3]) committed.push((await placeOrder(client, `js-${n}`, 1000 * n)).event);
    for (const n of [1, 2, 3]) committed.push((await payOrder(client, `js-${n}`)).event);

    // 2. An idempotent retry: the id is fixed before the first attempt.
    const eventId = crypto.randomUUID();
    const first = await placeOrder(client, 'js-retry', 4200, eventId);
    assert.ok(first.inserted);
    committed.push(first.event);
    const retry = await placeOrder(client, 'js-retry', 4200, eventId);
    assert.ok(!retry.inserted, 'a retry with the same id must not add a second event');
    console.error('retry with the same event id: no second event');

    // 3. Refused events roll back their business row.
    assert.equal(await refused(client, 'js-bad-array', [1, 2, 3]), 'outbox_event_payload_must_be_object');
    assert.equal(await refused(client, 'js-bad-large', { blob: 'x'.repeat(300000) }), 'outbox_event_payload_size');
    const { rows } = await client.query(`SELECT count(*)::int AS n FROM orders WHERE id LIKE 'js-bad-%'`);
    assert.equal(rows[0].n, 0, 'a refused event must roll back its order');
    console.error('refused events rolled back their orders (payload not an object, payload too large)');
  } finally {
    await client.end();
  }
  for (const event of committed) console.log(JSON.stringify(event));
}

main().catch((e) => {
  console.error(`error: ${e.message}`);
  process.exit(1);
});
