//! Data-plane bytes from a peer: the handshake (hello, then signature), collective
//! headers, and serving-stage frames (length prefixes, request and reply meta, the payload
//! size a request implies). The first byte picks the decoder.
#![no_main]

use coordinator_free::codec::{data::OpHeader, stage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    match which % 4 {
        0 => {
            let mut r = rest;
            if rt
                .block_on(shoal_node::data_plane::read_hello(&mut r))
                .is_ok()
            {
                let _ = rt.block_on(shoal_node::data_plane::read_sig(&mut r));
            }
        }
        1 => {
            if let Ok(h) = OpHeader::decode(rest) {
                assert_eq!(OpHeader::decode(&h.encode()).expect("round trip"), h);
            }
        }
        2 => {
            let mut r = rest;
            let Ok((meta, payload)) = rt.block_on(shoal_node::serve::read_frame(&mut r)) else {
                return;
            };
            if let Ok(req) = stage::StageRequest::decode(&meta) {
                if let stage::StageRequest::Forward { input, shape, .. } = &req {
                    let _ =
                        stage::expected_bytes(*input, shape).filter(|&n| n == payload.len() as u64);
                }
                let again = req.encode().expect("re-encodes");
                assert_eq!(stage::StageRequest::decode(&again).expect("decodes"), req);
            }
        }
        _ => {
            if let Ok(reply) = stage::StageReply::decode(rest) {
                let again = reply.encode().expect("re-encodes");
                assert_eq!(stage::StageReply::decode(&again).expect("decodes"), reply);
            }
        }
    }
});
