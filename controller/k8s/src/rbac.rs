//! What the agent may do with the Kubernetes API, written once: `policies/deploy/` grants
//! exactly this (its test compares the ClusterRole and the Role with [`AGENT_ACCESS`] both
//! ways), so code that needs another verb or resource must add it here and there together.

/// Where a grant applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every namespace, and cluster-scoped resources (the ClusterRole).
    Cluster,
    /// The agent's own namespace only (the Role in [`AGENT_NAMESPACE`]).
    AgentNamespace,
}

/// Verbs on one resource of one API group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The API group, `""` for the core group.
    pub group: &'static str,
    /// The resource's plural name, or `plural/subresource`.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
    pub scope: Scope,
}

/// The namespace the DaemonSet, its ServiceAccount, its ConfigMap and its leases live in.
pub const AGENT_NAMESPACE: &str = "palisade";
/// The agent's ServiceAccount.
pub const AGENT_SERVICE_ACCOUNT: &str = "palisade-agent";

const READ: &[&str] = &["get", "list", "watch"];

/// Everything the agent does with the API server:
/// - watches Pods, Namespaces and Nodes (labels, addresses, the node's pod CIDR);
/// - watches every policy kind it enforces: networking.k8s.io NetworkPolicy, ours, and
///   Cilium's, whose CRDs it looks up first (customresourcedefinitions) so that a cluster
///   without Cilium is not an error;
/// - writes the `Valid` condition of our policies through their status subresource;
/// - allocates identities cluster-wide as PalisadeIdentity objects, and deletes unused ones;
/// - records events (both the core and the events.k8s.io API, as kube-rs' recorder may use
///   either);
/// - takes leases in its own namespace (coordination among the agents), nowhere else.
pub const AGENT_ACCESS: &[Access] = &[
    Access {
        group: "",
        resource: "pods",
        verbs: READ,
        scope: Scope::Cluster,
    },
    Access {
        group: "",
        resource: "namespaces",
        verbs: READ,
        scope: Scope::Cluster,
    },
    Access {
        group: "",
        resource: "nodes",
        verbs: READ,
        scope: Scope::Cluster,
    },
    Access {
        group: "networking.k8s.io",
        resource: "networkpolicies",
        verbs: READ,
        scope: Scope::Cluster,
    },
    Access {
        group: "palisade.io",
        resource: "palisadenetworkpolicies",
        verbs: READ,
        scope: Scope::Cluster,
    },
    Access {
        group: "palisade.io",
        resource: "palisadeclusterwidenetworkpolicies",
        verbs: READ,
        scope: Scope::Cluster,
    },
    Access {
        group: "palisade.io",
        resource: "palisadenetworkpolicies/status",
        verbs: &["patch", "update"],
        scope: Scope::Cluster,
    },
    Access {
        group: "palisade.io",
        resource: "palisadeclusterwidenetworkpolicies/status",
        verbs: &["patch", "update"],
        scope: Scope::Cluster,
    },
    Access {
        group: "palisade.io",
        resource: "palisadeidentities",
        verbs: &["get", "list", "watch", "create", "delete"],
        scope: Scope::Cluster,
    },
    Access {
        group: "cilium.io",
        resource: "ciliumnetworkpolicies",
        verbs: READ,
        scope: Scope::Cluster,
    },
    Access {
        group: "cilium.io",
        resource: "ciliumclusterwidenetworkpolicies",
        verbs: READ,
        scope: Scope::Cluster,
    },
    Access {
        group: "apiextensions.k8s.io",
        resource: "customresourcedefinitions",
        verbs: READ,
        scope: Scope::Cluster,
    },
    Access {
        group: "",
        resource: "events",
        verbs: &["create", "patch"],
        scope: Scope::Cluster,
    },
    Access {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        scope: Scope::Cluster,
    },
    Access {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["get", "create", "update"],
        scope: Scope::AgentNamespace,
    },
];
