//! Fuzz target: the stored-entry decoder a shared tier reads (`edgecache::cache::codec`), as
//! is and behind a valid header, re-encoded to a fixed point (see
//! `edgecache::fuzzing::exercise_entry_codec`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    edgecache::fuzzing::exercise_entry_codec(data);
});
