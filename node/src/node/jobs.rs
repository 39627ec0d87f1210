//! The job registry: the training jobs this node takes part in (submitted here or learned
//! from an announcement), each on its own trainer thread, re-announced while it runs so
//! members that missed it (or join later) learn it.

use super::event_loop::EventLoop;
use crate::train::job::JobSpec;
use crate::train::{JobReport, JobState};
use coordinator_free::ControlMessage;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// Finished jobs kept in the status report.
const MAX_FINISHED_JOBS: usize = 16;

/// A job this node runs.
struct JobEntry {
    /// The announcement, re-published while the job runs.
    announce: Vec<u8>,
    report: Arc<Mutex<JobReport>>,
    perturb: Arc<AtomicU8>,
}

impl JobEntry {
    /// The job's report as of now.
    fn report(&self) -> JobReport {
        self.report.lock().expect("report lock").clone()
    }

    /// Whether the job is still waiting or running.
    fn live(&self) -> bool {
        matches!(
            self.report.lock().expect("report lock").state,
            JobState::Waiting | JobState::Running
        )
    }
}

/// The jobs this node runs, by run id, oldest first: every live one and at most
/// [`MAX_FINISHED_JOBS`] in all.
#[derive(Default)]
pub(super) struct JobRegistry {
    jobs: Vec<(u64, JobEntry)>,
}

impl JobRegistry {
    fn get(&self, run: u64) -> Option<&JobEntry> {
        self.jobs.iter().find(|(r, _)| *r == run).map(|(_, e)| e)
    }

    /// Adds a job, then forgets the oldest finished jobs beyond [`MAX_FINISHED_JOBS`].
    fn insert(&mut self, run: u64, entry: JobEntry) {
        self.jobs.push((run, entry));
        while self.jobs.len() > MAX_FINISHED_JOBS {
            let Some(i) = self.jobs.iter().position(|(_, e)| {
                matches!(
                    e.report.lock().expect("report lock").state,
                    JobState::Done | JobState::Failed
                )
            }) else {
                break;
            };
            self.jobs.remove(i);
        }
    }

    /// The announcements of the jobs still waiting or running.
    fn live_announcements(&self) -> Vec<Vec<u8>> {
        self.jobs
            .iter()
            .filter(|(_, e)| e.live())
            .map(|(_, e)| e.announce.clone())
            .collect()
    }

    /// Every job's report, oldest first.
    pub(super) fn reports(&self) -> Vec<JobReport> {
        self.jobs.iter().map(|(_, e)| e.report()).collect()
    }

    /// Debug: asks run `run` (16 hex digits) to perturb its next step in the way `kind`
    /// says ([`crate::train::PERTURB_WEIGHTS`] and its siblings); false if no such run.
    pub(super) fn perturb(&self, run: &str, kind: u8) -> bool {
        let found = self.jobs.iter().find(|(r, _)| format!("{r:016x}") == run);
        if let Some((_, e)) = found {
            e.perturb.store(kind, Ordering::SeqCst);
        }
        found.is_some()
    }
}

impl coordinator_free::gossip::Jobs for JobRegistry {
    type Spec = JobSpec;

    fn knows(&self, run: u64) -> bool {
        self.get(run).is_some()
    }

    fn parse(&self, spec: &str) -> Result<JobSpec, String> {
        JobSpec::parse(spec).map_err(|e| e.to_string())
    }
}

impl EventLoop {
    /// Starts a job on a trainer thread (once per run id) and announces it.
    pub(super) fn start_job(
        &mut self,
        spec: JobSpec,
        run: u64,
        resume: bool,
    ) -> Result<JobReport, String> {
        if let Some(e) = self.jobs.get(run) {
            return Ok(e.report());
        }
        let msg = ControlMessage::Job {
            run,
            resume,
            spec: spec.to_toml(),
        };
        let announce = msg.encode().map_err(|e| e.to_string())?;
        let report = Arc::new(Mutex::new(JobReport::new(&spec, run)));
        let perturb = Arc::new(AtomicU8::new(0));
        let ctx = crate::train::TrainContext {
            job: spec,
            run,
            resume,
            me: self.membership.me().clone(),
            dp: self.data_plane.clone(),
            views: self.views_tx.subscribe(),
            view_failed: self.view_failed_tx.clone(),
            rt: tokio::runtime::Handle::current(),
            node: self.handle.clone(),
            node_device: self.cfg.device,
            report: report.clone(),
            perturb: perturb.clone(),
        };
        let name = format!("train-{run:016x}");
        std::thread::Builder::new()
            .name(name)
            .spawn(move || crate::train::run(ctx))
            .map_err(|e| format!("cannot start the trainer thread: {e}"))?;
        tracing::info!(job = %report.lock().expect("report lock").job, run = format!("{run:016x}"), resume, "job started");
        let first = report.lock().expect("report lock").clone();
        self.jobs.insert(
            run,
            JobEntry {
                announce,
                report,
                perturb,
            },
        );
        self.announce_jobs();
        Ok(first)
    }

    /// Re-publishes the announcement of every job still waiting or running.
    pub(super) fn announce_jobs(&mut self) {
        for announce in self.jobs.live_announcements() {
            let _ = self.publish(announce);
        }
    }
}
