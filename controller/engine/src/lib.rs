//! Palisade's engine: the one owner of the agent's state and the only writer of the BPF maps.
//!
//! Commands come in (endpoint added, labels changed, policy applied); the engine recompiles the
//! whole model with `palisade_policies`, diffs the result against what the maps hold, writes
//! the diff through the [`Datapath`](datapath::Datapath), and only then answers. Every change
//! runs as a transaction: if any step fails, the model is restored and the maps are rolled
//! back to exactly what they held, so a rejected change never weakens enforcement in place.
//!
//! The engine knows nothing of HTTP, JSON, aya or netlink: the kernel sits behind
//! [`Datapath`](datapath::Datapath) and [`Plumbing`](plumbing::Plumbing), persistence behind
//! [`StateStore`](store::StateStore), and each has an in-memory implementation here for tests.
//!
//! - `engine`: start-up reconciliation and the transaction every change runs in;
//! - `endpoints`, `policies`: the changes; `views`: read-only answers and `policy trace`;
//! - `modes`: namespace modes and endpoints in audit; `whatif`: `policy what-if`, recorded
//!   flows judged against the policies in force and proposed ones, applying nothing;
//! - `attachments`: containers a runtime attached through the CNI plugin;
//! - `fqdn`, `fqdn_learning`: the name cache of DNS answers and how it is learned and expires;
//! - `revalidate`: ending the connections a change sends through the L7 proxy;
//! - `command`: the engine's task and the commands it serves;
//! - `model`: the state as plain data; `catalog`: names for the numbers flows carry;
//! - `datapath`, `plumbing`, `store`: the edges' traits and their in-memory fakes;
//! - `ipam`: endpoint addresses; `error`: what can fail, and whose fault it is.

pub mod attachments;
pub mod catalog;
pub mod cluster;
pub mod command;
pub mod datapath;
mod endpoints;
mod engine;
pub mod error;
pub mod fqdn;
mod fqdn_learning;
pub mod fqdn_trace;
pub mod ipam;
pub mod model;
pub mod modes;
pub mod plumbing;
mod policies;
pub mod revalidate;
pub mod store;
pub mod views;
pub mod whatif;

pub use command::{AskError, Command, Reply, ask};
pub use engine::{Engine, EngineConfig, EngineMetrics, Outputs};
pub use error::{EngineError, ErrorClass};
pub use fqdn_learning::{FqdnView, LearnReport, LearnRequest, LearnStages};
pub use policies::{PolicyAction, PolicyChange, PolicyUpdate};

#[cfg(test)]
mod tests;
