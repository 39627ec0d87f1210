//! Training parity: one step's loss and gradients of the trainable decoder equal
//! PyTorch's (`scripts/fixtures/train_step.py`), with and without LoRA.

use super::staged::Stage;
use super::train::{build, HfTrain, LoraConfig};
use crate::models::checkpoint;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// The tensors of a reference file, by name.
fn reference(path: &Path) -> BTreeMap<String, Tensor> {
    let header = checkpoint::read_header(path).unwrap();
    header
        .tensors
        .iter()
        .map(|(n, _)| {
            let t = if n == "tokens" {
                let e = header.get(n).unwrap();
                let bytes = std::fs::read(path).unwrap();
                let start = (header.data_start + e.start) as usize;
                let raw = &bytes[start..start + (e.end - e.start) as usize];
                Tensor::from_data_size(raw, &e.shape, Kind::Int64)
            } else {
                checkpoint::read_tensor(path, &header, n).unwrap()
            };
            (n.clone(), t)
        })
        .collect()
}

/// The loss shoal trains on: each sequence's mean next-token cross-entropy, summed.
fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let (b, t, v) = logits.size3().unwrap();
    logits
        .view([b * t, v])
        .cross_entropy_loss::<Tensor>(
            &targets.reshape([b * t]),
            None,
            tch::Reduction::None,
            -100,
            0.0,
        )
        .view([b, t])
        .mean_dim(1, false, Kind::Float)
        .sum(Kind::Float)
}

/// max |a − b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-30);
    (a - b).abs().max().double_value(&[]) / scale
}

/// Builds `arch` (with `lora`), runs the reference step, returns the variables, the
/// reference and the loss.
fn step(
    arch: &str,
    file: &str,
    lora: Option<LoraConfig>,
) -> (nn::VarStore, BTreeMap<String, Tensor>, f64) {
    step_as(arch, file, lora, false)
}

/// [`step`], its backward in stages when `staged` (checking that the stages come in order
/// and that no parameter's gradient changes after its stage said it was complete).
fn step_as(
    arch: &str,
    file: &str,
    lora: Option<LoraConfig>,
    staged: bool,
) -> (nn::VarStore, BTreeMap<String, Tensor>, f64) {
    let dir = fixture(arch);
    let r = reference(&dir.join(file));
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let t = HfTrain {
        dir,
        random: false,
        context: None,
        lora,
    };
    let dec = build(&t, &vs.root()).unwrap();
    let vars = vs.variables();
    tch::no_grad(|| {
        for (n, init) in r.iter().filter(|(n, _)| n.starts_with("init.")) {
            vars[&n["init.".len()..]].shallow_clone().copy_(init);
        }
    });
    let tokens = &r["tokens"];
    let n = tokens.size()[1];
    let x = tokens.narrow(1, 0, n - 1);
    let y = tokens.narrow(1, 1, n - 1);
    if !staged {
        let l = loss(&dec.forward(&x).unwrap(), &y);
        l.backward();
        return (vs, r, l.double_value(&[]));
    }
    let mut stages = Vec::new();
    // Each trained parameter's gradient when its stage said it was complete.
    let mut at_done: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut done = |stage: Stage| {
        stages.push(stage);
        for (n, v) in vars.iter().filter(|(n, _)| Stage::of(n) == stage) {
            let g = v.grad();
            if g.defined() {
                at_done.insert(n.clone(), g.copy());
            }
        }
    };
    let mut loss_of = |logits: &Tensor| Ok::<_, crate::models::StageError>(loss(logits, &y));
    let l = dec.backward_staged(&x, &mut loss_of, &mut done).unwrap();
    let layers = dec.config().layers;
    let mut order = vec![Stage::Head];
    order.extend((0..layers).rev().map(Stage::Block));
    order.push(Stage::Embed);
    assert_eq!(stages, order, "{arch}: stages in order");
    for (n, v) in vars.iter().filter(|(_, v)| v.requires_grad()) {
        let early = at_done
            .get(n)
            .unwrap_or_else(|| panic!("{arch}: {n} had no gradient when its stage was done"));
        assert!(
            early.equal(&v.grad()),
            "{arch}: the gradient of {n} changed after its stage was done"
        );
    }
    (vs, r, l.double_value(&[]))
}

#[test]
fn one_step_loss_and_gradients_equal_pytorch() {
    for arch in ["llama", "qwen2", "qwen3"] {
        let (vs, r, got) = step(arch, "train_step.safetensors", None);
        let want = r["loss"].double_value(&[0]);
        assert!(
            (got - want).abs() / want <= 1e-5,
            "{arch}: loss {got} vs {want}"
        );
        let vars = vs.variables();
        let grads: Vec<_> = r.iter().filter(|(n, _)| n.starts_with("grad.")).collect();
        assert_eq!(
            grads.len(),
            vars.len(),
            "{arch}: every parameter has a reference gradient"
        );
        let mut worst = 0f64;
        for (n, g) in grads {
            let name = &n["grad.".len()..];
            let v = vars
                .get(name)
                .unwrap_or_else(|| panic!("{arch}: no variable {name}"));
            let d = rel(&v.grad(), g);
            worst = worst.max(d);
            assert!(
                d <= 1e-5,
                "{arch}: gradient of {name} differs by {d:e} (relative)"
            );
        }
        eprintln!("{arch}: loss {got:.6} (PyTorch {want:.6}), worst gradient relative difference {worst:e}");
    }
}

/// The backward in stages (what lets gradients travel while it runs) gives PyTorch's
/// gradients too, on every family, with tied embeddings (qwen2's fixture) and with LoRA.
#[test]
fn staged_backward_equals_pytorch() {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    for (arch, file, lora) in [
        ("llama", "train_step.safetensors", None),
        ("qwen2", "train_step.safetensors", None),
        ("qwen3", "train_step.safetensors", None),
        ("llama", "train_step_lora.safetensors", Some(lora)),
    ] {
        let what = format!("{arch} (lora: {})", lora.is_some());
        let (vs, r, got) = step_as(arch, file, lora, true);
        let want = r["loss"].double_value(&[0]);
        assert!((got - want).abs() / want <= 1e-5, "{what}: loss {got} vs {want}");
        let mut checked = 0;
        for (n, v) in vs.variables() {
            match r.get(&format!("grad.{n}")) {
                Some(g) => {
                    let d = rel(&v.grad(), g);
                    assert!(d <= 1e-5, "{what}: gradient of {n} differs by {d:e}");
                    checked += 1;
                }
                None => assert!(!v.requires_grad(), "{what}: {n} has no reference"),
            }
        }
        assert!(checked > 0, "{what}: no gradient compared");
    }
}

#[test]
fn one_lora_step_trains_only_the_adapters_as_peft_does() {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let (vs, r, got) = step("llama", "train_step_lora.safetensors", Some(lora));
    let want = r["loss"].double_value(&[0]);
    assert!((got - want).abs() / want <= 1e-5, "loss {got} vs {want}");
    let vars = vs.variables();
    let adapters: Vec<&String> = vars.keys().filter(|n| n.contains(".lora_")).collect();
    assert_eq!(
        adapters.len(),
        12,
        "A and B on q and v of 3 layers: {adapters:?}"
    );
    for (n, v) in &vars {
        let reference = r.get(&format!("grad.{n}"));
        match reference {
            Some(g) => {
                let d = rel(&v.grad(), g);
                assert!(d <= 1e-5, "gradient of {n} differs by {d:e} (relative)");
            }
            None => assert!(!v.requires_grad(), "{n} is frozen"),
        }
    }
}

/// Logits transformers computes for `tokens` from the folder `model` (with the PEFT
/// adapter `adapter` loaded onto it), through `scripts/check_hf_export.py`.
fn transformers_logits(model: &Path, adapter: Option<&Path>, tokens: &[Vec<i64>]) -> Vec<f32> {
    let python = std::env::var("SHOAL_PYTHON").expect("SHOAL_PYTHON (source scripts/env.sh)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_hf_export.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(model)
        .arg(adapter.map_or("-".into(), |a| a.display().to_string()))
        .arg(serde_json::to_string(tokens).unwrap())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Trained weights (here: the fixture moved by one SGD step) exported as a model folder
/// load in transformers, and as a PEFT adapter load onto the base with `peft`: both compute
/// the logits shoal computes.
#[test]
fn exported_folders_load_in_transformers_and_peft() {
    let tmp = std::env::temp_dir().join(format!("shoal-hf-export-{}", std::process::id()));
    let tokens = vec![vec![1i64, 17, 250, 3, 99, 380], vec![1, 5, 6, 7, 8, 200]];
    let x = Tensor::from_slice(&tokens.concat()).view([2, 6]);
    let untrained = transformers_logits(&fixture("llama"), None, &tokens);
    for lora in [None, Some(4)] {
        let cfg = lora.map(|rank| LoraConfig {
            rank,
            alpha: 8.0,
            targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        });
        let file = if lora.is_some() {
            "train_step_lora.safetensors"
        } else {
            "train_step.safetensors"
        };
        let (vs, r, _) = step("llama", file, cfg.clone());
        // One SGD step on whatever trains (B starts at zero for the extra target).
        let params: Vec<(String, Tensor)> = tch::no_grad(|| {
            vs.variables()
                .into_iter()
                .filter(|(_, v)| v.requires_grad())
                .map(|(n, mut v)| {
                    let g = v.grad();
                    if g.defined() {
                        v -= g * 0.5;
                    }
                    if n.contains("down_proj.lora_B") {
                        v.copy_(&(v.randn_like() * 0.05));
                    }
                    (n, v.detach())
                })
                .collect()
        });
        drop(r);
        let dec_vs = vs;
        let t = HfTrain {
            dir: fixture("llama"),
            random: false,
            context: None,
            lora: cfg.clone(),
        };
        // The trained decoder's logits (rebuilt over the same variables).
        let probe = nn::VarStore::new(tch::Device::Cpu);
        let dec = build(&t, &probe.root()).unwrap();
        tch::no_grad(|| {
            let mine = probe.variables();
            for (n, v) in dec_vs.variables() {
                mine[&n].shallow_clone().copy_(&v);
            }
        });
        let want: Vec<f32> =
            Vec::try_from(tch::no_grad(|| dec.forward(&x)).unwrap().view([-1])).unwrap();
        let got = match &cfg {
            None => {
                let out = tmp.join("model");
                super::export::write_model(&fixture("llama"), &out, &params).unwrap();
                assert!(out.join("model.safetensors.index.json").is_file());
                transformers_logits(&out, None, &tokens)
            }
            Some(c) => {
                let out = tmp.join("adapter");
                super::export::write_adapter(&fixture("llama"), &out, c, &params).unwrap();
                transformers_logits(&fixture("llama"), Some(&out), &tokens)
            }
        };
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "export (lora {lora:?}): max |Δ| = {d:e}; first logits {:?} vs {:?}",
            &got[..3],
            &want[..3]
        );
        assert!(got.iter().chain(&want).all(|v| v.is_finite()));
        let moved = untrained
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(moved > 1e-2, "the step moved the logits by only {moved}");
        assert_eq!(got.len(), want.len());
        assert!(d <= 1e-4, "lora {lora:?}: logits differ by {d}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
