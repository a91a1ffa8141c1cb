//! The README's quick start, compiled with the crate so it stays true.
//! Run: `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run -p outbox --example quickstart`

use outbox::{Config, ConfigSource, NewEvent, Outbox};

#[derive(serde::Serialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: i64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::load(&ConfigSource::from_env())?; // outbox.toml + OUTBOX_* + DATABASE_URL
    let pool = outbox::connect_from_config(&config, "orders").await?;
    // Schema, strict_key_order and the payload limit for SQL producers, as `outbox migrate` applies them.
    outbox::migrate_from_config(&mut *pool.acquire().await?, &config).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS orders (id text PRIMARY KEY, total_cents bigint)")
        .execute(&pool)
        .await?;

    // The relay as a background task (the `@Scheduled` poller of the Spring world). The registry
    // holds the publisher kinds you link: built-in stdout/file/null, + .with(outbox_aws::Aws), ...
    let publisher = outbox::Registry::new().build(&config).await?;
    // None when relay.enabled = false (a standalone `outbox relay` publishes instead).
    let relay = outbox::start_relay_from_config(&config, pool.clone(), publisher).await?;

    // Business change and event in one transaction.
    let order_id = uuid::Uuid::now_v7().to_string();
    let outbox = Outbox::from_config(&config); // schema and [events] limits
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders (id, total_cents) VALUES ($1, $2)")
        .bind(&order_id)
        .bind(1250_i64)
        .execute(&mut *tx)
        .await?;
    outbox
        .enqueue(
            &mut tx,
            NewEvent::new("order", &order_id, "OrderPlaced")
                .payload(&OrderPlaced {
                    order_id: order_id.clone(),
                    total_cents: 1250,
                })?
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
        )
        .await?;
    tx.commit().await?; // the event exists if and only if the order does

    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    if let Some(relay) = relay {
        let stats = relay.stop().await?; // on shutdown: finishes the in-flight batch
        eprintln!("published {} event(s)", stats.published);
    }
    Ok(())
}
