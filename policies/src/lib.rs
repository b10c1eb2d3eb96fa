//! Palisade's policy language and compiler. Pure: plain functions over plain data, no I/O.
//!
//! - `audit`: audit at every scope (agent, namespace modes, endpoints, policies in audit) and
//!   the compile that merges policies in audit into the map state as flags;
//! - `labels`: labels, selectors and their Kubernetes semantics;
//! - `learn`: the aggregate of observed connections, and policies suggested from it;
//! - `model`: the internal policy form every manifest kind becomes;
//! - `manifest`: parsing and validating manifests (Kubernetes NetworkPolicy, palisade.io/v1,
//!   cilium.io/v2) into the model;
//! - `fqdn`: DNS names and patterns (`toFQDNs`, `rules.dns`) and what was learned of them;
//! - `identity`: security identities and their allocation;
//! - `compile`: endpoints + identities + policies -> the datapath's map state;
//! - `mapstate`: that map state, its datapath-equivalent lookup, and diffs between two states;
//! - `datapath_model`: the BPF programs' per-packet verdict (parse, conntrack, policy, proxy
//!   redirect, audit) again in plain Rust over a map state, to test the programs against.

pub mod audit;
pub mod compile;
pub mod datapath_model;
pub mod endpoint;
pub mod fqdn;
pub mod identity;
pub mod incremental;
pub mod l7;
pub mod labels;
pub mod learn;
pub mod manifest;
pub mod mapstate;
pub mod merge;
pub mod model;
pub mod selector;
