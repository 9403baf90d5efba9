//! Fuzz target: every untrusted header parser at once (see `edgecache::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgecache::fuzzing::exercise_header_parsers(data);
});
