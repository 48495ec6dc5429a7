//! A message as the broker delivered it: plain data for the pipeline.

use super::Source;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub body: Vec<u8>,
    /// The AMQP message-id, if the publisher set one.
    pub message_id: Option<String>,
    /// Delivered before (to this daemon or another) and not acked then.
    pub redelivered: bool,
}

impl Message {
    /// What a dead letter made from this message says of it.
    pub fn source(&self) -> Source<'_> {
        Source {
            body: &self.body,
            message_id: self.message_id.as_deref(),
            redelivered: self.redelivered,
        }
    }
}
