//! The operator commands of the binary: `checkpoint`, `restore`, `replay`.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use pipeline::config::Config;
use pipeline::restore::{RestoreOptions, RestoreReport, Until};

/// `syncflow checkpoint …`
#[derive(Subcommand)]
pub enum CheckpointAction {
    /// Take a checkpoint now and wait until every task has written its snapshot.
    Create {
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
    /// List the complete checkpoints, oldest first.
    List,
    /// Show one checkpoint's manifest (offsets, files, sizes, checksums).
    Show {
        /// The checkpoint id.
        id: String,
    },
    /// Delete a checkpoint (asks first, unless `--yes`).
    Delete {
        /// The checkpoint id.
        id: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

/// Runs a `checkpoint` subcommand.
pub fn checkpoint(cfg: &Config, action: CheckpointAction) -> anyhow::Result<()> {
    let dir = pipeline::checkpoint::dir(cfg);
    // checkpoint.dir is relative to the working directory by default: name the one read, and
    // say when it does not exist (a command run from elsewhere than the processors').
    let path = std::path::Path::new(&cfg.checkpoint.dir);
    let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if !path.is_dir() {
        eprintln!(
            "warning: checkpoint directory {} does not exist (checkpoint.dir, SYNCFLOW_CHECKPOINT_DIR: the processors' own)",
            shown.display()
        );
    } else if matches!(action, CheckpointAction::List) {
        eprintln!("checkpoints in {}", shown.display());
    }
    match action {
        CheckpointAction::Create { timeout_secs } => {
            let started = std::time::Instant::now();
            let marker = pipeline::checkpoint::request(cfg)?;
            eprintln!(
                "checkpoint {} requested on {} partitions; waiting for the processors",
                marker.id, marker.partitions
            );
            let m = pipeline::checkpoint::wait(cfg, &marker.id, Duration::from_secs(timeout_secs))?;
            eprintln!(
                "checkpoint {} complete in {:.1}s: {} entries, {} bytes",
                m.id,
                started.elapsed().as_secs_f64(),
                m.total_entries,
                m.total_bytes
            );
            println!("{}", m.id);
        }
        CheckpointAction::List => {
            for m in dir.list()? {
                println!(
                    "{}  created_at_ms={}  partitions={}  entries={}  bytes={}",
                    m.id,
                    m.created_at_ms,
                    m.partitions.len(),
                    m.total_entries,
                    m.total_bytes
                );
            }
        }
        CheckpointAction::Show { id } => {
            println!("{}", serde_json::to_string_pretty(&dir.manifest(&id)?)?);
        }
        CheckpointAction::Delete { id, yes } => {
            match dir.manifest(&id) {
                Ok(m) => {
                    let all = dir.list()?;
                    let newest = all.last().is_some_and(|n| n.id == m.id);
                    let what = match (all.len(), newest) {
                        (1, _) => "the only complete checkpoint: nothing older is left to restore",
                        (_, true) => "the newest checkpoint",
                        _ => "an older checkpoint",
                    };
                    eprintln!(
                        "checkpoint {id} ({what}), created_at_ms={}, {} bytes: deleting it cannot be undone",
                        m.created_at_ms, m.total_bytes
                    );
                }
                // An unfinished or damaged one can be deleted too (nothing can restore it).
                Err(e) => eprintln!("checkpoint {id} has no readable manifest ({e})"),
            }
            if !yes && !asked_yes("Delete it: type \"yes\" to go on: ") {
                anyhow::bail!("not deleted");
            }
            dir.delete(&id)?;
            eprintln!("checkpoint {id} deleted");
        }
    }
    Ok(())
}

/// Parses `--until`: ms since the epoch, an RFC 3339 UTC time (`2026-11-25T10:00:00Z`), or
/// per-partition offsets (`0:120,1:98`).
pub fn parse_until(text: &str) -> anyhow::Result<Until> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(Until::Time(ms));
    }
    if text.contains(':') && !text.contains('T') {
        let mut offsets = BTreeMap::new();
        for item in text.split(',') {
            let (p, o) = item
                .split_once(':')
                .with_context(|| format!("--until {item:?}: expected partition:offset"))?;
            let bad = || format!("--until {item:?}: expected partition:offset, both whole numbers");
            offsets.insert(
                p.trim().parse().with_context(bad)?,
                o.trim().parse().with_context(bad)?,
            );
        }
        return Ok(Until::Offsets(offsets));
    }
    rfc3339_utc_ms(text)
        .map(Until::Time)
        .with_context(|| format!("--until {text:?}: expected ms since the epoch, YYYY-MM-DDTHH:MM:SS[.fff]Z, or partition:offset,…"))
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
fn rfc3339_utc_ms(text: &str) -> Option<u64> {
    // Only digits: no signs, no spaces (a `-1` hour or a `+5` day is not a time).
    let number = |x: &str| -> Option<i64> {
        (!x.is_empty() && x.len() <= 4 && x.bytes().all(|b| b.is_ascii_digit()))
            .then(|| x.parse().ok())?
    };
    let body = text.strip_suffix('Z')?;
    let (date, time) = body.split_once('T')?;
    let d: Vec<&str> = date.split('-').collect();
    let [y, m, day] = d[..] else { return None };
    let (y, m, day) = (number(y)?, number(m)?, number(day)?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let t: Vec<&str> = hms.split(':').collect();
    let [hh, mm, ss] = t[..] else { return None };
    let (hh, mm, ss) = (number(hh)?, number(mm)?, number(ss)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if y < 1970
        || !(1..=12).contains(&m)
        || !(1..=month_days).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 60
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms_frac: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms_frac).ok()
}

fn describe(r: &RestoreReport) -> String {
    let unfinished = r.completes.as_ref().map_or(String::new(), |id| {
        format!(
            "; it takes the place of the unfinished restore of checkpoint {id} (the processors stay stopped until one completes)"
        )
    });
    let recreated = if r.input_recreated.is_empty() {
        String::new()
    } else {
        format!(
            " (data.changed partitions {:?} end at or before the checkpoint's cut: the topic was recreated since, or lost records, so none of the records they hold are applied)",
            r.input_recreated
        )
    };
    format!(
        "checkpoint {}: {} input records replayed; at most {} later input records will not be applied{recreated}; \
         {} document states change ({} visible), {} documents removed; {} changelog records; \
         the resolver resumes at {:?}{unfinished}",
        r.checkpoint,
        r.replayed,
        r.not_applied,
        r.docs_changed,
        r.visible_changed,
        r.docs_removed,
        r.changelog_records,
        r.resume_offsets
    )
}

fn confirm(yes: bool, report: &RestoreReport) -> bool {
    eprintln!("{}", describe(report));
    yes || asked_yes("Stop-the-world restore: type \"yes\" to go on: ")
}

/// Asks `question` on the terminal; true when the answer is `yes`. Without a terminal, no.
fn asked_yes(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        eprintln!("refusing without --yes: stdin is not a terminal");
        return false;
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    line.trim() == "yes"
}

/// Runs `restore` (no `replay`) or `replay`.
pub async fn restore(
    cfg: &Config,
    id: &str,
    opts: RestoreOptions,
    yes: bool,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let report = pipeline::restore::run(
        cfg,
        id,
        &opts,
        |r| confirm(yes, r),
        |step| eprintln!("[{:>6.1}s] {step}", started.elapsed().as_secs_f64()),
    )
    .await?;
    if report.dry_run {
        eprintln!("dry run, nothing changed: {}", describe(&report));
    } else {
        eprintln!(
            "restored in {:.1}s: {} bucket(s) rewritten with a new epoch, {} view documents",
            started.elapsed().as_secs_f64(),
            report.buckets,
            report.view_docs
        );
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Mints a service token `name` of `tenant` and registers it in Redis, the same way the API
/// does, so it is valid until it expires or a tenant admin revokes it. Its id goes to stderr,
/// the token to the caller.
pub async fn service_token(
    cfg: &Config,
    keys: &api::auth::TokenKeys,
    tenant: &str,
    name: &str,
    grants: Vec<api::auth::Grant>,
    operator: bool,
    ttl_secs: u64,
) -> anyhow::Result<String> {
    let name = api::admin::check_service_name(name)?;
    api::admin::check_grant_shapes(&grants)?;
    let conn = api::redis_conn::manager(&cfg.redis.url)
        .with_context(|| format!("redis {}", pipeline::config::redacted(&cfg.redis.url)))?;
    let store = api::auth::sessions::AuthStore::new(conn, &cfg.kafka.topic_prefix);
    let spec = api::admin::ServiceTokenSpec {
        tenant,
        name,
        grants,
        operator,
        ttl_secs,
        created_by: "cli",
        // Made with the signing key: its admin grants rest on no user.
        backed_by: Some(api::auth::sessions::Backer::SigningKey { signing_key: true }),
        // The operator's own tool is not held to the API's cap.
        cap: None,
    };
    let (record, token) =
        api::admin::issue_service_token(keys, &store, spec, cfg.auth.service_token_max_ttl_secs)
            .await
            .with_context(|| {
                format!(
                    "registering the service token in redis {}",
                    pipeline::config::redacted(&cfg.redis.url)
                )
            })?;
    eprintln!(
        "service token {} ({name}) of tenant {tenant}, expires at {}",
        record.id, record.expires_at
    );
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_refuses_times_that_do_not_exist() {
        for bad in [
            "2026-02-31T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-01-01T-1:00:00Z",
            "2026-01-01T00:+5:00Z",
            "2026-01-01-5T00:00:00Z",
            "99999999999-01-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-01-01T00:00:00.-5Z",
            "2026-01-01T00:00Z",
        ] {
            assert!(parse_until(bad).is_err(), "{bad} was accepted");
        }
        assert!(parse_until("2024-02-29T12:00:00Z").is_ok());
    }

    #[test]
    fn until_accepts_epoch_ms_rfc3339_and_offsets() {
        assert_eq!(
            parse_until("1764064800000").unwrap(),
            Until::Time(1_764_064_800_000)
        );
        assert_eq!(
            parse_until("2025-11-25T10:00:00Z").unwrap(),
            Until::Time(1_764_064_800_000)
        );
        assert_eq!(
            parse_until("1970-01-01T00:00:01.5Z").unwrap(),
            Until::Time(1_500)
        );
        assert_eq!(
            parse_until("0:12,3:40").unwrap(),
            Until::Offsets(BTreeMap::from([(0, 12), (3, 40)]))
        );
        assert!(parse_until("yesterday").is_err());
        let bad = parse_until("1:x").unwrap_err();
        assert!(format!("{bad:#}").contains("--until \"1:x\""), "{bad:#}");
        assert!(parse_until("2025-13-01T00:00:00Z").is_err());
    }
}
