//! Every glob translates to a regex the regex crate accepts, and matching never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: (String, String)| {
    let (pattern, subject) = data;
    let compiled = ge_orchestrator::fnmatch::Pattern::new(&pattern).expect("every glob translates to a valid regex");
    let _ = compiled.is_match(&subject);
});
