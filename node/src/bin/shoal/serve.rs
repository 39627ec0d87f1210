//! `shoal serve`: offers a model (a shoal checkpoint, a TorchScript file or a Hugging Face
//! folder) to a node, or to N local nodes it starts, waits until it is served, and asks it
//! the `--prompt`s.

use crate::cluster::{self, data_plane_args, local_dir, start_agreed};
use crate::failure::{usage, Failure};
use anyhow::anyhow;
use clap::Args;
use shoal_node::local::LocalCluster;
use shoal_node::serve::ModelReport;
use shoal_node::status;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct ServeArgs {
    /// The model: a shoal checkpoint (`runs/<job>/checkpoint.safetensors`), a
    /// TorchScript file, a Hugging Face folder (`config.json` with safetensors weights:
    /// Llama, Mistral, Qwen2, Qwen3; text prompts need its `tokenizer.json`, token-id
    /// prompts work without), or a PEFT LoRA adapter folder (`adapter_config.json`, e.g.
    /// `runs/<job>/adapter/`), served merged into its base (written to `<adapter>/merged/`).
    model: PathBuf,
    /// The name clients ask for. Default: the run directory's name for a checkpoint,
    /// else the file stem (a folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Fewest pipeline stages per replica. Default: 1 (as few as memory allows).
    #[arg(long, default_value_t = 1)]
    stages: u32,
    /// A Hugging Face folder's compute type: auto, f32, bf16 or f16. Default: auto (the
    /// weights' stored type on a GPU, f32 on the CPU, where 16-bit matrix products are
    /// slower; see docs/benchmarks.md).
    #[arg(long, default_value = "auto")]
    dtype: shoal_node::models::hf::ServeDtype,
    /// A Hugging Face folder's context in tokens (each request's KV cache is sized for
    /// it): at most `max_position_embeddings`. Default: `max_position_embeddings` or 4096,
    /// whichever is less.
    #[arg(long)]
    context: Option<u32>,
    /// Start this many local nodes on 127.0.0.1 and serve on them.
    #[arg(long)]
    local: Option<usize>,
    /// Ask this prompt (greedy) once the model is served, print the question and the
    /// answer (repeatable); with --local, exit afterwards.
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// Tokens to generate per --prompt. Default: 16.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Ask each --prompt as a user message through `/v1/chat/completions` (rendered with
    /// the model's chat template) instead of as a prompt to `/v1/completions`. Default: off.
    #[arg(long)]
    chat: bool,
    /// Print JSON lines (the offer, then one per prompt: its completion, finish reason,
    /// token usage and milliseconds). Default: off (text).
    #[arg(long, env = "SHOAL_JSON")]
    json: bool,
    /// The local API of the node to offer the model to (without --local).
    /// Default: 127.0.0.1:4412.
    #[arg(long, env = "SHOAL_API", default_value = "127.0.0.1:4412")]
    api: SocketAddr,
    /// Bearer token of the serving API (also given to --local nodes). Default: none.
    #[arg(long, env = "SHOAL_API_TOKEN")]
    api_token: Option<String>,
    /// Data-plane transport of --local nodes: tcp (loopback is trusted) or quic.
    /// Default: tcp.
    #[arg(long, default_value = "tcp")]
    data_plane: shoal_node::data_plane::DataTransport,
    /// Where --local nodes keep their data dirs and logs. Default: a temporary dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The device --local nodes serve on (`shoal up --device`): auto, cpu, cuda, cuda:N.
    /// Default: auto (the first CUDA device when there is one, else the CPU).
    #[arg(long, default_value = "auto")]
    device: shoal_node::device::DeviceSpec,
    /// Give up (exit 1) if the model is not served within this many seconds. Default: 120.
    #[arg(long, env = "SHOAL_TIMEOUT_S", default_value_t = 120)]
    timeout_s: u64,
}

/// The model name when `--name` is not given: the run directory's name for a checkpoint
/// (`runs/<job>/checkpoint.safetensors`), else the file stem; other characters than
/// `[A-Za-z0-9-_.:]` become `-`, at most 64.
fn default_model_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let name = if stem == "checkpoint" {
        path.canonicalize()
            .ok()
            .and_then(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or(stem)
    } else {
        stem
    };
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

/// The local API, with the serving API's bearer token where one is set.
#[derive(Clone)]
struct Api {
    addr: SocketAddr,
    token: Option<String>,
}

impl Api {
    /// `POST /v1/serve` of `offer`; the node's 400 (a model it cannot serve) is bad input.
    async fn offer(&self, offer: &str) -> Result<Vec<u8>, Failure> {
        status::http_request_with(
            self.addr,
            "POST",
            "/v1/serve",
            self.token.as_deref(),
            offer.as_bytes(),
            Duration::from_secs(120),
        )
        .await
        .map_err(|e| match e {
            status::ClientError::Status { status: 400, body } => usage(anyhow!("{body}")),
            e => anyhow::Error::from(e).into(),
        })
    }
}

/// `shoal serve`: offers the model to `--api`, or to `--local N` nodes started here.
pub async fn serve(a: ServeArgs) -> Result<(), Failure> {
    let path = a
        .model
        .canonicalize()
        .map_err(|e| usage(anyhow!("cannot read {}: {e}", a.model.display())))?;
    if path.is_dir() && !shoal_node::models::hf::export::is_adapter(&path) {
        // A folder is checked here before any node starts: a bad one is one line naming
        // the file (an adapter folder is merged and checked by the node it is offered to).
        let bad =
            |e: &dyn std::fmt::Display| usage(anyhow!("cannot serve {}: {e}", path.display()));
        let hf = shoal_node::models::config::HfServe {
            dtype: a.dtype,
            context: a.context,
            ..Default::default()
        };
        shoal_node::models::config::describe_with(&path, hf).map_err(|e| bad(&e))?;
        if path.join("tokenizer.json").is_file() {
            shoal_node::text::Tokenizer::load(&path).map_err(|e| bad(&e))?;
        }
    }
    let name = a.name.clone().unwrap_or_else(|| default_model_name(&path));
    let offer = serde_json::json!({"path": path, "name": name, "stages": a.stages,
        "dtype": a.dtype.to_string(), "context": a.context})
    .to_string();
    let token = a.api_token.clone().filter(|t| !t.is_empty());
    let Some(n) = a.local else {
        let api = Api { addr: a.api, token };
        let reply = api.offer(&offer).await?;
        println!("{}", String::from_utf8_lossy(&reply).trim());
        for p in &a.prompts {
            ask(&api, &name, p, a.max_tokens, a.chat, a.json).await?;
        }
        return Ok(());
    };
    serve_local(&a, n, &name, &offer, token).await
}

/// Starts `n` local nodes, serves the model on them, asks the prompts, and (without
/// prompts) runs until Ctrl-C.
async fn serve_local(
    a: &ServeArgs,
    n: usize,
    name: &str,
    offer: &str,
    token: Option<String>,
) -> Result<(), Failure> {
    let (dir, temp) = local_dir(a.dir.clone());
    let mut extra = data_plane_args(a.data_plane);
    extra.extend(["--device".to_string(), a.device.to_string()]);
    if let Some(tok) = &token {
        extra.extend(["--api-token".to_string(), tok.clone()]);
    }
    let bound = Duration::from_secs(a.timeout_s);
    let (mut c, _) = start_agreed(&dir, n, &extra, bound).await?;
    let api = Api {
        addr: c
            .api(0)
            .ok_or_else(|| anyhow!("node 0 has no API address"))?,
        token,
    };
    let reply = api.offer(offer).await?;
    let Some(model) = wait_served(&mut c, name, a.stages, bound).await? else {
        return Err(anyhow!(
            "the model was not served within {} s; logs under {}",
            a.timeout_s,
            dir.display()
        )
        .into());
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({"served": name, "offer": serde_json::from_slice::<serde_json::Value>(&reply).unwrap_or_default(), "replicas": model.replicas,
                "apis": (0..n).filter_map(|i| c.api(i).map(|a| a.to_string())).collect::<Vec<_>>()})
        );
    } else {
        println!("serving `{name}` on {n} local nodes; replicas:");
        for (i, r) in model.replicas.iter().enumerate() {
            println!("  {i}: {}", r.join(" -> "));
        }
        for i in 0..n {
            if let Some(api) = c.api(i) {
                println!("  node {i}: http://{api}/v1/completions");
            }
        }
    }
    let result = async {
        for p in &a.prompts {
            ask(&api, name, p, a.max_tokens, a.chat, a.json).await?;
        }
        Ok::<(), Failure>(())
    }
    .await;
    let wait = result.is_ok() && a.prompts.is_empty();
    cluster::finish(c, &dir, temp, wait, a.json).await;
    result
}

/// Waits at most `bound` until model `name` is served: every node of `c` holds it and
/// node 0 has a plan whose first replica has `stages` stages (or one per node, when fewer).
/// The model's report then, or `None` at the bound.
pub async fn wait_served(
    c: &mut LocalCluster,
    name: &str,
    stages: u32,
    bound: Duration,
) -> Result<Option<ModelReport>, Failure> {
    let n = c.len();
    let depth = (stages as usize).max(1).min(n);
    Ok(c.poll_until(bound, Duration::from_millis(100), |reports| {
        let r = reports.first()?.1.as_ref()?;
        let m = r.serving.iter().find(|m| m.name == name)?;
        (m.holders.len() >= n && m.replicas.first().is_some_and(|r| r.len() >= depth))
            .then(|| m.clone())
    })
    .await?)
}

/// Asks one greedy completion (a chat completion of one user message with `chat`) and
/// prints the question and the answer.
async fn ask(
    api: &Api,
    model: &str,
    prompt: &str,
    max_tokens: u32,
    chat: bool,
    json: bool,
) -> Result<(), Failure> {
    let (path, body) = if chat {
        let messages = [serde_json::json!({"role": "user", "content": prompt})];
        (
            "/v1/chat/completions",
            serde_json::json!({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}),
        )
    } else {
        (
            "/v1/completions",
            serde_json::json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
        )
    };
    let body = body.to_string();
    let t0 = Instant::now();
    let reply = status::http_request_with(
        api.addr,
        "POST",
        path,
        api.token.as_deref(),
        body.as_bytes(),
        Duration::from_secs(120),
    )
    .await
    .map_err(anyhow::Error::from)?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let v: serde_json::Value = serde_json::from_slice(&reply).map_err(anyhow::Error::from)?;
    let choice = &v["choices"][0];
    let Some(text) = choice["text"]
        .as_str()
        .or_else(|| choice["message"]["content"].as_str())
    else {
        return Err(anyhow!("{path} answered without a completion: {v}").into());
    };
    if json {
        println!(
            "{}",
            serde_json::json!({"prompt": prompt, "completion": text, "finish_reason": choice["finish_reason"], "usage": v["usage"], "ms": ms})
        );
    } else {
        println!("{prompt:?} -> {text:?} ({ms:.1} ms)");
    }
    Ok(())
}
