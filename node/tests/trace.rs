//! Where time goes, end to end with real `shoal train --local 2` processes: every step line
//! (and every DiLoCo round line) of `metrics.jsonl` splits its wall time into data,
//! compute, comm, wait and optimizer phases that add up to it within 5 %, and
//! `runs/<job>/trace.json` is a Chrome trace with one named track per member holding
//! every committed step (round) with its phases nested inside.

mod common;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The first 24 kB of tinyshakespeare in `dir/text.txt`, and a small byte-level gpt job
/// on it of `steps` steps; `extra` as in `gpt_lm_job`.
fn job(dir: &Path, name: &str, steps: u64, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data/tinyshakespeare.txt")).unwrap();
    std::fs::write(dir.join("text.txt"), &text[..24_000]).unwrap();
    let path = dir.join(format!("{name}.toml"));
    let data = "kind = \"text\"\npath = \"text.txt\"";
    std::fs::write(&path, gpt_lm_job(name, steps, steps, data, extra)).unwrap();
    path
}

/// The JSON lines of `path` (all must parse).
fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The phases of a metrics line add up to its `total` (`step_ms` or `round_ms`) within
/// 5 %, each phase is ≥ 0, and data, compute, comm and optimizer took time.
fn check_phases(line: &Value, total: &str) {
    let p = &line["phases"];
    let ms = |k: &str| {
        p[k].as_f64()
            .unwrap_or_else(|| panic!("phases.{k} in {line}"))
    };
    let keys = [
        "data_ms",
        "compute_ms",
        "comm_ms",
        "wait_ms",
        "optimizer_ms",
    ];
    assert!(keys.iter().all(|k| ms(k) >= 0.0), "{line}");
    for k in ["data_ms", "compute_ms", "comm_ms", "optimizer_ms"] {
        assert!(ms(k) > 0.0, "{k} is 0: {line}");
    }
    let sum: f64 = keys.iter().map(|k| ms(k)).sum();
    let wall = line[total].as_f64().unwrap();
    assert!(
        (sum - wall).abs() <= 0.05 * wall,
        "phases add up to {sum} ms, {total} = {wall} ms: {line}"
    );
}

/// The assembled trace: per member (process name) the committed units of category `cat`
/// (`step` or `round`), keyed by `key`: member → key → (ts, dur); and every phase event
/// lies within its unit on its member's track.
fn trace_units(run_dir: &Path, cat: &str, key: &str) -> BTreeMap<String, BTreeMap<u64, Value>> {
    let text = std::fs::read_to_string(run_dir.join("trace.json")).unwrap();
    let v: Value = serde_json::from_str(&text).expect("trace.json parses");
    let events = v["traceEvents"].as_array().expect("traceEvents");
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    for e in events.iter().filter(|e| e["ph"] == "M") {
        if e["name"] == "process_name" {
            let name = e["args"]["name"].as_str().unwrap().to_string();
            assert!(names.insert(e["pid"].as_u64().unwrap(), name).is_none());
        }
    }
    let mut out: BTreeMap<String, BTreeMap<u64, Value>> = BTreeMap::new();
    for e in events.iter().filter(|e| e["ph"] == "X") {
        let pid = e["pid"].as_u64().unwrap();
        assert!(
            names.contains_key(&pid),
            "an event of an unnamed track: {e}"
        );
        assert_eq!(e["tid"], 1, "{e}");
        assert!(e["ts"].as_i64().is_some() && e["dur"].as_i64().unwrap() >= 0);
        if e["cat"] == cat && e["args"]["committed"] == true {
            let id = e["args"][key].as_u64().unwrap();
            let prev = out
                .entry(names[&pid].clone())
                .or_default()
                .insert(id, e.clone());
            assert!(prev.is_none(), "{cat} {id} twice on {pid}");
        }
    }
    // Phases nest in their unit.
    for e in events.iter().filter(|e| e["cat"] == "phase") {
        let member = &names[&e["pid"].as_u64().unwrap()];
        let id = e["args"][key].as_u64().unwrap();
        let Some(unit) = out.get(member).and_then(|m| m.get(&id)) else {
            continue; // a failed unit's phase
        };
        let (ts, dur) = (unit["ts"].as_i64().unwrap(), unit["dur"].as_i64().unwrap());
        let (pts, pdur) = (e["ts"].as_i64().unwrap(), e["dur"].as_i64().unwrap());
        assert!(pts >= ts && pts + pdur <= ts + dur, "{e} outside {unit}");
    }
    out
}

/// The member ids with a `trace.<member>.jsonl` in `run_dir`; each of its lines parses.
fn member_files(run_dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(run_dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if let Some(m) = name
            .strip_prefix("trace.")
            .and_then(|n| n.strip_suffix(".jsonl"))
        {
            assert!(!json_lines(&p).is_empty(), "{name} is empty");
            out.insert(format!("member {m}"));
        }
    }
    out
}

/// Two members, 20 synchronous steps: every step line's phases add up to its `step_ms`;
/// the trace has one track per member, each holding all 20 steps with their phases.
#[test]
fn steps_split_into_phases_and_trace_every_member() {
    let d = TempDir::new("trace-sync");
    let path = job(&d.0, "tr", 20, "");
    let (code, summary, err) = train(&d.0, &path, &["--local", "2"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary["steps"], 20);
    let run = d.0.join("runs/tr");
    let steps: Vec<Value> = json_lines(&run.join("metrics.jsonl"))
        .into_iter()
        .filter(|v| v.get("step_ms").is_some())
        .collect();
    assert_eq!(steps.len(), 20);
    for s in &steps {
        check_phases(s, "step_ms");
    }
    let units = trace_units(&run, "step", "step");
    assert_eq!(units.len(), 2, "one track per member: {:?}", units.keys());
    assert_eq!(
        units.keys().cloned().collect::<BTreeSet<_>>(),
        member_files(&run)
    );
    for (member, by_step) in &units {
        let got: Vec<u64> = by_step.keys().copied().collect();
        assert_eq!(got, (1..=20).collect::<Vec<_>>(), "{member}");
        // Each step's event carries its phases, which add up as the metrics line's do.
        for e in by_step.values() {
            let line = serde_json::json!({"phases": e["args"]["phases"],
                "step_ms": e["args"]["step_ms"]});
            check_phases(&line, "step_ms");
        }
    }
}

/// Two members, DiLoCo with 5 inner steps over 20 steps: every round line's phases add up
/// to its `round_ms`; the trace holds the 4 rounds on both members' tracks.
#[test]
fn diloco_rounds_split_into_phases_and_trace_every_member() {
    let d = TempDir::new("trace-diloco");
    let sync = "[sync]\nkind = \"diloco\"\ninner_steps = 5";
    let path = job(&d.0, "trd", 20, sync);
    let (code, summary, err) = train(&d.0, &path, &["--local", "2"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(summary["steps"], 20);
    let run = d.0.join("runs/trd");
    let rounds: Vec<Value> = json_lines(&run.join("metrics.jsonl"))
        .into_iter()
        .filter(|v| v.get("outer_round").is_some())
        .collect();
    assert_eq!(rounds.len(), 4);
    for r in &rounds {
        check_phases(r, "round_ms");
    }
    let units = trace_units(&run, "round", "outer_round");
    assert_eq!(units.len(), 2, "one track per member: {:?}", units.keys());
    for (member, by_round) in &units {
        let got: Vec<u64> = by_round.keys().copied().collect();
        assert_eq!(got, [1, 2, 3, 4], "{member}");
    }
}

/// A run killed mid-way leaves every member's `trace.<member>.jsonl` in whole lines (at
/// most a torn last one), and `shoal trace` assembles them: both tracks hold every step
/// from 1 on.
#[test]
fn a_killed_run_leaves_per_member_traces_that_assemble() {
    let d = TempDir::new("trace-killed");
    let path = job(&d.0, "trk", 100_000, "");
    let run = d.0.join("runs/trk");
    let mut child = spawn_train(&d.0, &path, &d.0.join("nodes"), &["--local", "2"], false);
    let bound = std::time::Duration::from_secs(300);
    wait_until("50 steps logged", bound, || {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).ok()?;
        (text.lines().count() > 50).then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let mut members = 0;
    for e in std::fs::read_dir(&run).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("trace.") && name.ends_with(".jsonl")) {
            continue;
        }
        members += 1;
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let whole = if text.ends_with('\n') {
            &lines[..]
        } else {
            &lines[..lines.len() - 1]
        };
        assert!(whole.len() > 50, "{name}: {} lines", whole.len());
        for l in whole {
            serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{name}: {l}: {e}"));
        }
    }
    assert_eq!(members, 2);
    assert!(
        !run.join("trace.json").exists(),
        "assembled only at the end"
    );
    let out = run_shoal(&["trace", run.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let units = trace_units(&run, "step", "step");
    assert_eq!(units.len(), 2);
    for (member, by_step) in &units {
        let last = *by_step.keys().last().unwrap();
        assert!(last >= 50, "{member}: {last} steps");
        assert_eq!(by_step.len() as u64, last, "{member}: every step from 1 on");
    }
}
