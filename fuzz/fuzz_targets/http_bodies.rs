//! HTTP request bodies: completions, inference (JSON and safetensors) and model offers go
//! through the API's own decoding and checks. The first byte picks the endpoint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_node::serve::http::{check_body, Body};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let kind = match which % 4 {
        0 => Body::Completion,
        1 => Body::InferJson,
        2 => Body::InferSafetensors,
        _ => Body::Offer,
    };
    let _ = check_body(kind, body);
});
