//! Regression tests over the fuzz corpora (`fuzz/corpus/header_parsers`,
//! `fuzz/corpus/head_scan`, `fuzz/corpus/entry_codec`): every input that was ever
//! interesting to the fuzzer — past crashers included — is fed to the parsers on every
//! `cargo test`, without needing cargo-fuzz.

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

#[test]
fn head_scan_survives_the_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/head_scan");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        edgecache::fuzzing::exercise_head_scan(&data);
        count += 1;
    }
    assert!(count >= 3, "corpus has {count} inputs");
}

#[test]
fn entry_codec_survives_the_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/entry_codec");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        edgecache::fuzzing::exercise_entry_codec(&data);
        count += 1;
    }
    assert!(count >= 3, "corpus has {count} inputs");
}
