//! The users projector: applies `user.events` (registrations, grant changes) to the users view
//! in MongoDB, one event at a time, storing each offset only after MongoDB acknowledged it.
//! [`UsersView::apply`] is idempotent, so a re-delivery after a crash changes nothing.

use std::sync::Arc;

use api::users::{UserEvent, UsersView, USER_EVENT_VERSION};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tokio::sync::watch;

use crate::config::Config;
use crate::health::StageHealth;
use crate::projector::{commit_stored, received, subscribe, until_applied, ProjectorError};
use crate::topics;

/// The users projector's consumer group.
pub fn group_id(cfg: &Config) -> String {
    cfg.topic("syncflow-users")
}

/// The format of a user event newer than this build reads, if `payload` has one.
fn newer_format(payload: &[u8]) -> Option<u32> {
    #[derive(serde::Deserialize)]
    struct Format {
        v: u32,
    }
    serde_json::from_slice::<Format>(payload)
        .ok()
        .map(|f| f.v)
        .filter(|v| *v > USER_EVENT_VERSION)
}

/// Runs until `shutdown` turns true.
pub async fn run(
    cfg: Config,
    users: UsersView,
    health: Arc<StageHealth>,
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
        let payload = message.payload().unwrap_or_default();
        if let Some(found) = newer_format(payload) {
            // A newer API's event: applying it as this build reads it could be wrong, and
            // skipping it would lose it (a registration, a grant change) for good.
            return Err(ProjectorError::NewerFormat {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
                found,
                known: USER_EVENT_VERSION,
            });
        }
        let event = match serde_json::from_slice::<UserEvent>(payload) {
            Ok(e) => Some(e),
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
            let applied = until_applied(&mut shutdown, "users view apply", &health, || {
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
    commit_stored(&consumer, "users projector");
    tracing::info!("users projector stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_newer_format_stops_the_users_projector() {
        let newer = format!(
            r#"{{"type":"user.renamed","v":{}}}"#,
            USER_EVENT_VERSION + 1
        );
        assert_eq!(newer_format(newer.as_bytes()), Some(USER_EVENT_VERSION + 1));
        let same = format!(r#"{{"type":"user.renamed","v":{USER_EVENT_VERSION}}}"#);
        assert_eq!(newer_format(same.as_bytes()), None);
        assert_eq!(newer_format(b"not json"), None);
        assert_eq!(newer_format(br#"{"type":"user.created"}"#), None);
    }
}
