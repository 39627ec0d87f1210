//! Which backend carries a view's gradient all-reduce, and the view's NCCL communicator
//! when it is NCCL.
//!
//! Every member reports a device key in the view's progress exchange ([`device_key`]: 0
//! unless it computes on a CUDA device with NCCL available); the core's
//! [`choose_backend`] decides from the keys, so every member decides the same. Under NCCL
//! the view's root (`coordinator_free::collective::nccl_root`) mints the unique id and
//! gossips it; every member builds its communicator from it (bounded by
//! [`NCCL_SETUP_BOUND`]) on its first step in the view, and the step's all-reduce runs in
//! NCCL on a device copy of the flat gradient (bounded by [`NCCL_CALL_BOUND`]). A view
//! change means a new communicator. A member whose NCCL setup or call fails reports the
//! view as failed, as a broken ring does, and every member starts over in the next epoch.
//! Under the ring (any mix of devices) nothing here runs.

use super::collective::StepFailure;
use super::member::Trainer;
use coordinator_free::collective::{choose_backend, Backend};
use coordinator_free::{View, ViewHash};
use std::time::Duration;

/// How long a member waits for its view's NCCL id, and then for the communicator.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(super) const NCCL_SETUP_BOUND: Duration = Duration::from_secs(60);
/// How long one NCCL all-reduce may take before the communicator is aborted.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(super) const NCCL_CALL_BOUND: Duration = Duration::from_secs(120);

/// This member's key for [`choose_backend`]: 64 bits of its GPU's UUID (never 0) when it
/// computes on CUDA and NCCL is available (builds with the `nccl` feature); 0 otherwise.
pub(super) fn device_key(device: tch::Device) -> u64 {
    match device {
        #[cfg(feature = "nccl")]
        tch::Device::Cuda(i) => crate::nccl::device_key(i).unwrap_or(0),
        _ => 0,
    }
}

/// A trainer's backend state: the current view's device keys and its communicator.
#[derive(Default)]
pub(super) struct Backends {
    /// The view the keys are for, and every member's key (view order).
    keys: Option<(ViewHash, Vec<u64>)>,
    /// The communicator of the view it names (NCCL views only).
    #[cfg(feature = "nccl")]
    comm: Option<crate::nccl::NcclComm>,
}

impl Trainer {
    /// Records every member's device key on `view` (from the progress exchange).
    pub(super) fn set_device_keys(&mut self, view: &View, keys: Vec<u64>) {
        let backend = choose_backend(&keys);
        if self.backends.keys.as_ref().map(|(h, _)| *h) != Some(view.hash) {
            tracing::info!(
                epoch = view.epoch,
                members = view.len(),
                ?backend,
                "gradient all-reduce backend"
            );
        }
        self.backends.keys = Some((view.hash, keys));
        let name = match backend {
            Backend::Ring => "ring",
            Backend::Nccl => "nccl",
        };
        self.set_report(|r| r.backend = name.into());
    }

    /// The backend of `view`'s gradient all-reduce (the ring until its keys are known).
    pub(super) fn backend(&self, view: &View) -> Backend {
        match &self.backends.keys {
            Some((h, keys)) if *h == view.hash => choose_backend(keys),
            _ => Backend::Ring,
        }
    }

    /// Sums `flat` over `view`'s members in NCCL on this member's device. Only called for
    /// a view whose backend is NCCL. `on_device` is the gradient part of `flat` when it is
    /// still on the device: it is reduced there, with the rest of `flat` (loss, counts,
    /// the guard's slots) copied up beside it, and only the sum comes back.
    #[cfg(feature = "nccl")]
    pub(super) fn nccl_all_reduce(
        &mut self,
        view: &View,
        flat: &mut [f32],
        on_device: Option<&tch::Tensor>,
    ) -> Result<(), StepFailure> {
        let r = self.nccl_comm(view).and_then(|comm| {
            let device = tch::Device::Cuda(comm.device());
            let mut t = match on_device {
                Some(g) => {
                    let rest = tch::Tensor::from_slice(&flat[g.numel()..]).to_device(device);
                    tch::Tensor::cat(&[g.to_device(device), rest], 0)
                }
                None => tch::Tensor::from_slice(flat).to_device(device),
            };
            comm.all_reduce_(&mut t, coordinator_free::ReduceOp::Sum, NCCL_CALL_BOUND)
                .map_err(|e| e.to_string())?;
            t.copy_data(flat, flat.len());
            Ok(())
        });
        r.map_err(|e| {
            self.backends.comm = None;
            // The node is gone only when it is shutting down; then nothing restarts anyway.
            let _ = self.ctx.view_failed.send(view.hash);
            StepFailure::Nccl(e)
        })
    }

    /// Without the `nccl` feature no member reports a key, so no view chooses NCCL.
    #[cfg(not(feature = "nccl"))]
    pub(super) fn nccl_all_reduce(
        &mut self,
        _view: &View,
        _flat: &mut [f32],
        _on_device: Option<&tch::Tensor>,
    ) -> Result<(), StepFailure> {
        Err(StepFailure::Nccl(
            "this build has no NCCL (cargo feature `nccl`)".into(),
        ))
    }

    /// The communicator of `view`: the one held, or a new one from the id its root gossips.
    #[cfg(feature = "nccl")]
    fn nccl_comm(&mut self, view: &View) -> Result<&mut crate::nccl::NcclComm, String> {
        use crate::nccl;
        if self.backends.comm.as_ref().map(|c| c.view()) != Some(view.hash) {
            self.backends.comm = None;
            let tch::Device::Cuda(device) = self.model.device() else {
                return Err("NCCL chosen for a member that is not on CUDA".into());
            };
            let me = self.ctx.me.clone();
            let node = self.ctx.node.clone();
            let id = if coordinator_free::collective::nccl_root(view) == Some(&me) {
                let id = nccl::mint_id().map_err(|e| e.to_string())?;
                self.ctx
                    .rt
                    .block_on(node.publish_nccl_id(id.clone()))
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("publishing the NCCL id: {e}"))?;
                id
            } else {
                self.ctx
                    .rt
                    .block_on(node.nccl_id(view.hash, NCCL_SETUP_BOUND))
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| {
                        format!("the view's NCCL id did not arrive within {NCCL_SETUP_BOUND:?}")
                    })?
            };
            let comm = nccl::NcclComm::init(view, &me, &id, device, NCCL_SETUP_BOUND)
                .map_err(|e| e.to_string())?;
            tracing::info!(
                epoch = view.epoch,
                rank = comm.rank(),
                members = comm.world_size(),
                device,
                "NCCL communicator ready"
            );
            self.backends.comm = Some(comm);
        }
        Ok(self.backends.comm.as_mut().expect("just set"))
    }
}
