//! Policies: applying parsed manifests (all or nothing), deleting them, and replacing the set
//! read from the policy directory. Manifests are parsed by the caller, off the engine's task.

use std::path::PathBuf;

use palisade_policies::model::{Policy, PolicyRef};
use tracing::info;

use crate::datapath::Datapath;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::model::{FilePolicies, PolicySource};
use crate::plumbing::Plumbing;

/// What an apply or delete did to one policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

impl PolicyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Created => "created",
            PolicyAction::Configured => "configured",
            PolicyAction::Unchanged => "unchanged",
            PolicyAction::Deleted => "deleted",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyChange {
    pub id: PolicyRef,
    pub action: PolicyAction,
}

/// The result of an apply or a delete; the datapath enforces it when this is returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyUpdate {
    pub policies: Vec<PolicyChange>,
    /// Map writes it took.
    pub map_operations: usize,
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    /// Applies the policies of one manifest together: all of them or none.
    pub fn policy_apply(&mut self, parsed: Vec<Policy>) -> Result<PolicyUpdate, EngineError> {
        if parsed.is_empty() {
            return Err(EngineError::EmptyManifest);
        }
        if self.cfg.cluster_identities {
            return Err(EngineError::ClusterManaged {
                policy: parsed[0].id.to_string(),
            });
        }
        let report: Vec<PolicyChange> = parsed
            .iter()
            .map(|p| PolicyChange {
                id: p.id.clone(),
                action: match self.model.policies.get(&p.id) {
                    None => PolicyAction::Created,
                    Some(old) if old == p => PolicyAction::Unchanged,
                    Some(_) => PolicyAction::Configured,
                },
            })
            .collect();
        let touched: Vec<PolicyRef> = parsed.iter().map(|p| p.id.clone()).collect();
        let ((), ops) = self.transact_policies(&touched, |m| {
            for p in parsed {
                m.policy_sources.insert(p.id.clone(), PolicySource::Api);
                m.policies.insert(p.id.clone(), p);
            }
            Ok(())
        })?;
        for p in &report {
            info!(policy = %p.id.name, namespace = ?p.id.namespace, action = p.action.as_str(), map_operations = ops, "policy applied");
        }
        Ok(PolicyUpdate {
            policies: report,
            map_operations: ops,
        })
    }

    pub fn policy_delete(
        &mut self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<PolicyUpdate, EngineError> {
        let doomed: Vec<PolicyRef> = self
            .model
            .policies
            .keys()
            .filter(|r| r.name == name && r.namespace.as_deref() == namespace)
            .cloned()
            .collect();
        if doomed.is_empty() {
            return Err(EngineError::NoSuchPolicy {
                name: name.to_string(),
                namespace: namespace.map(str::to_string),
            });
        }
        if let Some(r) = doomed
            .iter()
            .find(|r| self.model.policy_sources.get(*r) == Some(&PolicySource::Cluster))
        {
            return Err(EngineError::ClusterManaged {
                policy: r.to_string(),
            });
        }
        let deleted: Vec<PolicyChange> = doomed
            .iter()
            .map(|id| PolicyChange {
                id: id.clone(),
                action: PolicyAction::Deleted,
            })
            .collect();
        let ((), ops) = self.transact_policies(&doomed, |m| {
            for r in &doomed {
                m.policies.remove(r);
                m.policy_sources.remove(r);
            }
            Ok(())
        })?;
        info!(policy = name, namespace = ?namespace, map_operations = ops, "policy deleted");
        Ok(PolicyUpdate {
            policies: deleted,
            map_operations: ops,
        })
    }

    /// Replaces every policy read from the policy directory with `loaded` (what its files hold
    /// now), in one transaction. Policies applied through the API are left alone.
    pub fn replace_file_policies(
        &mut self,
        loaded: Vec<FilePolicies>,
    ) -> Result<usize, EngineError> {
        let files: Vec<PathBuf> = loaded.iter().map(|(p, _)| p.clone()).collect();
        let ((), ops) = self.transact(|m| {
            m.policy_sources.retain(|_, src| *src == PolicySource::Api);
            let sources = &m.policy_sources;
            m.policies.retain(|id, _| sources.contains_key(id));
            for (path, policies) in loaded {
                for p in policies {
                    m.policy_sources
                        .insert(p.id.clone(), PolicySource::File(path.clone()));
                    m.policies.insert(p.id.clone(), p);
                }
            }
            Ok(())
        })?;
        info!(
            files = files.len(),
            map_operations = ops,
            "policy directory loaded"
        );
        Ok(ops)
    }
}
