//! A model folder's text files: `tokenizer.json` (parsed by the `tokenizers` crate, then
//! used to encode, decode and stream), `tokenizer_config.json` (special tokens, the chat
//! template's place) and chat templates (compiled and rendered with small bounds). The
//! first byte picks the file. Refusals are fine; panics, hangs and blow-ups are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_node::text::{check_file, File};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let kind = match which % 3 {
        0 => File::TokenizerJson,
        1 => File::TokenizerConfig,
        _ => File::ChatTemplate,
    };
    let _ = check_file(kind, bytes);
});
