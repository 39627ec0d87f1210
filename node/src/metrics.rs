//! `GET /metrics`: the node's state in the Prometheus text exposition format (0.0.4).
//!
//! Exported: members and view epoch, member liveness, heartbeats and gossip verdicts,
//! refused handshakes, connected peers, control-plane gossip payload bytes, data-plane
//! payload bytes per direction, collective outcomes and a collective latency histogram;
//! per training run (labels `job`, `run`): step, loss, samples/s, step time, samples
//! consumed, held-out loss and accuracy, and the number of runs per state; serving:
//! requests by outcome, a request latency histogram, cache hits and misses, tokens,
//! batches, retries, stage calls answered, and per model its replicas and holders.
//!
//! The latency histograms' layout and bucketing ([`LatencyHistogram`]) live here too, so
//! the code that records durations and the code that exports them share one definition.

use crate::status::StatusReport;
use coordinator_free::MemberState;
use std::fmt::Write as _;

/// A latency histogram's layout: bucket upper bounds in seconds, ascending.
///
/// A duration counts in the first bucket whose bound it does not exceed (a duration equal
/// to a bound counts in that bound's bucket), or in the overflow bucket after the last
/// bound. Counts are kept per bucket, one per bound and then the overflow bucket; the
/// exporter forms the cumulative `le` samples Prometheus expects.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencyHistogram {
    /// Upper bounds in seconds, ascending.
    pub bounds: &'static [f64],
}

/// Durations of successful data-plane collectives: 0.5 ms to 5 s.
pub const COLLECTIVE_LATENCY: LatencyHistogram = LatencyHistogram {
    bounds: &[
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    ],
};

/// Latencies of successful completion requests: 5 ms to 30 s.
pub const REQUEST_LATENCY: LatencyHistogram = LatencyHistogram {
    bounds: &[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ],
};

impl LatencyHistogram {
    /// The index of the bucket a duration of `took_s` seconds counts in: that of the first
    /// bound `>= took_s`, or `bounds.len()` (the overflow bucket) past the last bound.
    pub fn bucket(&self, took_s: f64) -> usize {
        self.bounds
            .iter()
            .position(|&b| took_s <= b)
            .unwrap_or(self.bounds.len())
    }

    /// Records a duration of `took_s` seconds: counts it in its bucket of `counts` and adds
    /// it to `sum_s`. `counts` is first reset to one zero per bucket if it has another
    /// length (as in freshly defaulted counters).
    pub fn record(&self, counts: &mut Vec<u64>, sum_s: &mut f64, took_s: f64) {
        if counts.len() != self.bounds.len() + 1 {
            *counts = vec![0; self.bounds.len() + 1];
        }
        counts[self.bucket(took_s)] += 1;
        *sum_s += took_s;
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: f64) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// Declares a family and writes its samples (labels, value).
fn metric(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    family(o, name, kind, help);
    for (labels, value) in samples {
        sample(o, name, labels, *value);
    }
}

/// Renders a status report as Prometheus text.
pub fn render(r: &StatusReport) -> String {
    let mut o = String::new();
    render_membership(&mut o, r);
    render_planes(&mut o, r);
    render_jobs(&mut o, &r.jobs);
    render_serving(&mut o, r);
    o
}

/// The view, the members known and the control plane's counters.
fn render_membership(o: &mut String, r: &StatusReport) {
    let c = &r.counters;
    let members = r.view.members.len() as f64;
    let help = "Members in this node's current view.";
    metric(o, "shoal_view_members", "gauge", help, &[("", members)]);
    if let Some(m) = r.node.memory {
        let help = "Resident memory of this node's process, bytes.";
        metric(
            o,
            "shoal_resident_memory_bytes",
            "gauge",
            help,
            &[("", m.rss_bytes as f64)],
        );
        let help = "Peak resident memory of this node's process, bytes.";
        let peak = m.peak_rss_bytes as f64;
        metric(
            o,
            "shoal_resident_memory_peak_bytes",
            "gauge",
            help,
            &[("", peak)],
        );
    }
    let help = "Epoch of this node's current view.";
    metric(
        o,
        "shoal_view_epoch",
        "gauge",
        help,
        &[("", r.view.epoch as f64)],
    );
    let help = "Views this node went through.";
    let changes = c.view_changes as f64;
    metric(
        o,
        "shoal_view_changes_total",
        "counter",
        help,
        &[("", changes)],
    );
    let known = |state| r.members.iter().filter(|m| m.state == state).count() as f64;
    metric(
        o,
        "shoal_members_known",
        "gauge",
        "Other members this node knows of, by liveness.",
        &[
            ("state=\"alive\"", known(MemberState::Alive)),
            ("state=\"suspect\"", known(MemberState::Suspect)),
            ("state=\"failed\"", known(MemberState::Failed)),
        ],
    );
    let peers = r.node.connected_peers as f64;
    let help = "Connected libp2p peers.";
    metric(o, "shoal_connected_peers", "gauge", help, &[("", peers)]);
    let sent = c.heartbeats_sent as f64;
    let help = "Heartbeats published.";
    metric(
        o,
        "shoal_heartbeats_sent_total",
        "counter",
        help,
        &[("", sent)],
    );
    metric(
        o,
        "shoal_gossip_messages_total",
        "counter",
        "Gossip messages received, by verdict.",
        &[
            ("verdict=\"accepted\"", c.gossip_accepted as f64),
            ("verdict=\"rejected\"", c.gossip_rejected as f64),
            ("verdict=\"ignored\"", c.gossip_ignored as f64),
        ],
    );
    metric(
        o,
        "shoal_handshakes_refused_total",
        "counter",
        "Inbound control-plane handshakes that failed.",
        &[("", c.handshakes_refused as f64)],
    );
}

/// Bytes by plane, and the data plane's collectives.
fn render_planes(o: &mut String, r: &StatusReport) {
    let c = &r.counters;
    // One family: the data plane's samples follow the control plane's.
    metric(
        o,
        "shoal_plane_bytes_total",
        "counter",
        "Payload bytes by plane and direction (control: gossip payloads).",
        &[
            (
                "plane=\"control\",direction=\"sent\"",
                c.control_bytes_sent as f64,
            ),
            (
                "plane=\"control\",direction=\"received\"",
                c.control_bytes_received as f64,
            ),
        ],
    );
    let Some(dp) = &r.node.data_plane else {
        return;
    };
    let s = &dp.stats;
    let name = "shoal_plane_bytes_total";
    sample(
        o,
        name,
        "plane=\"data\",direction=\"sent\"",
        s.bytes_sent as f64,
    );
    sample(
        o,
        name,
        "plane=\"data\",direction=\"received\"",
        s.bytes_received as f64,
    );
    metric(
        o,
        "shoal_collectives_total",
        "counter",
        "Collectives run, by outcome.",
        &[
            ("outcome=\"ok\"", s.collectives_ok as f64),
            ("outcome=\"failed\"", s.collectives_failed as f64),
        ],
    );
    metric(
        o,
        "shoal_data_plane_refused_total",
        "counter",
        "Data-plane connections refused (non-members, failed authentication).",
        &[("", s.refused as f64)],
    );
    metric(
        o,
        "shoal_collective_wait_seconds_total",
        "counter",
        "Time every collective in flight was still waiting for its ring neighbours to start it.",
        &[("", s.wait_s)],
    );
    family(
        o,
        "shoal_collective_duration_seconds",
        "histogram",
        "Duration of successful collectives.",
    );
    histogram(
        o,
        "shoal_collective_duration_seconds",
        COLLECTIVE_LATENCY.bounds,
        &s.latency_counts,
        s.latency_sum_s,
    );
}

/// Writes the samples of a histogram family (already declared) from per-bucket counts
/// (one per bound, then an overflow bucket).
fn histogram(o: &mut String, name: &str, bounds: &[f64], counts: &[u64], sum: f64) {
    let mut cumulative = 0u64;
    for (i, bound) in bounds.iter().enumerate() {
        cumulative += counts.get(i).copied().unwrap_or(0);
        sample(
            o,
            &format!("{name}_bucket"),
            &format!("le=\"{bound}\""),
            cumulative as f64,
        );
    }
    cumulative += counts.get(bounds.len()).copied().unwrap_or(0);
    sample(
        o,
        &format!("{name}_bucket"),
        "le=\"+Inf\"",
        cumulative as f64,
    );
    sample(o, &format!("{name}_sum"), "", sum);
    sample(o, &format!("{name}_count"), "", cumulative as f64);
}

fn render_serving(o: &mut String, r: &StatusReport) {
    let Some(s) = &r.serve_stats else { return };
    family(
        o,
        "shoal_serve_requests_total",
        "counter",
        "Completion requests that entered here, by outcome (rejected: invalid before running).",
    );
    for (outcome, v) in [
        ("ok", s.requests_ok),
        ("failed", s.requests_failed),
        ("rejected", s.requests_rejected),
    ] {
        sample(
            o,
            "shoal_serve_requests_total",
            &format!("outcome=\"{outcome}\""),
            v as f64,
        );
    }
    family(
        o,
        "shoal_serve_request_duration_seconds",
        "histogram",
        "Latency of successful completion requests (cache hits count as 0).",
    );
    histogram(
        o,
        "shoal_serve_request_duration_seconds",
        REQUEST_LATENCY.bounds,
        &s.latency_counts,
        s.latency_sum_s,
    );
    family(
        o,
        "shoal_serve_cache_total",
        "counter",
        "Response-cache lookups of deterministic requests, by result.",
    );
    sample(
        o,
        "shoal_serve_cache_total",
        "result=\"hit\"",
        s.cache_hits as f64,
    );
    sample(
        o,
        "shoal_serve_cache_total",
        "result=\"miss\"",
        s.cache_misses as f64,
    );
    for (name, help, v) in [
        (
            "shoal_serve_tokens_total",
            "Tokens generated.",
            s.tokens_generated,
        ),
        (
            "shoal_serve_batches_total",
            "Prefill calls (requests started together).",
            s.batches,
        ),
        (
            "shoal_serve_batched_requests_total",
            "Requests started by those calls.",
            s.batched_requests,
        ),
        (
            "shoal_serve_retries_total",
            "Requests retried after a stage failed.",
            s.retries,
        ),
        (
            "shoal_serve_stage_calls_total",
            "Pipeline-stage calls this node answered.",
            s.stage_calls,
        ),
    ] {
        family(o, name, "counter", help);
        sample(o, name, "", v as f64);
    }
    family(
        o,
        "shoal_serve_replicas",
        "gauge",
        "Replica pipelines this node plans for each served model.",
    );
    family(
        o,
        "shoal_serve_model_holders",
        "gauge",
        "Members that hold each served model.",
    );
    for m in &r.serving {
        // Model names are [A-Za-z0-9-_.:] (checked by the codec): nothing to escape.
        let l = format!("model=\"{}\"", m.name);
        sample(o, "shoal_serve_replicas", &l, m.replicas.len() as f64);
        sample(o, "shoal_serve_model_holders", &l, m.holders.len() as f64);
    }
}

fn render_jobs(o: &mut String, jobs: &[crate::train::JobReport]) {
    use crate::train::JobState;
    family(
        o,
        "shoal_train_runs",
        "gauge",
        "Training runs this node takes part in, by state.",
    );
    for (state, name) in [
        (JobState::Waiting, "waiting"),
        (JobState::Running, "running"),
        (JobState::Done, "done"),
        (JobState::Failed, "failed"),
    ] {
        let n = jobs.iter().filter(|j| j.state == state).count();
        sample(
            o,
            "shoal_train_runs",
            &format!("state=\"{name}\""),
            n as f64,
        );
    }
    type Get = fn(&crate::train::JobReport) -> Option<f64>;
    let families: [(&str, &str, &str, Get); 7] = [
        ("shoal_train_step", "gauge", "Steps committed.", |j| {
            Some(j.step as f64)
        }),
        (
            "shoal_train_loss",
            "gauge",
            "Mean loss of the latest step's global batch.",
            |j| j.loss,
        ),
        (
            "shoal_train_samples_per_second",
            "gauge",
            "Global samples per second of the latest step.",
            |j| j.samples_per_s,
        ),
        (
            "shoal_train_step_seconds",
            "gauge",
            "Wall time of the latest step.",
            |j| j.step_ms.map(|m| m / 1e3),
        ),
        (
            "shoal_train_samples_total",
            "counter",
            "Training samples consumed.",
            |j| Some(j.samples as f64),
        ),
        (
            "shoal_train_eval_loss",
            "gauge",
            "Mean held-out loss at the latest evaluation.",
            |j| j.eval.as_ref().map(|e| e.loss),
        ),
        (
            "shoal_train_eval_accuracy",
            "gauge",
            "Held-out accuracy at the latest evaluation (classification: label; arithmetic: exact answer; text: next token).",
            |j| j.eval.as_ref().map(|e| e.accuracy),
        ),
    ];
    for (name, kind, help, get) in families {
        family(o, name, kind, help);
        for j in jobs {
            if let Some(v) = get(j) {
                // Job names are [A-Za-z0-9._-] and runs hex: nothing to escape.
                sample(o, name, &format!("job=\"{}\",run=\"{}\"", j.job, j.run), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{JobReport, JobState};

    #[test]
    fn a_duration_counts_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let h = LatencyHistogram {
            bounds: &[0.01, 0.1, 1.0],
        };
        // A bound is inclusive: a duration equal to it counts in its bucket.
        assert_eq!(h.bucket(0.0), 0);
        assert_eq!(h.bucket(0.01), 0);
        assert_eq!(h.bucket(0.010_000_1), 1);
        assert_eq!(h.bucket(0.1), 1);
        assert_eq!(h.bucket(0.5), 2);
        assert_eq!(h.bucket(1.0), 2);
        // Past the last bound: the overflow bucket.
        assert_eq!(h.bucket(1.000_001), 3);
        assert_eq!(h.bucket(1e9), 3);
        assert_eq!(h.bucket(f64::INFINITY), 3);
    }

    #[test]
    fn recording_fills_per_bucket_counts_and_the_sum() {
        let h = COLLECTIVE_LATENCY;
        // Freshly defaulted counters hold no buckets yet.
        let (mut counts, mut sum) = (Vec::new(), 0.0);
        for took in [0.0005, 0.0006, 5.0, 7.0, 7.0] {
            h.record(&mut counts, &mut sum, took);
        }
        let mut want = vec![0u64; h.bounds.len() + 1];
        want[0] = 1; // 0.0005 s: the first bound, inclusive
        want[1] = 1; // 0.0006 s: up to 1 ms
        want[h.bounds.len() - 1] = 1; // 5 s: the last bound, inclusive
        want[h.bounds.len()] = 2; // 7 s twice: overflow
        assert_eq!(counts, want);
        assert!((sum - 19.0011).abs() < 1e-9, "{sum}");
        // Counts of another length (another layout) start over.
        let mut counts = vec![9; 3];
        h.record(&mut counts, &mut sum, 0.2);
        assert_eq!(counts.iter().sum::<u64>(), 1);
        assert_eq!(counts[h.bucket(0.2)], 1);
        assert_eq!(counts.len(), h.bounds.len() + 1);
    }

    #[test]
    fn exported_histograms_are_cumulative_with_an_inf_bucket() {
        let h = LatencyHistogram {
            bounds: &[0.01, 0.1],
        };
        let (mut counts, mut sum) = (Vec::new(), 0.0);
        for took in [0.005, 0.01, 0.05, 3.0] {
            h.record(&mut counts, &mut sum, took);
        }
        let mut o = String::new();
        histogram(&mut o, "x", h.bounds, &counts, sum);
        assert_eq!(
            o,
            "x_bucket{le=\"0.01\"} 2\nx_bucket{le=\"0.1\"} 3\nx_bucket{le=\"+Inf\"} 4\n\
             x_sum 3.065\nx_count 4\n"
        );
    }

    #[test]
    fn training_runs_are_exported_per_job() {
        let spec = crate::train::job::JobSpec::parse(
            "name = \"digits\"\nsteps = 9\nbatch_size = 4\n[model]\nkind = \"mlp\"\n[data]\nkind = \"csv\"\npath = \"a\"\n",
        )
        .unwrap();
        let mut j = JobReport::new(&spec, 0xab);
        j.state = JobState::Running;
        j.step = 7;
        j.loss = Some(0.25);
        j.samples = 28;
        j.step_ms = Some(12.0);
        let mut o = String::new();
        render_jobs(&mut o, &[j]);
        let labels = "job=\"digits\",run=\"00000000000000ab\"";
        assert!(o.contains("shoal_train_runs{state=\"running\"} 1\n"), "{o}");
        assert!(
            o.contains(&format!("shoal_train_step{{{labels}}} 7\n")),
            "{o}"
        );
        assert!(
            o.contains(&format!("shoal_train_loss{{{labels}}} 0.25\n")),
            "{o}"
        );
        assert!(
            o.contains(&format!("shoal_train_step_seconds{{{labels}}} 0.012\n")),
            "{o}"
        );
        assert!(
            o.contains(&format!("shoal_train_samples_total{{{labels}}} 28\n")),
            "{o}"
        );
        // No evaluation yet: the family is declared but has no sample.
        assert!(!o.contains("shoal_train_eval_loss{"), "{o}");
    }
}
