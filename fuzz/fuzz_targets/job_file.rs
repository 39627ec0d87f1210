//! Job files (TOML) as `shoal submit` and `POST /v1/jobs` take them: parsed and validated,
//! never a panic; a job that parses prints back to TOML that parses to the same job.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_node::train::job::JobSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(job) = JobSpec::parse(text) {
        let again = JobSpec::parse(&job.to_toml()).expect("a parsed job prints back");
        assert_eq!(again.to_toml(), job.to_toml());
    }
});
