//! Test fixtures for end-to-end tests: a node namespace with no uplink running the real
//! `palisade-agent`, endpoints made through the real `palisade` CLI, and real TCP/UDP/ICMP
//! traffic sent from inside endpoint namespaces. Everything a fixture makes is removed in
//! `Drop`, also when the test fails.
#![expect(
    clippy::print_stderr,
    reason = "test fixtures: a failing test prints the agent's log for whoever reads it"
)]

pub mod cluster;
pub mod cni;
pub mod conformance;
#[cfg(feature = "bpf-datapath")]
pub mod differential;
pub mod dns;
pub mod http;
pub mod kube_api;
pub mod node;
pub mod traffic;

pub use node::{Endpoint, Node};

/// Fails loudly (never skips) when the tests cannot do what they claim to test.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "integration tests need root (BPF, network namespaces); run them through `cargo xtask test` as root"
    );
}
