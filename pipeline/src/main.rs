//! `syncflow`: the one binary. `run` starts roles, `topics apply` manages topics, `token` mints a
//! development JWT, `checkpoint`/`restore`/`replay` are the operator's recovery tools.

mod ops;

/// The resolver allocates and frees many small strings and maps per record; mimalloc does that
/// faster than the system allocator (see docs/BENCHMARKS.md, resolver), and `mialloc` calls its
/// plain entry points where `mimalloc::MiMalloc` would take the slower aligned ones.
#[global_allocator]
static GLOBAL: mialloc::MiMalloc = mialloc::MiMalloc;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use pipeline::app::{self, Role};
use pipeline::config::Config;
use pipeline::topics::{self, TopicsFile};

#[derive(Parser)]
#[command(
    name = "syncflow",
    version,
    about = "Real-time data sync backend on Kafka"
)]
struct Cli {
    /// Configuration file (TOML). Also `SYNCFLOW_CONFIG`.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run SyncFlow: all roles, or the ones given with --role.
    Run {
        /// Role to run (repeatable): api, processor, projector (includes fanout), fanout. Default: all.
        #[arg(long, value_enum)]
        role: Vec<Role>,
    },
    /// Manage Kafka topics from topics.yaml.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Rebuild the MongoDB view from the resolver's state (stop the projectors first).
    Project {
        /// Required: rebuild (the only action for now).
        #[arg(long, required = true)]
        rebuild: bool,
        /// Only this bucket, as tenant/bucket.
        #[arg(long)]
        bucket: Option<String>,
    },
    /// Subscribe to a bucket over WebSocket; print every message as a JSON line; resume after
    /// disconnects from the last cursor.
    Subscribe {
        /// The bucket.
        #[arg(long)]
        bucket: String,
        /// Resume after this cursor (from a previous run's output).
        #[arg(long)]
        cursor: Option<String>,
        /// Access token (or SYNCFLOW_TOKEN).
        #[arg(long, env = "SYNCFLOW_TOKEN", hide_env_values = true)]
        token: String,
        /// WebSocket URL.
        #[arg(long)]
        url: Option<String>,
        /// Seconds without a frame from the server after which the connection is taken for dead
        /// and replaced (keep it above the server's ws.heartbeat_secs, 15 by default).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        idle_timeout_secs: u64,
    },
    /// Checkpoints: create (and wait), list, show, delete.
    Checkpoint {
        #[command(subcommand)]
        action: ops::CheckpointAction,
    },
    /// Put the state and the view back to a checkpoint; later writes are not applied. Stop every
    /// processor, projector and fanout first.
    Restore {
        /// The checkpoint id.
        #[arg(long)]
        checkpoint: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Report what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Restore a checkpoint, then re-run data.changed from its offsets with the current code, up
    /// to --until (default: the end). Stop every processor, projector and fanout first.
    Replay {
        /// The checkpoint id.
        #[arg(long)]
        from_checkpoint: String,
        /// Stop at: ms since the epoch, YYYY-MM-DDTHH:MM:SS[.fff]Z, or partition:offset,…
        #[arg(long)]
        until: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Report what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Mint a development JWT signed with the configured secret, or (with `--service`) a
    /// revocable service token registered in Redis.
    Token {
        /// Tenant the token belongs to.
        #[arg(long)]
        tenant: String,
        /// Grant as bucket:perms (r, w, a), repeatable or comma-separated; `prefix*` matches many.
        #[arg(
            long = "grant",
            required_unless_present = "operator",
            conflicts_with = "operator"
        )]
        grants: Vec<String>,
        /// An operator token (cluster-wide operations such as GET /v1/checkpoints; no buckets).
        #[arg(long)]
        operator: bool,
        /// Subject (user or service id).
        #[arg(long, default_value = "dev")]
        sub: String,
        /// Mint a service token with this name instead: registered in the tenant's registry in
        /// Redis, so a tenant admin can list and revoke it (`/v1/tenant/service-tokens`).
        /// Default lifetime: auth.service_token_max_ttl_secs.
        #[arg(long, value_name = "NAME")]
        service: Option<String>,
        /// Lifetime in seconds, 1 to 315360000 (ten years) (default: auth.token_ttl_secs).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
        ttl: Option<u64>,
    },
    /// Print the configuration in effect (defaults, then the file, then SYNCFLOW_* variables)
    /// as TOML, secrets and URL passwords shown as ***; with KEY (e.g. api.listen), only that
    /// value.
    Config {
        /// A setting, as section.key.
        key: Option<String>,
    },
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Create missing topics; report (without changing) live topics that differ from the file.
    Apply {
        /// Exit with status 3 when a live topic differs from the file.
        #[arg(long)]
        strict: bool,
    },
}

fn init_logging() {
    let filter = std::env::var("SYNCFLOW_LOG").unwrap_or_else(|_| "info,rdkafka=warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on SIGTERM or Ctrl-C. `term` is installed before start-up, so a SIGTERM that arrives
/// while the roles are still starting stops them cleanly instead of killing the process.
async fn shutdown_signal(mut term: tokio::signal::unix::Signal) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let cli = Cli::parse();
    // `syncflow run` stops cleanly on SIGTERM from its first moment: the handler goes in before
    // anything else (reading the configuration included), and the log says when it is in, so
    // that a supervisor (or a test) knows a SIGTERM from then on is a clean stop.
    let term = match &cli.command {
        Command::Run { .. } => {
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
            tracing::info!("syncflow run: SIGTERM handler installed");
            Some(term)
        }
        _ => None,
    };
    if let Command::Subscribe {
        bucket,
        cursor,
        token,
        url,
        idle_timeout_secs,
    } = &cli.command
    {
        // A client: needs no server configuration.
        let url = url
            .clone()
            .unwrap_or_else(|| "ws://127.0.0.1:8080/v1/subscribe".to_string());
        // A reader that went away (`| head`) ends the client, without a panic.
        let idle = std::time::Duration::from_secs(*idle_timeout_secs);
        pipeline::subscribe::run_with(&url, token, bucket, cursor.clone(), idle, |msg| {
            use std::io::Write;
            writeln!(std::io::stdout().lock(), "{msg}").is_ok()
        })
        .await?;
        return Ok(());
    }
    // Only the API and the token commands sign or check tokens: the other commands and roles
    // do not need (and should not be given) the signing secret.
    let signs_tokens = match &cli.command {
        Command::Run { role } => role.is_empty() || role.contains(&Role::Api),
        Command::Token { .. } => true,
        _ => false,
    };
    let cfg = Config::from_env(cli.config.clone(), signs_tokens)?;
    match cli.command {
        Command::Run { role } => {
            let roles = if role.is_empty() {
                vec![Role::Api, Role::Processor, Role::Projector]
            } else {
                role
            };
            let term = term.context("the SIGTERM handler of syncflow run")?;
            let running = app::start(cfg, &roles).await?;
            running.run_until(shutdown_signal(term)).await?;
        }
        Command::Topics {
            action: TopicsAction::Apply { strict },
        } => {
            let file = TopicsFile::load(std::path::Path::new(&cfg.kafka.topics_file))?;
            let report = topics::apply(&cfg.kafka.brokers, &cfg.kafka.topic_prefix, &file)
                .await
                .context("applying topics")?;
            for t in &report.created {
                println!("created   {t}");
            }
            for t in &report.unchanged {
                println!("ok        {t}");
            }
            for d in &report.drift {
                println!("DIFFERS   {d}  (not changed)");
            }
            let single: Vec<&str> = file
                .topics
                .iter()
                .filter(|(_, spec)| spec.replication_factor < 3)
                .map(|(name, _)| name.as_str())
                .collect();
            if !single.is_empty() {
                // Fine on one broker (development); in production one broker's loss would lose
                // acknowledged writes and state.
                eprintln!(
                    "note: {} topic(s) have a replication factor below 3 in the file ({}): give them 3 and min.insync.replicas 2 on a production cluster",
                    single.len(),
                    single.join(", ")
                );
            }
            for u in &report.unsafe_settings {
                println!("UNSAFE    {u}  (not changed)");
            }
            if !report.unsafe_settings.is_empty() {
                // Whatever --strict says: processors on such a topic lose data.
                eprintln!(
                    "Error: {} live topic setting(s) lose data; change them (kafka-configs.sh --alter) before starting SyncFlow",
                    report.unsafe_settings.len()
                );
                std::process::exit(4);
            }
            if strict && !report.drift.is_empty() {
                // Its own status, so that a script tells drift from a failure (status 1).
                eprintln!(
                    "Error: {} live topic setting(s) differ from the file",
                    report.drift.len()
                );
                std::process::exit(3);
            }
        }
        Command::Project { rebuild: _, bucket } => {
            let only = match bucket.as_deref() {
                None => None,
                Some(text) => {
                    let (tenant, bucket) = text
                        .split_once('/')
                        .ok_or_else(|| anyhow::anyhow!("--bucket must be tenant/bucket"))?;
                    processors::limits::check_tenant(tenant)
                        .and_then(|()| processors::limits::check_bucket(bucket))
                        .map_err(|e| anyhow::anyhow!("--bucket {text:?}: {}", e.message))?;
                    Some(processors::BucketKey {
                        tenant: tenant.into(),
                        bucket: bucket.into(),
                    })
                }
            };
            let client = mongodb::Client::with_uri_str(&cfg.mongo.uri).await?;
            let view = api::view::MongoView::new(client.database(&cfg.mongo.database));
            let started = std::time::Instant::now();
            let report = pipeline::rebuild::rebuild(&cfg, &view, only.as_ref(), |done, total| {
                eprint!("\rrebuilding the view: {done}/{total} documents");
            })
            .await?;
            eprintln!();
            if let (Some(key), 0) = (&only, report.buckets) {
                anyhow::bail!(
                    "the resolver's state has no bucket {}/{}: nothing was rebuilt (check the name)",
                    key.tenant,
                    key.bucket
                );
            }
            println!(
                "rebuilt {} bucket(s): {} documents written, {} stale removed, in {:.1}s",
                report.buckets,
                report.written,
                report.removed,
                started.elapsed().as_secs_f64()
            );
        }
        Command::Subscribe { .. } => unreachable!("handled before the configuration is loaded"),
        Command::Config { key } => {
            println!("{}", pipeline::config::show(&cfg, key.as_deref())?);
        }
        Command::Checkpoint { action } => {
            tokio::task::spawn_blocking(move || ops::checkpoint(&cfg, action)).await??;
        }
        Command::Restore {
            checkpoint,
            yes,
            dry_run,
        } => {
            let opts = pipeline::restore::RestoreOptions {
                dry_run,
                ..Default::default()
            };
            ops::restore(&cfg, &checkpoint, opts, yes).await?;
        }
        Command::Replay {
            from_checkpoint,
            until,
            yes,
            dry_run,
        } => {
            let opts = pipeline::restore::RestoreOptions {
                replay: true,
                until: until.as_deref().map(ops::parse_until).transpose()?,
                dry_run,
            };
            ops::restore(&cfg, &from_checkpoint, opts, yes).await?;
        }
        Command::Token {
            tenant,
            grants,
            sub,
            ttl,
            operator,
            service,
        } => {
            processors::limits::check_tenant(&tenant).map_err(|e| anyhow::anyhow!(e.message))?;
            let grants =
                api::auth::parse_grants(&grants.join(",")).map_err(|e| anyhow::anyhow!(e))?;
            let keys = api::auth::TokenKeys::new(&cfg.auth).map_err(anyhow::Error::msg)?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            if let Some(name) = service {
                let ttl = ttl.unwrap_or(cfg.auth.service_token_max_ttl_secs);
                let token =
                    ops::service_token(&cfg, &keys, &tenant, &name, grants, operator, ttl).await?;
                println!("{token}");
                return Ok(());
            }
            let ttl = ttl.unwrap_or(cfg.auth.token_ttl_secs);
            let token = if operator {
                keys.mint_operator(&sub, &tenant, now, ttl)
            } else {
                keys.mint(&sub, &tenant, grants, now, ttl)
            };
            println!("{token}");
        }
    }
    Ok(())
}
