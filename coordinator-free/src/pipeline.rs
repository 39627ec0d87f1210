//! Pipeline partition plans for serving: which member holds which contiguous layers, and how
//! many replica pipelines the view supports.
//!
//! Input: per-layer costs (bytes to hold the layer and its KV cache budget; work per token)
//! and per-member free memory and measured speed. Output: replicas, each a chain of stages.
//! - Members are taken fastest first (ties by id), and a replica is the shortest run of them
//!   whose memory holds the model with `headroom`; replicas are formed while members remain,
//!   so a view with room for several copies serves from several pipelines.
//! - Within a replica the layers are cut so that each stage's work is proportional to its
//!   member's speed (equal stage times make the pipeline's throughput the sum of its
//!   members'), never placing more bytes on a member than it has free; every stage gets at
//!   least one layer.
//!
//! The plan is a pure function of its inputs, so every member computes the same one.

use crate::view::NodeId;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// What one layer costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerCost {
    /// Bytes to hold it (weights plus its KV-cache budget).
    pub bytes: u64,
    /// Work per token (any unit, the same for every layer).
    pub work: u64,
}

/// A member that can hold stages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    /// The member.
    pub id: NodeId,
    /// Memory it can give to layers, in bytes.
    pub free_bytes: u64,
    /// Measured speed (work per second, any unit; > 0).
    pub speed: f64,
}

/// Contiguous layers on one member.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Stage {
    /// The member.
    pub member: NodeId,
    /// Its layers.
    pub layers: Range<usize>,
}

/// The plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Replica pipelines, each its stages in layer order.
    pub replicas: Vec<Vec<Stage>>,
    /// Members left out (too little memory left for another whole replica).
    pub spare: Vec<NodeId>,
}

/// Planner settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlanConfig {
    /// A replica's members must hold this fraction more than the model. Default: 0.1.
    pub headroom: f64,
    /// Most replicas to build. Default: 8.
    pub max_replicas: usize,
    /// Fewest stages per replica (pipeline depth), even when fewer members would hold
    /// the model; capped at the number of layers. Default: 1.
    pub min_stages: usize,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            headroom: 0.1,
            max_replicas: 8,
            min_stages: 1,
        }
    }
}

/// Why no plan exists.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The model has no layers.
    #[error("the model has no layers")]
    NoLayers,
    /// No member can hold a stage (none, or none with positive speed and memory).
    #[error("no member can hold a stage")]
    NoWorkers,
    /// All members together cannot hold the model.
    #[error("the model needs {need} bytes; the members have {have} free")]
    TooLarge {
        /// Bytes the model needs (with headroom).
        need: u64,
        /// Bytes free on all usable members.
        have: u64,
    },
}

/// Plans replicas and stages for `layers` over `workers`.
pub fn plan(layers: &[LayerCost], workers: &[Worker], cfg: PlanConfig) -> Result<Plan, PlanError> {
    if layers.is_empty() {
        return Err(PlanError::NoLayers);
    }
    let mut pool: Vec<&Worker> = workers
        .iter()
        .filter(|w| w.free_bytes > 0 && w.speed.is_finite() && w.speed > 0.0)
        .collect();
    if pool.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    pool.sort_by(|a, b| b.speed.total_cmp(&a.speed).then_with(|| a.id.cmp(&b.id)));
    let model: u64 = layers.iter().map(|l| l.bytes).sum();
    let need = (model as f64 * (1.0 + cfg.headroom.max(0.0))).ceil() as u64;
    let mut replicas = Vec::new();
    let mut rest: &[&Worker] = &pool;
    while replicas.len() < cfg.max_replicas.max(1) && !rest.is_empty() {
        // The shortest run of the fastest remaining members that holds the model, and can
        // be cut into stages that fit.
        let mut found = None;
        let mut have = 0u64;
        let depth = cfg.min_stages.clamp(1, layers.len());
        for k in 1..=rest.len() {
            have = have.saturating_add(rest[k - 1].free_bytes);
            if have >= need && k >= depth {
                if let Some(stages) = cut(layers, &rest[..k]) {
                    found = Some((k, stages));
                    break;
                }
            }
        }
        let Some((k, stages)) = found else {
            break;
        };
        replicas.push(stages);
        rest = &rest[k..];
    }
    if replicas.is_empty() {
        return Err(PlanError::TooLarge {
            need,
            have: pool.iter().map(|w| w.free_bytes).sum(),
        });
    }
    let mut spare: Vec<NodeId> = rest.iter().map(|w| w.id.clone()).collect();
    spare.sort();
    Ok(Plan { replicas, spare })
}

/// Cuts `layers` into one contiguous stage per member of `group` (in order), each stage's
/// work proportional to its member's speed and its bytes within the member's memory.
fn cut(layers: &[LayerCost], group: &[&Worker]) -> Option<Vec<Stage>> {
    if layers.len() < group.len() {
        return None;
    }
    let total_work: f64 = layers.iter().map(|l| l.work as f64).sum::<f64>().max(1.0);
    let total_speed: f64 = group.iter().map(|w| w.speed).sum();
    let mut stages = Vec::with_capacity(group.len());
    let mut start = 0usize;
    let mut target = 0.0f64;
    let mut done_work = 0.0f64;
    for (i, w) in group.iter().enumerate() {
        let left_members = group.len() - i - 1;
        target += total_work * w.speed / total_speed;
        let mut end = start;
        let mut bytes = 0u64;
        // At least one layer; stop at the work target or the memory; leave one layer for
        // every later member; the last member takes the rest.
        while end < layers.len() - left_members {
            let l = layers[end];
            if bytes + l.bytes > w.free_bytes {
                break;
            }
            let after = done_work + l.work as f64;
            if end > start && left_members > 0 && (after - target) > (target - done_work) {
                break;
            }
            bytes += l.bytes;
            done_work = after;
            end += 1;
        }
        if end == start {
            return None;
        }
        stages.push(Stage {
            member: w.id.clone(),
            layers: start..end,
        });
        start = end;
    }
    (start == layers.len()).then_some(stages)
}

/// How many micro-batches (lanes) an entry keeps in flight through a replica of `stages`
/// stages: one for a single stage (a second would only halve each request's speed: a
/// larger batch costs about the same call), `stages + 1` for a pipeline. With one
/// micro-batch per stage, every stage idles while a micro-batch travels between stages and
/// back through the entry (logits sampled, the next tokens sent); the extra one is already
/// waiting at the stage that comes free.
pub fn lanes(stages: usize) -> usize {
    match stages {
        0 | 1 => 1,
        k => k + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_keeps_one_micro_batch_more_than_its_stages() {
        assert_eq!([0, 1, 2, 3].map(lanes), [1, 1, 3, 4]);
    }

    fn w(id: &str, gib: u64, speed: f64) -> Worker {
        Worker {
            id: NodeId::new(id).unwrap(),
            free_bytes: gib << 30,
            speed,
        }
    }

    fn layers(n: usize, gib_each: u64) -> Vec<LayerCost> {
        vec![
            LayerCost {
                bytes: gib_each << 30,
                work: 100,
            };
            n
        ]
    }

    fn check(p: &Plan, layers: &[LayerCost], workers: &[Worker]) {
        for r in &p.replicas {
            assert_eq!(r.first().unwrap().layers.start, 0);
            assert_eq!(r.last().unwrap().layers.end, layers.len());
            for pair in r.windows(2) {
                assert_eq!(pair[0].layers.end, pair[1].layers.start);
            }
            for s in r {
                assert!(!s.layers.is_empty());
                let bytes: u64 = layers[s.layers.clone()].iter().map(|l| l.bytes).sum();
                let free = workers
                    .iter()
                    .find(|w| w.id == s.member)
                    .unwrap()
                    .free_bytes;
                assert!(bytes <= free, "{s:?} holds {bytes} > {free}");
            }
        }
    }

    #[test]
    fn min_stages_sets_the_pipeline_depth() {
        let ls = layers(4, 1);
        let ws = vec![
            w("a", 64, 1.0),
            w("b", 64, 1.0),
            w("c", 64, 1.0),
            w("d", 64, 1.0),
        ];
        let cfg = PlanConfig {
            min_stages: 2,
            ..PlanConfig::default()
        };
        let p = plan(&ls, &ws, cfg).unwrap();
        assert_eq!(p.replicas.len(), 2);
        for r in &p.replicas {
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].layers, 0..2);
        }
        check(&p, &ls, &ws);
        // Deeper than the layers: one layer per stage.
        let deep = PlanConfig {
            min_stages: 9,
            ..PlanConfig::default()
        };
        let p = plan(&layers(2, 1), &ws, deep).unwrap();
        assert_eq!(p.replicas.len(), 2);
        assert!(p.replicas.iter().all(|r| r.len() == 2));
    }

    #[test]
    fn one_member_that_holds_it_all() {
        let ls = layers(12, 1);
        let ws = [w("a", 40, 1.0)];
        let p = plan(&ls, &ws, PlanConfig::default()).unwrap();
        assert_eq!(p.replicas.len(), 1);
        assert_eq!(p.replicas[0].len(), 1);
        check(&p, &ls, &ws);
    }

    #[test]
    fn replicas_when_members_can_each_hold_the_model() {
        let ls = layers(8, 1);
        let ws = [
            w("a", 20, 1.0),
            w("b", 20, 1.0),
            w("c", 20, 1.0),
            w("d", 4, 1.0),
        ];
        let p = plan(&ls, &ws, PlanConfig::default()).unwrap();
        assert_eq!(p.replicas.len(), 3);
        assert_eq!(p.spare, vec![NodeId::new("d").unwrap()]);
        check(&p, &ls, &ws);
    }

    #[test]
    fn stages_follow_speed_and_memory() {
        let ls = layers(12, 1);
        // Neither holds 12 GiB alone; b is twice as fast as a.
        let ws = [w("a", 10, 1.0), w("b", 10, 2.0)];
        let p = plan(&ls, &ws, PlanConfig::default()).unwrap();
        assert_eq!(p.replicas.len(), 1);
        let r = &p.replicas[0];
        assert_eq!(r[0].member.as_str(), "b", "fastest first");
        assert_eq!(r[0].layers, 0..8, "two thirds of the work on the 2x member");
        assert_eq!(r[1].layers, 8..12);
        check(&p, &ls, &ws);
        // Memory caps the fast member's share.
        let ws = [w("a", 10, 1.0), w("b", 5, 100.0)];
        let p = plan(
            &ls,
            &ws,
            PlanConfig {
                headroom: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.replicas[0][0].layers, 0..5);
        check(&p, &ls, &ws);
    }

    #[test]
    fn errors_and_determinism() {
        let ls = layers(4, 1);
        assert_eq!(
            plan(&[], &[w("a", 1, 1.0)], PlanConfig::default()),
            Err(PlanError::NoLayers)
        );
        assert_eq!(
            plan(&ls, &[w("a", 0, 1.0)], PlanConfig::default()),
            Err(PlanError::NoWorkers)
        );
        assert!(matches!(
            plan(
                &ls,
                &[w("a", 2, 1.0), w("b", 1, 1.0)],
                PlanConfig::default()
            ),
            Err(PlanError::TooLarge { .. })
        ));
        let ws = vec![w("c", 3, 1.0), w("a", 3, 1.0), w("b", 3, 2.0)];
        let mut rev = ws.clone();
        rev.reverse();
        assert_eq!(
            plan(&ls, &ws, PlanConfig::default()),
            plan(&ls, &rev, PlanConfig::default())
        );
    }
}
