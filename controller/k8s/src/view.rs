//! The cluster as this node sees it, and what changed since the engine last heard: watch
//! events go in, `ClusterDelta`s come out. Pure, so relists, restarts, invalid objects and
//! identity races are unit-tested without a server.
//!
//! Nothing is removed from the engine until the watcher that would have listed it has
//! finished a full list without it (a relist after a dropped watch or `410 Gone`, or the
//! first list after a restart, whose state the engine kept): a policy present before and
//! after a relist is never absent in between.

use std::collections::{BTreeMap, BTreeSet};

use palisade_engine::cluster::ClusterKnown;
use palisade_engine::model::{Changes, ClusterDelta, RemoteSpec};
use palisade_policies::identity::{Identity, workload_identity_labels};
use palisade_policies::labels::{Labels, NAMESPACE_NAME_LABEL};
use palisade_policies::model::{Policy, PolicyRef};

use crate::translate::{NodeInfo, PodInfo, PolicyObjectKind};

/// What a watcher reports, already translated.
#[derive(Clone, Debug, PartialEq)]
pub enum Change<T> {
    /// A (re)list starts.
    Init,
    /// An object, from the list.
    InitApply(T),
    /// The list is complete: what it did not name is gone.
    InitDone,
    Apply(T),
    /// Deleted, by key.
    Delete(String),
}

/// A policy object: the key is `kind/ns/name` (`kind/name` for clusterwide ones).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyObject {
    pub kind: PolicyObjectKind,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    pub generation: i64,
    /// What the parser made of it: its policies, or why it is rejected.
    pub parsed: Result<Vec<Policy>, String>,
    /// The `Valid` condition the object carries now (status, reason, message,
    /// observedGeneration), to write status only when it changes.
    pub valid_condition: Option<(String, String, String, i64)>,
}

impl PolicyObject {
    pub fn key(&self) -> String {
        object_key(self.kind, self.namespace.as_deref(), &self.name)
    }
}

pub fn object_key(kind: PolicyObjectKind, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{kind:?}/{ns}/{name}"),
        None => format!("{kind:?}/{name}"),
    }
}

/// Whether an object is enforced, as the status writer reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validity {
    Valid,
    /// Rejected by the parser or the datapath; the previous version, if any, still holds.
    Invalid(String),
}

/// A resource the view is fed by one watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Namespaces,
    Pods,
    Nodes,
    Identities,
    Policies(PolicyObjectKind),
}

pub fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn remote_pod_key(pod: &str) -> String {
    format!("pod/{pod}")
}

fn remote_node_key(node: &str) -> String {
    format!("node/{node}")
}

#[derive(Default)]
struct Dirty {
    namespaces: BTreeSet<String>,
    pods: BTreeSet<String>,
    nodes: BTreeSet<String>,
    policies: BTreeSet<String>,
    identities: bool,
}

pub struct ClusterView {
    node: String,
    namespaces: BTreeMap<String, Labels>,
    pods: BTreeMap<String, PodInfo>,
    nodes: BTreeMap<String, NodeInfo>,
    policies: BTreeMap<String, PolicyObject>,
    /// Identity objects: number -> labels.
    identities: BTreeMap<Identity, Labels>,
    /// The policies each object last gave the engine.
    sent_policies: BTreeMap<String, Vec<PolicyRef>>,
    /// Which object owns a policy name (a palisade.io and a cilium.io object of the same
    /// namespace and name are the same policy; the first one keeps it).
    owners: BTreeMap<PolicyRef, String>,
    /// Rejections by the datapath, by object key.
    rejected: BTreeMap<String, String>,
    /// What the engine held at start and no watcher has confirmed yet.
    known: ClusterKnown,
    /// Keys named by the (re)list in progress, per resource.
    listing: BTreeMap<Resource, BTreeSet<String>>,
    synced: BTreeSet<Resource>,
    /// Policy kinds with a watcher (their CRD exists); the others hold nothing.
    active_kinds: BTreeSet<PolicyObjectKind>,
    /// Whether the CRD watcher has listed once (so the active kinds are known).
    crds_synced: bool,
    dirty: Dirty,
    sent_identities: BTreeMap<Labels, Identity>,
}

impl ClusterView {
    /// A view for `node`, starting from what the engine kept.
    pub fn new(node: impl Into<String>, known: ClusterKnown) -> Self {
        Self {
            node: node.into(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
            policies: BTreeMap::new(),
            identities: BTreeMap::new(),
            sent_policies: BTreeMap::new(),
            owners: BTreeMap::new(),
            rejected: BTreeMap::new(),
            known,
            listing: BTreeMap::new(),
            synced: BTreeSet::new(),
            active_kinds: [PolicyObjectKind::Kubernetes].into(),
            crds_synced: false,
            dirty: Dirty::default(),
            sent_identities: BTreeMap::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether every watcher has listed at least once.
    pub fn synced(&self) -> bool {
        self.crds_synced
            && [
                Resource::Namespaces,
                Resource::Pods,
                Resource::Nodes,
                Resource::Identities,
            ]
            .iter()
            .all(|r| self.synced.contains(r))
            && self
                .active_kinds
                .iter()
                .all(|k| self.synced.contains(&Resource::Policies(*k)))
    }

    fn listing_started(&mut self, r: Resource) {
        self.listing.insert(r, BTreeSet::new());
    }

    fn listed(&mut self, r: Resource, key: &str) {
        if let Some(seen) = self.listing.get_mut(&r) {
            seen.insert(key.to_string());
        }
    }

    /// The keys of `r` the view holds that the finished list did not name.
    fn unlisted(&mut self, r: Resource, held: impl Iterator<Item = String>) -> Vec<String> {
        let seen = self.listing.remove(&r).unwrap_or_default();
        self.synced.insert(r);
        held.filter(|k| !seen.contains(k)).collect()
    }

    pub fn namespaces(&mut self, change: Change<(String, Labels)>) {
        match change {
            Change::Init => self.listing_started(Resource::Namespaces),
            Change::InitApply((name, labels)) | Change::Apply((name, labels)) => {
                self.listed(Resource::Namespaces, &name);
                if self.namespaces.get(&name) != Some(&labels) {
                    self.namespaces.insert(name.clone(), labels);
                    self.namespace_changed(&name);
                }
            }
            Change::Delete(name) => {
                if self.namespaces.remove(&name).is_some() {
                    self.namespace_changed(&name);
                }
            }
            Change::InitDone => {
                let held: Vec<String> = self
                    .namespaces
                    .keys()
                    .chain(self.known.namespaces.iter())
                    .cloned()
                    .collect();
                for name in self.unlisted(Resource::Namespaces, held.into_iter()) {
                    self.namespaces.remove(&name);
                    self.namespace_changed(&name);
                }
                self.known.namespaces.clear();
            }
        }
    }

    fn namespace_changed(&mut self, ns: &str) {
        self.dirty.namespaces.insert(ns.to_string());
        // Its pods' identities follow its labels.
        let members: Vec<String> = self
            .pods
            .values()
            .filter(|p| p.namespace == ns)
            .map(|p| pod_key(&p.namespace, &p.name))
            .collect();
        self.dirty.pods.extend(members);
    }

    pub fn pods(&mut self, change: Change<PodInfo>) {
        match change {
            Change::Init => self.listing_started(Resource::Pods),
            Change::InitApply(p) | Change::Apply(p) => {
                let key = pod_key(&p.namespace, &p.name);
                self.listed(Resource::Pods, &key);
                if self.pods.get(&key) != Some(&p) {
                    self.pods.insert(key.clone(), p);
                    self.dirty.pods.insert(key);
                }
            }
            Change::Delete(key) => {
                if self.pods.remove(&key).is_some() {
                    self.dirty.pods.insert(key);
                }
            }
            Change::InitDone => {
                let held: Vec<String> = self
                    .pods
                    .keys()
                    .cloned()
                    .chain(
                        self.known
                            .remotes
                            .iter()
                            .filter_map(|k| k.strip_prefix("pod/").map(str::to_string)),
                    )
                    .collect();
                for key in self.unlisted(Resource::Pods, held.into_iter()) {
                    self.pods.remove(&key);
                    self.dirty.pods.insert(key);
                }
                self.known.remotes.retain(|k| !k.starts_with("pod/"));
            }
        }
    }

    pub fn nodes(&mut self, change: Change<NodeInfo>) {
        match change {
            Change::Init => self.listing_started(Resource::Nodes),
            Change::InitApply(n) | Change::Apply(n) => {
                self.listed(Resource::Nodes, &n.name);
                if self.nodes.get(&n.name) != Some(&n) {
                    self.dirty.nodes.insert(n.name.clone());
                    self.nodes.insert(n.name.clone(), n);
                }
            }
            Change::Delete(name) => {
                if self.nodes.remove(&name).is_some() {
                    self.dirty.nodes.insert(name);
                }
            }
            Change::InitDone => {
                let held: Vec<String> = self
                    .nodes
                    .keys()
                    .cloned()
                    .chain(
                        self.known
                            .remotes
                            .iter()
                            .filter_map(|k| k.strip_prefix("node/").map(str::to_string)),
                    )
                    .collect();
                for name in self.unlisted(Resource::Nodes, held.into_iter()) {
                    self.nodes.remove(&name);
                    self.dirty.nodes.insert(name);
                }
                self.known.remotes.retain(|k| !k.starts_with("node/"));
            }
        }
    }

    /// Identity objects: (number, labels).
    pub fn identities(&mut self, change: Change<(Identity, Labels)>) {
        match change {
            Change::Init => self.listing_started(Resource::Identities),
            Change::InitApply((id, labels)) | Change::Apply((id, labels)) => {
                self.listed(Resource::Identities, &id.0.to_string());
                if self.identities.get(&id) != Some(&labels) {
                    self.identities.insert(id, labels);
                    self.dirty.identities = true;
                }
            }
            Change::Delete(key) => {
                if let Ok(n) = key.parse::<u32>()
                    && self.identities.remove(&Identity(n)).is_some()
                {
                    self.dirty.identities = true;
                }
            }
            Change::InitDone => {
                let held: Vec<String> = self.identities.keys().map(|i| i.0.to_string()).collect();
                for key in self.unlisted(Resource::Identities, held.into_iter()) {
                    if let Ok(n) = key.parse::<u32>() {
                        self.identities.remove(&Identity(n));
                        self.dirty.identities = true;
                    }
                }
            }
        }
    }

    /// A number this node allocated itself, before its watch event arrives.
    pub fn identity_allocated(&mut self, id: Identity, labels: Labels) {
        self.identities(Change::Apply((id, labels)));
    }

    /// The CRDs that exist: policy kinds without one hold nothing.
    pub fn policy_kinds(&mut self, active: BTreeSet<PolicyObjectKind>) {
        let mut active = active;
        active.insert(PolicyObjectKind::Kubernetes);
        let gone: Vec<PolicyObjectKind> = self.active_kinds.difference(&active).copied().collect();
        for kind in gone {
            let keys: Vec<String> = self
                .policies
                .values()
                .filter(|o| o.kind == kind)
                .map(PolicyObject::key)
                .collect();
            for k in keys {
                self.policies.remove(&k);
                self.dirty.policies.insert(k);
            }
            self.synced.remove(&Resource::Policies(kind));
        }
        self.active_kinds = active;
        self.crds_synced = true;
    }

    pub fn active_kinds(&self) -> &BTreeSet<PolicyObjectKind> {
        &self.active_kinds
    }

    pub fn policies(&mut self, kind: PolicyObjectKind, change: Change<PolicyObject>) {
        let r = Resource::Policies(kind);
        match change {
            Change::Init => self.listing_started(r),
            Change::InitApply(o) | Change::Apply(o) => {
                let key = o.key();
                self.listed(r, &key);
                if self.policies.get(&key) != Some(&o) {
                    // A new version is judged afresh by the datapath.
                    self.rejected.remove(&key);
                    self.policies.insert(key.clone(), o);
                    self.dirty.policies.insert(key);
                }
            }
            Change::Delete(key) => {
                if self.policies.remove(&key).is_some() {
                    self.dirty.policies.insert(key);
                }
            }
            Change::InitDone => {
                let held: Vec<String> = self
                    .policies
                    .values()
                    .filter(|o| o.kind == kind)
                    .map(PolicyObject::key)
                    .collect();
                for key in self.unlisted(r, held.into_iter()) {
                    self.policies.remove(&key);
                    self.dirty.policies.insert(key);
                }
            }
        }
    }

    /// The datapath would not take an object's policy.
    pub fn policy_rejected(&mut self, policy: &PolicyRef, why: String) {
        if let Some(owner) = self.owners.get(policy).cloned() {
            self.rejected.insert(owner, why);
        }
    }

    fn identity_labels(&self, p: &PodInfo) -> Labels {
        let mut ns = self
            .namespaces
            .get(&p.namespace)
            .cloned()
            .unwrap_or_default();
        ns.entry(NAMESPACE_NAME_LABEL.to_string())
            .or_insert_with(|| p.namespace.clone());
        workload_identity_labels(&p.namespace, &ns, &p.labels)
    }

    /// Each label set's number: the lowest when two nodes raced and both won one.
    fn assignments(&self) -> BTreeMap<Labels, Identity> {
        let mut out: BTreeMap<Labels, Identity> = BTreeMap::new();
        for (id, labels) in &self.identities {
            out.entry(labels.clone())
                .and_modify(|have| *have = (*have).min(*id))
                .or_insert(*id);
        }
        out
    }

    /// Identity label sets of the pods that have an address of their own, with the
    /// number the cluster gave each (None: none yet).
    pub fn workload_label_sets(&self) -> BTreeMap<Labels, Option<Identity>> {
        let assigned = self.assignments();
        self.pods
            .values()
            .filter(|p| p.has_own_address() || p.node.as_deref() == Some(self.node.as_str()))
            .map(|p| {
                let l = self.identity_labels(p);
                let id = assigned.get(&l).copied();
                (l, id)
            })
            .collect()
    }

    /// Every identity object: number and labels.
    pub fn identity_objects(&self) -> Vec<(Identity, Labels)> {
        self.identities
            .iter()
            .map(|(i, l)| (*i, l.clone()))
            .collect()
    }

    /// Identity objects no pod uses: their labels are no pod's, or they lost a race for
    /// their labels to a lower number (candidates for the leader's collection).
    pub fn unused_identities(&self) -> Vec<Identity> {
        let used = self.workload_label_sets();
        self.identities
            .iter()
            .filter(|(id, l)| used.get(*l).is_none_or(|winner| *winner != Some(**id)))
            .map(|(id, _)| *id)
            .collect()
    }

    /// This node's pods, with their labels and whether the cluster has numbered them.
    pub fn local_pods(&self) -> Vec<(String, &PodInfo, bool)> {
        let assigned = self.assignments();
        self.pods
            .iter()
            .filter(|(_, p)| p.node.as_deref() == Some(self.node.as_str()))
            .map(|(k, p)| {
                (
                    k.clone(),
                    p,
                    assigned.contains_key(&self.identity_labels(p)),
                )
            })
            .collect()
    }

    /// Marks a pod of this node changed, so its labels reach its endpoint again (the CNI
    /// plugin attached it before its labels were known).
    pub fn touch_pod(&mut self, key: &str) {
        if self.pods.contains_key(key) {
            self.dirty.pods.insert(key.to_string());
        }
    }

    pub fn node_info(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn nodes_iter(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    /// Whether each of this node's watched policy objects is enforced, for status.
    pub fn validity(&self) -> Vec<(&PolicyObject, Validity)> {
        self.policies
            .values()
            .map(|o| {
                let v = match (&o.parsed, self.rejected.get(&o.key())) {
                    (Err(why), _) | (Ok(_), Some(why)) => Validity::Invalid(why.clone()),
                    (Ok(_), None) => Validity::Valid,
                };
                (o, v)
            })
            .collect()
    }

    pub fn is_dirty(&self) -> bool {
        let d = &self.dirty;
        d.identities
            || !d.namespaces.is_empty()
            || !d.pods.is_empty()
            || !d.nodes.is_empty()
            || !d.policies.is_empty()
            || self.known_policies_removable()
    }

    /// The policies the engine kept from before a restart can be judged gone once every
    /// policy watcher (and the CRD discovery) has listed.
    fn known_policies_removable(&self) -> bool {
        !self.known.policies.is_empty()
            && self.crds_synced
            && self
                .active_kinds
                .iter()
                .all(|k| self.synced.contains(&Resource::Policies(*k)))
    }

    /// What changed since the last call, for the engine.
    pub fn take_delta(&mut self) -> ClusterDelta {
        let mut delta = ClusterDelta::default();
        let dirty = std::mem::take(&mut self.dirty);

        let assignments = self.assignments();
        if assignments != self.sent_identities {
            self.sent_identities.clone_from(&assignments);
            delta.identities = Some(assignments);
        }

        for ns in dirty.namespaces {
            match self.namespaces.get(&ns) {
                Some(labels) => delta.namespaces.upsert.push((ns, labels.clone())),
                None => delta.namespaces.delete.push(ns),
            }
        }

        for key in dirty.pods {
            let remote = remote_pod_key(&key);
            match self.pods.get(&key) {
                Some(p) if p.node.as_deref() == Some(self.node.as_str()) => {
                    // A malformed annotation leaves the endpoint enforced (the adapter
                    // reports it).
                    let audit = p.audit.clone().unwrap_or(false);
                    delta.endpoint_audit.push((key.clone(), audit));
                    delta.endpoint_labels.push((key, p.labels.clone()));
                }
                Some(p) if p.has_own_address() => {
                    if let Some(ip) = p.ip {
                        delta.remotes.upsert.push((
                            remote,
                            RemoteSpec::Pod {
                                namespace: p.namespace.clone(),
                                name: p.name.clone(),
                                labels: p.labels.clone(),
                                ip,
                                node: p.node.clone().unwrap_or_default(),
                            },
                        ));
                    }
                }
                _ => delta.remotes.delete.push(remote),
            }
        }

        for name in dirty.nodes {
            match self.nodes.get(&name) {
                Some(n) if n.name != self.node => delta.remotes.upsert.push((
                    remote_node_key(&name),
                    RemoteSpec::Node {
                        name: name.clone(),
                        ips: n.addresses.clone(),
                    },
                )),
                _ => delta.remotes.delete.push(remote_node_key(&name)),
            }
        }

        self.policy_delta(dirty.policies, &mut delta.policies);
        delta
    }

    fn policy_delta(&mut self, keys: BTreeSet<String>, out: &mut Changes<PolicyRef, Policy>) {
        for key in keys {
            let before = self.sent_policies.remove(&key).unwrap_or_default();
            let mut now: Vec<PolicyRef> = Vec::new();
            match self.policies.get(&key).map(|o| &o.parsed) {
                // Invalid: what it gave before still holds, unchanged.
                Some(Err(_)) => now.clone_from(&before),
                Some(Ok(policies)) => {
                    for p in policies {
                        let owner = self
                            .owners
                            .entry(p.id.clone())
                            .or_insert_with(|| key.clone());
                        if *owner == key {
                            out.upsert.push((p.id.clone(), p.clone()));
                            now.push(p.id.clone());
                        } else {
                            let why = format!("policy {} is already defined by {owner}", p.id);
                            self.rejected.insert(key.clone(), why);
                        }
                    }
                }
                None => {}
            }
            for r in before {
                if !now.contains(&r) {
                    if self.owners.get(&r) == Some(&key) {
                        self.owners.remove(&r);
                    }
                    out.delete.push(r.clone());
                }
            }
            if !now.is_empty() {
                self.sent_policies.insert(key, now);
            }
        }
        if self.known_policies_removable() {
            let known = std::mem::take(&mut self.known.policies);
            for r in known {
                if !self.owners.contains_key(&r) {
                    out.delete.push(r);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::translate::parse_policy_object;
    use serde_json::json;

    const NODE: &str = "node-a";

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(name: &str, node: &str, app: &str, ip: [u8; 4]) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            node: Some(node.into()),
            ip: Some(Ipv4Addr::from(ip)),
            host_network: false,
            finished: false,
            labels: labels(&[("app", app)]),
            named_ports: vec![],
            audit: Ok(false),
        }
    }

    fn netpol(name: &str, generation: i64, spec: &serde_json::Value) -> PolicyObject {
        let object = json!({"metadata": {"name": name, "namespace": "shop"}, "spec": spec});
        let kind = PolicyObjectKind::Kubernetes;
        PolicyObject {
            kind,
            namespace: Some("shop".into()),
            name: name.into(),
            uid: format!("uid-{name}"),
            generation,
            parsed: parse_policy_object(kind, &object).map_err(|e| e.to_string()),
            valid_condition: None,
        }
    }

    fn web_policy() -> PolicyObject {
        netpol(
            "web",
            1,
            &json!({"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}),
        )
    }

    /// A view that has listed everything once: a namespace, pods on two nodes, a node, a
    /// policy, and numbers for every pod's labels.
    fn synced_view() -> ClusterView {
        let mut v = ClusterView::new(NODE, ClusterKnown::default());
        v.policy_kinds(BTreeSet::new());
        v.namespaces(Change::Init);
        v.namespaces(Change::InitApply((
            "shop".into(),
            labels(&[("kubernetes.io/metadata.name", "shop")]),
        )));
        v.namespaces(Change::InitDone);
        v.pods(Change::Init);
        v.pods(Change::InitApply(pod("web", NODE, "web", [10, 0, 0, 2])));
        v.pods(Change::InitApply(pod(
            "client",
            "node-b",
            "client",
            [10, 1, 0, 2],
        )));
        v.pods(Change::InitDone);
        v.nodes(Change::Init);
        v.nodes(Change::InitApply(NodeInfo {
            name: "node-b".into(),
            addresses: vec![Ipv4Addr::new(192, 168, 0, 2)],
            internal_ip: Some(Ipv4Addr::new(192, 168, 0, 2)),
            pod_cidr: None,
        }));
        v.nodes(Change::InitDone);
        v.identities(Change::Init);
        let sets: Vec<Labels> = v.workload_label_sets().into_keys().collect();
        for (i, l) in sets.into_iter().enumerate() {
            v.identities(Change::InitApply((
                Identity(1000 + u32::try_from(i).unwrap()),
                l,
            )));
        }
        v.identities(Change::InitDone);
        let k = PolicyObjectKind::Kubernetes;
        v.policies(k, Change::Init);
        v.policies(k, Change::InitApply(web_policy()));
        v.policies(k, Change::InitDone);
        v
    }

    #[test]
    fn a_first_sync_gives_the_engine_everything_in_one_delta() {
        let mut v = synced_view();
        assert!(v.synced());
        let d = v.take_delta();
        assert_eq!(d.identities.as_ref().map(BTreeMap::len), Some(2));
        assert_eq!(d.namespaces.upsert.len(), 1);
        assert_eq!(
            d.endpoint_labels,
            vec![("shop/web".to_string(), labels(&[("app", "web")]))]
        );
        let remote_keys: Vec<&str> = d.remotes.upsert.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(remote_keys, ["pod/shop/client", "node/node-b"]);
        assert_eq!(d.policies.upsert.len(), 1);
        assert!(v.take_delta().is_empty(), "nothing changed since");
    }

    #[test]
    fn a_relist_removes_only_what_it_no_longer_lists() {
        let mut v = synced_view();
        v.take_delta();
        // The watch dropped; while it was down `client` went away.
        v.pods(Change::Init);
        v.pods(Change::InitApply(pod("web", NODE, "web", [10, 0, 0, 2])));
        assert!(
            v.take_delta().is_empty(),
            "nothing is removed before the list ends"
        );
        v.pods(Change::InitDone);
        let d = v.take_delta();
        assert_eq!(d.remotes.delete, vec!["pod/shop/client".to_string()]);
        assert!(d.policies.is_empty());
    }

    #[test]
    fn what_the_engine_kept_from_before_a_restart_goes_only_once_relisted_without_it() {
        let known = ClusterKnown {
            namespaces: ["shop".into(), "gone".into()].into(),
            remotes: [
                "pod/shop/client".into(),
                "pod/shop/old".into(),
                "node/node-x".into(),
            ]
            .into(),
            policies: [
                web_policy().parsed.unwrap()[0].id.clone(),
                PolicyRef {
                    kind: palisade_policies::model::PolicyKind::KubernetesNetworkPolicy,
                    namespace: Some("shop".into()),
                    name: "deleted-while-down".into(),
                },
            ]
            .into(),
        };
        let mut v = ClusterView::new(NODE, known);
        v.namespaces(Change::Init);
        v.namespaces(Change::InitApply(("shop".into(), Labels::new())));
        v.namespaces(Change::InitDone);
        v.pods(Change::Init);
        v.pods(Change::InitApply(pod(
            "client",
            "node-b",
            "client",
            [10, 1, 0, 2],
        )));
        v.pods(Change::InitDone);
        let d = v.take_delta();
        assert_eq!(d.namespaces.delete, vec!["gone".to_string()]);
        assert_eq!(d.remotes.delete, vec!["pod/shop/old".to_string()]);
        assert!(
            d.policies.delete.is_empty(),
            "the policy watchers have not listed yet"
        );
        let k = PolicyObjectKind::Kubernetes;
        v.policies(k, Change::Init);
        v.policies(k, Change::InitApply(web_policy()));
        v.policies(k, Change::InitDone);
        assert!(
            v.take_delta().policies.delete.is_empty(),
            "CRDs not known yet"
        );
        v.policy_kinds(BTreeSet::new());
        let d = v.take_delta();
        assert_eq!(d.policies.delete.len(), 1);
        assert_eq!(d.policies.delete[0].name, "deleted-while-down");
        v.nodes(Change::Init);
        v.nodes(Change::InitDone);
        assert_eq!(
            v.take_delta().remotes.delete,
            vec!["node/node-x".to_string()]
        );
    }

    #[test]
    fn an_invalid_new_version_leaves_the_old_one_enforced_and_says_why() {
        let mut v = synced_view();
        v.take_delta();
        let k = PolicyObjectKind::Kubernetes;
        let bad = netpol(
            "web",
            2,
            &json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]}),
        );
        assert!(bad.parsed.is_err());
        v.policies(k, Change::Apply(bad));
        let d = v.take_delta();
        assert!(d.policies.is_empty(), "no change to enforcement: {d:?}");
        let validity = v.validity();
        assert!(matches!(&validity[0].1, Validity::Invalid(why) if why.contains("10.0.0.0/33")));
        // Deleting the object does remove what it had.
        v.policies(k, Change::Delete(object_key(k, Some("shop"), "web")));
        assert_eq!(v.take_delta().policies.delete.len(), 1);
    }

    #[test]
    fn an_audit_annotation_change_reaches_the_endpoint_and_a_malformed_one_enforces() {
        let mut v = synced_view();
        let d = v.take_delta();
        assert_eq!(d.endpoint_audit, vec![("shop/web".to_string(), false)]);
        let mut web = pod("web", NODE, "web", [10, 0, 0, 2]);
        web.audit = Ok(true);
        v.pods(Change::Apply(web.clone()));
        let d = v.take_delta();
        assert_eq!(d.endpoint_audit, vec![("shop/web".to_string(), true)]);
        assert_eq!(d.endpoint_labels.len(), 1, "labels unchanged, sent with it");
        web.audit = Err("yes".into());
        v.pods(Change::Apply(web));
        assert_eq!(
            v.take_delta().endpoint_audit,
            vec![("shop/web".to_string(), false)]
        );
        // Another node's pod is no endpoint here.
        let mut client = pod("client", "node-b", "client", [10, 1, 0, 2]);
        client.audit = Ok(true);
        v.pods(Change::Apply(client));
        assert!(v.take_delta().endpoint_audit.is_empty());
    }

    #[test]
    fn a_namespace_label_change_renews_its_pods_and_an_unnumbered_set_is_reported() {
        let mut v = synced_view();
        v.take_delta();
        v.namespaces(Change::Apply(("shop".into(), labels(&[("team", "red")]))));
        let d = v.take_delta();
        assert_eq!(d.namespaces.upsert.len(), 1);
        assert_eq!(d.endpoint_labels.len(), 1);
        assert_eq!(d.remotes.upsert.len(), 1);
        let missing: Vec<Labels> = v
            .workload_label_sets()
            .into_iter()
            .filter_map(|(l, id)| id.is_none().then_some(l))
            .collect();
        assert_eq!(
            missing.len(),
            2,
            "both pods' labels changed with their namespace's"
        );
    }

    #[test]
    fn the_lowest_number_wins_when_two_nodes_number_the_same_labels() {
        let mut v = synced_view();
        let first = v.take_delta().identities.unwrap();
        let (l, id) = first.iter().next().map(|(l, i)| (l.clone(), *i)).unwrap();
        v.identities(Change::Apply((Identity(id.0 + 500), l.clone())));
        assert!(
            v.take_delta().identities.is_none(),
            "a higher duplicate changes nothing"
        );
        v.identities(Change::Apply((Identity(300), l.clone())));
        assert_eq!(v.take_delta().identities.unwrap()[&l], Identity(300));
        let unused = v.unused_identities();
        assert!(unused.contains(&Identity(id.0 + 500)) && unused.contains(&id));
        assert!(!unused.contains(&Identity(300)));
    }

    #[test]
    fn a_removed_crd_takes_its_policies_with_it() {
        let mut v = synced_view();
        v.policy_kinds([PolicyObjectKind::Cilium].into());
        let k = PolicyObjectKind::Cilium;
        let object = json!({"metadata": {"name": "c", "namespace": "shop"}, "spec": {"endpointSelector": {}}});
        v.policies(k, Change::Init);
        v.policies(
            k,
            Change::InitApply(PolicyObject {
                kind: k,
                namespace: Some("shop".into()),
                name: "c".into(),
                uid: "u".into(),
                generation: 1,
                parsed: parse_policy_object(k, &object).map_err(|e| e.to_string()),
                valid_condition: None,
            }),
        );
        v.policies(k, Change::InitDone);
        v.take_delta();
        v.policy_kinds(BTreeSet::new());
        assert_eq!(v.take_delta().policies.delete.len(), 1);
    }
}
