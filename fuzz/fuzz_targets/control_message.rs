//! Control-plane gossip: every message a peer can publish. Decoding is size-limited and
//! never panics; what decodes is validated as the node validates it, and re-encodes to a
//! message that decodes to the same value.
#![no_main]

use coordinator_free::ControlMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = ControlMessage::decode(data) else {
        return;
    };
    if let ControlMessage::Heartbeat(hb) = &msg {
        let _ = hb.validate();
    }
    let again = msg.encode().expect("a decoded message re-encodes");
    assert_eq!(ControlMessage::decode(&again).expect("and decodes"), msg);
});
