//! Prerequisites, installed when missing, saying what and why.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{nightly_cargo, run};

const BPF_LINKER_VERSION: &str = "0.10.2";

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether dpkg has `package` installed.
fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["--show", "--showformat=${Status}", package]))
        .is_some_and(|status| status.ends_with("installed") && !status.contains("not-installed"))
}

/// Debian packages the agent, the tests and the demo use, and why.
const PACKAGES: [(&str, &str); 8] = [
    ("iproute2", "`ip`: namespaces and links"),
    (
        "util-linux",
        "`nsenter`, `unshare`: agents and runtimes in a test's namespace",
    ),
    ("podman", "the CNI tests run containers with podman"),
    (
        "containerd",
        "the CNI tests run containers with containerd's ctr",
    ),
    (
        "runc",
        "the OCI runtime podman and containerd start containers with",
    ),
    (
        "containernetworking-plugins",
        "the CNI reference plugins (host-local, bridge, ptp)",
    ),
    (
        "busybox-static",
        "the test containers' root filesystem (no image registry)",
    ),
    (
        "dnsmasq-base",
        "the DNS tests' and benchmark's resolver (dnsmasq in an endpoint's namespace)",
    ),
];

fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(pkg, _)| !installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (pkg, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
        eprintln!("xtask: {pkg} is missing ({why})");
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

/// cargo-fuzz, for `cargo xtask fuzz` only (not part of `ensure`: the build, the tests and CI
/// do not need it). It runs on the nightly toolchain (sanitizer flags).
pub fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    if output(nightly_cargo().arg("--version")).is_none() {
        bail!("fuzzing needs the nightly toolchain: rustup toolchain install nightly");
    }
    if output(nightly_cargo().args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (runs the fuzz targets; takes a minute once)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}
