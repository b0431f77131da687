//! The engine works on domain types only: wire types are converted in
//! `proto/src/convert.rs`, at the hub and the API. This fails when engine
//! code names the generated `wavegate.v1` types again.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read the engine's sources") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_engine_names_no_wire_type() {
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let mut files = Vec::new();
    rust_files(&engine, &mut files);
    assert!(files.len() >= 5, "the engine's sources were found: {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for (n, line) in text.lines().enumerate() {
            assert!(
                !line.contains("pb::") && !line.contains("wavegate_proto"),
                "{}:{}: the engine names a wire type: {line}",
                f.display(),
                n + 1
            );
        }
    }
}
