//! Golden cases: `tests/golden/<case>/` holds
//!
//! - `input.jsonl`: one record per line, `{"received_at_ms": N, "write": {...}}`, optionally with
//!   `"key": "tenant/bucket"` (the Kafka record key) and `"note": "..."` (ignored; says why the
//!   line is there). `write` is the raw `data.changed` event, decoded like real input, so invalid
//!   events are fine too. Every case runs with the default limits and `max_skew_ms` = 5000.
//! - `expected.jsonl`: what the core emits, in order, one line per output, each tagged with the
//!   input line (1-based) that produced it: `{"line": n, "sync": SyncEvent}`,
//!   `{"line": n, "conflict": ConflictEvent}` or `{"line": n, "rejected": Rejection}`.
//! - `expected_docs.json`: the final document of every document an accepted write touched, by
//!   `tenant/bucket/doc_id` (`null` when it does not exist).
//!
//! `UPDATE_GOLDEN=1 cargo test -p processors --test golden` rewrites the expected files; read
//! every change against `docs/CONFLICTS.md` before committing it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use processors::{compute_diff, decode_write, resolve_lww, DiffContext, Limits, MemState};

const MAX_SKEW_MS: u64 = 5_000;

/// Runs one case's input; returns the output lines and the final documents.
fn run_case(input: &str) -> (Vec<Value>, Value) {
    let limits = Limits::default();
    let mut state = MemState::default();
    let mut out = Vec::new();
    let mut touched = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("input line {line_no} is not JSON: {e}"));
        let received_at_ms = record["received_at_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("input line {line_no} needs received_at_ms"));
        let key = record["key"].as_str().map(str::as_bytes);
        let payload = serde_json::to_vec(&record["write"]).unwrap();
        let ctx = DiffContext {
            limits: &limits,
            received_at_ms,
            max_skew_ms: MAX_SKEW_MS,
        };
        let change = match decode_write(key, &payload).and_then(|w| compute_diff(w, &ctx)) {
            Ok(Some(change)) => change,
            Ok(None) => continue,
            Err(r) => {
                out.push(json!({"line": line_no, "rejected": r}));
                continue;
            }
        };
        if !touched.contains(&change.key) {
            touched.push(change.key.clone());
        }
        let applied = resolve_lww(&mut state, change).unwrap();
        if let Some(e) = applied.change {
            out.push(json!({"line": line_no, "sync": e}));
        }
        for c in applied.conflicts {
            out.push(json!({"line": line_no, "conflict": c}));
        }
    }
    let docs: BTreeMap<String, Value> = touched
        .iter()
        .map(|k| {
            let doc = state.docs.get(k).and_then(|d| d.document());
            let name = format!("{}/{}/{}", k.bucket.tenant, k.bucket.bucket, k.doc_id);
            (name, doc.map_or(Value::Null, Value::Object))
        })
        .collect();
    (out, serde_json::to_value(docs).unwrap())
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("input.jsonl").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn parse_lines(text: &str, file: &Path) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}", file.display())))
        .collect()
}

#[test]
fn golden_cases() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let cases = cases();
    assert!(cases.len() >= 7, "golden cases are missing");
    let mut failures = Vec::new();
    for dir in &cases {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let input = fs::read_to_string(dir.join("input.jsonl")).unwrap();
        let (lines, docs) = run_case(&input);
        let expected_path = dir.join("expected.jsonl");
        let docs_path = dir.join("expected_docs.json");
        if update {
            let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
            fs::write(&expected_path, text).unwrap();
            fs::write(
                &docs_path,
                serde_json::to_string_pretty(&docs).unwrap() + "\n",
            )
            .unwrap();
            continue;
        }
        let expected = fs::read_to_string(&expected_path)
            .map(|t| parse_lines(&t, &expected_path))
            .unwrap_or_default();
        if expected != lines {
            let at = expected
                .iter()
                .zip(&lines)
                .position(|(e, a)| e != a)
                .unwrap_or(expected.len().min(lines.len()));
            failures.push(format!(
                "{name}: expected.jsonl differs at output {} (expected {} lines, got {})\n  expected: {}\n  actual:   {}",
                at + 1,
                expected.len(),
                lines.len(),
                expected.get(at).map_or("<none>".into(), Value::to_string),
                lines.get(at).map_or("<none>".into(), Value::to_string),
            ));
        }
        let expected_docs: Value = fs::read_to_string(&docs_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        if expected_docs != docs {
            failures.push(format!(
                "{name}: expected_docs.json differs\n  expected: {expected_docs}\n  actual:   {docs}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n(UPDATE_GOLDEN=1 regenerates; review every change)",
        failures.join("\n")
    );
}

/// Feeding a case's input twice changes nothing the second time: no events, no conflicts.
#[test]
fn golden_inputs_replayed_emit_nothing_new() {
    for dir in cases() {
        let input = fs::read_to_string(dir.join("input.jsonl")).unwrap();
        let (once, docs_once) = run_case(&input);
        let twice_input = format!("{input}\n{input}");
        let (twice, docs_twice) = run_case(&twice_input);
        let accepted = |v: &Vec<Value>| v.iter().filter(|l| l.get("rejected").is_none()).count();
        assert_eq!(accepted(&once), accepted(&twice), "{}", dir.display());
        assert_eq!(docs_once, docs_twice, "{}", dir.display());
    }
}
