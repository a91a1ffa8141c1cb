//! The handler contract: what the consumer calls for each delivery.

use async_trait::async_trait;

use crate::delivery::Delivery;

/// Any error a handler reports. The message is then neither deleted nor marked seen: SQS
/// redelivers it after its visibility timeout, and the redrive policy dead-letters it after
/// `maxReceiveCount` receives.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a successful handler did; both delete the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The event was applied now.
    Processed,
    /// The event had been applied before (an idempotency store recognised its id).
    Duplicate,
}

/// Handles one delivery. Implementations must be safe to call concurrently for different events;
/// events of one FIFO message group are handed over one at a time, in order.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, delivery: &Delivery) -> Result<Handled, HandlerError>;
}

#[async_trait]
impl<H: Handler + ?Sized> Handler for std::sync::Arc<H> {
    async fn handle(&self, delivery: &Delivery) -> Result<Handled, HandlerError> {
        (**self).handle(delivery).await
    }
}
