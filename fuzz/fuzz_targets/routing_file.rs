//! Any input to the routing-file parser gives a table or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ge_orchestrator::config::parse(text, "fuzz.yaml");
    }
});
