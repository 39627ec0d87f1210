//! `/v1/infer`: one plain forward through a model's pipeline.
//!
//! The input is f32 values (`mlp`, TorchScript) or token ids (`gpt`, `hf`: below the
//! model's vocabulary, answered with the logits of every position), run through the first replica of the plan as one batch,
//! with no lanes, batching or cache. A failed stage is suspected and the forward retried
//! on a new plan until the request's deadline. The route's handler ([`infer`]) takes a
//! JSON body (nested arrays) or a safetensors one (`application/octet-stream`).

// The handler returns a ready `Response` as its error (as `http`'s do).
#![allow(clippy::result_large_err)]

use super::http::{authorize, body, invalid, parse, serve_error, Api};
use super::{ServeError, Server};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use coordinator_free::codec::stage::{self as wire, Payload};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

impl Server {
    // ------------------------------------------------------------------- infer

    /// Runs a generic forward through the model's pipeline: f32 inputs (`mlp`,
    /// TorchScript) or token ids (`gpt`, `hf`, answering logits of every position).
    pub async fn infer(
        &self,
        model: &str,
        shape: Vec<u32>,
        data: Vec<f32>,
    ) -> Result<(Vec<u32>, Vec<f32>), ServeError> {
        let (a, cfg) = self.model_for_request(model)?;
        let deadline = Instant::now() + self.inner.cfg.request_timeout;
        if shape.is_empty() || shape.len() > 4 || shape.contains(&0) {
            return Err(ServeError::Invalid(format!("input shape {shape:?}")));
        }
        let input = if cfg.is_lm() {
            if shape.len() != 2 || shape[1] > cfg.context {
                return Err(ServeError::Invalid(format!(
                    "a `{}` model takes token ids [batch, len ≤ {}]",
                    cfg.kind, cfg.context
                )));
            }
            let mut b = Vec::with_capacity(data.len() * 8);
            let vocab = cfg.vocab as f32;
            for &t in &data {
                if !(0.0..vocab).contains(&t) || t.fract() != 0.0 {
                    return Err(ServeError::Invalid(format!(
                        "token id {t} is not in the vocabulary of {} tokens",
                        cfg.vocab
                    )));
                }
                b.extend_from_slice(&(t as i64).to_le_bytes());
            }
            (Payload::Tokens, b)
        } else {
            let b = data.iter().flat_map(|f| f.to_le_bytes()).collect();
            (Payload::Hidden, b)
        };
        if wire::expected_bytes(input.0, &shape) != Some(input.1.len() as u64) {
            return Err(ServeError::Invalid(format!(
                "{} values for shape {shape:?}",
                data.len()
            )));
        }
        let batch = shape[0] as usize;
        loop {
            let plan = self.plan(model)?;
            let replica = plan.replicas[0].clone();
            let rows: Vec<u64> = (0..batch).map(|_| rand::random()).collect();
            let r = self
                .through(
                    a.sha256,
                    &replica,
                    &rows,
                    true,
                    &vec![0; batch],
                    input.clone(),
                    shape.clone(),
                    Payload::Logits,
                    Vec::new(),
                )
                .await;
            if cfg.is_lm() {
                self.drop_rows(&replica, rows);
            }
            match r {
                Ok((shape, out)) => {
                    let v = out
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect();
                    return Ok((shape, v));
                }
                Err(ServeError::Stage {
                    rejected: true,
                    reason,
                    ..
                }) => return Err(ServeError::Invalid(reason)),
                Err(e) => {
                    if let ServeError::Stage { member, .. } = &e {
                        self.suspect(member);
                    }
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Most values in one `/v1/infer` input.
pub const MAX_INFER_VALUES: usize = 1 << 20;

/// Flattens rectangular nested arrays of numbers (rank 1 to 4).
pub(super) fn flatten(v: &Value) -> Result<(Vec<u32>, Vec<f32>), String> {
    fn shape_of(v: &Value, depth: usize, shape: &mut Vec<u32>) -> Result<(), String> {
        if let Value::Array(a) = v {
            if depth >= 4 {
                return Err("inputs deeper than 4 dimensions".into());
            }
            if a.is_empty() {
                return Err("an empty dimension".into());
            }
            shape.push(a.len() as u32);
            shape_of(&a[0], depth + 1, shape)
        } else {
            Ok(())
        }
    }
    fn walk(v: &Value, depth: usize, shape: &[u32], out: &mut Vec<f32>) -> Result<(), String> {
        if depth == shape.len() {
            let x = v.as_f64().ok_or("inputs must be numbers")?;
            out.push(x as f32);
            return Ok(());
        }
        let a = v.as_array().ok_or("inputs are not rectangular")?;
        if a.len() as u32 != shape[depth] {
            return Err("inputs are not rectangular".into());
        }
        if out.len() + a.len() > MAX_INFER_VALUES {
            return Err(format!("more than {MAX_INFER_VALUES} values"));
        }
        for x in a {
            walk(x, depth + 1, shape, out)?;
        }
        Ok(())
    }
    let mut shape = Vec::new();
    shape_of(v, 0, &mut shape)?;
    if shape.is_empty() {
        return Err("inputs must be an array".into());
    }
    let mut out = Vec::new();
    walk(v, 0, &shape, &mut out)?;
    Ok((shape, out))
}

fn nest(shape: &[u32], data: &[f32]) -> Value {
    match shape {
        [] => json!(data.first().copied().unwrap_or(0.0)),
        [_] => json!(data),
        [n, rest @ ..] => {
            let step = rest.iter().map(|&d| d as usize).product::<usize>();
            Value::Array(
                (0..*n as usize)
                    .map(|i| nest(rest, &data[i * step..(i + 1) * step]))
                    .collect(),
            )
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InferRequest {
    model: String,
    pub(super) inputs: Value,
}

/// Query of a safetensors `/v1/infer`.
#[derive(Deserialize)]
pub(super) struct InferQuery {
    #[serde(default)]
    pub(super) model: Option<String>,
}

/// A safetensors request body: the model (from the query) and its one F32 tensor.
pub(super) fn safetensors_input(
    q: &InferQuery,
    body: &[u8],
) -> Result<(String, Vec<u32>, Vec<f32>), Response> {
    let model = q
        .model
        .clone()
        .ok_or_else(|| invalid("a safetensors body needs ?model=NAME", Some("model")))?;
    let c = crate::models::checkpoint::parse(body, "request body")
        .map_err(|e| invalid(e, Some("inputs")))?;
    let t = match c.get("inputs") {
        Some(t) => t.shallow_clone(),
        None if c.tensors.len() == 1 => c.tensors[0].1.shallow_clone(),
        None => return Err(invalid("name the input tensor `inputs`", Some("inputs"))),
    };
    let shape: Vec<u32> = t.size().iter().map(|&d| d as u32).collect();
    let n = t.numel();
    if n > MAX_INFER_VALUES {
        return Err(invalid(
            format!("more than {MAX_INFER_VALUES} values"),
            Some("inputs"),
        ));
    }
    let mut data = vec![0f32; n];
    t.contiguous().view([-1]).copy_data(&mut data, n);
    Ok((model, shape, data))
}

/// The `/v1/infer` handler: a JSON body, or a safetensors one.
pub(super) async fn infer(
    State(api): State<Api>,
    axum::extract::Query(q): axum::extract::Query<InferQuery>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let binary = |h: axum::http::header::HeaderName| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("application/octet-stream"))
    };
    if binary(axum::http::header::CONTENT_TYPE) {
        if let Err(r) = authorize(&api.server, &headers) {
            return r;
        }
        let b = match body(b) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let (model, shape, data) = match safetensors_input(&q, &b) {
            Ok(x) => x,
            Err(r) => return r,
        };
        return match api.server.infer(&model, shape, data).await {
            Ok((shape, out)) => {
                let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                let t = tch::Tensor::from_slice(&out).view(dims.as_slice());
                let meta = std::collections::BTreeMap::from([("model".to_string(), model)]);
                let bytes = crate::models::checkpoint::encode(&[("outputs".into(), t)], &meta);
                (
                    [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                    bytes,
                )
                    .into_response()
            }
            Err(e) => serve_error(e),
        };
    }
    let req: InferRequest = match parse(&api, &headers, b) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let (shape, data) = match flatten(&req.inputs) {
        Ok(x) => x,
        Err(e) => return invalid(e, Some("inputs")),
    };
    match api.server.infer(&req.model, shape, data).await {
        Ok((shape, out)) => Json(json!({
            "model": req.model,
            "shape": shape,
            "outputs": nest(&shape, &out),
        }))
        .into_response(),
        Err(e) => serve_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_inputs_round_trip() {
        let v = json!([[1, 2, 3], [4, 5, 6]]);
        let (shape, data) = flatten(&v).unwrap();
        assert_eq!(shape, vec![2, 3]);
        assert_eq!(data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            nest(&shape, &data),
            json!([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        );
        assert!(flatten(&json!([[1, 2], [3]])).is_err());
        assert!(flatten(&json!([[[[[1]]]]])).is_err());
        assert!(flatten(&json!(3)).is_err());
        assert!(flatten(&json!([])).is_err());
        assert!(flatten(&json!([["a"]])).is_err());
    }
}
