//! The `palisade-agent` binary's edges, wired to the engine: the aya datapath, netlink
//! plumbing, the L7 proxy, the API server and metrics.
//!
//! - `run`: the command line and the wiring (the binary, `src/main.rs`, calls it);
//! - `datapath`: the BPF object, its pinned maps and links, the flow-event reader;
//! - `plumbing`: endpoint namespaces and veths over rtnetlink;
//! - `server`: the API routes and their wire shapes; `status`: the node's status;
//! - `flows`: datapath events and proxy requests as flows, and their store;
//! - `metrics`: Prometheus metrics and the health check;
//! - `prefilter`: the XDP prefilter's CIDR deny list on host-facing interfaces;
//! - `policy_dir`: `--policy-dir` read and watched; `state_file`: the state directory;
//! - `runtime`: containers' labels from their runtime (podman, containerd).

pub mod datapath;
pub mod flows;
pub mod kubernetes;
pub mod metrics;
pub mod plumbing;
pub mod policy_dir;
pub mod prefilter;
pub mod run;
pub mod runtime;
pub mod server;
pub mod state_file;
pub mod status;
