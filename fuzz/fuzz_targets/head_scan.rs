//! Fuzz target: the request head scanner (`edgecache::server::head_scan`), whole, split and
//! byte by byte (see `edgecache::fuzzing::exercise_head_scan`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgecache::fuzzing::exercise_head_scan(data);
});
