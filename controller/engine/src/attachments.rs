//! Containers a runtime attached through the CNI plugin: registering one (the plugin made its
//! veth; the engine judges it before it carries anything), checking it, removing it
//! (idempotently), collecting the stale ones, and giving it its labels once the runtime tells
//! them. Until then it holds the reserved `init` identity, enforced both ways.

use std::collections::BTreeSet;

use palisade_policies::{
    endpoint::EndpointId, identity::Identity, identity::IdentityError,
    identity::workload_identity_labels, labels::Labels,
};
use tracing::{info, warn};

use crate::datapath::Datapath;
use crate::endpoints::{validate_dns_label, validate_labels};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::model::{AttachmentSpec, EndpointOrigin, EndpointRecord, NetnsRef, qualified};
use crate::plumbing::Plumbing;
use crate::views::EndpointView;

/// What CHECK learns of an attachment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentStatus {
    pub endpoint: EndpointView,
    /// The host-side interface exists with the index the datapath knows.
    pub interface_present: bool,
    /// Both classifiers are attached to it.
    pub programs_attached: bool,
    /// The maps hold its endpoint entry.
    pub in_datapath: bool,
}

/// Container and pod names as runtimes make them: 1-253 letters, digits, `_`, `.` and `-`,
/// starting with a letter or digit.
fn validate_container_name(value: &str) -> Result<(), EngineError> {
    let bad = |why| EngineError::InvalidName {
        what: "container name",
        value: value.to_string(),
        why,
    };
    if value.is_empty() || value.len() > 253 {
        return Err(bad("must be 1-253 characters"));
    }
    if !value
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    {
        return Err(bad("may contain only letters, digits, '_', '.' and '-'"));
    }
    if !value.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    Ok(())
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    fn attachment_record(&self, container_id: &str, ifname: &str) -> Option<&EndpointRecord> {
        self.model.endpoints.values().find(|e| {
            e.attachment()
                .is_some_and(|a| a.container_id == container_id && a.ifname == ifname)
        })
    }

    /// Registers a container's attachment and judges its veth; returns once the datapath
    /// enforces it. On failure nothing of it stays in the model or the maps (its veth is the
    /// plugin's to remove).
    pub async fn attachment_add(
        &mut self,
        spec: AttachmentSpec,
    ) -> Result<EndpointView, EngineError> {
        validate_container_name(&spec.name)?;
        validate_dns_label("namespace", &spec.namespace)?;
        if let Some(labels) = &spec.labels {
            validate_labels(labels)?;
        }
        let a = &spec.attachment;
        if self.attachment_record(&a.container_id, &a.ifname).is_some() {
            return Err(EngineError::AttachmentExists {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            });
        }
        let key = qualified(&spec.namespace, &spec.name);
        if self.model.endpoints.contains_key(&key) {
            return Err(EngineError::EndpointExists { name: key });
        }
        let ip = self.choose_address(Some(spec.ip))?;
        let ifindex = self
            .plumbing
            .ifindex(&spec.host_ifname)
            .await?
            .ok_or_else(|| EngineError::NoSuchInterface {
                ifname: spec.host_ifname.clone(),
            })?;
        let link = self
            .link_layer(&NetnsRef::Path(a.netns.clone()), &a.ifname, ifindex)
            .await;
        let id = EndpointId(self.model.next_endpoint_id);
        let ns_labels = self.namespace_labels(&spec.namespace);
        let chained = a.chained;
        self.transact(|m| {
            // A bridge's MAC may follow its ports (one it was not given follows the lowest):
            // the other ports of this one learn its address as it is now.
            if let Some(bridge) = link.bridge {
                for r in m.endpoints.values_mut() {
                    if let Some(b) = &mut r.link.bridge
                        && b.ifindex == bridge.ifindex
                    {
                        b.mac = bridge.mac;
                    }
                }
            }
            let (identity, pending, awaiting) = match &spec.labels {
                Some(labels) => match m.identities.acquire(&workload_identity_labels(
                    &spec.namespace,
                    &ns_labels,
                    labels,
                )) {
                    Ok(id) => (id, false, false),
                    // Kubernetes mode, labels the cluster has not numbered yet: `init` until
                    // the number arrives.
                    Err(IdentityError::NotAssigned { .. }) => (Identity::INIT, true, true),
                    Err(e) => return Err(e.into()),
                },
                None => (Identity::INIT, true, false),
            };
            m.next_endpoint_id += 1;
            m.namespaces.entry(spec.namespace.clone()).or_default();
            m.endpoints.insert(
                key.clone(),
                EndpointRecord {
                    id,
                    name: spec.name.clone(),
                    namespace: spec.namespace.clone(),
                    labels: spec.labels.clone().unwrap_or_default(),
                    ip,
                    named_ports: spec.named_ports.clone(),
                    identity,
                    host_ifname: spec.host_ifname.clone(),
                    ifindex,
                    origin: EndpointOrigin::Cni(spec.attachment.clone()),
                    pending_labels: pending,
                    audit: false,
                    awaiting_identity: awaiting,
                    link,
                },
            );
            Ok(())
        })?;
        // Judge before carrying; a chained attachment's routes are the previous plugin's.
        let attached = match self.datapath.attach(&spec.host_ifname, ifindex) {
            Ok(()) if chained => Ok(()),
            Ok(()) => self
                .plumbing
                .activate(ifindex, ip)
                .await
                .map_err(EngineError::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = attached {
            warn!(endpoint = %key, error = %e, "attach failed; removing the attachment");
            let _ = self.endpoint_delete(&key).await;
            return Err(e);
        }
        info!(endpoint = %key, container = %spec.attachment.container_id, %ip, id = id.0, pending_labels = spec.labels.is_none(), "container attached");
        self.endpoint_view(&key)
    }

    /// Removes a container's attachment; false when there was none (DEL is idempotent).
    pub async fn attachment_delete(
        &mut self,
        container_id: &str,
        ifname: &str,
    ) -> Result<bool, EngineError> {
        let Some(key) = self
            .attachment_record(container_id, ifname)
            .map(EndpointRecord::qualified_name)
        else {
            return Ok(false);
        };
        self.endpoint_delete(&key).await?;
        Ok(true)
    }

    /// What CHECK needs: whether the attachment's interface, programs and map entries are
    /// all in place.
    pub fn attachment_check(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<AttachmentStatus, EngineError> {
        let rec = self
            .attachment_record(container_id, ifname)
            .ok_or_else(|| EngineError::NoSuchAttachment {
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            })?;
        let health = self
            .datapath
            .endpoint_health(rec.id, &rec.host_ifname, rec.ifindex)?;
        Ok(AttachmentStatus {
            endpoint: self.endpoint_view(&rec.qualified_name())?,
            interface_present: health.interface_present,
            programs_attached: health.programs_attached,
            in_datapath: health.in_datapath,
        })
    }

    /// Removes every attachment of `network` not in `valid` (container id, interface) — the
    /// runtime's GC. Returns the endpoints removed.
    pub async fn attachment_gc(
        &mut self,
        network: &str,
        valid: &BTreeSet<(String, String)>,
    ) -> Result<Vec<String>, EngineError> {
        let stale: Vec<String> = self
            .model
            .endpoints
            .values()
            .filter(|e| {
                e.attachment().is_some_and(|a| {
                    a.network == network
                        && !valid.contains(&(a.container_id.clone(), a.ifname.clone()))
                })
            })
            .map(EndpointRecord::qualified_name)
            .collect();
        for key in &stale {
            self.endpoint_delete(key).await?;
        }
        if !stale.is_empty() {
            info!(removed = stale.len(), "stale attachments collected");
        }
        Ok(stale)
    }

    /// Gives an endpoint whose labels were pending its namespace and labels, as its runtime
    /// tells them; it leaves `init` for the identity of its labels.
    pub fn endpoint_resolve(
        &mut self,
        key: &str,
        namespace: &str,
        labels: Labels,
    ) -> Result<EndpointView, EngineError> {
        validate_dns_label("namespace", namespace)?;
        validate_labels(&labels)?;
        let rec = self.record(key)?.clone();
        if !rec.pending_labels {
            return Err(EngineError::LabelsKnown {
                name: rec.qualified_name(),
            });
        }
        let new_key = qualified(namespace, &rec.name);
        if new_key != rec.qualified_name() && self.model.endpoints.contains_key(&new_key) {
            return Err(EngineError::EndpointExists { name: new_key });
        }
        let ns_labels = self.namespace_labels(namespace);
        self.transact(|m| {
            let identity = m
                .identities
                .acquire(&workload_identity_labels(namespace, &ns_labels, &labels))?;
            let Some(mut r) = m.endpoints.remove(&rec.qualified_name()) else {
                return Ok(());
            };
            r.namespace = namespace.to_string();
            r.labels = labels;
            r.identity = identity;
            r.pending_labels = false;
            m.namespaces.entry(namespace.to_string()).or_default();
            m.endpoints.insert(new_key.clone(), r);
            Ok(())
        })?;
        info!(endpoint = %new_key, "labels known");
        self.endpoint_view(&new_key)
    }
}
