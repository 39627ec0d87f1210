//! CUDA checks, run by `scripts/gpu-check` on a machine with a GPU. They are ignored by a
//! plain `cargo test` (a machine without a GPU has nothing to run them on; the script
//! says why it skips there) and fail, rather than pass quietly, when run without one.
//!
//! - a forward/backward and one optimizer step on CUDA equal the CPU's (f32 within 1e-4
//!   relative; bf16 mixed precision within 5e-2: bfloat16 keeps 8 bits of mantissa);
//! - the demo's job trains on `device = "cuda"` to the demo's accuracy, and its checkpoint
//!   served on CUDA answers the sums;
//! - two members on one GPU train through the ring (NCCL refuses two ranks on one device).
//!
//! NCCL itself (a 1-rank and, where there are GPUs for it, an n-rank all-reduce) is
//! `nccl_gpu.rs`; a serving stage on each device against the CPU is `models/stage.rs`.

mod common;

use common::{repo_root, shoal_bin, wait_until, TempDir};
use serde_json::Value;
use shoal_node::device::{self, Precision};
use shoal_node::train::data::{Batch, Task};
use shoal_node::train::job::JobSpec;
use shoal_node::train::model::Model;
use shoal_node::train::optim::Optimizer;
use std::process::Stdio;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn need_cuda() {
    assert!(
        device::cuda_device_count() > 0,
        "no CUDA device: these checks run where one is (scripts/gpu-check)"
    );
}

/// The flat f32 gradient of `model`'s parameters, in host memory.
fn flat_grad(model: &Model) -> Vec<f32> {
    let mut out = Vec::new();
    for (_, p) in model.params() {
        let g = p
            .grad()
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .view([-1]);
        out.extend(Vec::<f32>::try_from(&g).unwrap());
    }
    out
}

/// ‖a − b‖ / ‖b‖.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += f64::from(x - y).powi(2);
        n += f64::from(*y).powi(2);
    }
    (d / n.max(1e-30)).sqrt()
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check runs it"]
fn a_cuda_step_equals_the_cpu_step() {
    need_cuda();
    step_matches_the_cpu_f32_step(Device::Cuda(0));
}

/// The same comparison with the CPU standing in for the device: f32 against itself, and
/// the CPU's own bf16 mixed precision against f32 (the check's tolerances and plumbing,
/// run everywhere).
#[test]
fn the_cpu_step_equals_itself_and_bf16_stays_close() {
    step_matches_the_cpu_f32_step(Device::Cpu);
}

/// A forward/backward and one AdamW step of the gpt on `device`, in f32 and in bf16,
/// against the CPU's f32.
fn step_matches_the_cpu_f32_step(device: Device) {
    let job = JobSpec::parse(
        "name = \"parity\"\nsteps = 1\nbatch_size = 8\n[model]\nkind = \"gpt\"\nlayers = 2\nheads = 4\nwidth = 64\ncontext = 32\n[data]\nkind = \"text\"\npath = \"x.txt\"\n",
    )
    .unwrap();
    let task = Task::Lm {
        len: 32,
        masked: false,
        vocab: 256,
    };
    tch::manual_seed(11);
    let tokens = Tensor::randint(256, [8, 33], (Kind::Int64, Device::Cpu));
    let batch = Batch {
        x: tokens.narrow(1, 0, 32).contiguous(),
        y: tokens.narrow(1, 1, 32).contiguous(),
        mask: None,
        len: 8,
    };
    let cpu = Model::build(&job, task, 7, Device::Cpu, Precision::F32).unwrap();
    let (loss_cpu, _) = cpu.loss_sum(&batch).unwrap();
    loss_cpu.backward();
    let g_cpu = flat_grad(&cpu);
    let mut opt_cpu = Optimizer::new(&job.optimizer, &cpu.params()).unwrap();
    opt_cpu.step(&g_cpu, 0.125, 1e-3);
    let after_cpu: Vec<f32> = master(&opt_cpu, &cpu);
    for (precision, tol) in [(Precision::F32, 1e-4), (Precision::Bf16, 5e-2)] {
        let gpu = Model::build(&job, task, 7, device, precision).unwrap();
        let (loss, _) = gpu.loss_sum(&batch.to_device(device)).unwrap();
        loss.backward();
        let (a, b) = (loss.double_value(&[]), loss_cpu.double_value(&[]));
        assert!(
            (a - b).abs() / b.abs() < tol,
            "{precision:?}: loss {a} vs {b}"
        );
        let g = flat_grad(&gpu);
        let e = rel(&g, &g_cpu);
        assert!(e < tol, "{precision:?}: gradient differs by {e}");
        let mut opt = Optimizer::new(&job.optimizer, &gpu.params()).unwrap();
        opt.step(&g, 0.125, 1e-3);
        let e = rel(&master(&opt, &gpu), &after_cpu);
        assert!(
            e < tol,
            "{precision:?}: weights after one step differ by {e}"
        );
        eprintln!("{precision:?}: loss {a:.6} (CPU {b:.6}), after one step within {e:.2e}");
    }
}

/// The optimizer's f32 master weights, flat, in host memory.
fn master(opt: &Optimizer, model: &Model) -> Vec<f32> {
    opt.named_params(&model.params())
        .iter()
        .flat_map(|(_, t)| Vec::<f32>::try_from(&t.to_device(Device::Cpu).view([-1])).unwrap())
        .collect()
}

/// Runs `shoal train --local <nodes>` on `job` (TOML) in `dir`; the summary line.
fn train(dir: &std::path::Path, job: &str, nodes: usize) -> Value {
    let path = dir.join("job.toml");
    std::fs::write(&path, job).unwrap();
    // The logs go to a file: a long run's would fill a pipe nobody reads until the end.
    let log = dir.join("train.log");
    let mut child = std::process::Command::new(shoal_bin())
        .args([
            "train",
            path.to_str().unwrap(),
            "--local",
            &nodes.to_string(),
        ])
        .args(["--json", "--dir", dir.join("nodes").to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("train.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let code = wait_until("shoal train to finish", Duration::from_secs(900), || {
        child.try_wait().unwrap().map(|s| s.code())
    });
    let stdout = std::fs::read_to_string(dir.join("train.out")).unwrap();
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(code, Some(0), "{stdout}\n{logs}");
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap()
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check runs it"]
fn the_demo_job_trains_on_cuda() {
    need_cuda();
    let d = TempDir::new("gpu-demo");
    let job = std::fs::read_to_string(repo_root().join("examples/jobs/arithmetic.toml"))
        .unwrap()
        .replace("threads = 1", "threads = 1\ndevice = \"cuda\"")
        .replace(
            "[model]",
            &format!("output_dir = \"{}\"\n[model]", d.0.join("runs").display()),
        );
    let s = train(&d.0, &job, 1);
    eprintln!("demo on CUDA: {s}");
    assert_eq!(s["device"], "cuda:0", "{s}");
    let acc = s["eval"]["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "held-out accuracy {acc}");
    // Then serve that checkpoint on CUDA, as the demo serves it, and ask it sums.
    let checkpoint = d.0.join("runs/arithmetic/checkpoint.safetensors");
    let mut args = vec![
        "serve",
        "--local",
        "1",
        "--device",
        "cuda",
        "--max-tokens",
        "3",
    ];
    args.extend(["--json", "--dir"]);
    let nodes = d.0.join("serve-nodes");
    args.push(nodes.to_str().unwrap());
    let sums = [(12, 34), (37, 45), (99, 99), (58, 7)];
    let prompts: Vec<String> = sums
        .iter()
        .map(|(a, b)| format!("{a:02}+{b:02}="))
        .collect();
    for p in &prompts {
        args.extend(["--prompt", p]);
    }
    args.push(checkpoint.to_str().unwrap());
    let out = common::run_shoal(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut right = 0;
    for line in stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let (Some(q), Some(raw)) = (line["prompt"].as_str(), line["completion"].as_str()) else {
            continue;
        };
        let (a, b) = q.trim_end_matches('=').split_once('+').unwrap();
        let sum = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
        // The model writes the sum's digits least-significant first.
        let answer: String = raw.chars().rev().collect();
        right += usize::from(answer.trim_start_matches('0').parse::<u32>().ok() == Some(sum));
    }
    eprintln!("served on CUDA: {right} of {} sums right", sums.len());
    assert!(right >= 3, "{stdout}");
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check runs it"]
fn two_members_on_one_gpu_train_through_the_ring() {
    need_cuda();
    let d = TempDir::new("gpu-shared");
    let job = format!(
        "name = \"shared\"\nsteps = 200\nbatch_size = 64\ndevice = \"cuda:0\"\nconsistency_every = 50\noutput_dir = \"{}\"\n[model]\nkind = \"mlp\"\nhidden = [128]\n[data]\nkind = \"csv\"\npath = \"{}\"\n[optimizer]\nlr = 0.003\n",
        d.0.join("runs").display(),
        repo_root().join("data/digits.csv.gz").display()
    );
    let s = train(&d.0, &job, 2);
    eprintln!("two members on cuda:0: {s}");
    assert_eq!(s["device"], "cuda:0", "{s}");
    assert_eq!(s["backend"], "ring", "{s}");
    assert_eq!(s["members"], 2, "{s}");
    let acc = s["eval"]["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "held-out accuracy {acc}");
}
