//! Checking served logprobs against the model's distribution, computed by the test.

use serde_json::Value;

/// `log_softmax` of each `vocab`-wide row of the flat f32 `logits`, by libtorch in f32:
/// the reference the served logprobs are compared with.
pub fn log_softmax_rows(logits: &[f32], vocab: usize) -> Vec<Vec<f32>> {
    let t = tch::Tensor::from_slice(logits).view([-1, vocab as i64]);
    let flat = Vec::<f32>::try_from(t.log_softmax(-1, tch::Kind::Float).view([-1]))
        .expect("f32 log_softmax");
    flat.chunks_exact(vocab).map(|r| r.to_vec()).collect()
}

/// The `n` largest values of `row`, largest first.
pub fn largest(row: &[f32], n: usize) -> Vec<f32> {
    let mut v = row.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    v.truncate(n);
    v
}

fn f32_of(v: &Value) -> f32 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")) as f32
}

/// Checks the `logprobs` of a greedy `/v1/completions` choice asked with `top`
/// alternatives, for its generated tokens `ids`, against `rows` (per token, the
/// log_softmax of the logits that chose it): each token is named `name(id)`; its logprob
/// is its row's at `id` within `tol`, and the largest of its alternatives (greedy chose
/// the most likely token: its own entry there, with the same value); the alternatives'
/// logprobs, sorted, are the row's `top` largest within `tol`. Returns the text offsets.
pub fn check_greedy_completion_logprobs(
    lp: &Value,
    ids: &[u32],
    rows: &[Vec<f32>],
    top: usize,
    name: impl Fn(u32) -> String,
    tol: f32,
) -> Vec<u64> {
    let list = |k: &str| {
        lp[k]
            .as_array()
            .unwrap_or_else(|| panic!("no `{k}` in {lp}"))
            .clone()
    };
    let (tokens, values, tops, offsets) = (
        list("tokens"),
        list("token_logprobs"),
        list("top_logprobs"),
        list("text_offset"),
    );
    for l in [&tokens, &values, &tops, &offsets] {
        assert_eq!(l.len(), ids.len(), "one entry per token: {lp}");
    }
    let mut worst = 0f32;
    for (i, &id) in ids.iter().enumerate() {
        let row = &rows[i];
        assert_eq!(tokens[i], name(id).as_str(), "token {i}");
        let v = f32_of(&values[i]);
        worst = worst.max((v - row[id as usize]).abs());
        let alts = tops[i].as_object().expect("an object of alternatives");
        assert_eq!(alts.len(), top.max(1), "token {i}: {alts:?}");
        let mut got: Vec<f32> = alts.values().map(f32_of).collect();
        got.sort_by(|a, b| b.total_cmp(a));
        assert_eq!(got[0], v, "token {i}: the chosen is the most likely");
        assert_eq!(
            alts.get(&name(id)),
            Some(&values[i]),
            "token {i}: its own entry"
        );
        for (g, w) in got.iter().zip(largest(row, top)) {
            worst = worst.max((g - w).abs());
        }
    }
    assert!(worst <= tol, "max |served - log_softmax| = {worst}");
    eprintln!(
        "{} tokens: max |served logprob - log_softmax| = {worst:e}",
        ids.len()
    );
    offsets
        .iter()
        .map(|o| o.as_u64().expect("an offset"))
        .collect()
}
