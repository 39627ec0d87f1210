//! One member's training: its state ([`Trainer`]) and the loop that drives the core's
//! `coordinator_free::training` machine. The machine decides what comes next (wait for a
//! view, exchange progress, sync state, run a step, finish); this loop does it with the
//! data plane and tch and reports the outcome back. After each committed step the view's
//! first member writes the step's line, and every member evaluates, checkpoints and
//! compares weights on the job's schedule (`eval_every`, `checkpoint_every`,
//! `consistency_every`, and always after the last step).
//!
//! A DiLoCo job (`[sync] kind = "diloco"`) runs the loop of `outer` instead, which drives
//! `coordinator_free::outer_round`; the actions both machines share (waiting for a view,
//! the progress exchange, the sync) are handled here for both ([`Turn`]).

use super::collective::{collective_failed, StepError, StepFailure};
use super::data::Dataset;
use super::job::JobSpec;
use super::model::Model;
use super::optim::Optimizer;
use super::phases::PhaseClock;
use super::report::{RunLog, SamplesLog, StepRecord};
use super::step::StepDone;
use super::trace::TraceLog;
use super::{JobReport, JobState, TrainContext, TrainError};
use super::{CHECKPOINT_FILE, REJOIN_TIMEOUT, START_TIMEOUT};
use coordinator_free::sharding::{self, DataCursor};
use coordinator_free::training::{Action, Progress, RoundMachine, Training, TrainingPlan};
use coordinator_free::{View, ViewHash};
use std::time::Instant;
use tch::Tensor;

/// A member's training state: the job's data, model and optimizer, and its progress.
pub(super) struct Trainer {
    /// What the node handed over (job, data plane, views, report, debug faults).
    pub(super) ctx: TrainContext,
    /// The job's data.
    pub(super) data: Dataset,
    /// The model.
    pub(super) model: Model,
    /// The model's trainable parameters, sorted by name (the order every member flattens
    /// them in).
    pub(super) params: Vec<(String, Tensor)>,
    /// The optimizer over `params`.
    pub(super) opt: Optimizer,
    /// Steps committed.
    pub(super) step: u64,
    /// Where the next step's batch starts in the data epoch's order.
    pub(super) cursor: DataCursor,
    /// Steps in the job.
    pub(super) total_steps: u64,
    /// The data epoch's sample order, cached: (data epoch, order).
    pub(super) order: Option<(u64, Vec<u64>)>,
    /// The run's log, opened when this member first writes as the view's first member.
    pub(super) log: Option<RunLog>,
    /// When training started (after the members first gathered).
    pub(super) started: Instant,
    /// The run's part of every collective tag (job and run).
    pub(super) tag_base: u64,
    /// This member's key in the views' backend choice (see `backend`).
    pub(super) device_key: u64,
    /// The backend of the current view's gradient all-reduce, and its NCCL communicator.
    pub(super) backends: super::backend::Backends,
    /// This member's `samples.<member>.jsonl` when the job asks for it (`log_samples`),
    /// opened when training starts.
    pub(super) samples: Option<SamplesLog>,
    /// DiLoCo's state beside the working weights (θ_global, the outer momentum, the
    /// committed inner optimizer state); `None` in synchronous training.
    pub(super) outer: Option<super::outer::Outer>,
    /// Each trainable parameter's place in the flat gradient, and the backward stage that
    /// completes it (`Model::backward_staged`), in `params` order.
    pub(super) stage_parts: Vec<(super::model::Stage, std::ops::Range<usize>)>,
    /// Error feedback of compressed synchronous gradients: what this member's encodings
    /// lost in the last committed step (added to the next step's gradient), and what the
    /// round in flight loses (committed with its step). Empty until a compressed round
    /// runs; not checkpointed (a resumed member starts from zeros).
    pub(super) residual: Vec<f32>,
    /// See `residual`.
    pub(super) residual_next: Vec<f32>,
    /// The phases of the step (or outer round) under way.
    pub(super) phases: PhaseClock,
    /// This member's `trace.<member>.jsonl`, opened when training starts.
    pub(super) trace: Option<TraceLog>,
}

/// What the loop carries from one turn to the next.
#[derive(Default)]
pub(super) struct Turn {
    /// Whether the members have gathered once (training started).
    started: bool,
    /// The view whose collective failed, to wait past.
    pub(super) failed_view: Option<ViewHash>,
}

impl Trainer {
    /// Loads the job's data, builds its model and optimizer.
    pub(super) fn new(ctx: TrainContext) -> Result<Trainer, TrainError> {
        let job = &ctx.job;
        tch::set_num_threads(job.threads as i32);
        let data = Dataset::load(job)?;
        let device = match job.device {
            crate::device::DeviceSpec::Auto => ctx.node_device,
            spec => spec.resolve()?,
        };
        let model = Model::build(job, data.task, job.seed, device, job.precision)?;
        let params = model.params();
        let opt = Optimizer::new(&job.optimizer, &params)?;
        let outer = job
            .sync
            .outer()
            .map(|c| super::outer::Outer::new(c, opt.numel()));
        let total_steps = match (job.steps, job.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * sharding::steps_per_epoch(data.train_len(), job.batch_size),
            (None, None) => unreachable!("validated"),
        };
        tracing::info!(job = %job.name, params = model.numel(), train = data.train_len(),
            device = %crate::device::name(device), precision = ?job.precision,
            held_out = data.eval_len(), total_steps, "job loaded");
        let tag_base = job.tag_base() ^ ctx.run;
        let mut at = 0;
        let stage_parts = params
            .iter()
            .map(|(name, t)| {
                let r = at..at + t.numel();
                at = r.end;
                (super::model::Stage::of(name), r)
            })
            .collect();
        {
            let mut r = ctx.report.lock().expect("report lock");
            r.total_steps = total_steps;
            r.device = crate::device::name(device);
        }
        Ok(Trainer {
            ctx,
            data,
            model,
            params,
            opt,
            step: 0,
            cursor: DataCursor::default(),
            total_steps,
            order: None,
            log: None,
            started: Instant::now(),
            tag_base,
            device_key: super::backend::device_key(device),
            backends: Default::default(),
            samples: None,
            outer,
            stage_parts,
            residual: Vec::new(),
            residual_next: Vec::new(),
            phases: PhaseClock::default(),
            trace: None,
        })
    }

    /// The job.
    pub(super) fn job(&self) -> &JobSpec {
        &self.ctx.job
    }

    /// Whether this member is `view`'s first (the one that writes the run's files).
    pub(super) fn am_first(&self, view: &View) -> bool {
        view.ids().next() == Some(&self.ctx.me)
    }

    /// Runs the job to its last step (or the first fatal error).
    pub(super) fn run(&mut self) -> Result<(), TrainError> {
        if self.ctx.resume {
            // Any member holding the checkpoint resumes from it; the sync hands its state
            // to the others (the member with the most steps is the root).
            let path = self.job().run_dir().join(CHECKPOINT_FILE);
            if path.exists() {
                self.load_checkpoint()?;
            }
        }
        let (dir, me) = (self.job().run_dir(), self.ctx.me.clone());
        self.trace = Some(TraceLog::open(&dir, me.as_str(), self.ctx.resume)?);
        if self.outer.is_some() {
            self.run_outer()?;
        } else {
            self.run_steps()?;
        }
        if let Some(log) = self.log.as_mut() {
            log.finish(&format!("{} — loss", self.ctx.job.name))?;
            // Every member wrote its last step before the final weights comparison (a
            // collective), so their files are complete here.
            if let Err(e) = super::trace::assemble(&dir) {
                tracing::warn!("cannot write {}: {e}", dir.join("trace.json").display());
            }
        }
        Ok(())
    }

    /// Synchronous training: drives the core's `Training` to the last step.
    fn run_steps(&mut self) -> Result<(), TrainError> {
        let mut machine = self.machine();
        self.samples = self.samples_log()?;
        let mut turn = Turn::default();
        loop {
            self.observe_view(&mut machine);
            match machine.poll_action()? {
                Action::Finished => return Ok(()),
                Action::WaitForView => self.wait_for_view(&mut machine, &mut turn)?,
                Action::ExchangeProgress { view } => {
                    self.exchange(&mut machine, &mut turn, &view)?
                }
                Action::Sync {
                    view,
                    root,
                    root_rank,
                    progress,
                } => self.sync(&mut machine, &mut turn, &view, &root, root_rank, progress)?,
                Action::Step {
                    view,
                    step,
                    batch,
                    ranges,
                    weights,
                    coverage,
                } => {
                    self.maybe_perturb(step);
                    debug_assert_eq!(step, self.step, "the step in flight follows the last");
                    match self.train_step(&view, &batch, &ranges, &weights, &coverage) {
                        Ok(done) => self.committed(&mut machine, &view, step, &batch, done)?,
                        Err(StepError::Fatal(e)) => return Err(e),
                        Err(StepError::Failed(e)) => {
                            // The samples log has this member's line written ahead.
                            self.trace_unit(&view, step + 1, false, None)?;
                            turn.failed_view = Some(self.redo(&mut machine, &view, step, e)?)
                        }
                    }
                }
            }
        }
    }

    /// Top of a turn: a settled view other than the one the machine holds restarts the
    /// exchange (between steps or inner steps, so work in a dead view stops early).
    pub(super) fn observe_view(&self, machine: &mut impl RoundMachine) {
        let s = self.ctx.views.borrow();
        if s.settled {
            machine.handle_view(&s.view);
        }
    }

    /// The machine waits for a usable view: the first bounded by [`START_TIMEOUT`], later
    /// ones by [`REJOIN_TIMEOUT`], and one other than a view that just failed.
    pub(super) fn wait_for_view(
        &mut self,
        machine: &mut impl RoundMachine,
        turn: &mut Turn,
    ) -> Result<(), TrainError> {
        let min = self.job().min_nodes;
        let bound = if turn.started {
            REJOIN_TIMEOUT
        } else {
            START_TIMEOUT
        };
        let view = self.next_view(min, turn.failed_view.take(), bound)?;
        machine.handle_view(&view);
        Ok(())
    }

    /// The machine asks for the progress exchange on `view` (the first one starts the
    /// job's clock).
    pub(super) fn exchange(
        &mut self,
        machine: &mut impl RoundMachine,
        turn: &mut Turn,
        view: &View,
    ) -> Result<(), TrainError> {
        if !turn.started {
            turn.started = true;
            self.started = Instant::now();
            self.set_report(|r| r.state = JobState::Running);
        }
        match self.exchange_progress(view, machine.progress()) {
            Ok(all) => machine.handle_progress(view.hash, &all)?,
            Err(e) => turn.failed_view = Some(collective_failed(machine, view, "exchange", e)),
        }
        Ok(())
    }

    /// The machine asks for a sync on `view` from `root`.
    pub(super) fn sync(
        &mut self,
        machine: &mut impl RoundMachine,
        turn: &mut Turn,
        view: &View,
        root: &coordinator_free::NodeId,
        root_rank: u32,
        progress: Progress,
    ) -> Result<(), TrainError> {
        if let Some(failed) = self.on_sync(machine, view, root, root_rank, progress)? {
            turn.failed_view = Some(failed);
        }
        Ok(())
    }

    /// The job's plan as the core's machines take it.
    pub(super) fn plan(&self) -> TrainingPlan {
        TrainingPlan {
            min_nodes: self.job().min_nodes,
            total_steps: self.total_steps,
            batch_size: self.job().batch_size,
            n_samples: self.data.train_len(),
            shard_size: self.job().shard_size,
            balance: self.job().balance,
        }
    }

    /// This member's committed progress.
    pub(super) fn progress(&self) -> Progress {
        Progress {
            step: self.step,
            cursor: self.cursor,
        }
    }

    /// The core's training machine for this job, starting from this member's progress.
    fn machine(&self) -> Training {
        Training::new(self.ctx.me.clone(), self.plan(), self.progress())
    }

    /// This member's record of the sample ids it uses, when the job asks for one
    /// (`log_samples`).
    pub(super) fn samples_log(&self) -> Result<Option<SamplesLog>, TrainError> {
        if !self.job().log_samples {
            return Ok(None);
        }
        Ok(Some(SamplesLog::open(
            &self.job().run_dir(),
            self.ctx.me.as_str(),
            self.ctx.resume,
        )?))
    }

    /// Step `step` committed on `view`: tells the machine, then logs, evaluates,
    /// checkpoints and compares weights as the job's schedule asks.
    fn committed(
        &mut self,
        machine: &mut Training,
        view: &View,
        step: u64,
        batch: &sharding::StepBatch,
        (record, ids, speeds): StepDone,
    ) -> Result<(), TrainError> {
        machine.handle_speeds(view.hash, step, &speeds);
        machine.handle_step(view.hash, step, true);
        debug_assert_eq!(machine.progress().step, self.step);
        if let Some(f) = self.samples.as_mut() {
            f.append(record.step, batch.cursor.epoch, &ids, view, true)?;
        }
        self.trace_unit(view, record.step, true, Some(&record))?;
        self.log_step(view, &record)?;
        self.scheduled(view, step)
    }

    /// After a commit on `view` that moved this member from step `before` to `self.step`:
    /// evaluates, checkpoints and compares weights where the job's schedule has one due
    /// (a multiple of its period passed, or the last step).
    pub(super) fn scheduled(&mut self, view: &View, before: u64) -> Result<(), TrainError> {
        let first = self.am_first(view);
        let last = self.step == self.total_steps;
        let now = self.step;
        let due = |every: u64| last || (every > 0 && now / every > before / every);
        let (eval_due, ckpt_due) = (due(self.job().eval_every), due(self.job().checkpoint_every));
        let consistency_due = due(self.job().consistency_every);
        let args = serde_json::json!({"step": now});
        if eval_due {
            let t = Instant::now();
            self.evaluate_logged(view, first, last)?;
            self.trace_span("eval", t, &args)?;
        }
        if first && ckpt_due {
            let t = Instant::now();
            self.save_checkpoint()?;
            self.trace_span("checkpoint", t, &args)?;
        }
        if consistency_due {
            let t = Instant::now();
            self.check_consistency(view)?;
            self.trace_span("consistency", t, &args)?;
        }
        Ok(())
    }

    /// Step `step` failed on `view` (`e`): tells the machine, which redoes it in the next
    /// view, and records the redo. Returns the failed view.
    fn redo(
        &mut self,
        machine: &mut Training,
        view: &View,
        step: u64,
        e: StepFailure,
    ) -> Result<ViewHash, TrainError> {
        tracing::warn!(
            step,
            epoch = view.epoch,
            "step failed ({e}); it is redone in the next view"
        );
        machine.handle_step(view.hash, step, false);
        self.set_report(|r| r.redone += 1);
        self.event(
            view,
            serde_json::json!({"event": "redo", "step": step,
            "view_epoch": view.epoch, "error": e.to_string()}),
        )?;
        Ok(view.hash)
    }

    /// The run's log, opened on first use (appending after step 0: a resumed run or a
    /// member that became the view's first member mid-run).
    pub(super) fn run_log(&mut self) -> Result<&mut RunLog, TrainError> {
        if self.log.is_none() {
            self.log = Some(RunLog::open(&self.job().run_dir(), self.step > 0)?);
        }
        Ok(self.log.as_mut().expect("just opened"))
    }

    /// Writes a step line when this member is the view's first.
    fn log_step(&mut self, view: &View, record: &StepRecord) -> Result<(), TrainError> {
        if self.am_first(view) {
            self.run_log()?.step(record)?;
        }
        Ok(())
    }

    /// Appends step `step` (1-based) on `view` to this member's trace, with its phases:
    /// committed (with its `record`) or failed here (lasting until now).
    fn trace_unit(
        &mut self,
        view: &View,
        step: u64,
        committed: bool,
        record: Option<&StepRecord>,
    ) -> Result<(), TrainError> {
        let Some(t) = self.trace.as_mut() else {
            return Ok(());
        };
        let dur = match record {
            Some(r) => std::time::Duration::from_secs_f64(r.step_ms / 1e3),
            None => self.phases.started().elapsed(),
        };
        let mut args = serde_json::json!({"step": step, "committed": committed,
            "step_ms": dur.as_secs_f64() * 1e3, "members": view.len(), "view_epoch": view.epoch});
        if let Some(r) = record {
            args["loss"] = serde_json::json!(r.loss);
            args["phases"] = serde_json::json!(r.phases);
        }
        let name = format!("step {step}");
        t.unit((&name, "step"), dur, args, ("step", step), &self.phases)?;
        Ok(())
    }

    /// DiLoCo: appends outer round `round` (1-based) on `view` to this member's trace, with
    /// its inner steps and phases: committed (with its `record`) or failed here.
    pub(super) fn trace_round(
        &mut self,
        view: &View,
        round: u64,
        committed: bool,
        record: Option<&super::report::RoundRecord>,
    ) -> Result<(), TrainError> {
        let Some(t) = self.trace.as_mut() else {
            return Ok(());
        };
        let dur = match record {
            Some(r) => std::time::Duration::from_secs_f64(r.round_ms / 1e3),
            None => self.phases.started().elapsed(),
        };
        let mut args = serde_json::json!({"outer_round": round, "committed": committed,
            "round_ms": dur.as_secs_f64() * 1e3, "members": view.len(), "view_epoch": view.epoch});
        if let Some(r) = record {
            args["step"] = serde_json::json!(r.step);
            args["loss"] = serde_json::json!(r.loss);
            args["phases"] = serde_json::json!(r.phases);
        }
        let name = format!("round {round}");
        t.unit(
            (&name, "round"),
            dur,
            args,
            ("outer_round", round),
            &self.phases,
        )?;
        Ok(())
    }

    /// Appends a span of work between steps (`eval`, `checkpoint`, ...) from `start` to
    /// now to this member's trace.
    pub(super) fn trace_span(
        &mut self,
        name: &str,
        start: Instant,
        args: &serde_json::Value,
    ) -> Result<(), TrainError> {
        if let Some(t) = self.trace.as_mut() {
            t.span((name, "schedule"), start, args.clone())?;
        }
        Ok(())
    }

    /// Writes an event line (sync, redo) when this member is the view's first.
    pub(super) fn event(&mut self, view: &View, line: serde_json::Value) -> Result<(), TrainError> {
        if self.am_first(view) {
            self.run_log()?.event(&line)?;
        }
        Ok(())
    }

    /// Publishes progress: applies `f` to the job's report and updates its wall time.
    pub(super) fn set_report(&self, f: impl FnOnce(&mut JobReport)) {
        let mut r = self.ctx.report.lock().expect("report lock");
        f(&mut r);
        r.wall_s = self.started.elapsed().as_secs_f64();
    }
}
