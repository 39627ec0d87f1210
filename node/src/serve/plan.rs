//! The plan the entry derives for a model, and which members it leaves out.
//!
//! Any node plans on its own from the view, the members that hold the model (announced in
//! the last 10 s) and their announced memory and speed (`coordinator_free::pipeline`), so
//! every node derives the same plan from the same view. A member a stage call just failed
//! on is suspected and left out for [`SUSPECT_FOR`] or until the view changes; the next
//! request re-plans without it. A plan is kept with the inputs it was made from and reused
//! while they hold, with the replica balance of its requests.

use super::{ServeError, Server, SUSPECT_FOR};
use coordinator_free::pipeline::{self, LayerCost, Plan, PlanConfig, Worker};
use coordinator_free::serving::Balancer;
use coordinator_free::{Capabilities, NodeId, View, ViewHash};
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
            let holders: Vec<NodeId> = e
                .holders
                .iter()
                .filter(|(id, t)| **id == self.inner.me || t.elapsed() < Duration::from_secs(10))
                .map(|(id, _)| id.clone())
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
        st.inputs = workers;
        // Keep the balancer while the plan is unchanged.
        if st.plan != plan {
            st.plan = plan.clone();
            st.balancer.reset(plan.replicas.len());
        }
        Ok(plan)
    }

    /// The members of the view among `holders` that are not suspected, as workers (their
    /// serving budget, [`budget`], and their speed), sorted by id.
    fn workers(&self, holders: &[NodeId]) -> Vec<Worker> {
        let v = self.inner.view.lock().unwrap();
        let mut workers: Vec<Worker> = v
            .view
            .ids()
            .filter(|id| holders.contains(id))
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
    use coordinator_free::Capabilities;

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
