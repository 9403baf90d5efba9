//! Regression test over the fuzz corpus (`fuzz/corpus/header_parsers`): every input that was
//! ever interesting to the fuzzer — past crashers included — is fed to the header parsers on
//! every `cargo test`, without needing cargo-fuzz.

#[test]
fn header_parsers_survive_the_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/header_parsers");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        edgecache::fuzzing::exercise_header_parsers(&data);
        count += 1;
    }
    assert!(count >= 5, "corpus has {count} inputs");
}
