//! Writes trained weights as Hugging Face folders: what `transformers`' `from_pretrained`
//! and `shoal serve` load as they are.
//!
//! - [`write_model`]: a model folder — the source folder's `config.json`, the weights in
//!   f32 as safetensors shards of at most [`SHARD_BYTES`] with
//!   `model.safetensors.index.json`, and the tokenizer files copied
//!   ([`TOKENIZER_FILES`]).
//! - [`write_adapter`]: a PEFT LoRA adapter folder — `adapter_config.json` naming the base
//!   folder and `adapter_model.safetensors` with PEFT's tensor names
//!   (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), and the tokenizer
//!   files.
//!
//! Each is written into `<out>.partial/` and renamed over `<out>` once complete, so a
//! reader never sees half a folder.

use super::train::LoraConfig;
use super::HfError;
use crate::models::checkpoint;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Tensor;

/// Largest shard written, bytes. 2 GiB.
pub const SHARD_BYTES: u64 = 2 << 30;

/// The files copied from the source folder when present.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
];

/// PEFT's prefix of an adapter tensor's name.
pub const PEFT_PREFIX: &str = "base_model.model.";

fn io(path: &Path) -> impl Fn(std::io::Error) -> HfError + '_ {
    move |source| HfError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Runs `fill` on a fresh `<out>.partial/`, then puts it at `out` (replacing what was
/// there).
fn atomically(out: &Path, fill: impl FnOnce(&Path) -> Result<(), HfError>) -> Result<(), HfError> {
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    fill(&partial)?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    std::fs::rename(&partial, out).map_err(io(out))
}

/// Copies [`TOKENIZER_FILES`] present in `src` into `dst`.
fn copy_tokenizer(src: &Path, dst: &Path) -> Result<(), HfError> {
    for f in TOKENIZER_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dst.join(f)).map_err(io(&from))?;
        }
    }
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), HfError> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
    std::fs::write(path, text + "\n").map_err(io(path))
}

/// Writes `params` (Hugging Face names → f32 tensors) as a model folder at `out`, with
/// `src`'s `config.json` and tokenizer files.
pub fn write_model(src: &Path, out: &Path, params: &[(String, Tensor)]) -> Result<(), HfError> {
    atomically(out, |dir| {
        let cfg_path = src.join("config.json");
        let bytes = super::weights::read_limited(&cfg_path, super::config::MAX_CONFIG_BYTES)?;
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| HfError::Json {
                path: cfg_path.display().to_string(),
                problem: format!("not JSON: {e}"),
            })?;
        if let Some(m) = cfg.as_object_mut() {
            m.insert("dtype".into(), "float32".into());
        }
        write_json(&dir.join("config.json"), &cfg)?;
        // Shards in name order, each at most SHARD_BYTES (a larger tensor alone).
        let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
        let mut size = 0u64;
        let mut total = 0u64;
        let mut sorted: Vec<&(String, Tensor)> = params.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in sorted {
            let bytes = t.numel() as u64 * 4;
            if size > 0 && size + bytes > SHARD_BYTES {
                shards.push(Vec::new());
                size = 0;
            }
            size += bytes;
            total += bytes;
            let t = t.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
            shards.last_mut().expect("one").push((name.clone(), t));
        }
        let n = shards.len();
        let mut map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
            let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
            checkpoint::write(&dir.join(&file), shard, &meta).map_err(|e| HfError::Weights {
                path: dir.join(&file).display().to_string(),
                problem: e.to_string(),
            })?;
            for (name, _) in shard {
                map.insert(name.clone(), file.clone());
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
        write_json(&dir.join(super::weights::INDEX), &index)?;
        copy_tokenizer(src, dir)
    })
}

/// Writes the LoRA adapters among `params` (names containing `.lora_A.` / `.lora_B.`) as
/// a PEFT adapter folder at `out` for the base folder `base`.
pub fn write_adapter(
    base: &Path,
    out: &Path,
    lora: &LoraConfig,
    params: &[(String, Tensor)],
) -> Result<(), HfError> {
    atomically(out, |dir| {
        let base_abs = base.canonicalize().map_err(io(base))?;
        let cfg = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_abs,
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "lora_dropout": 0.0,
            "target_modules": lora.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
        });
        write_json(&dir.join("adapter_config.json"), &cfg)?;
        let tensors: Vec<(String, Tensor)> = params
            .iter()
            .filter(|(n, _)| n.contains(".lora_A.") || n.contains(".lora_B."))
            .map(|(n, t)| {
                let t = t.to_kind(tch::Kind::Float).to_device(tch::Device::Cpu);
                (format!("{PEFT_PREFIX}{n}"), t)
            })
            .collect();
        let file = dir.join("adapter_model.safetensors");
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        checkpoint::write(&file, &tensors, &meta).map_err(|e| HfError::Weights {
            path: file.display().to_string(),
            problem: e.to_string(),
        })?;
        copy_tokenizer(base, dir)
    })
}

/// Whether `dir` is a PEFT adapter folder (it has `adapter_config.json`).
pub fn is_adapter(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file()
}

/// Writes at `out` the model folder of the PEFT LoRA adapter folder `adapter` merged into
/// its base (`base_model_name_or_path`, a folder): each target weight becomes
/// `W + (alpha / r) · B·A`, in f32. Adapters shoal does not implement (DoRA, rsLoRA,
/// `fan_in_fan_out`, trained biases, `modules_to_save`, other PEFT types) are refused by
/// key. Holds the whole merged model in memory while writing it. Returns the base folder.
pub fn merge_adapter(adapter: &Path, out: &Path) -> Result<std::path::PathBuf, HfError> {
    let cfg_path = adapter.join("adapter_config.json");
    let label = cfg_path.display().to_string();
    let bytes = super::weights::read_limited(&cfg_path, super::config::MAX_CONFIG_BYTES)?;
    let cfg: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| HfError::Json {
        path: label.clone(),
        problem: format!("not JSON: {e}"),
    })?;
    let key = |k: &str| cfg.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let refuse = |k: &str, why: &str| HfError::Unsupported {
        path: label.clone(),
        key: k.into(),
        value: key(k).to_string(),
        why: why.into(),
    };
    if key("peft_type") != "LORA" {
        return Err(refuse("peft_type", "LORA only"));
    }
    for (k, ok) in [
        ("use_dora", serde_json::Value::Bool(false)),
        ("use_rslora", serde_json::Value::Bool(false)),
        ("fan_in_fan_out", serde_json::Value::Bool(false)),
    ] {
        if !key(k).is_null() && key(k) != ok {
            return Err(refuse(k, "false only"));
        }
    }
    if !key("bias").is_null() && key("bias") != "none" {
        return Err(refuse("bias", "\"none\" only"));
    }
    if !key("modules_to_save").is_null() {
        return Err(refuse("modules_to_save", "null only"));
    }
    let bad = |k: &str, p: &str| HfError::Config {
        path: label.clone(),
        key: k.into(),
        problem: p.into(),
    };
    let r = key("r")
        .as_f64()
        .filter(|r| *r >= 1.0)
        .ok_or_else(|| bad("r", "not a positive number"))?;
    let alpha = key("lora_alpha")
        .as_f64()
        .ok_or_else(|| bad("lora_alpha", "not a number"))?;
    let base = key("base_model_name_or_path");
    let base = std::path::PathBuf::from(
        base.as_str()
            .ok_or_else(|| bad("base_model_name_or_path", "not a folder path"))?,
    );
    let base = if base.is_relative() {
        adapter.join(base)
    } else {
        base
    };
    if !base.join("config.json").is_file() {
        return Err(bad(
            "base_model_name_or_path",
            &format!("{} is not a model folder on this machine", base.display()),
        ));
    }
    // The adapter's tensors, by PEFT name.
    let file = adapter.join("adapter_model.safetensors");
    let header = checkpoint::read_header(&file).map_err(|e| HfError::Weights {
        path: file.display().to_string(),
        problem: e.to_string(),
    })?;
    let get = |n: &str| {
        checkpoint::read_tensor(&file, &header, n)
            .map(|t| t.to_kind(tch::Kind::Float))
            .map_err(|e| HfError::Weights {
                path: file.display().to_string(),
                problem: e.to_string(),
            })
    };
    let weights = super::HfWeights::open(&base)?;
    let mut used = 0;
    let mut params = Vec::new();
    for name in weights.names() {
        let mut w = weights.get(name)?.to_kind(tch::Kind::Float);
        if let Some(stem) = name.strip_suffix(".weight") {
            let (a, b) = (
                format!("{PEFT_PREFIX}{stem}.lora_A.weight"),
                format!("{PEFT_PREFIX}{stem}.lora_B.weight"),
            );
            if header.get(&a).is_some() && header.get(&b).is_some() {
                let delta = get(&b)?.matmul(&get(&a)?) * (alpha / r);
                if delta.size() != w.size() {
                    return Err(HfError::Weights {
                        path: file.display().to_string(),
                        problem: format!(
                            "`{a}`/`{b}` make {:?}, `{name}` is {:?}",
                            delta.size(),
                            w.size()
                        ),
                    });
                }
                w += delta;
                used += 2;
            }
        }
        params.push((name.to_string(), w));
    }
    let adapters = header.tensors.len();
    if used != adapters {
        return Err(HfError::Weights {
            path: file.display().to_string(),
            problem: format!(
                "{} of its {adapters} tensors adapt no weight of {}",
                adapters - used,
                base.display()
            ),
        });
    }
    write_model(&base, out, &params)?;
    // The adapter's own tokenizer files (if any) win over the base's.
    copy_tokenizer(adapter, out)?;
    Ok(base)
}
