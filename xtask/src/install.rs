//! Prerequisites, installed when missing, saying what and why.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run;

const BPF_LINKER_VERSION: &str = "0.10.2";

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Debian packages the agent, the tests and the demo use: `ip` (iproute2) for namespaces and
/// `nsenter` (util-linux) to start the agent in one.
const PACKAGES: [(&str, &str); 2] = [("ip", "iproute2"), ("nsenter", "util-linux")];

fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {missing:?} (commands missing)");
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "Debian packages {missing:?} are missing; install them (apt-get install {}) or rerun as root",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup is needed to build the BPF programs (nightly toolchain)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing rust-src for the nightly toolchain (the BPF crate builds core from source)"
    );
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} (links the BPF object; takes a few minutes once)"
    );
    run(Command::new("cargo").args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))
}

pub fn ensure() -> anyhow::Result<()> {
    ensure_packages()?;
    ensure_rust_src()?;
    ensure_bpf_linker()
}
