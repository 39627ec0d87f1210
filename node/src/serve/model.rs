//! Servable models live in [`crate::models`] (one definition shared with training); this
//! path re-exports what the serving engine names: what a model file is
//! ([`describe`], [`ModelConfig`]) and the stage executor ([`Stage`], i.e.
//! [`crate::models::stage::StageExecutor`]).

pub use crate::models::config::{describe, ModelConfig, KV_BUDGET_BATCH};
pub use crate::models::gpt::VOCAB;
pub use crate::models::stage::{StageExecutor as Stage, MAX_ROWS, ROW_TTL};
pub use crate::models::StageError as ServeModelError;
