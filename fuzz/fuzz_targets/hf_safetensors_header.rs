//! A safetensors file of a Hugging Face folder (`shoal_node::models::checkpoint`): the
//! 8-byte header length (bounded by the file and `MAX_HEADER_BYTES`), the JSON header and
//! every entry's dtype, shape and offsets checked against the file, as `read_header` checks
//! a shard. The input is the whole file; it is also read as the head of a much larger file
//! (offsets past the input then fit). Whatever is accepted builds its tensors as
//! `read_tensor` does. Refusals are fine; panics, hangs and blow-ups are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_node::models::checkpoint::{parse, parse_file_header, tensor_from_bytes};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_file_header(data, data.len() as u64, "fuzz") {
        assert!(h.data_start <= data.len() as u64);
        let body = &data[h.data_start as usize..];
        for (name, e) in &h.tensors {
            assert!(e.start <= e.end && e.end <= body.len() as u64);
            let bytes = &body[e.start as usize..e.end as usize];
            if let Ok(t) = tensor_from_bytes(name, e, bytes, "fuzz") {
                assert_eq!(t.size(), e.shape);
            }
        }
        let _ = parse(data, "fuzz");
    }
    // The same bytes as the head of a 1 TiB file: only the header is checked.
    let _ = parse_file_header(data, 1 << 40, "fuzz");
});
