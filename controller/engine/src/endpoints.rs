//! Endpoints and namespaces: joining a workload to the node, relabelling it (it moves to the
//! identity of its new labels), and removing it. Endpoints are keyed by `ns/name`; a bare name
//! finds an endpoint when no other namespace has one of that name.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use palisade_policies::{
    audit::MODE_LABEL,
    endpoint::EndpointId,
    identity::workload_identity_labels,
    labels::{self, Labels, NAMESPACE_NAME_LABEL},
};
use tracing::{info, warn};

use crate::datapath::Datapath;
use crate::engine::Engine;
use crate::error::{AddressOwner, EngineError};
use crate::ipam;
use crate::model::{EndpointOrigin, EndpointRecord, EndpointSpec, LabelChange, qualified};
use crate::plumbing::Plumbing;
use crate::views::EndpointView;

/// DNS-1123 label: what Kubernetes requires of namespace names, and what endpoint names must
/// be to serve as `ip netns` names.
pub(crate) fn validate_dns_label(what: &'static str, value: &str) -> Result<(), EngineError> {
    let bad = |why| EngineError::InvalidName {
        what,
        value: value.to_string(),
        why,
    };
    if value.is_empty() || value.len() > 63 {
        return Err(bad("must be 1-63 characters"));
    }
    let b = value.as_bytes();
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err(bad("may contain only lowercase letters, digits and '-'"));
    }
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err(bad("must start and end with a letter or digit"));
    }
    Ok(())
}

pub(crate) fn validate_labels(l: &Labels) -> Result<(), EngineError> {
    for (k, v) in l {
        labels::validate_key(k)?;
        labels::validate_value(k, v)?;
    }
    Ok(())
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    pub(crate) fn choose_address(&self, asked: Option<Ipv4Addr>) -> Result<Ipv4Addr, EngineError> {
        let Some(ip) = asked else {
            let used: BTreeSet<Ipv4Addr> = self.model.endpoints.values().map(|e| e.ip).collect();
            return ipam::allocate(&self.cfg.pod_cidr, &used).ok_or(
                EngineError::AddressPoolExhausted {
                    pool: self.cfg.pod_cidr,
                },
            );
        };
        if let Some(owner) = self.model.endpoints.values().find(|e| e.ip == ip) {
            return Err(EngineError::AddressInUse {
                ip,
                owner: AddressOwner::Endpoint {
                    namespace: owner.namespace.clone(),
                    name: owner.name.clone(),
                },
            });
        }
        if self.host_addresses.contains(&ip) {
            return Err(EngineError::AddressInUse {
                ip,
                owner: AddressOwner::Node,
            });
        }
        Ok(ip)
    }

    pub async fn endpoint_add(&mut self, req: EndpointSpec) -> Result<EndpointView, EngineError> {
        validate_dns_label("endpoint name", &req.name)?;
        validate_dns_label("namespace", &req.namespace)?;
        validate_labels(&req.labels)?;
        let mut seen = BTreeSet::new();
        for p in &req.named_ports {
            if !seen.insert(p.name.clone()) {
                return Err(EngineError::DuplicateNamedPort {
                    name: p.name.clone(),
                });
            }
        }
        // Palisade's own endpoints are `ip netns` names: unique on the node.
        if self.model.endpoints.values().any(|e| e.name == req.name) {
            return Err(EngineError::EndpointExists { name: req.name });
        }
        if self.plumbing.netns_exists(&req.name) {
            return Err(EngineError::NetnsExists { name: req.name });
        }
        let ip = self.choose_address(req.ip)?;
        let id = EndpointId(self.model.next_endpoint_id);
        let host_ifname = format!("pal{}", id.0);
        let plumbed = self
            .plumbing
            .create_endpoint(&req.name, &host_ifname, ip)
            .await?;
        let link = self
            .link_layer(
                &crate::model::NetnsRef::Named(req.name.clone()),
                "eth0",
                plumbed.host_ifindex,
            )
            .await;

        let ns_labels = self.namespace_labels(&req.namespace);
        let new_key = qualified(&req.namespace, &req.name);
        let record_result = self.transact_endpoint(&new_key, |m| {
            let identity = m.identities.acquire(&workload_identity_labels(
                &req.namespace,
                &ns_labels,
                &req.labels,
            ))?;
            m.next_endpoint_id += 1;
            m.namespaces.entry(req.namespace.clone()).or_default();
            m.endpoints.insert(
                qualified(&req.namespace, &req.name),
                EndpointRecord {
                    id,
                    name: req.name.clone(),
                    namespace: req.namespace.clone(),
                    labels: req.labels.clone(),
                    ip,
                    named_ports: req.named_ports.clone(),
                    identity,
                    host_ifname: host_ifname.clone(),
                    ifindex: plumbed.host_ifindex,
                    origin: EndpointOrigin::Local,
                    pending_labels: false,
                    audit: false,
                    awaiting_identity: false,
                    link,
                },
            );
            Ok(())
        });
        if let Err(e) = record_result {
            let _ = self.plumbing.delete_endpoint(&req.name, &host_ifname).await;
            return Err(e);
        }
        // Judge before carrying: the host side comes up only once the classifiers run.
        let attached = match self.datapath.attach(&host_ifname, plumbed.host_ifindex) {
            Ok(()) => self
                .plumbing
                .activate(plumbed.host_ifindex, ip)
                .await
                .map_err(EngineError::from),
            Err(e) => Err(e.into()),
        };
        let key = qualified(&req.namespace, &req.name);
        if let Err(e) = attached {
            warn!(endpoint = %req.name, error = %e, "attach failed; removing the endpoint");
            let _ = self.endpoint_delete(&key).await;
            return Err(e);
        }
        info!(endpoint = %req.name, namespace = %req.namespace, %ip, id = id.0, "endpoint added");
        self.endpoint_view(&key)
    }

    pub async fn endpoint_delete(&mut self, name: &str) -> Result<(), EngineError> {
        let rec = self.record(name)?.clone();
        let key = rec.qualified_name();
        self.transact_endpoint(&key, |m| {
            m.endpoints.remove(&key);
            if !rec.pending_labels {
                m.identities.release(rec.identity)?;
            }
            Ok(())
        })?;
        // The endpoint is out of the model and the maps; what follows only cleans up, and
        // says so when it cannot.
        let left_behind = |source| EngineError::EndpointLeftBehind {
            name: rec.name.clone(),
            source,
        };
        let flushed = self.datapath.flush_conntrack(rec.id);
        self.datapath
            .detach(&rec.host_ifname, rec.ifindex)
            .map_err(|e| left_behind(crate::plumbing::PlumbingError::new(e)))?;
        // A container's veth is its CNI plugin's to remove.
        if rec.origin == EndpointOrigin::Local {
            self.plumbing
                .delete_endpoint(&rec.name, &rec.host_ifname)
                .await
                .map_err(left_behind)?;
        }
        info!(endpoint = %name, conntrack_flushed = flushed.unwrap_or(0), "endpoint deleted");
        Ok(())
    }

    pub fn endpoint_label(
        &mut self,
        name: &str,
        change: &LabelChange,
    ) -> Result<EndpointView, EngineError> {
        validate_labels(&change.set)?;
        let rec = self.record(name)?.clone();
        let key = rec.qualified_name();
        let new_labels = change.applied_to(&rec.labels);
        let ns_labels = self.namespace_labels(&rec.namespace);
        self.transact(|m| {
            // Acquire before release: an identity shared with others must not be freed and
            // renumbered in between. An endpoint whose labels were pending held `init`, which
            // is reserved: labelling it gives it its first workload identity.
            let identity = m.identities.acquire(&workload_identity_labels(
                &rec.namespace,
                &ns_labels,
                &new_labels,
            ))?;
            if !rec.pending_labels {
                m.identities.release(rec.identity)?;
            }
            if let Some(r) = m.endpoints.get_mut(&key) {
                r.labels = new_labels;
                r.identity = identity;
                r.pending_labels = false;
            }
            Ok(())
        })?;
        self.endpoint_view(&key)
    }

    pub fn namespace_label(
        &mut self,
        ns: &str,
        change: &LabelChange,
    ) -> Result<Labels, EngineError> {
        validate_dns_label("namespace", ns)?;
        validate_labels(&change.set)?;
        if self.cfg.cluster_identities {
            return Err(EngineError::ClusterNamespace {
                namespace: ns.to_string(),
            });
        }
        if change.set.contains_key(NAMESPACE_NAME_LABEL)
            || change.remove.iter().any(|k| k == NAMESPACE_NAME_LABEL)
        {
            return Err(EngineError::ReservedNamespaceLabel {
                key: NAMESPACE_NAME_LABEL,
            });
        }
        if change.set.contains_key(MODE_LABEL) || change.remove.iter().any(|k| k == MODE_LABEL) {
            return Err(EngineError::ModeLabel { key: MODE_LABEL });
        }
        let members: Vec<EndpointRecord> = self
            .model
            .endpoints
            .values()
            .filter(|e| e.namespace == ns && !e.pending_labels)
            .cloned()
            .collect();
        let user = change.applied_to(&self.model.namespaces.get(ns).cloned().unwrap_or_default());
        let mut effective = user.clone();
        effective.insert(NAMESPACE_NAME_LABEL.to_string(), ns.to_string());
        self.transact(|m| {
            m.namespaces.insert(ns.to_string(), user);
            for rec in &members {
                let identity =
                    m.identities
                        .acquire(&workload_identity_labels(ns, &effective, &rec.labels))?;
                m.identities.release(rec.identity)?;
                if let Some(r) = m.endpoints.get_mut(&rec.qualified_name()) {
                    r.identity = identity;
                }
            }
            Ok(())
        })?;
        Ok(self.namespace_labels(ns))
    }

    /// The endpoint called `ns/name`, or `name` when only one namespace has that name.
    pub(crate) fn record(&self, name: &str) -> Result<&EndpointRecord, EngineError> {
        if name.contains('/') {
            return self
                .model
                .endpoints
                .get(name)
                .ok_or_else(|| EngineError::NoSuchEndpoint {
                    name: name.to_string(),
                });
        }
        let mut found = self.model.endpoints.values().filter(|e| e.name == name);
        match (found.next(), found.next()) {
            (Some(one), None) => Ok(one),
            (None, _) => Err(EngineError::NoSuchEndpoint {
                name: name.to_string(),
            }),
            (Some(a), Some(b)) => Err(EngineError::AmbiguousEndpoint {
                name: name.to_string(),
                namespaces: vec![a.namespace.clone(), b.namespace.clone()],
            }),
        }
    }
}
