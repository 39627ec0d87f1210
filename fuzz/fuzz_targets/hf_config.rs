//! A Hugging Face folder's `config.json` (`shoal_node::models::hf::HfConfig::parse`, what
//! `HfConfig::read` runs on the file's bytes): every key's type and range, the families,
//! RoPE types and attention variants refused by key and value. Whatever is accepted is
//! sized for a serving plan (`model_config`, `block_params`, checked as an offer is) and its rotary frequencies
//! computed, as a stage does. Refusals are fine; panics (overflows included), hangs and
//! blow-ups are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_node::models::hf::{llama::inv_freq, model_config, HfConfig};

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = HfConfig::parse(data, "config.json") {
        let _ = cfg.block_params();
        for kind in [tch::Kind::Float, tch::Kind::BFloat16] {
            let mc = model_config(&cfg, kind);
            assert_eq!(mc.layer_bytes.len(), cfg.layers);
            let _ = mc.validate();
        }
        assert_eq!(inv_freq(&cfg).size(), [cfg.head_dim / 2]);
    }
});
