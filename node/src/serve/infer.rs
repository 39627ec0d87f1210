//! `/v1/infer`: one plain forward through a model's pipeline.
//!
//! The input is f32 values (`mlp`, TorchScript) or token ids (`gpt`, `hf`: below the
//! model's vocabulary, answered with the logits of every position), run through the first replica of the plan as one batch,
//! with no lanes, batching or cache. A failed stage is suspected and the forward retried
//! on a new plan until the request's deadline.

use super::{ServeError, Server};
use coordinator_free::codec::stage::{self as wire, Payload};
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
