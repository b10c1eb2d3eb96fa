//! `cargo xtask <task>`: what a build script cannot do.
//!
//! - `install`: prerequisites (nightly rust-src, bpf-linker, Debian packages), with messages;
//! - `build`: the agent, CLI and BPF object;
//! - `install-cni`: palisade-cni and an example network for the host's runtimes;
//! - `demo`: the product in one run, in a throwaway node namespace;
//! - `lint`: clippy with warnings as errors, on the host crates and on the BPF crate;
//! - `test`: the lint, unit tests and the root-only integration tests (what CI runs);
//! - `bench`: benchmarks;
//! - `fuzz`: the cargo-fuzz targets, each for a while.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a developer's task runner: it reports to the terminal"
)]

mod bench;
mod bench_k8s;
mod bench_l7;
mod bench_prefilter;
mod bench_scale;
mod demo;
mod fuzz;
mod gen_crds;
mod install;
mod install_cni;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs: rust-src for nightly, bpf-linker, Debian packages.
    Install,
    /// Install palisade-cni (release build) into the CNI plugin directory and the example
    /// conflist (network "palisade", standalone, host-local IPAM) into the network directory;
    /// links host-local and loopback beside it when missing.
    InstallCni {
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// Replace the conflist when one is there already.
        #[arg(long)]
        force: bool,
    },
    /// Build the BPF object only (via the agent's build script).
    BuildEbpf,
    /// Build palisade-agent and palisade.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the demo: a node namespace, three workloads, policies, traffic, and why.
    Demo,
    /// Clippy with warnings as errors: the host crates (all targets), then the BPF crate
    /// (nightly, BPF target).
    Lint,
    /// The lint, unit tests, then the integration tests (needs root).
    Test {
        /// Only the lint and the unit tests (no root needed).
        #[arg(long)]
        unit_only: bool,
        /// Arguments for the integration test binaries (e.g. a test name filter).
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Benchmarks (needs root): policy-scale, flow-ingest, l7-proxy, prefilter, kubernetes-scale (default:
    /// all). Results go to docs/benchmarks/.
    Bench { which: Option<String> },
    /// Write the CRD YAML of controller/k8s/src/crd.rs into policies/crds/.
    GenCrds,
    /// Every fuzz target (or the named ones) in turn, from the crate it fuzzes (`<crate>/fuzz`,
    /// cargo-fuzz on nightly, installed when missing), with seed inputs. Fails naming the target
    /// and the input when one crashes, hangs or runs out of memory.
    Fuzz {
        /// Time per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all): request_head, manifest, api_requests, flow_filter.
        targets: Vec<String>,
    },
    /// Only the integration tests (needs root).
    Integration {
        #[arg(last = true)]
        filter: Vec<String>,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// `cargo +nightly`, through rustup's proxy, without the variables an outer `cargo xtask` set
/// (the stable toolchain's cargo and rustc), which would pin the child to stable.
pub fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace_root()).arg("+nightly");
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
    ] {
        c.env_remove(var);
    }
    c
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

pub fn build_binaries(release: bool) -> anyhow::Result<PathBuf> {
    install::ensure()?;
    let mut c = cargo();
    c.args([
        "build",
        "--package",
        "palisade-agent",
        "--package",
        "palisade-cli",
        "--package",
        "palisade-cni",
        "--bins",
    ]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

/// Both clippy runs, warnings as errors. The BPF crate builds only with nightly for the BPF
/// target, so it gets its own run (`nightly_cargo`).
fn lint() -> anyhow::Result<()> {
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "palisade-datapath-bpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(nightly_cargo().args([
        "clippy",
        "-Z",
        "build-std=core",
        "--target",
        "bpfel-unknown-none",
        "-p",
        "palisade-datapath-bpf",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))
}

fn integration(filter: &[String]) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the integration tests need root (BPF programs, network namespaces); run `cargo xtask test` as root"
        );
    }
    let bin_dir = build_binaries(false)?;
    // Every test runs its own node namespace and agent, so they may run side by side.
    let mut c = cargo();
    c.args(["test", "--package", "palisade-integration", "--"])
        .args([
            "--test-threads",
            "3",
            "--skip",
            "network_policy_conformance",
        ])
        .args(filter)
        .env("PALISADE_BIN_DIR", &bin_dir);
    run(&mut c)?;
    // The conformance suite prints its truth tables and pass count.
    let mut c = cargo();
    c.args([
        "test",
        "--package",
        "palisade-integration",
        "--test",
        "conformance",
        "--",
        "--nocapture",
    ])
    .args(filter)
    .env("PALISADE_BIN_DIR", &bin_dir);
    run(&mut c)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Install => install::ensure(),
        Task::InstallCni {
            bin_dir,
            conf_dir,
            force,
        } => install_cni::run(&install_cni::Target {
            bin_dir,
            conf_dir,
            force,
        }),
        Task::BuildEbpf => {
            install::ensure()?;
            run(cargo().args(["check", "--package", "palisade-agent"]))
        }
        Task::Build { release } => {
            build_binaries(release).map(|d| println!("binaries in {}", d.display()))
        }
        Task::Demo => demo::run(),
        Task::Lint => {
            install::ensure()?;
            lint()
        }
        Task::Test { unit_only, filter } => {
            install::ensure()?;
            lint()?;
            run(cargo().args([
                "test",
                "--workspace",
                "--exclude",
                "palisade-integration",
                "--exclude",
                "palisade-datapath-bpf",
            ]))?;
            if unit_only {
                return Ok(());
            }
            integration(&filter)
        }
        Task::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Task::Integration { filter } => integration(&filter),
        Task::GenCrds => gen_crds::run(),
        Task::Bench { which } => bench::run(which),
    }
}
