//! palisade-k8s: the Kubernetes adapter. It watches Pods, Namespaces, Nodes and every policy
//! kind, and turns what it sees into the same engine changes local mode makes; nothing
//! Kubernetes-specific reaches the policy crate or the engine.
//!
//! - `translate`: objects into plain data (pure);
//! - `view`: the cluster as this node sees it, and the deltas the engine gets (pure);
//! - `watchers`: one watcher per resource; `adapter`: the loop that joins them to the engine;
//! - `identities`: cluster-wide identity numbers (`PalisadeIdentity` objects);
//! - `status`: the Lease holder's policy status, Events and identity collection;
//! - `directory`: this node's pods for the CNI path; `cni_conf`: this node's CNI network;
//! - `crd`, `rbac`: our resources and the permissions the agent needs.

pub mod adapter;
pub mod cni_conf;
pub mod crd;
pub mod directory;
pub mod error;
pub mod identities;
pub mod rbac;
pub mod status;
pub mod translate;
pub mod view;
pub mod watchers;

pub use adapter::{Adapter, AdapterConfig};
pub use directory::{LocalPod, PodDirectory};
