//! The users projector: applies `user.events` (registrations, grant changes) to the users view
//! in MongoDB, one event at a time, storing each offset only after MongoDB acknowledged it.
//! [`UsersView::apply`] is idempotent, so a re-delivery after a crash changes nothing.

use api::users::{UserEvent, UsersView};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tokio::sync::watch;

use crate::config::Config;
use crate::projector::{received, subscribe, until_applied, ProjectorError};
use crate::topics;

/// The users projector's consumer group.
pub fn group_id(cfg: &Config) -> String {
    cfg.topic("syncflow-users")
}

/// Runs until `shutdown` turns true.
pub async fn run(
    cfg: Config,
    users: UsersView,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProjectorError> {
    let (consumer, _) = subscribe(&cfg, &group_id(&cfg), topics::USER_EVENTS)?;
    if let Err(e) = users.ensure_indexes().await {
        tracing::warn!(error = %e, "users view index creation failed");
    }
    tracing::info!("users projector started");
    loop {
        let message = tokio::select! {
            _ = shutdown.changed() => break,
            m = consumer.recv() => m,
        };
        let Some(message) = received(message, "users projector")? else {
            continue;
        };
        let event = match message.payload().map(serde_json::from_slice::<UserEvent>) {
            Some(Ok(e)) => Some(e),
            other => {
                // Only the API writes this topic; a bad record is a bug, never a reason to stall.
                tracing::error!(
                    offset = message.offset(),
                    ?other,
                    "undecodable user event skipped"
                );
                None
            }
        };
        if let Some(event) = event {
            let offset = message.offset();
            let applied = until_applied(&mut shutdown, "users view apply", || {
                users.apply(&event, offset)
            })
            .await;
            let Some(outcome) = applied else { break };
            tracing::debug!(key = event.key(), ?outcome, "user event applied");
        }
        if let Err(e) = consumer.store_offset_from_message(&message) {
            tracing::warn!(error = %e, "storing users projector offset failed");
        }
    }
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        tracing::debug!(error = %e, "final users projector commit");
    }
    tracing::info!("users projector stopped");
    Ok(())
}
