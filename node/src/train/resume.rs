//! The run's checkpoint (`runs/<job>/checkpoint.safetensors`): the view's first member
//! writes it every `checkpoint_every` steps and after the last; a resumed run loads it
//! (refusing a checkpoint of another job) and the sync hands its state to the others.
//! Beside the tensors (`model.*` parameters, `optim.*` optimizer state) its metadata holds
//! the format marker, the job's name and hash, the step, the data cursor, the total steps
//! and the model's shape.

use super::job::ModelKind;
use super::member::Trainer;
use super::{TrainError, CHECKPOINT_FILE};
use crate::models::checkpoint;
use coordinator_free::sharding::DataCursor;
use coordinator_free::training::Progress;
use std::collections::BTreeMap;

/// An hf job's model folder in the run directory (`transformers` loads it). `hf`.
pub const HF_DIR: &str = "hf";
/// An hf LoRA job's PEFT adapter folder in the run directory. `adapter`.
pub const ADAPTER_DIR: &str = "adapter";

/// Checkpoint format marker (metadata `format`).
const CHECKPOINT_FORMAT: &str = "shoal-checkpoint-1";

impl Trainer {
    /// Loads the run directory's checkpoint into this member's state.
    pub(super) fn load_checkpoint(&mut self) -> Result<(), TrainError> {
        let path = self.job().run_dir().join(CHECKPOINT_FILE);
        let c = checkpoint::read(&path)?;
        let bad = |p: String| TrainError::Resume {
            path: path.display().to_string(),
            problem: p,
        };
        let meta = |k: &str| -> Result<u64, TrainError> {
            c.metadata
                .get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata `{k}` is missing")))
        };
        if c.metadata.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(bad("not a shoal checkpoint".into()));
        }
        if c.metadata.get("job_hash") != Some(&self.job().hash()) {
            return Err(bad(
                "it belongs to another job (the job file changed)".into()
            ));
        }
        let progress = Progress {
            step: meta("step")?,
            cursor: DataCursor {
                epoch: meta("data_epoch")?,
                offset: meta("data_offset")?,
            },
        };
        let _guard = tch::no_grad_guard();
        for (name, mut t) in self.state_tensors() {
            let src = c
                .get(&name)
                .ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
            if src.size() != t.size() {
                return Err(bad(format!(
                    "tensor `{name}` is {:?}, the model has {:?}",
                    src.size(),
                    t.size()
                )));
            }
            t.copy_(src);
        }
        self.opt.refresh();
        self.set_progress(progress);
        tracing::info!(step = self.step, "resumed from {}", path.display());
        Ok(())
    }

    /// Writes this member's state and progress to the run directory's checkpoint.
    pub(super) fn save_checkpoint(&self) -> Result<(), TrainError> {
        let path = self.job().run_dir().join(CHECKPOINT_FILE);
        let meta = BTreeMap::from([
            ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
            ("job".to_string(), self.job().name.clone()),
            ("job_hash".to_string(), self.job().hash()),
            ("step".to_string(), self.step.to_string()),
            ("data_epoch".to_string(), self.cursor.epoch.to_string()),
            ("data_offset".to_string(), self.cursor.offset.to_string()),
            ("total_steps".to_string(), self.total_steps.to_string()),
            ("model".to_string(), self.job().model_json()),
        ]);
        checkpoint::write(&path, &self.state_tensors(), &meta)?;
        tracing::info!(step = self.step, "checkpoint written to {}", path.display());
        self.export_hf()
    }

    /// An hf job's weights as a Hugging Face folder beside the checkpoint:
    /// `runs/<job>/hf/` (every weight), or `runs/<job>/adapter/` (PEFT's layout) when it
    /// trains LoRA adapters.
    fn export_hf(&self) -> Result<(), TrainError> {
        let job = self.job();
        let Some(src) = job
            .model
            .hf
            .as_ref()
            .filter(|_| job.model_kind() == ModelKind::Hf)
        else {
            return Ok(());
        };
        let params = self.opt.named_params(&self.params);
        let run = job.run_dir();
        let written = match &job.model.lora {
            None => crate::models::hf::export::write_model(src, &run.join(HF_DIR), &params),
            Some(l) => {
                let lora = crate::models::hf::train::LoraConfig {
                    rank: l.rank,
                    alpha: l.alpha,
                    targets: l.targets.clone(),
                };
                crate::models::hf::export::write_adapter(
                    src,
                    &run.join(ADAPTER_DIR),
                    &lora,
                    &params,
                )
            }
        };
        written.map_err(|e| TrainError::Model(e.into()))?;
        tracing::info!(
            step = self.step,
            "Hugging Face folder written under {}",
            run.display()
        );
        Ok(())
    }
}
