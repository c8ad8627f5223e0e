//! Starts the chosen roles in one process and stops them together.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use api::auth::password::Passwords;
use api::auth::sessions::AuthStore;
use api::auth::TokenKeys;
use api::ratelimit::RateLimiter;
use api::sink::KafkaSink;
use api::view::MongoView;
use api::AppState;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::health::{StageHealth, Stages};
use crate::resolver::{Resolver, ResolverStats};
use crate::{fanout, projector, topics};

/// A role a process can play.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Role {
    /// The HTTP API.
    Api,
    /// The resolver (validate, diff, LWW resolve).
    Processor,
    /// The MongoDB projector (the view and the users view), with the announcer.
    Projector,
    /// The announcer alone: publishes committed changes to Redis for WebSocket subscribers
    /// (part of `projector`; run it alone to scale it apart from the view write).
    Fanout,
}

/// Why the process could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A service could not be reached or set up.
    #[error("{0}")]
    Startup(String),
    /// A role failed while running.
    #[error("{role:?} failed: {reason}")]
    Role {
        /// The role.
        role: Role,
        /// Why.
        reason: String,
    },
}

/// The running roles.
pub struct Running {
    /// Where the API listens, when it runs.
    pub api_addr: Option<SocketAddr>,
    /// Resolver counters.
    pub resolver_stats: Arc<ResolverStats>,
    stop_tx: watch::Sender<bool>,
    stop_flag: Arc<AtomicBool>,
    tasks: Vec<(Role, JoinHandle<Result<(), String>>)>,
}

async fn mongo_view(cfg: &Config) -> Result<MongoView, AppError> {
    let client = mongodb::Client::with_uri_str(&cfg.mongo.uri)
        .await
        .map_err(|e| {
            AppError::Startup(format!(
                "mongodb {}: {e}",
                crate::config::redacted(&cfg.mongo.uri)
            ))
        })?;
    Ok(MongoView::new(client.database(&cfg.mongo.database)))
}

/// Runs `run` until it ends cleanly; a run that fails (a fatal consumer error) is replaced by a
/// fresh one a second later, unless `stop` is already set. Each failed run, and each new run
/// after one, is recorded in `health`.
fn supervise<F, Fut, E>(
    name: &'static str,
    stop: watch::Receiver<bool>,
    health: Arc<StageHealth>,
    mut run: F,
) -> JoinHandle<Result<(), String>>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display + Send,
{
    use std::time::Duration;
    // A role that keeps failing at once (a record it refuses, say) is restarted less and less
    // often, up to twice a minute, instead of rejoining its consumer group every second; one that
    // ran a minute before failing starts over at a second.
    const FIRST: Duration = Duration::from_secs(1);
    const MOST: Duration = Duration::from_secs(30);
    tokio::spawn(async move {
        let mut pause = FIRST;
        loop {
            let began = tokio::time::Instant::now();
            match run().await {
                Ok(()) => return Ok(()),
                Err(e) if *stop.borrow() => return Err(e.to_string()),
                Err(e) => {
                    if began.elapsed() >= Duration::from_secs(60) {
                        pause = FIRST;
                    }
                    health.failed(crate::health::now_ms());
                    tracing::error!(error = %e, "{name} failed; restarting it in {pause:?}");
                    let mut woken = stop.clone();
                    let stopping = async {
                        if woken.wait_for(|stopping| *stopping).await.is_err() {
                            // No one can stop it any more: just the pause.
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stopping => {}
                    }
                    if *stop.borrow() {
                        return Err(e.to_string());
                    }
                    health.restarted(crate::health::now_ms());
                    pause = (pause * 2).min(MOST);
                }
            }
        }
    })
}

/// Starts `roles`.
pub async fn start(cfg: Config, roles: &[Role]) -> Result<Running, AppError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_flag = Arc::new(AtomicBool::new(false));
    let resolver_stats = Arc::new(ResolverStats::default());
    let projector_stats = Arc::new(projector::ProjectorStats::default());
    let stages = Arc::new(Stages::default());
    // The stages this process runs, by their names in `GET /status`.
    let mut stage_names: Vec<&'static str> = Vec::new();
    let mut tasks: Vec<(Role, JoinHandle<Result<(), String>>)> = Vec::new();
    let mut api_addr = None;
    if roles.contains(&Role::Processor) {
        let resolver = Resolver::new(cfg.clone(), resolver_stats.clone())
            .map_err(|e| AppError::Startup(e.to_string()))?;
        let flag = stop_flag.clone();
        let handle =
            tokio::task::spawn_blocking(move || resolver.run(flag).map_err(|e| e.to_string()));
        tasks.push((Role::Processor, handle));
    }
    if roles.contains(&Role::Projector) {
        let view = mongo_view(&cfg).await?;
        let users = api::users::UsersView::new(view.database().clone());
        let (c, rx, stats) = (cfg.clone(), stop_rx.clone(), projector_stats.clone());
        let health = stages.projector.clone();
        let handle = supervise("projector", stop_rx.clone(), health.clone(), move || {
            projector::run(
                c.clone(),
                view.clone(),
                stats.clone(),
                health.clone(),
                rx.clone(),
            )
        });
        tasks.push((Role::Projector, handle));
        let (c, rx) = (cfg.clone(), stop_rx.clone());
        let health = stages.users_projector.clone();
        let handle = supervise(
            "users projector",
            stop_rx.clone(),
            health.clone(),
            move || {
                crate::users_projector::run(c.clone(), users.clone(), health.clone(), rx.clone())
            },
        );
        tasks.push((Role::Projector, handle));
        stage_names.extend(["projector", "users_projector"]);
    }
    if roles.contains(&Role::Projector) || roles.contains(&Role::Fanout) {
        let (c, rx) = (cfg.clone(), stop_rx.clone());
        let health = stages.announcer.clone();
        let handle = supervise("announcer", stop_rx.clone(), health.clone(), move || {
            fanout::run(c.clone(), health.clone(), rx.clone())
        });
        tasks.push((Role::Fanout, handle));
        stage_names.push("announcer");
    }
    if roles.contains(&Role::Api) {
        let compression = cfg.kafka.compression.codec();
        let sink = KafkaSink::new(
            &cfg.kafka.brokers,
            &cfg.topic(topics::DATA_CHANGED),
            compression,
        )
        .map_err(|e| AppError::Startup(e.to_string()))?;
        let keys = TokenKeys::new(&cfg.auth).map_err(AppError::Startup)?;
        let redis_conn = api::redis_conn::manager(&cfg.redis.url).map_err(|e| {
            AppError::Startup(format!(
                "redis {}: {e}",
                crate::config::redacted(&cfg.redis.url)
            ))
        })?;
        let view = mongo_view(&cfg).await?;
        let user_events = KafkaSink::new(
            &cfg.kafka.brokers,
            &cfg.topic(topics::USER_EVENTS),
            compression,
        )
        .map_err(|e| AppError::Startup(e.to_string()))?;
        let accounts = api::accounts::Accounts {
            store: AuthStore::new(redis_conn.clone(), &cfg.kafka.topic_prefix),
            users: api::users::UsersView::new(view.database().clone()),
            events: Arc::new(user_events),
            passwords: Passwords::new(cfg.auth.max_concurrent_hashes),
            cfg: cfg.auth.clone(),
        };
        let hub = api::fanout::Hub::start(
            &cfg.redis.url,
            &cfg.kafka.topic_prefix,
            api::fanout::HubQueues::of(&cfg.ws),
        )
        .map_err(|e| {
            AppError::Startup(format!(
                "redis {}: {e}",
                crate::config::redacted(&cfg.redis.url)
            ))
        })?;
        let connections = api::connections::Connections::default();
        let open = api::server::OpenConnections::default();
        let status_open = open.clone();
        let (limits, ws_max) = cfg
            .api
            .server_limits()
            .fitted_to_fds(cfg.ws.max_connections);
        let max_open = limits.max_connections;
        let mut ws = cfg.ws.clone();
        ws.max_connections = ws_max;
        let status_hub = hub.clone();
        let state = AppState {
            keys,
            accounts: Some(accounts),
            limiter: Some(RateLimiter::new(
                redis_conn,
                &cfg.kafka.topic_prefix,
                cfg.rate.clone(),
            )),
            sink: Arc::new(sink),
            reader: Arc::new(view),
            limits: cfg.limits.clone(),
            clocks: Arc::new(api::clocks::TenantClocks::new(cfg.resolver.max_skew_ms)),
            pages: api::PageLimits::from(&cfg.api),
            body_deadline: limits.idle_timeout,
            hub: Some(hub.clone()),
            ws,
            connections: connections.clone(),
            applied: Some(api::applied::AppliedWatch::new(
                hub,
                std::time::Duration::from_millis(cfg.api.wait_applied_timeout_ms),
            )),
            checkpoints: {
                let dir = crate::checkpoint::dir(&cfg);
                Some(Arc::new(move || {
                    dir.list()
                        .map_err(|e| e.to_string())
                        .and_then(|l| serde_json::to_value(l).map_err(|e| e.to_string()))
                }))
            },
            status: {
                let stats = resolver_stats.clone();
                let projected = projector_stats.clone();
                let stages = stages.clone();
                let stage_names = stage_names.clone();
                let hub = status_hub;
                let roles: Vec<String> = roles
                    .iter()
                    .map(|r| format!("{r:?}").to_lowercase())
                    .collect();
                Arc::new(move || {
                    let mut status = serde_json::json!({
                        "roles": roles,
                        "ws": {"connections": connections.open_now(), "buckets": hub.channel_count(), "hub_overflows": hub.overflows(), "hub_dropped": hub.dropped()},
                        "http": {"connections": status_open.get(), "max_connections": max_open},
                    });
                    if roles.iter().any(|r| r == "processor") {
                        status["resolver"] = stats.to_json();
                    }
                    if roles.iter().any(|r| r == "projector") {
                        status["projector"] = projected.to_json();
                    }
                    if !stage_names.is_empty() {
                        status["stages"] = stages.to_json(&stage_names, crate::health::now_ms());
                    }
                    status
                })
            },
        };
        let listener = tokio::net::TcpListener::bind(&cfg.api.listen)
            .await
            .map_err(|e| AppError::Startup(format!("cannot listen on {}: {e}", cfg.api.listen)))?;
        api_addr = listener.local_addr().ok();
        tracing::info!(addr = ?api_addr, "api listening");
        let mut rx = stop_rx.clone();
        let handle = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.changed().await;
            };
            api::serve(listener, state, limits, open, shutdown)
                .await
                .map_err(|e| e.to_string())
        });
        tasks.push((Role::Api, handle));
    }
    Ok(Running {
        api_addr,
        resolver_stats,
        stop_tx,
        stop_flag,
        tasks,
    })
}

impl Drop for Running {
    /// A `Running` dropped without [`Running::stop`] (a panic, an early return) still tells every
    /// role to stop, so the blocking resolver thread cannot keep the process alive.
    fn drop(&mut self) {
        self.stop_flag.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.send(true);
    }
}

impl Running {
    /// Waits until a role stops on its own (an error) or `signal` resolves, then stops them all.
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), AppError> {
        let first_exit = async {
            loop {
                if let Some(i) = self.tasks.iter().position(|(_, h)| h.is_finished()) {
                    return i;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        let failed = tokio::select! {
            _ = signal => None,
            i = first_exit => Some(i),
        };
        let mut result = Ok(());
        if let Some(i) = failed {
            let (role, handle) = self.tasks.remove(i);
            let reason = match handle.await {
                Ok(Ok(())) => "stopped unexpectedly".to_string(),
                Ok(Err(e)) => e,
                Err(e) => e.to_string(),
            };
            result = Err(AppError::Role { role, reason });
        }
        self.stop().await?;
        result
    }

    /// Stops every role and waits for them.
    pub async fn stop(mut self) -> Result<(), AppError> {
        self.stop_flag.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.send(true);
        let mut result = Ok(());
        for (role, handle) in std::mem::take(&mut self.tasks) {
            match handle.await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => result = Err(AppError::Role { role, reason }),
                Err(e) => {
                    result = Err(AppError::Role {
                        role,
                        reason: e.to_string(),
                    })
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::watch;

    use super::supervise;

    #[tokio::test(start_paused = true)]
    async fn a_role_that_keeps_failing_is_restarted_less_and_less_often_and_a_stop_cuts_the_pause()
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let health = Arc::new(crate::health::StageHealth::default());
        let handle = supervise("test role", stop_rx, health.clone(), move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>("refused") }
        });
        // Pauses of 1, 2, 4, 8, 16, 30, 30 s: runs at 0, 1, 3, 7, 15, 31, 61 and 91 s.
        tokio::time::sleep(Duration::from_millis(61_500)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            7,
            "one restart a second would be 62"
        );
        // Seven failed runs, six new runs after them (the seventh's pause is under way).
        let seen = health.to_json(crate::health::now_ms());
        assert_eq!(
            (seen["failures"].clone(), seen["restarts"].clone()),
            (7.into(), 6.into())
        );
        assert_eq!(seen["ok"], false, "{seen}");
        // Stopped in the middle of a 30 s pause: it ends at once, with the last error.
        stop_tx.send(true).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(1), handle)
            .await
            .expect("the stop cuts the pause short")
            .unwrap();
        assert_eq!(ended, Err("refused".to_string()));
        assert_eq!(runs.load(Ordering::SeqCst), 7);
    }
}
