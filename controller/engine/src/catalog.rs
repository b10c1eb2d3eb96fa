//! Names for the numbers the datapath reports: endpoints, identities and rules. The engine
//! publishes a fresh catalog after every change; flows, the proxy's records and conntrack
//! listings are named from it without asking the engine.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use palisade_policies::identity::{Identity, IdentityTable};

/// An endpoint as flows name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogEndpoint {
    pub namespace: String,
    pub name: String,
    /// The labels of its identity, Cilium style (`k8s:app=web`).
    pub labels: Vec<String>,
}

/// A rule as flows name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogRule {
    /// `ns/name` or `name` (clusterwide); empty for agent settings such as host access.
    pub policy: String,
    /// The policy's kind (`k8s`, `palisade`...) or `agent`.
    pub kind: String,
    /// The rule in words, e.g. `demo/allow-frontend ingress rule 0`.
    pub rule: String,
}

/// The policies (`ns/name`) selecting an endpoint for each direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DefaultDenyBy {
    pub ingress: Vec<String>,
    pub egress: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub endpoints_by_id: BTreeMap<u32, CatalogEndpoint>,
    /// Address -> (namespace, name).
    pub endpoints_by_ip: BTreeMap<Ipv4Addr, (String, String)>,
    /// Every identity in use, shared with the engine (not copied per change: thousands of
    /// learned DNS addresses are thousands of identities); [`Catalog::identity_labels`]
    /// names one.
    pub identities: Arc<IdentityTable>,
    pub rules: BTreeMap<u32, CatalogRule>,
    /// For endpoints in audit (or with policies in audit): the policies whose default deny
    /// applies to each direction, so that an AUDIT flow of a default deny names them.
    pub default_deny: BTreeMap<u32, DefaultDenyBy>,
    /// Namespaces not in protect mode.
    pub namespace_modes: BTreeMap<String, palisade_policies::audit::NamespaceMode>,
}

impl Catalog {
    /// The labels of identity `id`, Cilium style (`k8s:app=web`, `cidr:10.0.0.0/8`); none
    /// for an identity not in use.
    pub fn identity_labels(&self, id: u32) -> Vec<String> {
        self.identities
            .get(&Identity(id))
            .map(palisade_policies::identity::IdentitySource::label_strings)
            .unwrap_or_default()
    }
}
