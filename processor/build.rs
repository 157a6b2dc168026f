//! Embeds every `migrations/*.sql` file of the workspace into the binary, in name order, so a
//! new migration is picked up by dropping a file in the folder (no list to keep in sync).

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let dir = manifest.join("..").join("migrations");
    println!("cargo:rerun-if-changed={}", dir.display());

    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|ext| ext == "sql"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();

    let mut out = String::from("&[\n");
    for path in &files {
        let version = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("migration file names are UTF-8");
        let absolute = path.canonicalize().expect("canonical migration path");
        let _ = writeln!(
            out,
            "    ({version:?}, include_str!({:?})),",
            absolute.display().to_string()
        );
    }
    out.push(']');
    let target = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("migrations.rs");
    std::fs::write(target, out).expect("write the embedded migration list");
}
