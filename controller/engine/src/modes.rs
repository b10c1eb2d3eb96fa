//! Audit scopes the engine owns: namespace modes (discover, monitor, protect) and endpoints
//! put in audit one by one. Each change is a transaction like a policy change: the endpoints'
//! audit flags move, the policy revision moves with them, and open connections are judged
//! again on their next packet (a namespace switched to protect stops what its policy denies).

use palisade_policies::audit::NamespaceMode;
use tracing::info;

use crate::datapath::Datapath;
use crate::endpoints::validate_dns_label;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::plumbing::Plumbing;
use crate::views::EndpointView;

/// A namespace's mode after a change, and what the change took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeChange {
    pub namespace: String,
    pub mode: NamespaceMode,
    pub previous: NamespaceMode,
    /// Endpoints of the namespace now.
    pub endpoints: usize,
    pub map_operations: usize,
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    /// The mode of a namespace (protect unless set).
    pub fn namespace_mode(&self, ns: &str) -> NamespaceMode {
        self.model
            .namespace_modes
            .get(ns)
            .copied()
            .unwrap_or_default()
    }

    pub fn set_namespace_mode(
        &mut self,
        ns: &str,
        mode: NamespaceMode,
    ) -> Result<ModeChange, EngineError> {
        validate_dns_label("namespace", ns)?;
        if self.cfg.cluster_identities {
            return Err(EngineError::ClusterNamespaceMode {
                namespace: ns.to_string(),
                mode: mode.as_str(),
            });
        }
        let previous = self.namespace_mode(ns);
        let ((), ops) = self.transact(|m| {
            if mode == NamespaceMode::Protect {
                m.namespace_modes.remove(ns);
            } else {
                m.namespace_modes.insert(ns.to_string(), mode);
            }
            m.namespaces.entry(ns.to_string()).or_default();
            Ok(())
        })?;
        let endpoints = self
            .model
            .endpoints
            .values()
            .filter(|e| e.namespace == ns)
            .count();
        info!(
            namespace = ns,
            mode = mode.as_str(),
            previous = previous.as_str(),
            map_operations = ops,
            "namespace mode set"
        );
        Ok(ModeChange {
            namespace: ns.to_string(),
            mode,
            previous,
            endpoints,
            map_operations: ops,
        })
    }

    /// Puts one endpoint in audit, or takes it out (its namespace's mode and the agent's
    /// setting still apply).
    pub fn set_endpoint_audit(
        &mut self,
        name: &str,
        audit: bool,
    ) -> Result<EndpointView, EngineError> {
        let key = self.record(name)?.qualified_name();
        let ((), ops) = self.transact(|m| {
            if let Some(r) = m.endpoints.get_mut(&key) {
                r.audit = audit;
            }
            Ok(())
        })?;
        info!(endpoint = %key, audit, map_operations = ops, "endpoint audit set");
        self.endpoint_view(&key)
    }
}
