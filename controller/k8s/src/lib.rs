//! palisade-k8s: the Kubernetes adapter. It watches Pods, Namespaces, Nodes and every policy
//! kind, and turns what it sees into the same engine changes local mode makes; nothing
//! Kubernetes-specific reaches the policy crate or the engine.

pub mod crd;
