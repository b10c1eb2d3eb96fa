//! Palisade's agent and its edges.
//!
//! - `engine`: owns all state; the only writer of BPF maps (through `datapath::Datapath`);
//! - `datapath`: the BPF loader, map writer and flow-event reader (aya);
//! - `plumbing` / `netns`: endpoint namespaces and veths (rtnetlink);
//! - `flows`: flow records, their store and filters;
//! - `api`: the agent's unix-socket API, server and client;
//! - `proxy`: the L7 proxy: HTTP/1.1 enforcement, transparent listener, its policy view;
//! - `cli`: the `palisade` command line;
//! - `metrics`: Prometheus metrics and the health check;
//! - `agent`: `palisade-agent`, wiring it together.

pub mod agent;
pub mod api;
pub mod cli;
pub mod datapath;
pub mod engine;
pub mod flows;
pub mod metrics;
pub mod netns;
pub mod plumbing;
pub mod proxy;
