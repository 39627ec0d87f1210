//! The run's timeline in the Chrome trace-event format (Perfetto, `chrome://tracing`): every
//! member appends its own events to `runs/<job>/trace.<member>.jsonl` as it goes
//! ([`TraceLog`]), and whoever writes `loss.svg` at the end assembles them into
//! `runs/<job>/trace.json` ([`assemble`]), one process track per member.
//!
//! Each line of a member's file is one complete event (`"ph": "X"`, `ts` and `dur` in
//! microseconds since the Unix epoch, so members on one machine line up exactly and members
//! on several line up as well as their clocks do), without `pid`/`tid`; a unit of work is
//! written in one `write`, so a killed member leaves whole lines (and at most one torn last
//! line, which readers skip and a resumed run ends before appending). Events, nested by
//! time on the member's track:
//! - `step N` (`cat: "step"`; args: step, committed, step_ms, members, view_epoch) with its
//!   phases inside (`cat: "phase"`: `data`, `compute`, `wait`, `comm`, `optimizer`; see
//!   `phases`);
//! - DiLoCo: `round R` (`cat: "round"`; args: outer_round, step, committed, round_ms, ...)
//!   holding `inner step N` (`cat: "inner_step"`) and the phases;
//! - between steps: `eval`, `checkpoint`, `consistency` (`cat: "schedule"`).
//!
//! A member's file stops growing at [`MAX_TRACE_BYTES`] (about 60 000 steps; a warning says
//! so); the assembly reads at most that much of each.

use super::phases::PhaseClock;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The assembled trace in the run directory.
pub const TRACE_FILE: &str = "trace.json";

/// The most a member's `trace.<member>.jsonl` grows to: 64 MiB.
pub const MAX_TRACE_BYTES: u64 = 64 << 20;

/// A member's events file in the run directory: `trace.<member>.jsonl`.
pub fn member_file(member: &str) -> String {
    format!("trace.{member}.jsonl")
}

/// Appends one member's events to its `trace.<member>.jsonl`.
pub struct TraceLog {
    file: std::fs::File,
    /// Bytes in the file.
    written: u64,
    /// Whether it reached [`MAX_TRACE_BYTES`].
    full: bool,
    /// An instant and the same moment in ns since the Unix epoch.
    anchor: (Instant, i128),
}

impl TraceLog {
    /// Opens `member`'s file in `dir` (created if absent); appends when `resume`, else
    /// starts anew.
    pub fn open(dir: &Path, member: &str, resume: bool) -> std::io::Result<TraceLog> {
        let file = super::report::open_log(dir, &member_file(member), resume)?;
        let written = file.metadata()?.len();
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(TraceLog {
            file,
            written,
            full: written >= MAX_TRACE_BYTES,
            anchor: (Instant::now(), since_epoch.as_nanos() as i128),
        })
    }

    /// Microseconds since the Unix epoch at `t` (rounded down, so events nested in time
    /// stay nested).
    fn us(&self, t: Instant) -> i64 {
        let (at, ns) = self.anchor;
        let ns = match t.checked_duration_since(at) {
            Some(d) => ns + d.as_nanos() as i128,
            None => ns - at.duration_since(t).as_nanos() as i128,
        };
        ns.div_euclid(1000) as i64
    }

    /// One complete event from `start` to `end`.
    fn event(&self, name: &str, cat: &str, start: Instant, end: Instant, args: Value) -> Value {
        let ts = self.us(start);
        json!({"name": name, "cat": cat, "ph": "X", "ts": ts,
            "dur": (self.us(end) - ts).max(0), "args": args})
    }

    /// Appends a unit of work (a step or an outer round) named `name` of category `cat`,
    /// from the clock's start and lasting `dur`, with `args`; nested in it, the clock's
    /// inner steps and phase spans, each with the args `{key: id}`.
    pub fn unit(
        &mut self,
        (name, cat): (&str, &str),
        dur: Duration,
        args: Value,
        (key, id): (&str, u64),
        clock: &PhaseClock,
    ) -> std::io::Result<()> {
        let start = clock.started();
        let mut lines = String::new();
        let mut push = |v: Value| {
            lines.push_str(&v.to_string());
            lines.push('\n');
        };
        push(self.event(name, cat, start, start + dur, args));
        for &(step, from, to) in clock.inner_steps() {
            let name = format!("inner step {step}");
            push(self.event(&name, "inner_step", from, to, json!({"step": step})));
        }
        for s in clock.spans() {
            push(self.event(s.phase.name(), "phase", s.start, s.end, json!({key: id})));
        }
        self.write(&lines)
    }

    /// Appends a span of work between steps (`eval`, `checkpoint`, ...) from `start` to
    /// now, with `args`.
    pub fn span(
        &mut self,
        (name, cat): (&str, &str),
        start: Instant,
        args: Value,
    ) -> std::io::Result<()> {
        let mut line = self
            .event(name, cat, start, Instant::now(), args)
            .to_string();
        line.push('\n');
        self.write(&line)
    }

    /// Writes `text` (whole lines) in one call, unless that would take the file past
    /// [`MAX_TRACE_BYTES`].
    fn write(&mut self, text: &str) -> std::io::Result<()> {
        if self.full {
            return Ok(());
        }
        if self.written + text.len() as u64 > MAX_TRACE_BYTES {
            self.full = true;
            tracing::warn!(
                "the trace reached {MAX_TRACE_BYTES} bytes; later events are not recorded"
            );
            return Ok(());
        }
        self.file.write_all(text.as_bytes())?;
        self.written += text.len() as u64;
        Ok(())
    }
}

/// The members' event files in `dir`, sorted by member: (member, path).
fn member_files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(member) = name
            .strip_prefix("trace.")
            .and_then(|n| n.strip_suffix(".jsonl"))
        {
            if !member.is_empty() {
                out.push((member.to_string(), path.clone()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `dir/trace.json` (`{"displayTimeUnit": "ms", "traceEvents": [...]}`) from every
/// `trace.<member>.jsonl` in `dir`: member k (sorted by id, from 1) is process `k`, named
/// `member <id>` by a `process_name` metadata event, with one thread `training`; its
/// complete (`"X"`) events follow, lines that do not parse skipped, at most
/// [`MAX_TRACE_BYTES`] read per member. Written to a temporary file and renamed, so a
/// reader never sees half a trace. Returns the number of members.
pub fn assemble(dir: &Path) -> std::io::Result<usize> {
    let members = member_files(dir)?;
    let tmp = dir.join(format!("{TRACE_FILE}.{}.partial", std::process::id()));
    let mut out = BufWriter::new(std::fs::File::create(&tmp)?);
    out.write_all(b"{\"displayTimeUnit\":\"ms\",\"traceEvents\":[")?;
    let mut first = true;
    let mut put = |out: &mut BufWriter<std::fs::File>, v: &Value| -> std::io::Result<()> {
        out.write_all(if first { b"\n" } else { b",\n" })?;
        first = false;
        serde_json::to_writer(&mut *out, v).map_err(std::io::Error::other)
    };
    for (k, (member, path)) in members.iter().enumerate() {
        let pid = k as u64 + 1;
        let meta = |name: &str, args: Value| json!({"name": name, "ph": "M", "pid": pid, "tid": 1, "args": args});
        put(
            &mut out,
            &meta("process_name", json!({"name": format!("member {member}")})),
        )?;
        put(
            &mut out,
            &meta("process_sort_index", json!({"sort_index": pid})),
        )?;
        put(&mut out, &meta("thread_name", json!({"name": "training"})))?;
        let reader = BufReader::new(std::fs::File::open(path)?.take(MAX_TRACE_BYTES));
        for line in reader.split(b'\n') {
            let Ok(mut v) = serde_json::from_slice::<Value>(&line?) else {
                continue;
            };
            let Some(o) = v.as_object_mut() else {
                continue;
            };
            if o.get("ph").and_then(Value::as_str) != Some("X") {
                continue;
            }
            o.insert("pid".into(), json!(pid));
            o.insert("tid".into(), json!(1));
            put(&mut out, &v)?;
        }
    }
    out.write_all(b"\n]}\n")?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, dir.join(TRACE_FILE))?;
    Ok(members.len())
}

#[cfg(test)]
mod tests {
    use super::super::phases::{Phase, PhaseClock};
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shoal-trace-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A step with its phases nested inside; the assembled file parses, names one process
    /// per member, and every member's events carry its pid.
    #[test]
    fn members_become_named_tracks_with_nested_phases() {
        let dir = temp_dir("tracks");
        for (member, steps) in [("bbb", 3u64), ("aaa", 2)] {
            let mut log = TraceLog::open(&dir, member, false).unwrap();
            for step in 1..=steps {
                let t0 = Instant::now();
                let mut clock = PhaseClock::new(t0);
                clock.mark(Phase::Data);
                std::thread::sleep(Duration::from_millis(2));
                clock.mark(Phase::Compute);
                clock.all_reduce(Duration::ZERO);
                clock.mark(Phase::Optimizer);
                let args = json!({"step": step, "committed": true});
                let dur = t0.elapsed();
                log.unit(("step", "step"), dur, args, ("step", step), &clock)
                    .unwrap();
            }
            log.span(("eval", "schedule"), Instant::now(), json!({}))
                .unwrap();
        }
        assert_eq!(assemble(&dir).unwrap(), 2);
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(TRACE_FILE)).unwrap()).unwrap();
        let events = v["traceEvents"].as_array().unwrap();
        let names: Vec<(u64, &str)> = events
            .iter()
            .filter(|e| e["name"] == "process_name")
            .map(|e| {
                (
                    e["pid"].as_u64().unwrap(),
                    e["args"]["name"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(names, [(1, "member aaa"), (2, "member bbb")]);
        for (pid, steps) in [(1u64, 2usize), (2, 3)] {
            let mine = |cat: &str| -> Vec<&Value> {
                events
                    .iter()
                    .filter(|e| e["pid"] == pid && e["cat"] == cat)
                    .collect()
            };
            let (step_events, phases) = (mine("step"), mine("phase"));
            assert_eq!(step_events.len(), steps);
            assert_eq!(mine("schedule").len(), 1);
            // Every phase lies within its step.
            for p in &phases {
                let s = step_events
                    .iter()
                    .find(|s| s["args"]["step"] == p["args"]["step"])
                    .expect("its step");
                let (ts, dur) = (s["ts"].as_i64().unwrap(), s["dur"].as_i64().unwrap());
                let (pts, pdur) = (p["ts"].as_i64().unwrap(), p["dur"].as_i64().unwrap());
                assert!(pts >= ts && pts + pdur <= ts + dur, "{p} outside {s}");
                assert_eq!(p["ph"], "X");
                assert_eq!(p["tid"], 1);
            }
            assert!(phases.iter().any(|p| p["name"] == "compute"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A member killed mid-write leaves a torn last line: its whole lines still assemble,
    /// and a resumed member appends after it.
    #[test]
    fn torn_lines_are_skipped_and_resume_appends() {
        let dir = temp_dir("torn");
        let mut log = TraceLog::open(&dir, "m", false).unwrap();
        log.span(("eval", "schedule"), Instant::now(), json!({"n": 1}))
            .unwrap();
        drop(log);
        let path = dir.join(member_file("m"));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"name\":\"step\",\"ph\":\"X\",\"ts\":12")
            .unwrap();
        drop(f);
        assert_eq!(assemble(&dir).unwrap(), 1);
        let count = |dir: &Path| {
            let v: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join(TRACE_FILE)).unwrap())
                    .unwrap();
            v["traceEvents"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["ph"] == "X")
                .count()
        };
        assert_eq!(count(&dir), 1);
        let mut log = TraceLog::open(&dir, "m", true).unwrap();
        log.span(("checkpoint", "schedule"), Instant::now(), json!({}))
            .unwrap();
        assemble(&dir).unwrap();
        assert_eq!(count(&dir), 2);
        // A fresh run starts the file anew.
        drop(TraceLog::open(&dir, "m", false).unwrap());
        assemble(&dir).unwrap();
        assert_eq!(count(&dir), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The file stops growing at its bound.
    #[test]
    fn the_file_is_bounded() {
        let dir = temp_dir("bounded");
        let mut log = TraceLog::open(&dir, "m", false).unwrap();
        log.written = MAX_TRACE_BYTES - 10;
        log.span(("eval", "schedule"), Instant::now(), json!({}))
            .unwrap();
        assert!(log.full);
        assert_eq!(
            std::fs::metadata(dir.join(member_file("m"))).unwrap().len(),
            0
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
