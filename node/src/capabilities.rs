//! What this machine offers, as announced in heartbeats.

use coordinator_free::{Capabilities, GpuInfo};
use std::time::Duration;

/// Cores, RAM and GPUs of this machine. GPUs are read from `nvidia-smi` when it is on the
/// PATH (bounded to 5 s); none are reported otherwise.
pub async fn detect() -> Capabilities {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    Capabilities {
        cores,
        ram_bytes: ram_bytes().unwrap_or(0),
        gpus: gpus().await,
        speed_mflops: speed_mflops(),
    }
}

/// f32 matrix-product (128×128) speed in MFLOP/s, measured once per process and rounded to
/// two significant digits so small jitter does not change plans. The best of 16 short
/// rounds (about 2 ms each) counts, so other processes starting at the same moment (a local
/// cluster) do not make a node look slower than its hardware.
pub fn speed_mflops() -> u32 {
    static SPEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SPEED.get_or_init(|| {
        let _guard = tch::no_grad_guard();
        let n = 128i64;
        let a = tch::Tensor::ones([n, n], (tch::Kind::Float, tch::Device::Cpu));
        let _ = a.matmul(&a); // warm-up
        let mut best = 0f64;
        for _ in 0..16 {
            let started = std::time::Instant::now();
            let mut reps = 0u64;
            while started.elapsed() < Duration::from_millis(2) {
                let _ = a.matmul(&a);
                reps += 1;
            }
            let flops = 2.0 * (n * n * n) as f64 * reps as f64;
            best = best.max(flops / started.elapsed().as_secs_f64() / 1e6);
        }
        round2(best)
    })
}

fn round2(x: f64) -> u32 {
    if !(x.is_finite() && x >= 1.0) {
        return 0;
    }
    let scale = 10f64.powi(x.log10().floor() as i32 - 1);
    ((x / scale).round() * scale) as u32
}

fn ram_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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
    }

    #[test]
    fn parses_nvidia_smi() {
        let g = super::parse_nvidia_smi("NVIDIA H200, 143771, 143000\nbad line\n");
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].name, "NVIDIA H200");
        assert_eq!(g[0].total_bytes, 143771 << 20);
    }
}
