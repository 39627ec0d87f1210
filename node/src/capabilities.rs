//! What this machine offers, as announced in heartbeats.
//!
//! The compute device is the node's (`shoal up --device`, resolved at start-up into
//! [`crate::node::NodeConfig::device`]): its name, its free memory and the matmul speed
//! measured on it travel in every heartbeat, and the serving planner budgets by them.

use crate::device;
use coordinator_free::{Capabilities, GpuInfo};
use std::time::Duration;

/// Cores, RAM and GPUs of this machine, and the compute `device`'s name, free memory
/// ([`device::free_bytes`], rounded down to two significant digits; 0 when unknown) and
/// speed ([`speed_mflops`]). GPUs are read from `nvidia-smi` when it is on the PATH
/// (bounded to 5 s); none are reported otherwise.
pub async fn detect(device: tch::Device) -> Capabilities {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    // Off the runtime's threads: a measurement computes for 8-32 ms, and asking a CUDA
    // driver for free memory may take a while the first time.
    let measured = tokio::task::spawn_blocking(move || {
        (
            speed_mflops(device),
            device::free_bytes(device).map_or(0, round_down2),
        )
    })
    .await;
    let (speed_mflops, device_free_bytes) =
        measured.unwrap_or_else(|_| (BEST_SPEED.load(std::sync::atomic::Ordering::Relaxed), 0));
    Capabilities {
        cores,
        ram_bytes: ram_bytes().unwrap_or(0),
        gpus: gpus().await,
        speed_mflops,
        device: device::name(device),
        device_free_bytes,
    }
}

/// f32 matrix-product speed on `device` in MFLOP/s, rounded to two significant digits so
/// small jitter does not change plans. The product is 128×128 on the CPU and 1024×1024 on
/// a CUDA device (a 128×128 one there measures the kernel launch, not the device), and a
/// CUDA device is synchronised before the clock is read. The first call measures 16 short
/// rounds (about 2 ms each); every later call (each re-detection: 1, 2, 4 and 8 s after
/// the start, then every 10 s) measures 4 more, and
/// the best round ever seen counts: contention from other processes (a local cluster
/// starting at once, a busy shared machine) only ever lowers a round, so the running best
/// converges on the hardware's speed instead of keeping an unlucky first measurement (which
/// once made the planner cut two equal machines' 4 layers 3 + 1). A node measures one
/// device all its life, so one running best per process serves.
pub fn speed_mflops(device: tch::Device) -> u32 {
    let rounds = if BEST_SPEED.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        16
    } else {
        4
    };
    let measured = round2(matmul_mflops(device, rounds));
    BEST_SPEED
        .fetch_max(measured, std::sync::atomic::Ordering::Relaxed)
        .max(measured)
}

/// The best speed [`speed_mflops`] has measured in this process (0 before the first call).
static BEST_SPEED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The best of `rounds` rounds of about 2 ms of f32 matrix products on `device`, in
/// MFLOP/s.
fn matmul_mflops(device: tch::Device, rounds: u32) -> f64 {
    let _guard = tch::no_grad_guard();
    let n: i64 = if device.is_cuda() { 1024 } else { 128 };
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let a = tch::Tensor::ones([n, n], (tch::Kind::Float, device));
    let _ = a.matmul(&a); // warm-up
    sync();
    let mut best = 0f64;
    for _ in 0..rounds {
        let started = std::time::Instant::now();
        let mut reps = 0u64;
        while started.elapsed() < Duration::from_millis(2) {
            let _ = a.matmul(&a);
            sync();
            reps += 1;
        }
        let flops = 2.0 * (n * n * n) as f64 * reps as f64;
        best = best.max(flops / started.elapsed().as_secs_f64() / 1e6);
    }
    best
}

fn round2(x: f64) -> u32 {
    if !(x.is_finite() && x >= 1.0) {
        return 0;
    }
    let scale = 10f64.powi(x.log10().floor() as i32 - 1);
    ((x / scale).round() * scale) as u32
}

/// `x` rounded down to two significant digits (free memory moves a little all the time;
/// the planner should not re-cut stages for it).
pub(crate) fn round_down2(x: u64) -> u64 {
    let digits = x.checked_ilog10().unwrap_or(0);
    let scale = 10u64.pow(digits.saturating_sub(1));
    x / scale * scale
}

fn ram_bytes() -> Option<u64> {
    device::meminfo("MemTotal:")
}

async fn gpus() -> Vec<GpuInfo> {
    let cmd = tokio::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,memory.free",
            "--format=csv,noheader,nounits",
        ])
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(5), cmd).await {
        Ok(Ok(out)) if out.status.success() => {
            parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
        }
        _ => Vec::new(),
    }
}

/// Parses `name, total MiB, free MiB` lines.
pub fn parse_nvidia_smi(text: &str) -> Vec<GpuInfo> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.rsplitn(3, ',').map(str::trim);
            let free: u64 = parts.next()?.parse().ok()?;
            let total: u64 = parts.next()?.parse().ok()?;
            let name = parts.next()?.chars().take(128).collect();
            Some(GpuInfo {
                name,
                total_bytes: total << 20,
                free_bytes: (free << 20).min(total << 20),
            })
        })
        .take(coordinator_free::membership::MAX_GPUS)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn rounds_to_two_digits() {
        assert_eq!(super::round2(12345.0), 12000);
        assert_eq!(super::round2(987.0), 990);
        assert_eq!(super::round2(0.5), 0);
        assert_eq!(super::round_down2(25_987_654_321), 25_000_000_000);
        assert_eq!(super::round_down2(99), 99);
        assert_eq!(super::round_down2(7), 7);
        assert_eq!(super::round_down2(0), 0);
    }

    #[test]
    fn the_speed_is_the_best_measured_so_far() {
        let first = super::speed_mflops(tch::Device::Cpu);
        assert!(first > 0);
        let mut last = first;
        for _ in 0..3 {
            let next = super::speed_mflops(tch::Device::Cpu);
            assert!(next >= last, "{next} after {last}");
            last = next;
        }
        assert_eq!(
            super::BEST_SPEED.load(std::sync::atomic::Ordering::Relaxed),
            last
        );
        // Here (not in a test of its own, which could raise the best while the loop above
        // compares): the CPU is announced with its free memory and that speed.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = rt.block_on(super::detect(tch::Device::Cpu));
        assert_eq!(c.device, "cpu");
        assert!(c.device_free_bytes > 0 && c.device_free_bytes <= c.ram_bytes);
        assert!(c.speed_mflops >= last);
    }

    #[test]
    fn parses_nvidia_smi() {
        let g = super::parse_nvidia_smi("NVIDIA H200, 143771, 143000\nbad line\n");
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].name, "NVIDIA H200");
        assert_eq!(g[0].total_bytes, 143771 << 20);
    }
}
