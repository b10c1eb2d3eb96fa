//! Builds the BPF object (datapath-bpf) with aya-build and leaves it in OUT_DIR, where
//! `datapath::object` embeds it. Needs nightly with rust-src and bpf-linker:
//! `cargo xtask install` sets both up.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "palisade-datapath-bpf")
        .ok_or_else(|| anyhow!("package palisade-datapath-bpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the BPF datapath failed; prerequisites: `rustup component add rust-src \
         --toolchain nightly` and `cargo install bpf-linker@0.10.2 --locked` (or run \
         `cargo xtask install`)",
    )
}
