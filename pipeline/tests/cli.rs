//! The `syncflow` binary: configuration errors, `topics apply`, `token`.

mod common;

use std::process::Command;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

fn syncflow(envs: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    // Bounded: a check that stopped refusing a configuration would start every role and
    // never exit (`timeout` exits 124 then).
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=5", "120", env!("CARGO_BIN_EXE_syncflow")]);
    cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SYNCFLOW_")) {
        cmd.env_remove(k);
    }
    cmd.envs(envs.iter().copied()).args(args);
    let out = cmd.output().expect("run syncflow");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lines_starting(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}

/// Runs the binary off the async workers.
async fn syncflow_blocking(envs: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let e: Vec<(&str, &str)> = envs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        syncflow(&e, &a)
    })
    .await
    .unwrap()
}

#[test]
fn every_configuration_problem_is_reported_at_start() {
    let (code, _, err) = syncflow(
        &[
            ("SYNCFLOW_KAFKA_BROKERZ", "x"),
            ("SYNCFLOW_RESOLVER_BATCH_MAX", "lots"),
            ("SYNCFLOW_API_LISTEN", "nowhere"),
        ],
        &["run"],
    );
    assert_ne!(code, 0);
    for needle in ["SYNCFLOW_KAFKA_BROKERZ", "SYNCFLOW_RESOLVER_BATCH_MAX"] {
        assert!(err.contains(needle), "{needle} not reported:\n{err}");
    }
    // With the typing errors fixed, the semantic ones are all reported too.
    let (code, _, err) = syncflow(&[("SYNCFLOW_API_LISTEN", "nowhere")], &["run"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("jwt_secret") && err.contains("api.listen"),
        "{err}"
    );
    // The public development secret, or a short one, outside development mode: refused.
    for secret in [api::auth::DEV_SECRET, "short-secret"] {
        let (code, _, err) = syncflow(&[("SYNCFLOW_AUTH_JWT_SECRET", secret)], &["run"]);
        assert_ne!(code, 0, "{secret}");
        assert!(
            err.contains("development") || err.contains("32 bytes"),
            "{err}"
        );
    }
    let (code, _, err) = syncflow(
        &[
            ("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET),
            ("SYNCFLOW_AUTH_SIGNING_KID", "2027-01"),
        ],
        &["run"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("signing_kid"), "{err}");
    // Commands that sign no tokens need no secret; those that do still refuse without one.
    let dir = std::env::temp_dir().join(format!("syncflow-cli-{}", std::process::id()));
    let dir_env = ("SYNCFLOW_CHECKPOINT_DIR", dir.to_str().unwrap());
    let (code, _, err) = syncflow(&[dir_env], &["checkpoint", "list"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = syncflow(&[dir_env], &["token", "--tenant", "acme", "--grant", "b:r"]);
    assert_ne!(code, 0);
    assert!(err.contains("jwt_secret"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    // Arguments that cannot be right are refused before anything is done.
    let secret = ("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET);
    let (code, _, err) = syncflow(&[], &["project", "--rebuild", "--bucket", "acme/"]);
    assert_ne!(code, 0);
    assert!(err.contains("--bucket \"acme/\""), "{err}");
    let args = ["token", "--tenant", "acme", "--operator", "--grant", "b:r"];
    let (code, _, err) = syncflow(&[secret], &args);
    assert_ne!(code, 0, "{err}");
}

/// The key ring of the tests' secret.
fn test_keys() -> api::auth::TokenKeys {
    api::auth::TokenKeys::new(&api::auth::AuthConfig {
        jwt_secret: common::SECRET.into(),
        ..Default::default()
    })
    .expect("valid auth configuration")
}

#[test]
fn token_mints_a_revocable_service_token_registered_in_redis() {
    let prefix = format!("cli_svc_{}.", std::process::id());
    let (code, out, err) = syncflow(
        &[
            ("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET),
            ("SYNCFLOW_KAFKA_TOPIC_PREFIX", &prefix),
        ],
        &[
            "token",
            "--tenant",
            "acme",
            "--grant",
            "todos:w",
            "--service",
            "ingest",
            "--ttl",
            "600",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let claims = test_keys()
        .verify(out.trim())
        .expect("a service token verifies");
    assert_eq!(claims.typ, api::auth::TokenKind::Service);
    assert_eq!(claims.sub, "service:ingest");
    let id = claims.jti.expect("service tokens have an id");
    assert!(err.contains(&id), "the id is reported: {err}");
    // Registered: a tenant admin can list and revoke it like one made through the API.
    let mut redis = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_connection()
        .unwrap();
    let key = format!("{prefix}syncflow:auth:services:acme");
    let registered: bool = redis::cmd("HEXISTS")
        .arg(&key)
        .arg(&id)
        .query(&mut redis)
        .unwrap();
    assert!(registered);
    let _: () = redis::cmd("DEL").arg(&key).query(&mut redis).unwrap();
    // Bad input is refused with the same reasons the API gives.
    for (grant, name, reason) in [
        ("todos:w", "bad name", "service token name"),
        ("a*b:w", "ingest", "may only end with '*'"),
    ] {
        let (code, out, err) = syncflow(
            &[
                ("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET),
                ("SYNCFLOW_KAFKA_TOPIC_PREFIX", &prefix),
            ],
            &[
                "token",
                "--tenant",
                "acme",
                "--grant",
                grant,
                "--service",
                name,
            ],
        );
        assert_ne!(code, 0, "{name} {grant}: {out}");
        assert!(err.contains(reason), "{err}");
    }
}

#[test]
fn token_mints_a_verifiable_jwt() {
    let (code, out, err) = syncflow(
        &[("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET)],
        &[
            "token", "--tenant", "acme", "--grant", "todos:rw", "--grant", "notes*:r", "--sub",
            "ann",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let claims = test_keys()
        .verify(out.trim())
        .expect("minted token verifies");
    assert_eq!(claims.tenant, "acme");
    assert_eq!(claims.sub, "ann");
    assert!(claims.allows(api::auth::Perm::Write, "todos"));
    assert!(claims.allows(api::auth::Perm::Read, "notes-2"));
    assert!(!claims.allows(api::auth::Perm::Write, "notes-2"));
    let (code, _, err) = syncflow(
        &[("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET)],
        &["token", "--tenant", "Bad Tenant", "--grant", "x:r"],
    );
    assert_ne!(code, 0);
    assert!(err.contains("tenant"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_apply_creates_once_and_reports_drift_without_touching_it() {
    let prefix = format!("cli_{}_{}.", std::process::id(), rand::random::<u32>());
    let envs = [
        ("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET),
        ("SYNCFLOW_KAFKA_TOPIC_PREFIX", prefix.as_str()),
    ];
    // A live topic that disagrees with the file: 2 partitions, other retention.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9092")
        .create()
        .unwrap();
    let drifted = format!("{prefix}conflict.detected");
    let topic = NewTopic::new(&drifted, 2, TopicReplication::Fixed(1)).set("retention.ms", "1000");
    admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap();
    // Until the broker's metadata lists it, `topics apply` would try to create it too.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !admin
        .inner()
        .fetch_metadata(Some(&drifted), Duration::from_secs(5))
        .is_ok_and(|m| {
            m.topics()
                .first()
                .is_some_and(|t| t.partitions().len() == 2)
        })
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{drifted} never listed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (code, out, err) = syncflow_blocking(&envs, &["topics", "apply"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines_starting(&out, "created "), 6, "{out}");
    assert_eq!(lines_starting(&out, "UNSAFE "), 0, "{out}");
    assert!(
        out.contains(&format!(
            "DIFFERS   {drifted}: 2 partitions live, 6 in the file"
        )),
        "{out}"
    );
    assert!(out.contains("retention.ms"), "{out}");

    let (code, out, err) = syncflow_blocking(&envs, &["topics", "apply", "--strict"]).await;
    assert_eq!(code, 3, "--strict must fail on drift with status 3: {out}");
    assert_eq!(
        lines_starting(&out, "created "),
        0,
        "second apply created topics: {out}"
    );
    assert_eq!(lines_starting(&out, "ok "), 6, "{out}\n{err}");

    // The drifted topic was left alone.
    let md = admin
        .inner()
        .fetch_metadata(Some(&drifted), std::time::Duration::from_secs(5))
        .unwrap();
    assert_eq!(md.topics()[0].partitions().len(), 2);

    // A changelog someone set to delete by time: apply fails, and a processor does not start.
    let changelog = format!("{prefix}resolver.changelog");
    let alter =
        rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&changelog))
            .set("cleanup.policy", "delete");
    for result in admin
        .alter_configs(&[alter], &AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    let (code, out, _) = syncflow_blocking(&envs, &["topics", "apply"]).await;
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains(&format!(
            "UNSAFE    {changelog}: resolver.changelog has cleanup.policy delete"
        )),
        "{out}"
    );
    let state = std::env::temp_dir().join(format!("{prefix}state"));
    let run_envs = [
        envs[0],
        envs[1],
        ("SYNCFLOW_STATE_DIR", state.to_str().unwrap()),
    ];
    let started = std::time::Instant::now();
    let (code, _, err) = tokio::time::timeout(
        Duration::from_secs(120),
        syncflow_blocking(&run_envs, &["run", "--role", "processor"]),
    )
    .await
    .expect("the processor kept running on a changelog that deletes state");
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("must be exactly compact"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(100));
    let _ = std::fs::remove_dir_all(&state);
    let names: Vec<String> = pipeline::topics::REQUIRED
        .iter()
        .map(|t| format!("{prefix}{t}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&refs, &AdminOptions::new()).await;
}

/// `syncflow config` shows the settings in effect, from the file and the environment, with
/// secrets and URL passwords hidden; `config KEY` one of them.
#[test]
fn config_shows_the_settings_in_effect_without_secrets() {
    let file = std::env::temp_dir().join(format!("syncflow-config-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        "[api]\nlisten = \"127.0.0.1:9191\"\n[redis]\nurl = \"redis://ops:hunter2@cache:6379/\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = syncflow(&[("SYNCFLOW_CONFIG", path)], &["config", "api.listen"]);
    assert_eq!((code, out.trim()), (0, "127.0.0.1:9191"), "{err}");
    // The environment wins over the file.
    let listen = ("SYNCFLOW_API_LISTEN", "127.0.0.1:9292");
    let (_, out, _) = syncflow(
        &[("SYNCFLOW_CONFIG", path), listen],
        &["config", "api.listen"],
    );
    assert_eq!(out.trim(), "127.0.0.1:9292");
    let secret = ("SYNCFLOW_AUTH_JWT_SECRET", common::SECRET);
    let (code, out, err) = syncflow(&[("SYNCFLOW_CONFIG", path), secret], &["config"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains(common::SECRET) && !out.contains("hunter2"),
        "{out}"
    );
    assert!(out.contains("jwt_secret = \"***\""), "{out}");
    assert!(out.contains("redis://***@cache:6379/"), "{out}");
    let parsed: toml::Table = out.parse().expect("TOML");
    assert_eq!(parsed["ws"]["queue"].as_integer(), Some(1024));
    let (code, _, err) = syncflow(&[], &["config", "api.nothing"]);
    assert_ne!(code, 0);
    assert!(err.contains("no setting \"api.nothing\""), "{err}");
    let _ = std::fs::remove_file(&file);
}
