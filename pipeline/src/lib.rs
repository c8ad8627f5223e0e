//! # pipeline — SyncFlow's Kafka runtime and the `syncflow` binary
//!
//! - [`config`]: the typed configuration (defaults → file → `SYNCFLOW_*` environment);
//! - [`topics`]: `topics.yaml` and `syncflow topics apply`;
//! - [`partition`]: the Java-compatible key partitioner (co-partitioning by bucket);
//! - [`resolver`]: the stateful stage's runtime: consume `data.changed`, diff, resolve against
//!   the sled state, produce `sync.events` / `conflict.detected` / `data.rejected` / changelog in
//!   one Kafka transaction per batch;
//! - [`projector`]: applies `sync.events` to the MongoDB view and publishes changes to Redis;
//! - [`checkpoint`]: checkpoint markers, task snapshots, completion and retention;
//! - [`rebuild`]: rebuilds the MongoDB view from the resolver's changelog;
//! - [`restore`]: restore to a checkpoint, and replay from one (`syncflow restore|replay`);
//! - [`subscribe`]: the reference WebSocket client behind `syncflow subscribe`;
//! - [`users_projector`]: applies `user.events` to the users view;
//! - [`health`]: whether the background stages get their work done (`GET /status`);
//! - [`app`]: starts the chosen roles in one process.

pub mod app;
pub mod checkpoint;
pub mod config;
pub mod fanout;
pub mod health;
pub mod partition;
pub mod projector;
pub mod rebuild;
pub mod resolver;
pub mod restore;
pub mod subscribe;
pub mod topics;
pub mod users_projector;
