//! Kubernetes mode: what the cluster changed — identity numbers, namespaces, other nodes'
//! pods and the nodes, policy objects, this node's pods' labels — applied in one transaction
//! per batch. A policy the datapath cannot take is left out and reported, never the batch.

use std::collections::{BTreeMap, BTreeSet};

use palisade_policies::audit::{MODE_LABEL, NamespaceMode};
use palisade_policies::identity::{Identity, IdentityError, workload_identity_labels};
use palisade_policies::labels::Labels;
use palisade_policies::model::PolicyRef;
use tracing::{debug, info, warn};

use crate::datapath::Datapath;
use crate::endpoints::{validate_dns_label, validate_labels};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::model::{ClusterDelta, Model, PolicySource, RemoteRecord, RemoteSpec};
use crate::plumbing::Plumbing;

/// What a cluster update did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterReport {
    pub map_operations: usize,
    /// Policies left out, and why (the previous version of each, if any, still holds).
    pub rejected: Vec<(PolicyRef, String)>,
    /// Items of the delta that were not valid (a namespace or label the API should not have
    /// let through), left out.
    pub skipped: Vec<String>,
}

/// What the engine holds of the cluster (kept from before a restart, until the watchers
/// have relisted and said what is gone).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterKnown {
    pub namespaces: BTreeSet<String>,
    pub remotes: BTreeSet<String>,
    pub policies: BTreeSet<PolicyRef>,
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    pub fn cluster_known(&self) -> ClusterKnown {
        ClusterKnown {
            namespaces: self.model.namespaces.keys().cloned().collect(),
            remotes: self.model.remotes.keys().cloned().collect(),
            policies: self
                .model
                .policy_sources
                .iter()
                .filter(|(_, s)| **s == PolicySource::Cluster)
                .map(|(r, _)| r.clone())
                .collect(),
        }
    }

    /// Applies a batch of cluster changes. The policies of the batch that the datapath
    /// cannot take (an HTTP rule the proxy cannot compile, ...) are retried one by one, so one
    /// bad object never holds back the rest.
    pub fn cluster_update(&mut self, delta: ClusterDelta) -> Result<ClusterReport, EngineError> {
        let (delta, skipped) = valid_part(delta);
        if delta.is_empty() {
            return Ok(ClusterReport {
                skipped,
                ..ClusterReport::default()
            });
        }
        let keep = BTreeSet::new();
        match self.transact(|m| apply(m, &delta, &keep)) {
            Ok(((), ops)) => Ok(ClusterReport {
                map_operations: ops,
                rejected: Vec::new(),
                skipped,
            }),
            Err(e) if !delta.policies.upsert.is_empty() => {
                warn!(error = %e, "a cluster update failed as a whole; applying its policies one by one");
                let mut rest = delta;
                let policies = std::mem::take(&mut rest.policies.upsert);
                // A relist must not remove the policies being retried.
                let keep: BTreeSet<PolicyRef> = policies.iter().map(|(r, _)| r.clone()).collect();
                let ((), mut ops) = self.transact(|m| apply(m, &rest, &keep))?;
                let mut rejected = Vec::new();
                for (id, policy) in policies {
                    let one = ClusterDelta {
                        policies: crate::model::Changes {
                            upsert: vec![(id.clone(), policy)],
                            ..crate::model::Changes::default()
                        },
                        ..ClusterDelta::default()
                    };
                    match self.transact(|m| apply(m, &one, &BTreeSet::new())) {
                        Ok(((), n)) => ops += n,
                        Err(e) => {
                            warn!(policy = %id, error = %e, "policy from the cluster not enforced");
                            rejected.push((id, e.to_string()));
                        }
                    }
                }
                Ok(ClusterReport {
                    map_operations: ops,
                    rejected,
                    skipped,
                })
            }
            Err(e) => Err(e),
        }
    }
}

/// The identity for `labels`, or `init` when the cluster has not numbered them yet.
fn acquire_or_init(m: &mut Model, labels: &Labels, holder: &str) -> Result<Identity, EngineError> {
    match m.identities.acquire(labels) {
        Ok(id) => Ok(id),
        Err(IdentityError::NotAssigned { .. }) => {
            warn!(workload = %holder, "no cluster identity for its labels yet; it holds init");
            Ok(Identity::INIT)
        }
        Err(e) => Err(e.into()),
    }
}

/// A Kubernetes namespace's mode from its `palisade.io/mode` label: absent, protect; a value
/// that names no mode is enforced too (fail closed), and said.
fn namespace_mode_of(namespace: &str, label: Option<&str>) -> NamespaceMode {
    match label.map(|v| (v, NamespaceMode::parse(v))) {
        None => NamespaceMode::Protect,
        Some((_, Some(mode))) => mode,
        Some((value, None)) => {
            warn!(
                namespace,
                value, "label {MODE_LABEL} names no mode (discover, monitor, protect): protected"
            );
            NamespaceMode::Protect
        }
    }
}

/// The delta without what is not valid (said in `skipped`).
fn valid_part(mut delta: ClusterDelta) -> (ClusterDelta, Vec<String>) {
    let mut skipped = Vec::new();
    delta.namespaces.upsert.retain(|(ns, labels)| {
        match validate_dns_label("namespace", ns).and_then(|()| validate_labels(labels)) {
            Ok(()) => true,
            Err(e) => {
                skipped.push(format!("namespace {ns}: {e}"));
                false
            }
        }
    });
    delta.remotes.upsert.retain(|(key, spec)| {
        let check = match spec {
            RemoteSpec::Pod {
                namespace, labels, ..
            } => validate_dns_label("namespace", namespace).and_then(|()| validate_labels(labels)),
            RemoteSpec::Node { .. } => Ok(()),
        };
        match check {
            Ok(()) => true,
            Err(e) => {
                skipped.push(format!("{key}: {e}"));
                false
            }
        }
    });
    delta
        .endpoint_labels
        .retain(|(key, labels)| match validate_labels(labels) {
            Ok(()) => true,
            Err(e) => {
                skipped.push(format!("endpoint {key}: {e}"));
                false
            }
        });
    for s in &skipped {
        warn!(item = %s, "cluster object left out: not valid");
    }
    (delta, skipped)
}

/// The delta, applied to the model (compiling is the transaction's). `keep`: cluster
/// policies a `replace_all` must not remove.
fn apply(
    m: &mut Model,
    delta: &ClusterDelta,
    keep: &BTreeSet<PolicyRef>,
) -> Result<(), EngineError> {
    // Numbers first: everything below acquires by labels, and what already holds a number
    // that moved takes the new one.
    if let Some(assignments) = &delta.identities {
        let moved: BTreeMap<Identity, Identity> = m
            .identities
            .assign(assignments.clone())?
            .into_iter()
            .collect();
        for r in m.endpoints.values_mut() {
            if let Some(new) = moved.get(&r.identity) {
                r.identity = *new;
            }
        }
        for r in m.remotes.values_mut() {
            if let Some(new) = moved.get(&r.identity) {
                r.identity = *new;
            }
        }
        if !moved.is_empty() {
            info!(
                renumbered = moved.len(),
                "identities renumbered to the cluster's"
            );
        }
    }

    let ns = &delta.namespaces;
    if ns.replace_all {
        m.namespaces.clear();
        m.namespace_modes.clear();
    }
    for n in &ns.delete {
        m.namespaces.remove(n);
        m.namespace_modes.remove(n);
    }
    for (n, labels) in &ns.upsert {
        // The mode label is the namespace's mode, not a label of its workloads' identities.
        let mut labels = labels.clone();
        match namespace_mode_of(n, labels.remove(MODE_LABEL).as_deref()) {
            NamespaceMode::Protect => m.namespace_modes.remove(n),
            mode => m.namespace_modes.insert(n.clone(), mode),
        };
        m.namespaces.insert(n.clone(), labels);
    }

    // Records whose identity was acquired before this batch: released once every record has
    // acquired its new one (acquire before release, so a shared number is never freed and
    // renumbered in between).
    let mut release: Vec<Identity> = Vec::new();
    let held = |r: &RemoteRecord| matches!(r.spec, RemoteSpec::Pod { .. }).then_some(r.identity);
    let rem = &delta.remotes;
    if rem.replace_all {
        let wanted: BTreeSet<&String> = rem.upsert.iter().map(|(k, _)| k).collect();
        let gone: Vec<String> = m
            .remotes
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(r) = m.remotes.remove(&k) {
                release.extend(held(&r));
            }
        }
    }
    for k in &rem.delete {
        if let Some(r) = m.remotes.remove(k) {
            release.extend(held(&r));
        }
    }
    for (k, spec) in &rem.upsert {
        let identity = match spec {
            RemoteSpec::Node { .. } => Identity::REMOTE_NODE,
            // Acquired below with the others.
            RemoteSpec::Pod { .. } => Identity::INIT,
        };
        if let Some(old) = m.remotes.insert(
            k.clone(),
            RemoteRecord {
                spec: spec.clone(),
                identity,
            },
        ) {
            release.extend(held(&old));
        }
    }

    for (key, labels) in &delta.endpoint_labels {
        let Some(r) = m.endpoints.get_mut(key) else {
            debug!(endpoint = %key, "labels for a pod this node has no endpoint for (yet)");
            continue;
        };
        if !r.pending_labels {
            release.push(r.identity);
            r.identity = Identity::INIT;
            r.pending_labels = true;
        }
        // Its number comes below (`init` holds no reference).
        r.awaiting_identity = true;
        r.labels = labels.clone();
    }

    for (key, audit) in &delta.endpoint_audit {
        if let Some(r) = m.endpoints.get_mut(key)
            && r.audit != *audit
        {
            info!(endpoint = %key, audit, "endpoint audit set by its pod's annotation");
            r.audit = *audit;
        }
    }

    // Every workload's identity from its labels as they are now (namespace labels may have
    // changed under any of them). Labels the cluster has not numbered yet leave the workload
    // at `init`: enforced both ways, and an address no policy allows.
    for r in m.endpoints.values() {
        if !r.pending_labels {
            release.push(r.identity);
        }
    }
    for r in m.remotes.values() {
        if matches!(r.spec, RemoteSpec::Pod { .. }) && r.identity != Identity::INIT {
            release.push(r.identity);
        }
    }
    let endpoint_keys: Vec<String> = m
        .endpoints
        .iter()
        .filter(|(_, r)| !r.pending_labels || r.awaiting_identity)
        .map(|(k, _)| k.clone())
        .collect();
    for key in endpoint_keys {
        let (namespace, labels) = {
            let r = &m.endpoints[&key];
            (r.namespace.clone(), r.labels.clone())
        };
        let want = workload_identity_labels(&namespace, &m.namespace_labels(&namespace), &labels);
        let id = acquire_or_init(m, &want, &key)?;
        if let Some(r) = m.endpoints.get_mut(&key) {
            r.identity = id;
            r.pending_labels = id == Identity::INIT;
            r.awaiting_identity = id == Identity::INIT;
        }
    }
    let remote_keys: Vec<String> = m.remotes.keys().cloned().collect();
    for key in remote_keys {
        let RemoteSpec::Pod {
            namespace, labels, ..
        } = m.remotes[&key].spec.clone()
        else {
            continue;
        };
        let want = workload_identity_labels(&namespace, &m.namespace_labels(&namespace), &labels);
        let id = acquire_or_init(m, &want, &key)?;
        if let Some(r) = m.remotes.get_mut(&key) {
            r.identity = id;
        }
    }
    for id in release {
        m.identities.release(id)?;
    }

    let pol = &delta.policies;
    let upserted: BTreeSet<&PolicyRef> = pol.upsert.iter().map(|(r, _)| r).collect();
    let mut gone: Vec<PolicyRef> = pol.delete.clone();
    if pol.replace_all {
        gone.extend(
            m.policy_sources
                .iter()
                .filter(|(r, src)| {
                    **src == PolicySource::Cluster && !upserted.contains(r) && !keep.contains(*r)
                })
                .map(|(r, _)| r.clone()),
        );
    }
    for r in gone {
        if m.policy_sources.get(&r) == Some(&PolicySource::Cluster) {
            m.policy_sources.remove(&r);
            m.policies.remove(&r);
        }
    }
    for (r, p) in &pol.upsert {
        if let Some(src) = m.policy_sources.get(r)
            && *src != PolicySource::Cluster
        {
            warn!(policy = %r, source = %src, "a policy of the cluster replaces the node's own of the same name");
        }
        m.policy_sources.insert(r.clone(), PolicySource::Cluster);
        m.policies.insert(r.clone(), p.clone());
    }
    Ok(())
}

#[cfg(test)]
mod mode_label_tests {
    use super::*;

    #[test]
    fn the_mode_label_names_the_mode_and_anything_else_protects() {
        assert_eq!(namespace_mode_of("a", None), NamespaceMode::Protect);
        assert_eq!(
            namespace_mode_of("a", Some("discover")),
            NamespaceMode::Discover
        );
        assert_eq!(
            namespace_mode_of("a", Some("monitor")),
            NamespaceMode::Monitor
        );
        assert_eq!(
            namespace_mode_of("a", Some("protect")),
            NamespaceMode::Protect
        );
        assert_eq!(namespace_mode_of("a", Some("off")), NamespaceMode::Protect);
    }
}
