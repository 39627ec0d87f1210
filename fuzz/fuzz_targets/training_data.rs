//! Training data files: JSONL records (a text field, or a conversation's messages), read
//! line by line with a length cap, and Parquet files (a string column, or a list of
//! `{role, content}` structs) read row group by row group. The first byte picks the format.
//! Refusals are fine; panics, hangs and blow-ups are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_node::train::data::{check_records, RecordFormat};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let format = match which % 4 {
        0 => RecordFormat::Jsonl,
        1 => RecordFormat::JsonlChat,
        2 => RecordFormat::Parquet,
        _ => RecordFormat::ParquetChat,
    };
    let _ = check_records(format, bytes);
});
