//! A Hugging Face folder's `model.safetensors.index.json`
//! (`shoal_node::models::hf::weights::parse_index`, what `HfWeights::open` runs on the
//! file's bytes): the `weight_map` of tensor names to shards, every shard a plain file name
//! in the folder. Refusals are fine; panics, hangs and blow-ups are not; nothing accepted
//! names a path outside the folder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_node::models::hf::weights::parse_index;

fuzz_target!(|data: &[u8]| {
    if let Ok(map) = parse_index(data, "model.safetensors.index.json") {
        for file in map.values() {
            let mut parts = std::path::Path::new(file).components();
            assert!(matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            ));
        }
    }
});
