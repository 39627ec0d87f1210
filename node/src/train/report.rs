//! What a run leaves in `runs/<job>/`: `metrics.jsonl` (one line per step and per
//! evaluation), `samples.<member>.jsonl` when the job asks for it, and `loss.svg` at the
//! end (and, from `trace`, every member's `trace.<member>.jsonl` and the assembled
//! `trace.json`).

use super::phases::Phases;
use serde::Serialize;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One committed step.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    /// Step number (1-based: steps committed so far).
    pub step: u64,
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Samples in the global batch.
    pub samples: u64,
    /// Global samples per second over this step.
    pub samples_per_s: f64,
    /// Wall time of the step, ms.
    pub step_ms: f64,
    /// Of the step: forward and backward on this member's share, ms.
    pub compute_ms: f64,
    /// Of the step: redoing it without gradients the guard rejected (their recomputation
    /// and all-reduce; 0 when none was rejected), ms.
    #[serde(default)]
    pub guard_ms: f64,
    /// Of the step: the gradient all-reduce, which carries the guard's norms (including
    /// waiting for the slowest member), ms.
    pub allreduce_ms: f64,
    /// The step's wall time (`step_ms`) by phase on this member: data loading, compute,
    /// communication, waiting for peers, optimizer (see `phases`). They never overlap, so
    /// they add up to at most `step_ms`; the rest is bookkeeping between them.
    pub phases: Phases,
    /// Seconds since training started (after the members gathered), at the commit.
    pub elapsed_s: f64,
    /// Data-plane bytes this node sent during the step.
    pub bytes_sent: u64,
    /// Data-plane bytes this node received during the step.
    pub bytes_received: u64,
    /// Members in the view that ran the step.
    pub members: usize,
    /// That view's epoch.
    pub view_epoch: u64,
    /// Data epoch and cursor after the step.
    pub data_epoch: u64,
    /// Samples of the data epoch consumed after the step.
    pub data_offset: u64,
    /// The most this node's process has been resident so far (`VmHWM`), bytes; 0 where
    /// the system does not say (no `/proc`).
    pub peak_rss_bytes: u64,
}

/// What an evaluation's `accuracy` counts (serialized as `accuracy_of`).
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccuracyOf {
    /// Classification: samples whose argmax is the label.
    Label,
    /// Arithmetic: sums whose greedily generated answer is exactly right.
    Answer,
    /// Text (language model): held-out positions whose argmax is the next token.
    NextToken,
}

impl AccuracyOf {
    /// How a person reads it: `label accuracy`, `exact-answer accuracy`,
    /// `next-token accuracy`.
    pub fn describe(self) -> &'static str {
        match self {
            AccuracyOf::Label => "label accuracy",
            AccuracyOf::Answer => "exact-answer accuracy",
            AccuracyOf::NextToken => "next-token accuracy",
        }
    }
}

/// One evaluation on the held-out split.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct EvalRecord {
    /// After this many steps.
    pub step: u64,
    /// Mean loss.
    pub loss: f64,
    /// Fraction correct; `accuracy_of` says of what (classification: samples, the label;
    /// arithmetic: sums, the exact answer; text: positions, the next token).
    pub accuracy: f64,
    /// What `accuracy` counts.
    pub accuracy_of: AccuracyOf,
    /// Held-out samples evaluated.
    pub samples: u64,
}

impl std::fmt::Display for EvalRecord {
    /// `loss=2.1234 next-token accuracy=0.3456 (4096 samples)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loss={:.4} {}={:.4} ({} samples)",
            self.loss,
            self.accuracy_of.describe(),
            self.accuracy,
            self.samples
        )
    }
}

/// One committed DiLoCo outer round (`[sync] kind = "diloco"`): a line of its own in
/// `metrics.jsonl` in place of its inner steps' lines.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRecord {
    /// Outer rounds committed so far (1-based).
    pub outer_round: u64,
    /// Steps (global batches) committed after the round.
    pub step: u64,
    /// Inner steps of the round.
    pub inner_steps: u64,
    /// Mean loss over the round's samples (every member's inner steps).
    pub loss: f64,
    /// Inner learning rate at the round's last step.
    pub lr: f64,
    /// Samples of the round (every member's).
    pub samples: u64,
    /// Global samples per second over the round.
    pub samples_per_s: f64,
    /// Wall time of the round on this member (its inner steps, the outer all-reduce and
    /// the outer step), ms.
    pub round_ms: f64,
    /// Of the round: this member's inner steps (forward, backward, inner optimizer), ms.
    pub compute_ms: f64,
    /// Of the round: the outer all-reduce of the pseudo-gradient (including waiting for
    /// the slowest member) and the outer step, ms.
    pub allreduce_ms: f64,
    /// The round's wall time (`round_ms`) by phase on this member, over its inner steps
    /// (data, compute, inner updates as optimizer), the outer all-reduce (comm, wait) and
    /// the pseudo-gradient and outer step (optimizer); they add up to at most `round_ms`.
    pub phases: Phases,
    /// Seconds since training started (after the members gathered), at the commit.
    pub elapsed_s: f64,
    /// Data-plane bytes this node sent during the round.
    pub bytes_sent: u64,
    /// Data-plane bytes this node received during the round.
    pub bytes_received: u64,
    /// Members in the view that ran the round.
    pub members: usize,
    /// That view's epoch.
    pub view_epoch: u64,
    /// Data epoch after the round.
    pub data_epoch: u64,
    /// Samples of the data epoch consumed after the round.
    pub data_offset: u64,
}

/// Writes a run's files.
pub struct RunLog {
    dir: PathBuf,
    metrics: std::fs::File,
    losses: Vec<(u64, f64)>,
    evals: Vec<(u64, f64)>,
}

impl RunLog {
    /// Opens `dir` (created if absent); appends when `resume`, else starts anew.
    pub fn open(dir: &Path, resume: bool) -> std::io::Result<RunLog> {
        Ok(RunLog {
            dir: dir.to_path_buf(),
            metrics: open_log(dir, "metrics.jsonl", resume)?,
            losses: Vec::new(),
            evals: Vec::new(),
        })
    }

    /// Appends a step line.
    pub fn step(&mut self, r: &StepRecord) -> std::io::Result<()> {
        self.losses.push((r.step, r.loss));
        writeln!(self.metrics, "{}", serde_json::to_string(r).expect("json"))
    }

    /// Appends an outer round's line.
    pub fn round(&mut self, r: &RoundRecord) -> std::io::Result<()> {
        self.losses.push((r.step, r.loss));
        writeln!(self.metrics, "{}", serde_json::to_string(r).expect("json"))
    }

    /// Appends an event line (`{"event": "sync" | "redo", ...}`).
    pub fn event(&mut self, line: &serde_json::Value) -> std::io::Result<()> {
        writeln!(self.metrics, "{line}")
    }

    /// Appends an evaluation line (`{"eval": {...}}`).
    pub fn eval(&mut self, r: &EvalRecord) -> std::io::Result<()> {
        self.evals.push((r.step, r.loss));
        writeln!(
            self.metrics,
            "{}",
            serde_json::json!({ "step": r.step, "eval": r })
        )
    }

    /// Writes `loss.svg` from the lines written so far.
    pub fn finish(&mut self, title: &str) -> std::io::Result<()> {
        self.metrics.flush()?;
        std::fs::write(
            self.dir.join("loss.svg"),
            loss_svg(title, &self.losses, &self.evals),
        )
    }
}

/// Opens a log for appending (emptied first unless `resume`). Always `O_APPEND`: the
/// view's first member writes `metrics.jsonl`, and when that role moves to another process
/// and back, each write must land at the end, never at a stale offset over the other's lines.
pub(super) fn open_log(dir: &Path, name: &str, resume: bool) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    if !resume {
        std::fs::File::create(&path)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)?;
    // A process killed mid-write leaves a torn last line: end it, so the lines appended now
    // stay whole (readers skip the torn one).
    use std::io::{Read, Seek, SeekFrom, Write};
    if f.seek(SeekFrom::End(0))? > 0 {
        f.seek(SeekFrom::End(-1))?;
        let mut last = [0u8; 1];
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            f.write_all(b"\n")?;
        }
    }
    Ok(f)
}

/// One member's record of the sample ids it contributed: `samples.<member>.jsonl`, lines
/// `{"step":..,"data_epoch":..,"member":..,"ids":[..],"view_epoch":..,"view":..,
/// "committed":..}`. Each time this member's contribution to a step (a guard's redo
/// included) or to a DiLoCo round (a line per inner step) is about to leave, its ids are
/// written ahead with `"committed": false`; when the step or round commits here, they are
/// written again with `"committed": true`. A step's samples are, for each member, its last
/// line of the view that committed the step last (the highest `view_epoch` among the
/// step's committed lines): an all-reduce completes on one member only with every member's
/// contribution, so a member whose own end failed, or that died, after its contribution
/// left, while another's end completed, was part of that commit, and its line written
/// ahead says with what; a commit with a lower epoch died with its member and was redone
/// ([`used_samples`] reads them so). Each line is one `write`: a member killed mid-run
/// leaves whole lines.
pub struct SamplesLog {
    file: std::fs::File,
    member: String,
}

impl SamplesLog {
    /// Opens this member's file in `dir`; appends when `resume`.
    pub fn open(dir: &Path, member: &str, resume: bool) -> std::io::Result<SamplesLog> {
        Ok(SamplesLog {
            file: open_log(dir, &format!("samples.{member}.jsonl"), resume)?,
            member: member.to_string(),
        })
    }

    /// Appends the ids this member contributes to `step` (from data epoch `epoch`) on
    /// `view`: written ahead (`committed` false) or committed here.
    pub fn append(
        &mut self,
        step: u64,
        epoch: u64,
        ids: &[u64],
        view: &coordinator_free::View,
        committed: bool,
    ) -> std::io::Result<()> {
        let mut line = serde_json::json!({"step": step, "data_epoch": epoch, "member": self.member,
            "ids": ids, "view_epoch": view.epoch, "view": view.hash.short(), "committed": committed})
        .to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes())
    }
}

/// The samples of every committed step from a run's `samples.*.jsonl` lines (see
/// [`SamplesLog`]; each member's lines in its file's order): step → (data epoch, member →
/// ids). Lines that do not parse are skipped.
pub fn used_samples<'a>(
    lines: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeMap<u64, (u64, std::collections::BTreeMap<String, Vec<u64>>)> {
    use std::collections::BTreeMap;
    #[derive(serde::Deserialize)]
    struct Line {
        step: u64,
        data_epoch: u64,
        member: String,
        ids: Vec<u64>,
        view_epoch: u64,
        view: String,
        committed: bool,
    }
    let lines: Vec<Line> = lines
        .into_iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    // The view that committed each step last.
    let mut decided: BTreeMap<u64, (u64, &str)> = BTreeMap::new();
    for l in lines.iter().filter(|l| l.committed) {
        let d = decided.entry(l.step).or_insert((l.view_epoch, &l.view));
        if l.view_epoch > d.0 {
            *d = (l.view_epoch, &l.view);
        }
    }
    let mut out: BTreeMap<u64, (u64, BTreeMap<String, Vec<u64>>)> = BTreeMap::new();
    for l in &lines {
        if decided.get(&l.step) == Some(&(l.view_epoch, l.view.as_str())) {
            let (_, members) = out.entry(l.step).or_insert((l.data_epoch, BTreeMap::new()));
            members.insert(l.member.clone(), l.ids.clone());
        }
    }
    out
}

/// A self-contained SVG line chart of training loss (and held-out loss as points).
pub fn loss_svg(title: &str, train: &[(u64, f64)], eval: &[(u64, f64)]) -> String {
    let (w, h, l, r, t, b) = (720.0, 400.0, 64.0, 16.0, 32.0, 40.0);
    let finite = |v: &&(u64, f64)| v.1.is_finite();
    let all: Vec<&(u64, f64)> = train.iter().chain(eval).filter(finite).collect();
    let xmax = all.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let ymax = all.iter().map(|p| p.1).fold(f64::MIN, f64::max).max(1e-9);
    let ymin = all.iter().map(|p| p.1).fold(0.0f64, f64::min);
    let sx = |x: f64| l + (w - l - r) * x / xmax;
    let sy = |y: f64| t + (h - t - b) * (1.0 - (y - ymin) / (ymax - ymin).max(1e-12));
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="#fff"/><text x="{l}" y="20" font-size="14">{}</text>"##,
        escape(title)
    );
    let _ = write!(
        s,
        r##"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="#333"/><line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="#333"/>"##,
        h - b,
        w - r,
        h - b,
        h - b
    );
    for i in 0..=4 {
        let y = ymin + (ymax - ymin) * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{y:.3}</text><line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="#eee"/>"##,
            l - 6.0,
            sy(y) + 4.0,
            sy(y),
            w - r,
            sy(y)
        );
        let x = xmax * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{}</text>"##,
            sx(x),
            h - b + 16.0,
            x.round()
        );
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">step</text>"##,
        (l + w - r) / 2.0,
        h - 6.0
    );
    let pts: Vec<String> = train
        .iter()
        .filter(finite)
        .map(|&(x, y)| format!("{:.1},{:.1}", sx(x as f64), sy(y)))
        .collect();
    let _ = write!(
        s,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
        pts.join(" ")
    );
    for &(x, y) in eval.iter().filter(finite) {
        let _ = write!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#d62728"/>"##,
            sx(x as f64),
            sy(y)
        );
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" fill="#1f77b4">train loss</text><text x="{}" y="{}" fill="#d62728">held-out loss</text></svg>"##,
        w - r - 180.0,
        t + 4.0,
        w - r - 90.0,
        t + 4.0
    );
    s.push('\n');
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step's samples: each member's last line of the view that committed it last,
    /// committed or not.
    #[test]
    fn used_samples_follow_the_committing_view() {
        let line = |step: u64, member: &str, ids: &[u64], epoch: u64, committed: bool| {
            serde_json::json!({"step": step, "data_epoch": 0, "member": member, "ids": ids,
                "view_epoch": epoch, "view": format!("v{epoch}"), "committed": committed})
            .to_string()
        };
        let lines = [
            // Step 1: both committed in view 3.
            line(1, "a", &[0, 1], 3, true),
            line(1, "b", &[2, 3], 3, true),
            // Step 2: a committed in view 3, b's end of the all-reduce failed there (b
            // syncs from a); c joins in view 4, nobody redoes step 2.
            line(2, "a", &[4, 5], 3, true),
            line(2, "b", &[6, 7], 3, false),
            // Step 3: a committed in view 4 and died with it; b and c redid it in view 5
            // (c's failed line of view 4 does not count either).
            line(3, "a", &[8], 4, true),
            line(3, "c", &[9], 4, false),
            line(3, "b", &[8, 9], 5, true),
            line(3, "c", &[10, 11], 5, true),
            // Step 4: failed everywhere: not used.
            line(4, "b", &[12], 5, false),
            // Step 5: both wrote ahead in view 5; b died once its contribution had left,
            // a committed: b's line written ahead counts.
            line(5, "a", &[13], 5, false),
            line(5, "b", &[14], 5, false),
            line(5, "a", &[13], 5, true),
            // Step 6: the guard left b out in view 5 and a took its sample over: each
            // member's last line of the view counts, not the first attempt's.
            line(6, "a", &[15], 5, false),
            line(6, "b", &[16], 5, false),
            line(6, "a", &[15, 16], 5, false),
            line(6, "b", &[], 5, false),
            line(6, "a", &[15, 16], 5, true),
            line(6, "b", &[], 5, true),
            "{\"torn\"".to_string(),
        ];
        let used = used_samples(lines.iter().map(String::as_str));
        let ids = |step: u64| -> Vec<u64> {
            let mut v: Vec<u64> = used[&step].1.values().flatten().copied().collect();
            v.sort_unstable();
            v
        };
        assert_eq!(used.len(), 5);
        assert_eq!(ids(1), [0, 1, 2, 3]);
        assert_eq!(ids(2), [4, 5, 6, 7]);
        assert_eq!(ids(3), [8, 9, 10, 11]);
        assert_eq!(ids(5), [13, 14]);
        assert_eq!(ids(6), [15, 16]);
        assert_eq!(used[&3].1.keys().collect::<Vec<_>>(), ["b", "c"]);
    }

    /// A log whose last line a killed process tore is ended before new lines are appended.
    #[test]
    fn a_torn_last_line_is_ended_on_resume() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("shoal-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("m.jsonl"), "{\"a\":1}\n{\"torn\"").unwrap();
        let mut f = open_log(&dir, "m.jsonl", true).unwrap();
        f.write_all(b"{\"b\":2}\n").unwrap();
        let text = std::fs::read_to_string(dir.join("m.jsonl")).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"torn\"\n{\"b\":2}\n");
        // A whole last line gets nothing added.
        drop(open_log(&dir, "m.jsonl", true).unwrap());
        assert_eq!(std::fs::read_to_string(dir.join("m.jsonl")).unwrap(), text);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The eval line and the summary say what the accuracy counts.
    #[test]
    fn eval_records_name_what_their_accuracy_counts() {
        let r = EvalRecord {
            step: 60,
            loss: 2.5,
            accuracy: 0.3125,
            accuracy_of: AccuracyOf::NextToken,
            samples: 4096,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["accuracy_of"], "next_token");
        assert_eq!(v["accuracy"], 0.3125);
        let back: EvalRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            r.to_string(),
            "loss=2.5000 next-token accuracy=0.3125 (4096 samples)"
        );
        let label = serde_json::to_value(AccuracyOf::Label).unwrap();
        assert_eq!(label, "label");
        assert_eq!(serde_json::to_value(AccuracyOf::Answer).unwrap(), "answer");
    }

    #[test]
    fn svg_has_one_point_per_step_and_eval() {
        let train: Vec<(u64, f64)> = (1..=50).map(|i| (i, 3.0 / i as f64)).collect();
        let svg = loss_svg("a<b", &train, &[(25, 0.2), (50, 0.1)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let poly = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(poly.split(' ').count(), 50);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("a&lt;b"));
        // Empty and non-finite input still yields a valid chart.
        assert!(loss_svg("x", &[(1, f64::NAN)], &[]).contains("</svg>"));
    }
}
