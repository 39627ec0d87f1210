//! TorchScript modules brought by the user (`forward(x) -> logits`): loaded trainable for
//! a training job (its parameters become the job's `VarStore` variables), or frozen in
//! evaluation mode for serving, where the whole module is one stage. Errors are
//! libtorch's; the caller says which file and what it was for.

use std::path::Path;
use tch::{nn, TchError};

/// Loads `path` with its parameters as variables under `root`.
pub fn load_trainable(path: &Path, root: nn::Path) -> Result<tch::TrainableCModule, TchError> {
    tch::TrainableCModule::load(path, root)
}

/// Loads `path` for inference (evaluation mode), its parameters on `device`.
pub fn load_frozen(path: &Path, device: tch::Device) -> Result<tch::CModule, TchError> {
    let mut m = tch::CModule::load_on_device(path, device)?;
    m.set_eval();
    Ok(m)
}

/// The module's parameter count (it is loaded and dropped).
pub fn params(path: &Path) -> Result<u64, TchError> {
    let m = tch::CModule::load(path)?;
    Ok(m.named_parameters()?
        .iter()
        .map(|(_, t)| t.numel() as u64)
        .sum())
}
