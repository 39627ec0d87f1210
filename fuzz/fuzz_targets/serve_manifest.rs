//! A model folder's manifest as a peer sends it (`shoal_node::serve::manifest`): size,
//! file count, names, digests and canonical form checked. Refusals are fine; panics,
//! hangs and blow-ups are not; whatever is accepted writes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_node::serve::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        assert_eq!(m.to_bytes(), data);
    }
});
