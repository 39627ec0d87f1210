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
    }
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
    fn parses_nvidia_smi() {
        let g = super::parse_nvidia_smi("NVIDIA H200, 143771, 143000\nbad line\n");
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].name, "NVIDIA H200");
        assert_eq!(g[0].total_bytes, 143771 << 20);
    }
}
