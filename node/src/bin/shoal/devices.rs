//! `shoal devices`: what this machine offers to compute on, as shoal sees it: the CPU and
//! every CUDA device libtorch sees, with their free memory, and whether NCCL can run here
//! (or why not). One JSON line; `scripts/gpu-check` reads it to decide what it can check.

use crate::failure::Failure;
use shoal_node::device;

/// Prints `{"cuda_devices":N,"devices":[{"device","free_bytes"}..],"nccl":"available"|why}`.
pub fn devices() -> Result<(), Failure> {
    let n = device::cuda_device_count();
    let all = std::iter::once(tch::Device::Cpu).chain((0..n).map(tch::Device::Cuda));
    let list: Vec<serde_json::Value> = all
        .map(
            |d| serde_json::json!({"device": device::name(d), "free_bytes": device::free_bytes(d)}),
        )
        .collect();
    let line = serde_json::json!({"cuda_devices": n, "devices": list, "nccl": nccl()});
    println!("{line}");
    Ok(())
}

#[cfg(feature = "nccl")]
fn nccl() -> String {
    match shoal_node::nccl::available() {
        Ok(()) => "available".into(),
        Err(e) => e.to_string(),
    }
}

#[cfg(not(feature = "nccl"))]
fn nccl() -> String {
    "this build has no NCCL (cargo feature `nccl`)".into()
}
