//! The engine: the one owner of Palisade's state. Commands come in (endpoint added, labels
//! changed, policy applied); the engine recompiles, diffs against what the maps hold, writes
//! the diff through the `Datapath`, and only then answers. Nothing else writes the maps.
//!
//! Every change runs as a transaction: the model is changed on a copy, compiled and written;
//! if any step fails the model is restored and the maps rolled back to exactly what they held,
//! so a rejected change changes nothing and never weakens enforcement already in place.

pub mod ipam;
pub mod persist;
mod views;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use ipnetwork::Ipv4Network;
use palisade_policies::{
    compile::{self, CompileInput, RuleTable, Settings},
    endpoint::{Endpoint, EndpointId, NamedPort},
    identity::{Identity, IdentityAllocator, IdentityError, workload_identity_labels},
    labels::{self, LabelError, Labels, NAMESPACE_NAME_LABEL},
    manifest::{self, ManifestError},
    mapstate::{self, MapState},
    model::{Policy, PolicyRef},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::types::{
    EndpointAddRequest, LabelChange, PolicyApplied, PolicyApplyResult, PolicyDeleteResult,
};
use crate::datapath::{Datapath, DatapathError};
use crate::flows::Catalog;
use crate::plumbing::{Plumbing, PlumbingError};
use crate::proxy::policy::ProxyPolicy;
use persist::{PersistError, STATE_VERSION, StateDir, StateFile};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("endpoint {0:?} already exists")]
    EndpointExists(String),
    #[error(
        "network namespace {0:?} already exists on this node (not created by palisade); pick another endpoint name"
    )]
    NetnsExists(String),
    #[error("no endpoint named {0:?}")]
    NoSuchEndpoint(String),
    #[error("endpoint {name:?} is in namespace {actual:?}, not {asked:?}")]
    WrongNamespace {
        name: String,
        actual: String,
        asked: String,
    },
    #[error("address {ip} is already used by {owner}")]
    AddressInUse { ip: Ipv4Addr, owner: String },
    #[error("no free address left in {0}")]
    AddressPoolExhausted(Ipv4Network),
    #[error(transparent)]
    Label(#[from] LabelError),
    #[error("named port {0:?} is declared twice")]
    DuplicateNamedPort(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("no policy {name:?} in {scope}")]
    NoSuchPolicy { name: String, scope: String },
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("datapath update failed, nothing changed: {0}")]
    RolledBack(String),
    #[error("plumbing: {0}")]
    Plumbing(#[from] PlumbingError),
    #[error(transparent)]
    Persist(#[from] PersistError),
}

impl EngineError {
    /// Whether the caller asked for something wrong (vs. the node failing).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            EngineError::InvalidName { .. }
                | EngineError::EndpointExists(_)
                | EngineError::NetnsExists(_)
                | EngineError::NoSuchEndpoint(_)
                | EngineError::WrongNamespace { .. }
                | EngineError::AddressInUse { .. }
                | EngineError::AddressPoolExhausted(_)
                | EngineError::Label(_)
                | EngineError::DuplicateNamedPort(_)
                | EngineError::Manifest(_)
                | EngineError::NoSuchPolicy { .. }
                | EngineError::BadRequest(_)
        )
    }

    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            EngineError::NoSuchEndpoint(_) | EngineError::NoSuchPolicy { .. }
        )
    }
}

/// An endpoint as the engine keeps it (and persists it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: EndpointId,
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    pub named_ports: Vec<NamedPort>,
    pub identity: Identity,
    pub host_ifname: String,
    pub ifindex: u32,
}

impl EndpointRecord {
    /// The endpoint as the compiler sees it.
    pub fn to_endpoint(&self) -> Endpoint {
        Endpoint {
            id: self.id,
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            identity: self.identity,
            ip: self.ip,
            ifindex: self.ifindex,
            named_ports: self.named_ports.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    Api,
    File(PathBuf),
}

impl PolicySource {
    pub fn describe(&self) -> String {
        match self {
            PolicySource::Api => "api".to_string(),
            PolicySource::File(p) => p.display().to_string(),
        }
    }
}

/// Everything a transaction may change.
#[derive(Clone)]
struct Model {
    endpoints: BTreeMap<String, EndpointRecord>,
    /// Labels set on namespaces by users (the name label is implicit).
    namespaces: BTreeMap<String, Labels>,
    /// Kept apart from their sources so compiling borrows them rather than copying them.
    policies: BTreeMap<PolicyRef, Policy>,
    policy_sources: BTreeMap<PolicyRef, PolicySource>,
    identities: IdentityAllocator,
    next_endpoint_id: u32,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub pod_cidr: Ipv4Network,
    pub node_ip: Ipv4Addr,
    pub settings: Settings,
    pub policy_dir: Option<PathBuf>,
    /// Where to record how long each compile-and-diff takes.
    pub compile_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
}

pub struct Engine<D: Datapath, P: Plumbing> {
    cfg: EngineConfig,
    model: Model,
    rules: RuleTable,
    /// What the datapath maps hold.
    applied: MapState,
    host_addresses: Vec<Ipv4Addr>,
    datapath: D,
    plumbing: P,
    state_dir: Option<StateDir>,
    catalog: watch::Sender<Arc<Catalog>>,
    /// The L7 proxy's view of policy, when a proxy runs.
    proxy: Option<watch::Sender<Arc<ProxyPolicy>>>,
    policy_dir_stamp: Option<Vec<(PathBuf, SystemTime, u64)>>,
}

/// DNS-1123 label: what Kubernetes requires of namespace names, and what endpoint names must
/// be to serve as `ip netns` names.
fn validate_dns_label(what: &'static str, value: &str) -> Result<(), EngineError> {
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

fn validate_labels(l: &Labels) -> Result<(), EngineError> {
    for (k, v) in l {
        labels::validate_key(k)?;
        labels::validate_value(k, v)?;
    }
    Ok(())
}

fn applied_entry(p: &Policy, action: &str) -> PolicyApplied {
    PolicyApplied {
        kind: p.id.kind.short_name().to_string(),
        namespace: p.id.namespace.clone(),
        name: p.id.name.clone(),
        action: action.to_string(),
    }
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    /// Starts the engine: restores persisted state, reconciles the maps with it (diffing
    /// against what the pinned maps actually hold), and re-attaches every endpoint.
    pub async fn start(
        cfg: EngineConfig,
        datapath: D,
        plumbing: P,
        state_dir: Option<StateDir>,
        catalog: watch::Sender<Arc<Catalog>>,
        proxy: Option<watch::Sender<Arc<ProxyPolicy>>>,
    ) -> Result<Self, EngineError> {
        let saved = match &state_dir {
            Some(d) => d.load()?,
            None => None,
        };
        let saved = saved.unwrap_or(StateFile {
            version: STATE_VERSION,
            next_endpoint_id: 1,
            ..StateFile::default()
        });
        let identities = IdentityAllocator::restore(&saved.identities)?;
        let applied = datapath.read_state()?;
        let mut engine = Self {
            cfg,
            model: Model {
                endpoints: BTreeMap::new(),
                namespaces: saved.namespaces.clone(),
                policies: saved
                    .policies
                    .iter()
                    .map(|p| (p.id.clone(), p.clone()))
                    .collect(),
                policy_sources: saved
                    .policies
                    .iter()
                    .map(|p| (p.id.clone(), PolicySource::Api))
                    .collect(),
                identities,
                next_endpoint_id: saved.next_endpoint_id.max(1),
            },
            rules: RuleTable::default(),
            applied,
            host_addresses: Vec::new(),
            datapath,
            plumbing,
            state_dir,
            catalog,
            proxy,
            policy_dir_stamp: None,
        };
        engine.host_addresses = engine.plumbing.node_addresses().await?;
        if !engine.host_addresses.contains(&engine.cfg.node_ip) {
            engine.host_addresses.push(engine.cfg.node_ip);
        }

        let mut live = Vec::new();
        for mut rec in saved.endpoints {
            let netns_ok = engine.plumbing.netns_exists(&rec.name);
            match engine.plumbing.ifindex(&rec.host_ifname).await? {
                Some(ifindex) if netns_ok => {
                    rec.ifindex = ifindex;
                    let ns_labels = engine.namespace_labels(&rec.namespace);
                    rec.identity = engine.model.identities.acquire(&workload_identity_labels(
                        &rec.namespace,
                        &ns_labels,
                        &rec.labels,
                    ))?;
                    live.push((rec.host_ifname.clone(), ifindex, rec.ip));
                    engine.model.endpoints.insert(rec.name.clone(), rec);
                }
                _ => {
                    warn!(endpoint = %rec.name, "endpoint's namespace or interface vanished while the agent was down; removing it");
                    let _ = engine
                        .plumbing
                        .delete_endpoint(&rec.name, &rec.host_ifname)
                        .await;
                }
            }
        }
        engine.model.identities.drop_unreferenced();
        if let Err(e) = engine.reload_policy_dir() {
            warn!(error = %e, "policy directory not loaded");
        }
        let ops = engine.sync()?;
        for (ifname, ifindex, ip) in &live {
            engine.datapath.attach(ifname, *ifindex)?;
            engine.plumbing.activate(*ifindex, *ip).await?;
        }
        let links: Vec<(String, u32)> = live.into_iter().map(|(n, i, _)| (n, i)).collect();
        engine.datapath.prune_links(&links);
        engine.persist()?;
        info!(
            endpoints = engine.model.endpoints.len(),
            policies = engine.model.policies.len(),
            map_operations = ops,
            "engine started"
        );
        Ok(engine)
    }

    fn namespace_labels(&self, ns: &str) -> Labels {
        let mut l = self.model.namespaces.get(ns).cloned().unwrap_or_default();
        l.insert(NAMESPACE_NAME_LABEL.to_string(), ns.to_string());
        l
    }

    fn compile_endpoints(&self) -> BTreeMap<EndpointId, Endpoint> {
        self.model
            .endpoints
            .values()
            .map(|r| (r.id, r.to_endpoint()))
            .collect()
    }

    fn policies(&self) -> &BTreeMap<PolicyRef, Policy> {
        &self.model.policies
    }

    /// Compiles the model and writes the difference to the maps. On a failed write, rolls
    /// the maps back to what they held and reports the error.
    fn sync(&mut self) -> Result<usize, EngineError> {
        let started = std::time::Instant::now();
        let cidrs = compile::policy_cidrs(self.model.policies.values());
        self.model.identities.sync_cidrs(&cidrs)?;
        let table = self.model.identities.table();
        let endpoints = self.compile_endpoints();
        let input = CompileInput {
            endpoints: &endpoints,
            identities: &table,
            policies: &self.model.policies,
            host_addresses: &self.host_addresses,
            settings: self.cfg.settings,
        };
        let (desired, l7) = compile::compile_with_l7(&input, &mut self.rules);
        // Built before any map changes, so a policy the proxy cannot enforce changes nothing.
        let proxy_policy =
            ProxyPolicy::new(&l7, &desired).map_err(|e| EngineError::BadRequest(e.to_string()))?;
        let diff = mapstate::diff(&self.applied, &desired);
        if let Some(h) = &self.cfg.compile_seconds {
            h.observe(started.elapsed().as_secs_f64());
        }
        let ops = diff.len();
        if ops > 0 {
            if let Err(e) = self.datapath.apply(&diff) {
                let mut partial = self.applied.clone();
                partial.apply_prefix(&diff, e.applied);
                let back = mapstate::diff(&partial, &self.applied);
                if let Err(rollback) = self.datapath.apply(&back) {
                    // The maps are in an unknown mix: believe them, so the next sync repairs.
                    warn!(error = %rollback, "rolling back a failed map update failed too");
                    self.applied = self.datapath.read_state().unwrap_or(partial);
                }
                return Err(EngineError::RolledBack(e.to_string()));
            }
            self.applied = desired;
            self.datapath.bump_revision()?;
        }
        self.rules.retain_used_with(&self.applied, &l7);
        self.publish_catalog(&table);
        if let Some(tx) = &self.proxy {
            tx.send_replace(Arc::new(proxy_policy));
        }
        Ok(ops)
    }

    /// Runs `change` on the model and syncs; on any error the model is restored.
    fn transact<T>(
        &mut self,
        change: impl FnOnce(&mut Model) -> Result<T, EngineError>,
    ) -> Result<(T, usize), EngineError> {
        let backup = self.model.clone();
        let result = change(&mut self.model).and_then(|t| self.sync().map(|ops| (t, ops)));
        match result {
            Ok(r) => {
                self.persist()?;
                Ok(r)
            }
            Err(e) => {
                self.model = backup;
                Err(e)
            }
        }
    }

    fn persist(&self) -> Result<(), EngineError> {
        let Some(dir) = &self.state_dir else {
            return Ok(());
        };
        let state = StateFile {
            version: STATE_VERSION,
            endpoints: self.model.endpoints.values().cloned().collect(),
            namespaces: self.model.namespaces.clone(),
            policies: self
                .model
                .policies
                .values()
                .filter(|p| self.model.policy_sources.get(&p.id) == Some(&PolicySource::Api))
                .cloned()
                .collect(),
            identities: self.model.identities.snapshot(),
            next_endpoint_id: self.model.next_endpoint_id,
        };
        dir.save(&state)?;
        Ok(())
    }

    fn publish_catalog(&self, table: &palisade_policies::identity::IdentityTable) {
        let mut c = Catalog::default();
        for r in self.model.endpoints.values() {
            let labels = table
                .get(&r.identity)
                .map(|s| s.label_strings())
                .unwrap_or_default();
            c.endpoints_by_id
                .insert(r.id.0, (r.namespace.clone(), r.name.clone(), labels));
            c.endpoints_by_ip
                .insert(r.ip, (r.namespace.clone(), r.name.clone()));
        }
        for (id, src) in table {
            c.identities.insert(id.0, src.label_strings());
        }
        for id in self
            .applied
            .policy
            .values()
            .map(|e| e.rule)
            .collect::<BTreeSet<_>>()
        {
            if let Some(origin) = self.rules.get(id) {
                let (name, kind) = match origin.policy() {
                    Some(p) => (p.to_string(), p.kind.short_name().to_string()),
                    None => (String::new(), "agent".to_string()),
                };
                c.rules.insert(id.0, (name, kind, origin.describe()));
            }
        }
        self.catalog.send_replace(Arc::new(c));
    }

    // ---- endpoints ----

    pub async fn endpoint_add(
        &mut self,
        req: EndpointAddRequest,
    ) -> Result<crate::api::types::EndpointView, EngineError> {
        validate_dns_label("endpoint name", &req.name)?;
        validate_dns_label("namespace", &req.namespace)?;
        validate_labels(&req.labels)?;
        let mut seen = BTreeSet::new();
        for p in &req.named_ports {
            if !seen.insert(p.name.clone()) {
                return Err(EngineError::DuplicateNamedPort(p.name.clone()));
            }
        }
        if self.model.endpoints.contains_key(&req.name) {
            return Err(EngineError::EndpointExists(req.name));
        }
        if self.plumbing.netns_exists(&req.name) {
            return Err(EngineError::NetnsExists(req.name));
        }
        let used: BTreeSet<Ipv4Addr> = self.model.endpoints.values().map(|e| e.ip).collect();
        let ip = match req.ip {
            Some(ip) => {
                if let Some(owner) = self.model.endpoints.values().find(|e| e.ip == ip) {
                    return Err(EngineError::AddressInUse {
                        ip,
                        owner: format!("endpoint {}/{}", owner.namespace, owner.name),
                    });
                }
                if self.host_addresses.contains(&ip) {
                    return Err(EngineError::AddressInUse {
                        ip,
                        owner: "the node".to_string(),
                    });
                }
                ip
            }
            None => ipam::allocate(&self.cfg.pod_cidr, &used)
                .ok_or(EngineError::AddressPoolExhausted(self.cfg.pod_cidr))?,
        };
        let id = EndpointId(self.model.next_endpoint_id);
        let host_ifname = format!("pal{}", id.0);
        let plumbed = self
            .plumbing
            .create_endpoint(&req.name, &host_ifname, ip)
            .await?;

        let ns_labels = self.namespace_labels(&req.namespace);
        let record_result = self.transact(|m| {
            let identity = m.identities.acquire(&workload_identity_labels(
                &req.namespace,
                &ns_labels,
                &req.labels,
            ))?;
            m.next_endpoint_id += 1;
            m.namespaces.entry(req.namespace.clone()).or_default();
            m.endpoints.insert(
                req.name.clone(),
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
        if let Err(e) = attached {
            warn!(endpoint = %req.name, error = %e, "attach failed; removing the endpoint");
            let _ = self.endpoint_delete(&req.name).await;
            return Err(e);
        }
        info!(endpoint = %req.name, namespace = %req.namespace, %ip, id = id.0, "endpoint added");
        self.endpoint_view(&req.name)
    }

    pub async fn endpoint_delete(&mut self, name: &str) -> Result<(), EngineError> {
        let rec = self
            .model
            .endpoints
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::NoSuchEndpoint(name.to_string()))?;
        self.transact(|m| {
            m.endpoints.remove(name);
            m.identities.release(rec.identity)?;
            Ok(())
        })?;
        self.datapath.detach(&rec.host_ifname, rec.ifindex)?;
        self.plumbing
            .delete_endpoint(&rec.name, &rec.host_ifname)
            .await?;
        let flushed = self.datapath.flush_conntrack(rec.id)?;
        info!(endpoint = %name, conntrack_flushed = flushed, "endpoint deleted");
        Ok(())
    }

    pub fn endpoint_label(
        &mut self,
        name: &str,
        change: LabelChange,
    ) -> Result<crate::api::types::EndpointView, EngineError> {
        validate_labels(&change.set)?;
        let rec = self
            .model
            .endpoints
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::NoSuchEndpoint(name.to_string()))?;
        let mut new_labels = rec.labels.clone();
        for k in &change.remove {
            new_labels.remove(k);
        }
        new_labels.extend(change.set.clone());
        let ns_labels = self.namespace_labels(&rec.namespace);
        self.transact(|m| {
            // Acquire before release: an identity shared with others must not be freed and
            // renumbered in between.
            let identity = m.identities.acquire(&workload_identity_labels(
                &rec.namespace,
                &ns_labels,
                &new_labels,
            ))?;
            m.identities.release(rec.identity)?;
            let r = m.endpoints.get_mut(name).expect("checked above");
            r.labels = new_labels;
            r.identity = identity;
            Ok(())
        })?;
        self.endpoint_view(name)
    }

    pub fn namespace_label(
        &mut self,
        ns: &str,
        change: LabelChange,
    ) -> Result<Labels, EngineError> {
        validate_dns_label("namespace", ns)?;
        validate_labels(&change.set)?;
        if change.set.contains_key(NAMESPACE_NAME_LABEL)
            || change.remove.iter().any(|k| k == NAMESPACE_NAME_LABEL)
        {
            return Err(EngineError::BadRequest(format!(
                "label {NAMESPACE_NAME_LABEL} is set by palisade to the namespace name and cannot be changed"
            )));
        }
        let members: Vec<EndpointRecord> = self
            .model
            .endpoints
            .values()
            .filter(|e| e.namespace == ns)
            .cloned()
            .collect();
        let mut user = self.model.namespaces.get(ns).cloned().unwrap_or_default();
        for k in &change.remove {
            user.remove(k);
        }
        user.extend(change.set);
        let mut effective = user.clone();
        effective.insert(NAMESPACE_NAME_LABEL.to_string(), ns.to_string());
        self.transact(|m| {
            m.namespaces.insert(ns.to_string(), user);
            for rec in &members {
                let identity =
                    m.identities
                        .acquire(&workload_identity_labels(ns, &effective, &rec.labels))?;
                m.identities.release(rec.identity)?;
                m.endpoints.get_mut(&rec.name).expect("member").identity = identity;
            }
            Ok(())
        })?;
        Ok(self.namespace_labels(ns))
    }

    // ---- policies ----

    pub fn policy_apply(&mut self, manifest_text: &str) -> Result<PolicyApplyResult, EngineError> {
        let parsed = manifest::parse_manifests(manifest_text)?;
        if parsed.is_empty() {
            return Err(EngineError::BadRequest(
                "the manifest holds no documents".to_string(),
            ));
        }
        let report: Vec<PolicyApplied> = parsed
            .iter()
            .map(|p| {
                let action = match self.model.policies.get(&p.id) {
                    None => "created",
                    Some(old) if old == p => "unchanged",
                    Some(_) => "configured",
                };
                applied_entry(p, action)
            })
            .collect();
        let ((), ops) = self.transact(|m| {
            for p in parsed {
                m.policy_sources.insert(p.id.clone(), PolicySource::Api);
                m.policies.insert(p.id.clone(), p);
            }
            Ok(())
        })?;
        for p in &report {
            info!(policy = %p.name, namespace = ?p.namespace, action = %p.action, map_operations = ops, "policy applied");
        }
        Ok(PolicyApplyResult {
            policies: report,
            map_operations: ops,
        })
    }

    pub fn policy_delete(
        &mut self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<PolicyDeleteResult, EngineError> {
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
                scope: namespace.map_or("the cluster-wide scope".to_string(), |n| {
                    format!("namespace {n:?}")
                }),
            });
        }
        let deleted: Vec<PolicyApplied> = doomed
            .iter()
            .filter_map(|r| self.model.policies.get(r))
            .map(|p| applied_entry(p, "deleted"))
            .collect();
        let ((), ops) = self.transact(|m| {
            for r in &doomed {
                m.policies.remove(r);
                m.policy_sources.remove(r);
            }
            Ok(())
        })?;
        info!(policy = name, namespace = ?namespace, map_operations = ops, "policy deleted");
        Ok(PolicyDeleteResult {
            deleted,
            map_operations: ops,
        })
    }

    /// Re-reads `--policy-dir` when its files changed. A file that does not parse is reported
    /// and the directory's previous policies stay in force.
    pub fn reload_policy_dir(&mut self) -> Result<usize, EngineError> {
        let Some(dir) = self.cfg.policy_dir.clone() else {
            return Ok(0);
        };
        let mut files: Vec<(PathBuf, SystemTime, u64)> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .filter_map(|p| {
                    let md = std::fs::metadata(&p).ok()?;
                    Some((p, md.modified().ok()?, md.len()))
                })
                .collect(),
            Err(e) => {
                return Err(EngineError::BadRequest(format!(
                    "policy directory {}: {e}",
                    dir.display()
                )));
            }
        };
        files.sort();
        if self.policy_dir_stamp.as_ref() == Some(&files) {
            return Ok(0);
        }
        let mut loaded: Vec<(Policy, PathBuf)> = Vec::new();
        for (path, _, _) in &files {
            let text = std::fs::read_to_string(path).map_err(|e| {
                EngineError::BadRequest(format!("policy file {}: {e}", path.display()))
            })?;
            let parsed = manifest::parse_manifests(&text).map_err(|e| {
                EngineError::BadRequest(format!("policy file {}: {e}", path.display()))
            })?;
            loaded.extend(parsed.into_iter().map(|p| (p, path.clone())));
        }
        let ((), ops) = self.transact(|m| {
            m.policy_sources.retain(|_, src| *src == PolicySource::Api);
            let sources = &m.policy_sources;
            m.policies.retain(|id, _| sources.contains_key(id));
            for (p, path) in loaded {
                m.policy_sources
                    .insert(p.id.clone(), PolicySource::File(path));
                m.policies.insert(p.id.clone(), p);
            }
            Ok(())
        })?;
        self.policy_dir_stamp = Some(files);
        info!(dir = %dir.display(), map_operations = ops, "policy directory loaded");
        Ok(ops)
    }

    /// Periodic housekeeping: expired conntrack entries.
    pub fn gc(&mut self) -> Result<(usize, usize), EngineError> {
        Ok(self.datapath.gc_conntrack()?)
    }
}

#[cfg(test)]
mod tests;
