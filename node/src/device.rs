//! Which device a member computes on, and what that device offers.
//!
//! A job's `device` key and `shoal up --device` take a [`DeviceSpec`]: `auto` (the
//! default: the first CUDA device when libtorch sees one, else the CPU), `cpu`, `cuda`
//! (CUDA device 0) or `cuda:N`. [`DeviceSpec::resolve`] turns it into a `tch::Device` on
//! this machine; asking for CUDA where libtorch sees none (or for a device index it does
//! not have) is an error naming what was asked and what exists, never a silent fall-back
//! to the CPU.
//!
//! [`Precision`] is the job's `precision` key: `f32` (default) or `bf16` (mixed precision:
//! the model computes in bfloat16, the optimizer keeps f32 master weights).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The text is not `auto`, `cpu`, `cuda` or `cuda:N`.
    #[error("device `{0}`: expected auto, cpu, cuda or cuda:N")]
    Parse(String),
    /// CUDA was asked for and libtorch sees no CUDA device here.
    #[error("device `{0}`: no CUDA device is available on this machine (libtorch sees none)")]
    NoCuda(DeviceSpec),
    /// The CUDA index is past the devices this machine has.
    #[error("device `{asked}`: this machine has {count} CUDA device(s)")]
    NoSuchDevice {
        /// What was asked for.
        asked: DeviceSpec,
        /// CUDA devices libtorch sees.
        count: usize,
    },
}

/// Where to compute, as written in a job file or on the command line. Default: `auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeviceSpec {
    /// The first CUDA device when libtorch sees one, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// A CUDA device (`cuda` is index 0).
    Cuda(usize),
}

impl DeviceSpec {
    /// The device this names on this machine.
    pub fn resolve(self) -> Result<tch::Device, DeviceError> {
        self.resolve_with(cuda_device_count())
    }

    /// [`resolve`](Self::resolve) on a machine with `count` CUDA devices.
    pub fn resolve_with(self, count: usize) -> Result<tch::Device, DeviceError> {
        match self {
            DeviceSpec::Auto if count > 0 => Ok(tch::Device::Cuda(0)),
            DeviceSpec::Auto | DeviceSpec::Cpu => Ok(tch::Device::Cpu),
            DeviceSpec::Cuda(_) if count == 0 => Err(DeviceError::NoCuda(self)),
            DeviceSpec::Cuda(i) if i >= count => {
                Err(DeviceError::NoSuchDevice { asked: self, count })
            }
            DeviceSpec::Cuda(i) => Ok(tch::Device::Cuda(i)),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<DeviceSpec, DeviceError> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .filter(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Parse(s.chars().take(40).collect())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DeviceSpec, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The number format a job trains in. Default: `f32`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: forward and backward in bfloat16 on bfloat16 copies of the
    /// weights, the gradient summed and the update applied in f32 to f32 master weights.
    Bf16,
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Precision, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!(
                "precision `{}`: expected f32 or bf16",
                s.chars().take(40).collect::<String>()
            )),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl Precision {
    /// The kind the model's forward and backward run in.
    pub fn compute_kind(self) -> tch::Kind {
        match self {
            Precision::F32 => tch::Kind::Float,
            Precision::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// CUDA devices libtorch sees (0 without CUDA). The first call loads libtorch's CUDA
/// backend where there is one to use ([`load_cuda_backend`]); call this (or
/// [`DeviceSpec::resolve`]) before any other CUDA query.
pub fn cuda_device_count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| {
        if driver_present() && load_cuda_backend() && tch::Cuda::is_available() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        }
    })
}

/// Whether an NVIDIA driver is installed (`libcuda.so.1` loads). Without one there is no
/// CUDA device, whatever libtorch was built with, and the CUDA backend is not loaded.
fn driver_present() -> bool {
    // SAFETY: dlopen with a constant, NUL-terminated name; the handle is kept (never
    // closed), so nothing it maps is unmapped under a user.
    !unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) }.is_null()
}

/// Loads libtorch's CUDA backend (`libtorch_cuda.so`, found through the binary's rpath to
/// libtorch). Nothing in Rust calls into it, so the linker's `--as-needed` drops it from the
/// binary's dependencies, and libtorch only registers CUDA once it is loaded; loading it on
/// demand also spares machines without a driver its start-up cost (about 0.3 s and 400 MB of
/// mappings). False where libtorch has no CUDA build.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        // SAFETY: as in `driver_present`; RTLD_GLOBAL so its static initialisers register
        // the CUDA hooks with libtorch, which is already loaded.
        let h = unsafe {
            libc::dlopen(
                c"libtorch_cuda.so".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_GLOBAL,
            )
        };
        !h.is_null()
    })
}

/// How a device is named in reports and heartbeats: `cpu` or `cuda:N`.
pub fn name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        tch::Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Free memory on `device` in bytes: the CPU's available memory (`MemAvailable`), a CUDA
/// device's free memory as its driver reports it (builds with the `nccl` feature, which
/// brings the CUDA driver bindings; `None` otherwise or when the driver cannot answer).
pub fn free_bytes(device: tch::Device) -> Option<u64> {
    match device {
        tch::Device::Cpu => meminfo("MemAvailable:"),
        tch::Device::Cuda(i) => cuda_free_bytes(i),
        _ => None,
    }
}

/// A `/proc/meminfo` field in bytes.
pub(crate) fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(feature = "nccl")]
fn cuda_free_bytes(index: usize) -> Option<u64> {
    // The primary context libtorch also uses; retaining it is cheap once it exists.
    // Called only for a device libtorch sees, so libcuda is there to load.
    let ctx = cudarc::driver::CudaContext::new(index).ok()?;
    let (free, _total) = ctx.mem_get_info().ok()?;
    Some(free as u64)
}

#[cfg(not(feature = "nccl"))]
fn cuda_free_bytes(_index: usize) -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for (text, spec) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda:0", DeviceSpec::Cuda(0)),
            ("cuda:7", DeviceSpec::Cuda(7)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        for bad in [
            "",
            "gpu",
            "cuda:",
            "cuda:x",
            "cuda:-1",
            "cuda:1000",
            "CPU",
            "cuda:0 ",
        ] {
            assert!(
                matches!(bad.parse::<DeviceSpec>(), Err(DeviceError::Parse(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn resolving_never_falls_back_silently() {
        assert_eq!(DeviceSpec::Auto.resolve_with(0).unwrap(), tch::Device::Cpu);
        assert_eq!(
            DeviceSpec::Auto.resolve_with(2).unwrap(),
            tch::Device::Cuda(0)
        );
        assert_eq!(DeviceSpec::Cpu.resolve_with(2).unwrap(), tch::Device::Cpu);
        assert_eq!(
            DeviceSpec::Cuda(1).resolve_with(2).unwrap(),
            tch::Device::Cuda(1)
        );
        assert_eq!(
            DeviceSpec::Cuda(0).resolve_with(0),
            Err(DeviceError::NoCuda(DeviceSpec::Cuda(0)))
        );
        let e = DeviceSpec::Cuda(2).resolve_with(2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "device `cuda:2`: this machine has 2 CUDA device(s)"
        );
        assert!(!e.to_string().contains('\n'));
    }

    /// libtorch's CUDA backend loads on demand (the venv's torch has one) without a GPU or
    /// driver, and then reports no device instead of failing.
    #[test]
    fn the_cuda_backend_loads_without_a_gpu() {
        let lib = std::path::Path::new(env!("SHOAL_LIBTORCH_LIB")).join("libtorch_cuda.so");
        assert_eq!(load_cuda_backend(), lib.exists());
        if !driver_present() {
            assert!(!tch::Cuda::is_available());
            assert_eq!(cuda_device_count(), 0);
        }
    }

    #[test]
    fn this_machine_resolves_what_it_has() {
        // Whatever this machine has, `auto` and `cpu` resolve, and `cuda` resolves exactly
        // when libtorch sees a device.
        assert!(DeviceSpec::Auto.resolve().is_ok());
        assert_eq!(DeviceSpec::Cpu.resolve().unwrap(), tch::Device::Cpu);
        assert_eq!(
            DeviceSpec::Cuda(0).resolve().is_ok(),
            cuda_device_count() > 0
        );
        assert!(free_bytes(tch::Device::Cpu).unwrap() > 0);
    }

    #[test]
    fn precision_reads_from_toml_words() {
        #[derive(Deserialize)]
        struct P {
            p: Precision,
            d: DeviceSpec,
        }
        let v: P = toml::from_str("p = \"bf16\"\nd = \"cuda:1\"").unwrap();
        assert_eq!((v.p, v.d), (Precision::Bf16, DeviceSpec::Cuda(1)));
        assert!(toml::from_str::<P>("p = \"fp16\"\nd = \"cpu\"").is_err());
        assert!(toml::from_str::<P>("p = \"f32\"\nd = \"tpu\"").is_err());
    }
}
