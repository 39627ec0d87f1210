//! The plan the entry derives for a model, which members it leaves out, and how fast this
//! node computes its stages.
//!
//! Any node plans on its own from the view, the members that hold the model (announced in
//! the last 10 s), their announced memory and start-up speed, and the speed each announced
//! measuring over its own stages of the model ([`SpeedMeter`]; `coordinator_free::pipeline`),
//! so every node derives the same plan from the same view. A plan is re-cut from measured
//! speeds only when the new cut promises `recut_margin` more throughput (the pipeline
//! module's `worth_replanning`). A member a stage call just failed
//! on is suspected and left out for [`SUSPECT_FOR`] or until the view changes; the next
//! request re-plans without it. A plan is kept with the inputs it was made from and reused
//! while they hold, with the replica balance of its requests.

use super::{ServeError, Server, SUSPECT_FOR};
use coordinator_free::pipeline::{self, LayerCost, Plan, PlanConfig, Worker};
use coordinator_free::serving::Balancer;
use coordinator_free::{Capabilities, NodeId, View, ViewHash};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The view as serving sees it, with the members suspected in it (one lock: a suspicion
/// is only meaningful with the view it was raised in).
pub(super) struct ViewState {
    view: View,
    /// Announced capabilities, by member.
    caps: HashMap<NodeId, Capabilities>,
    /// Members a stage call failed on: since when, and in which view.
    suspects: HashMap<NodeId, (Instant, ViewHash)>,
}

impl Default for ViewState {
    /// The empty view of epoch 0, before the event loop sends the first.
    fn default() -> ViewState {
        ViewState {
            view: View::new(0, vec![]),
            caps: HashMap::new(),
            suspects: HashMap::new(),
        }
    }
}

/// A model's current plan as the entry sees it.
pub(super) struct PlanState {
    /// The workers it was made from.
    inputs: Vec<Worker>,
    plan: Plan,
    /// Outstanding requests per replica of `plan`.
    pub(super) balancer: Balancer,
}

impl Server {
    /// The current view and the members' capabilities (from the event loop).
    pub fn set_members(&self, view: View, caps: HashMap<NodeId, Capabilities>) {
        let mut v = self.inner.view.lock().unwrap();
        if v.view.hash != view.hash {
            // Suspicions hold until the view changes.
            v.suspects.retain(|_, (_, h)| *h == view.hash);
        }
        v.view = view;
        v.caps = caps;
    }

    /// The plan for `name` now: members of the view that hold the model and are not
    /// suspected, by announced memory and speed.
    pub(super) fn plan(&self, name: &str) -> Result<Plan, ServeError> {
        let no_plan = |reason: String| ServeError::NoPlan {
            model: name.to_string(),
            reason,
        };
        let (cfg, holders, stages) = {
            let models = self.inner.models.lock().unwrap();
            let e = models
                .get(name)
                .ok_or_else(|| ServeError::UnknownModel(name.to_string()))?;
            // Each holder with the speed it measured (0: none yet).
            let holders: BTreeMap<NodeId, u64> = e
                .holders
                .iter()
                .filter(|(id, t)| **id == self.inner.me || t.elapsed() < Duration::from_secs(10))
                .map(|(id, _)| {
                    let measured = if *id == self.inner.me {
                        e.meter.speed()
                    } else {
                        e.measured.get(id).copied().unwrap_or(0)
                    };
                    (id.clone(), measured)
                })
                .collect();
            (e.cfg.clone(), holders, e.announce.stages)
        };
        let workers = self.workers(&holders);
        if workers.is_empty() {
            return Err(no_plan("no member in the view holds it yet".into()));
        }
        // Plans change with their inputs only: answer from the last one while they hold
        // (this runs for every request).
        if let Some(st) = self.inner.plans.lock().unwrap().get(name) {
            if st.inputs == workers {
                return Ok(st.plan.clone());
            }
        }
        let layers: Vec<LayerCost> = cfg
            .layer_bytes
            .iter()
            .zip(cfg.layer_work())
            .map(|(&bytes, work)| LayerCost { bytes, work })
            .collect();
        let pcfg = PlanConfig {
            min_stages: stages as usize,
            ..PlanConfig::default()
        };
        let plan = pipeline::plan(&layers, &workers, pcfg).map_err(|e| no_plan(e.to_string()))?;
        let mut plans = self.inner.plans.lock().unwrap();
        let st = plans.entry(name.to_string()).or_insert_with(|| PlanState {
            inputs: Vec::new(),
            plan: plan.clone(),
            balancer: Balancer::new(plan.replicas.len()),
        });
        // Keep the plan serving unless the view changed its members or the new cut is
        // enough faster; keep the balancer while the plan is unchanged.
        if st.plan != plan
            && pipeline::worth_replanning(&st.plan, &plan, &layers, &workers, pcfg.recut_margin)
        {
            tracing::info!(model = name, from = ?st.plan.replicas, to = ?plan.replicas, "re-planned");
            st.plan = plan;
            st.balancer.reset(st.plan.replicas.len());
        }
        st.inputs = workers;
        Ok(st.plan.clone())
    }

    /// The members of the view among `holders` that are not suspected, as workers (their
    /// serving budget, [`budget`], their start-up speed and the speed they measured
    /// serving the model), sorted by id.
    fn workers(&self, holders: &BTreeMap<NodeId, u64>) -> Vec<Worker> {
        let v = self.inner.view.lock().unwrap();
        let mut workers: Vec<Worker> = v
            .view
            .ids()
            .filter(|id| holders.contains_key(id))
            .filter(|id| {
                v.suspects
                    .get(*id)
                    .is_none_or(|(t, _)| t.elapsed() >= SUSPECT_FOR)
            })
            .map(|id| {
                let c = v.caps.get(id);
                Worker {
                    id: id.clone(),
                    free_bytes: c.map_or(0, budget),
                    speed: f64::from(c.map_or(0, |c| c.speed_mflops).max(1)),
                    measured: holders[id] as f64,
                }
            })
            .collect();
        drop(v);
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        workers
    }

    /// Leaves `member` out of plans for [`SUSPECT_FOR`] or until the view changes (never
    /// this node itself).
    pub(super) fn suspect(&self, member: &NodeId) {
        if *member == self.inner.me {
            return;
        }
        let mut v = self.inner.view.lock().unwrap();
        let view = v.view.hash;
        v.suspects.insert(member.clone(), (Instant::now(), view));
    }

    /// Whether `replica` is no longer in the model's plan.
    pub(super) fn replica_gone(&self, model: &str, replica: &[pipeline::Stage]) -> bool {
        match self.plan(model) {
            Ok(p) => !p.replicas.iter().any(|r| r.as_slice() == replica),
            Err(_) => true,
        }
    }
}

/// How fast this node computes its stages of one model: the planner's work units (the
/// layers' decode work) per second over its stage calls, as sums of work and seconds that
/// are both halved whenever the seconds pass [`SpeedMeter::WINDOW_S`], so the last half
/// minute or so counts most. Prefill calls count too, at the same work per call as a
/// decode: every stage of a pipeline sees the same calls, so equal speeds × work means
/// equal busy time over the real mix of prompts and tokens (a prefill costs blocks far
/// more than the vocabulary head, which computes only the last position).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct SpeedMeter {
    work: f64,
    secs: f64,
}

impl SpeedMeter {
    /// Seconds of calls after which older calls count half. Default: 30.
    const WINDOW_S: f64 = 30.0;
    /// Seconds of calls before a speed is announced. Default: 1.
    const MIN_S: f64 = 1.0;

    /// Counts a call that computed `work` in `secs`.
    pub(super) fn record(&mut self, work: f64, secs: f64) {
        if !(work.is_finite() && secs.is_finite() && work >= 0.0 && secs > 0.0) {
            return;
        }
        self.work += work;
        self.secs += secs;
        if self.secs > Self::WINDOW_S {
            self.work /= 2.0;
            self.secs /= 2.0;
        }
    }

    /// Work per second, rounded down to two significant digits (so that jitter below
    /// 1-10% does not change the planner's inputs); 0 before [`Self::MIN_S`] of calls.
    pub(super) fn speed(&self) -> u64 {
        if self.secs < Self::MIN_S {
            return 0;
        }
        crate::capabilities::round_down2((self.work / self.secs) as u64)
    }
}

/// The memory a member offers serving: the free memory of its compute device when it
/// announced it (a CUDA device's free memory, the CPU's available memory), else half its
/// RAM (the rest for everything else).
fn budget(c: &coordinator_free::Capabilities) -> u64 {
    if c.device_free_bytes > 0 {
        c.device_free_bytes
    } else {
        c.ram_bytes / 2
    }
}

#[cfg(test)]
mod tests {
    use super::SpeedMeter;
    use coordinator_free::Capabilities;

    #[test]
    fn the_meter_weighs_recent_calls_most_and_waits_for_a_second_of_them() {
        let mut m = SpeedMeter::default();
        m.record(4_000.0, 0.5);
        assert_eq!(m.speed(), 0, "half a second is not enough");
        m.record(4_000.0, 0.5);
        assert_eq!(m.speed(), 8_000);
        m.record(f64::NAN, 1.0);
        m.record(1.0, 0.0);
        assert_eq!(m.speed(), 8_000, "nonsense is not counted");
        // The member slows to half: after a few windows the speed is close to the new one.
        for _ in 0..120 {
            m.record(2_000.0, 0.5);
        }
        assert_eq!(m.speed(), 4_000);
        // Rounded to two digits.
        let mut m = SpeedMeter::default();
        m.record(123_456.0, 1.0);
        assert_eq!(m.speed(), 120_000);
    }

    #[test]
    fn the_budget_is_the_device_free_memory_when_known() {
        let mut c = Capabilities {
            ram_bytes: 64 << 30,
            device: "cuda:0".into(),
            device_free_bytes: 139 << 30,
            ..Default::default()
        };
        assert_eq!(super::budget(&c), 139 << 30);
        c.device_free_bytes = 0;
        assert_eq!(super::budget(&c), 32 << 30);
    }
}
