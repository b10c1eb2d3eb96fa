//! `cargo xtask gen-crds`: the CustomResourceDefinitions of controller/k8s/src/crd.rs as YAML in
//! policies/crds/, one file per CRD. The directory holds generated files only: a generated
//! file no CRD produces any more is removed, and a file that was not generated is an error.
//! `cargo test -p palisade-k8s` fails while the files are stale.

use std::path::Path;

use anyhow::{Context as _, bail};
use palisade_k8s::crd::{CRD_DIR, GENERATED_HEADER, crd_files};

use crate::workspace_root;

pub fn run() -> anyhow::Result<()> {
    let dir = workspace_root().join(CRD_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = crd_files()?;
    for file in &files {
        let path = dir.join(&file.file_name);
        let current = std::fs::read_to_string(&path).ok();
        if current.as_deref() == Some(file.contents.as_str()) {
            println!("{CRD_DIR}/{} is up to date", file.file_name);
            continue;
        }
        std::fs::write(&path, &file.contents)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {CRD_DIR}/{}", file.file_name);
    }
    remove_stale(&dir, &files)
}

/// Removes generated files no CRD produces any more; refuses to touch any other file.
fn remove_stale(dir: &Path, files: &[palisade_k8s::crd::CrdFile]) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if files.iter().any(|f| f.file_name == name) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if !text.starts_with(GENERATED_HEADER) {
            bail!(
                "{} was not written by `cargo xtask gen-crds`; {CRD_DIR}/ holds generated files only: move it elsewhere",
                path.display()
            );
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        println!("removed {CRD_DIR}/{name} (no CRD produces it any more)");
    }
    Ok(())
}
