//! The engine's core: start-up reconciliation, and the transaction every change runs in
//! (change a copy of the model, compile, diff against what the maps hold, write the diff, and
//! only then publish and persist).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use palisade_policies::{
    audit::{self, AuditScopes},
    compile::{self, CompileInput, RuleTable, Settings},
    endpoint::{Endpoint, EndpointId, LinkLayer},
    identity::{Identity, IdentityAllocator, IdentityTable, workload_identity_labels},
    incremental::{self, Compiler},
    l7::{DnsPolicy, ProxyPolicy},
    labels::Labels,
    mapstate::{self, MapState},
    model::{Policy, PolicyRef},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::catalog::{Catalog, CatalogEndpoint, CatalogRule, DefaultDenyBy};
use crate::datapath::Datapath;
use crate::error::EngineError;
use crate::model::{EndpointOrigin, FilePolicies, Model, PolicySource, RemoteSpec};
use crate::plumbing::Plumbing;
use crate::store::{STATE_VERSION, SaveTicket, StateFile, StateStore};

/// What the engine measures about itself, for whoever exports metrics.
pub trait EngineMetrics: Send + Sync {
    /// One compile of the model into map state and its diff took `took`.
    fn policy_compiled(&self, took: Duration);
    /// A DNS answer held more addresses for a name than an endpoint keeps: `count` went.
    fn fqdn_evicted(&self, count: usize) {
        let _ = count;
    }
    /// A batch of DNS answers was learned; where the engine's task spent its time on it.
    fn fqdn_learned(&self, stages: &crate::fqdn_learning::LearnStages) {
        let _ = stages;
    }
}

/// Where the last sync spent its time (for the learn path's breakdown).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SyncTimes {
    /// Identities, compile and diff.
    pub compile: Duration,
    /// Map writes and the revision bump.
    pub write: Duration,
    /// Catalog, L7 and DNS proxy policies handed out.
    pub publish: Duration,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub pod_cidr: Ipv4Network,
    pub node_ip: Ipv4Addr,
    pub settings: Settings,
    /// Kubernetes mode: workload identity numbers are the cluster's (`ClusterDelta`), never
    /// chosen by this node.
    pub cluster_identities: bool,
    /// Policies of `--policy-dir`, read before the start so the first sync includes them.
    pub file_policies: Vec<FilePolicies>,
    /// Lifetimes and limits of learned DNS names.
    pub fqdn: crate::fqdn::FqdnLimits,
}

/// What the engine tells the rest of the agent after every change.
#[derive(Default)]
pub struct Outputs {
    pub catalog: Option<watch::Sender<Arc<Catalog>>>,
    /// The L7 proxy's policy, when a proxy runs.
    pub proxy: Option<watch::Sender<Arc<ProxyPolicy>>>,
    /// The DNS proxy's policy, when it runs.
    pub dns: Option<watch::Sender<Arc<DnsPolicy>>>,
    pub metrics: Option<Arc<dyn EngineMetrics>>,
    /// What the engine did that others report (connections it ended).
    pub events: Option<tokio::sync::mpsc::UnboundedSender<crate::revalidate::EngineEvent>>,
    /// The engine's status after every command (see `Engine::status_watch`).
    pub status: Option<watch::Sender<Arc<crate::views::EngineStatus>>>,
}

pub struct Engine<D: Datapath, P: Plumbing> {
    pub(crate) cfg: EngineConfig,
    pub(crate) model: Model,
    pub(crate) rules: RuleTable,
    /// Recompiles only what a change touches; reset whenever a sync fails.
    pub(crate) compiler: Compiler,
    /// What the datapath maps hold.
    pub(crate) applied: MapState,
    pub(crate) host_addresses: Vec<Ipv4Addr>,
    pub(crate) datapath: D,
    pub(crate) plumbing: P,
    pub(crate) store: Option<Box<dyn StateStore>>,
    outputs: Outputs,
    /// The last sync made established connections subject to re-checking.
    pub(crate) revalidate: bool,
    /// The save of the last change, for its caller to wait on.
    pub(crate) saved: Option<SaveTicket>,
    /// Learned names changed (lifetimes) since the last save.
    pub(crate) fqdn_dirty: bool,
    /// Whether the maps held what the engine wrote when last read back (at the start, after
    /// a failed write, and at every housekeeping tick).
    pub(crate) maps_verified: bool,
    /// Where the last sync spent its time.
    pub(crate) sync_times: SyncTimes,
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    /// Starts the engine: restores the kept state, reconciles the maps with it (diffing
    /// against what the pinned maps actually hold), and re-attaches every endpoint.
    pub async fn start(
        mut cfg: EngineConfig,
        datapath: D,
        plumbing: P,
        mut store: Option<Box<dyn StateStore>>,
        outputs: Outputs,
    ) -> Result<Self, EngineError> {
        let saved = match &mut store {
            Some(s) => s.load()?,
            None => None,
        };
        let saved = saved.unwrap_or(StateFile {
            version: STATE_VERSION,
            next_endpoint_id: 1,
            ..StateFile::default()
        });
        let mut identities = IdentityAllocator::restore(&saved.identities)?;
        if cfg.cluster_identities {
            identities.set_cluster_scope();
        }
        let applied = datapath.read_state()?;
        let file_policies = std::mem::take(&mut cfg.file_policies);
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
                namespace_modes: saved.namespace_modes.clone(),
                remotes: BTreeMap::new(),
                fqdns: crate::fqdn::FqdnCache::restore(&saved.fqdns),
            },
            rules: RuleTable::default(),
            compiler: Compiler::default(),
            applied,
            host_addresses: Vec::new(),
            datapath,
            plumbing,
            store,
            outputs,
            revalidate: false,
            saved: None,
            fqdn_dirty: false,
            maps_verified: true,
            sync_times: SyncTimes::default(),
        };
        engine.host_addresses = engine.plumbing.node_addresses().await?;
        if !engine.host_addresses.contains(&engine.cfg.node_ip) {
            engine.host_addresses.push(engine.cfg.node_ip);
        }

        let mut live = Vec::new();
        for mut rec in saved.endpoints {
            let netns_ok = engine.plumbing.namespace_exists(&rec.netns());
            match engine.plumbing.ifindex(&rec.host_ifname).await? {
                Some(ifindex) if netns_ok => {
                    rec.ifindex = ifindex;
                    rec.link = engine
                        .link_layer(&rec.netns(), rec.workload_ifname(), ifindex)
                        .await;
                    if !rec.pending_labels {
                        let ns_labels = engine.namespace_labels(&rec.namespace);
                        rec.identity = engine.model.identities.acquire(
                            &workload_identity_labels(&rec.namespace, &ns_labels, &rec.labels),
                        )?;
                    }
                    // A chained attachment's routes are the previous plugin's.
                    let routed = !rec.attachment().is_some_and(|a| a.chained);
                    live.push((rec.host_ifname.clone(), ifindex, rec.ip, routed));
                    engine.model.endpoints.insert(rec.qualified_name(), rec);
                }
                _ => {
                    warn!(endpoint = %rec.name, "endpoint's namespace or interface vanished while the agent was down; removing it");
                    if rec.origin == EndpointOrigin::Local {
                        let _ = engine
                            .plumbing
                            .delete_endpoint(&rec.name, &rec.host_ifname)
                            .await;
                    }
                }
            }
        }
        for p in &saved.cluster_policies {
            engine
                .model
                .policy_sources
                .insert(p.id.clone(), PolicySource::Cluster);
            engine.model.policies.insert(p.id.clone(), p.clone());
        }
        for (key, mut rec) in saved.remotes {
            if let RemoteSpec::Pod {
                namespace, labels, ..
            } = &rec.spec
            {
                let ns_labels = engine.namespace_labels(namespace);
                rec.identity = engine
                    .model
                    .identities
                    .acquire(&workload_identity_labels(namespace, &ns_labels, labels))?;
            }
            engine.model.remotes.insert(key, rec);
        }
        engine.model.identities.drop_unreferenced();
        // In the first sync, so a restart never drops what the directory's policies allow.
        let without_files = engine.model.clone();
        for (path, policies) in file_policies {
            for p in policies {
                engine
                    .model
                    .policy_sources
                    .insert(p.id.clone(), PolicySource::File(path.clone()));
                engine.model.policies.insert(p.id.clone(), p);
            }
        }
        let ops = match engine.sync() {
            Ok(ops) => ops,
            Err(e) if engine.model.policies.len() != without_files.policies.len() => {
                warn!(error = %e, "the policy directory's policies cannot be enforced; starting without them");
                engine.model = without_files;
                engine.sync()?
            }
            Err(e) => return Err(e),
        };
        for (ifname, ifindex, ip, routed) in &live {
            engine.datapath.attach(ifname, *ifindex)?;
            if *routed {
                engine.plumbing.activate(*ifindex, *ip).await?;
            }
        }
        let links: Vec<(String, u32)> = live.into_iter().map(|(n, i, _, _)| (n, i)).collect();
        engine.datapath.prune_links(&links);
        engine.persist();
        // Nobody waits on the start's save; the store reports a failure itself.
        engine.saved = None;
        engine.end_connections_needing_proxy().await;
        engine.verify_maps();
        engine.publish_status();
        info!(
            endpoints = engine.model.endpoints.len(),
            policies = engine.model.policies.len(),
            map_operations = ops,
            "engine started"
        );
        Ok(engine)
    }

    /// The link layer of an endpoint's veth. Unreadable, it is unknown (zero), which the
    /// datapath meets by leaving the endpoint's traffic to the node's own path; a bridge port
    /// not known as one then has no way to the L7 proxy (its redirects fail closed).
    pub(crate) async fn link_layer(
        &mut self,
        netns: &crate::model::NetnsRef,
        ifname: &str,
        host_ifindex: u32,
    ) -> LinkLayer {
        match self.plumbing.link_layer(netns, ifname, host_ifindex).await {
            Ok(l) => l,
            Err(e) => {
                warn!(ifindex = host_ifindex, error = %e, "cannot read the veth's link layer");
                LinkLayer::default()
            }
        }
    }

    pub(crate) fn namespace_labels(&self, ns: &str) -> Labels {
        self.model.namespace_labels(ns)
    }

    pub(crate) fn compile_endpoints(&self) -> BTreeMap<EndpointId, Endpoint> {
        self.model
            .endpoints
            .values()
            .map(|r| (r.id, r.to_endpoint()))
            .collect()
    }

    /// Other nodes' pods and nodes by address. A pod's address wins over a node's (a node
    /// announcing a pod's address is a misconfiguration, and the pod is the precise answer).
    pub(crate) fn remote_addresses(&self) -> BTreeMap<Ipv4Addr, Identity> {
        let mut out = BTreeMap::new();
        for r in self.model.remotes.values() {
            if let RemoteSpec::Node { ips, .. } = &r.spec {
                for ip in ips {
                    out.insert(*ip, r.identity);
                }
            }
        }
        for r in self.model.remotes.values() {
            // A pod the cluster has not numbered yet is not given `init` here: its address
            // stays world, which only CIDR rules allow.
            if let RemoteSpec::Pod { ip, .. } = &r.spec
                && r.identity != Identity::INIT
            {
                out.insert(*ip, r.identity);
            }
        }
        out
    }

    pub(crate) fn policies(&self) -> &BTreeMap<PolicyRef, Policy> {
        &self.model.policies
    }

    /// Endpoints put in audit one by one.
    pub(crate) fn audit_endpoints(&self) -> BTreeSet<EndpointId> {
        self.model
            .endpoints
            .values()
            .filter(|r| r.audit)
            .map(|r| r.id)
            .collect()
    }

    /// Compiles the model and writes the difference to the maps. On a failed write, rolls
    /// the maps back to what they held and reports the error. Only what the change touches
    /// is recompiled; after a failure the next sync recompiles everything.
    pub(crate) fn sync(&mut self) -> Result<usize, EngineError> {
        let result = self.sync_incremental();
        if result.is_err() {
            self.compiler.reset();
            self.verify_maps();
        }
        result
    }

    /// Reads the maps back and compares them with what the engine wrote.
    pub(crate) fn verify_maps(&mut self) {
        self.maps_verified = self.datapath.read_state().is_ok_and(|s| s == self.applied);
    }

    /// A watch of the engine's status, updated after every command: status requests read it
    /// instead of waiting for the engine's task.
    pub fn status_watch(&mut self) -> watch::Receiver<Arc<crate::views::EngineStatus>> {
        let (tx, rx) = watch::channel(Arc::new(self.status_snapshot()));
        self.outputs.status = Some(tx);
        rx
    }

    /// Hands the current status to whoever answers status requests.
    pub(crate) fn publish_status(&self) {
        if let Some(tx) = &self.outputs.status {
            tx.send_replace(Arc::new(self.status_snapshot()));
        }
    }

    fn sync_incremental(&mut self) -> Result<usize, EngineError> {
        let started = Instant::now();
        let names = self.model.fqdns.names();
        let mut cidrs = compile::policy_cidrs(self.model.policies.values());
        cidrs.extend(compile::fqdn_prefixes(self.model.policies.values(), names));
        self.model.identities.sync_cidrs(&cidrs)?;
        let table = self.model.identities.table();
        let endpoints = self.compile_endpoints();
        let remote = self.remote_addresses();
        let input = CompileInput {
            endpoints: &endpoints,
            identities: table,
            policies: &self.model.policies,
            host_addresses: &self.host_addresses,
            remote: &remote,
            fqdns: names,
            settings: self.cfg.settings,
        };
        let audit_endpoints = self.audit_endpoints();
        let scopes = AuditScopes {
            namespaces: &self.model.namespace_modes,
            endpoints: &audit_endpoints,
        };
        let audited = input.policies.values().any(|p| p.audit)
            || !audit_endpoints.is_empty()
            || self.model.namespace_modes.values().any(|m| m.audits());
        // Staged policies and audit scopes are compiled whole; everything else (`toFQDNs`
        // peers following learned names, DNS rules) incrementally.
        let whole = audited;
        let (diff, proxy_policy, dns_policy, whole_l7) = if whole {
            // Staged policies and audit scopes are compiled whole (twice where policies are
            // staged): the incremental compiler knows neither, and it starts over with a full
            // compile once they are gone.
            self.compiler.reset();
            let (desired, l7) = audit::compile(&input, &scopes, &mut self.rules);
            // Built before any map changes, so a policy the proxy cannot enforce changes
            // nothing.
            let proxy_policy = ProxyPolicy::new(&l7, &desired)?;
            let dns_policy = DnsPolicy::new(&l7, &desired);
            (
                mapstate::diff(&self.applied, &desired),
                proxy_policy,
                dns_policy,
                Some(l7),
            )
        } else {
            let delta = self.compiler.compile(&input, &mut self.rules);
            // Built before any map changes, so a policy the proxy cannot enforce changes
            // nothing.
            let addresses = MapState {
                ipcache: delta.ipcache,
                ..MapState::default()
            };
            let proxy_policy = ProxyPolicy::new(self.compiler.l7(), &addresses)?;
            // The DNS rules of every endpoint, kept by the compiler with its entries.
            let dns_policy = DnsPolicy::new(self.compiler.l7(), &addresses);
            let delta = incremental::Delta {
                ipcache: addresses.ipcache,
                ..delta
            };
            (
                incremental::diff(&self.applied, &delta),
                proxy_policy,
                dns_policy,
                None,
            )
        };
        let compiled = started.elapsed();
        if let Some(m) = &self.outputs.metrics {
            m.policy_compiled(compiled);
        }
        self.sync_times = SyncTimes {
            compile: compiled,
            ..SyncTimes::default()
        };
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
                return Err(EngineError::RolledBack(e));
            }
            // Established connections are re-checked only once the revision moves; without it
            // the new policy would hold for new connections alone, so the change is undone.
            if let Err(e) = self.datapath.bump_revision() {
                let mut desired = self.applied.clone();
                desired.apply_diff(&diff);
                let back = mapstate::diff(&desired, &self.applied);
                if let Err(rollback) = self.datapath.apply(&back) {
                    // The maps are in an unknown mix: believe them, so the next sync repairs.
                    warn!(error = %rollback, "rolling back after a failed revision bump failed too");
                    self.applied = self.datapath.read_state().unwrap_or(desired);
                }
                return Err(EngineError::RevisionNotBumped(e));
            }
            self.applied.apply_diff(&diff);
            self.revalidate |= may_send_through_proxy(&diff);
        }
        let written = started.elapsed();
        self.sync_times.write = written.saturating_sub(compiled);
        if let Some(l7) = &whole_l7 {
            self.rules.retain_used_with(&self.applied, l7);
        } else {
            let compiler = &self.compiler;
            self.rules.retain(|id| compiler.uses(id));
        }
        self.publish_catalog(table);
        if let Some(tx) = &self.outputs.proxy {
            tx.send_replace(Arc::new(proxy_policy));
        }
        if let Some(tx) = &self.outputs.dns {
            tx.send_replace(Arc::new(dns_policy));
        }
        self.sync_times.publish = started.elapsed().saturating_sub(written);
        Ok(ops)
    }

    /// Runs `change` on the model and syncs; on any error the model is restored.
    pub(crate) fn transact<T>(
        &mut self,
        change: impl FnOnce(&mut Model) -> Result<T, EngineError>,
    ) -> Result<(T, usize), EngineError> {
        let backup = self.model.clone();
        let result = change(&mut self.model).and_then(|t| self.sync().map(|ops| (t, ops)));
        match result {
            Ok(r) => {
                // The change stands from here on; whether it is saved, its caller learns from
                // the ticket.
                self.persist();
                Ok(r)
            }
            Err(e) => {
                self.model = backup;
                Err(e)
            }
        }
    }

    /// `transact` for a change to the policies named in `touched` alone (their entries in
    /// `policies` and `policy_sources`): only those entries and the identities (which a sync
    /// changes) are kept for the undo, not the whole model.
    pub(crate) fn transact_policies<T>(
        &mut self,
        touched: &[PolicyRef],
        change: impl FnOnce(&mut Model) -> Result<T, EngineError>,
    ) -> Result<(T, usize), EngineError> {
        let kept: Vec<(PolicyRef, Option<Policy>, Option<PolicySource>)> = touched
            .iter()
            .map(|r| {
                (
                    r.clone(),
                    self.model.policies.get(r).cloned(),
                    self.model.policy_sources.get(r).cloned(),
                )
            })
            .collect();
        let identities = self.model.identities.clone();
        let result = change(&mut self.model).and_then(|t| self.sync().map(|ops| (t, ops)));
        match result {
            Ok(r) => {
                self.persist();
                Ok(r)
            }
            Err(e) => {
                for (r, policy, source) in kept {
                    match policy {
                        Some(p) => self.model.policies.insert(r.clone(), p),
                        None => self.model.policies.remove(&r),
                    };
                    match source {
                        Some(s) => self.model.policy_sources.insert(r, s),
                        None => self.model.policy_sources.remove(&r),
                    };
                }
                self.model.identities = identities;
                Err(e)
            }
        }
    }

    /// `transact` for a change to one endpoint (the record under `key`), with the namespaces,
    /// the identities and the next endpoint id it may move: only those are kept for the undo,
    /// not the whole model.
    pub(crate) fn transact_endpoint<T>(
        &mut self,
        key: &str,
        change: impl FnOnce(&mut Model) -> Result<T, EngineError>,
    ) -> Result<(T, usize), EngineError> {
        let record = self.model.endpoints.get(key).cloned();
        let namespaces = self.model.namespaces.clone();
        let identities = self.model.identities.clone();
        let next_endpoint_id = self.model.next_endpoint_id;
        let result = change(&mut self.model).and_then(|t| self.sync().map(|ops| (t, ops)));
        match result {
            Ok(r) => {
                self.persist();
                Ok(r)
            }
            Err(e) => {
                match record {
                    Some(r) => self.model.endpoints.insert(key.to_string(), r),
                    None => self.model.endpoints.remove(key),
                };
                self.model.namespaces = namespaces;
                self.model.identities = identities;
                self.model.next_endpoint_id = next_endpoint_id;
                Err(e)
            }
        }
    }

    pub(crate) fn persist(&mut self) {
        let Some(store) = &mut self.store else {
            return;
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
            namespace_modes: self.model.namespace_modes.clone(),
            remotes: self
                .model
                .remotes
                .iter()
                .map(|(k, r)| (k.clone(), r.clone()))
                .collect(),
            cluster_policies: self
                .model
                .policies
                .values()
                .filter(|p| self.model.policy_sources.get(&p.id) == Some(&PolicySource::Cluster))
                .cloned()
                .collect(),
            fqdns: self.model.fqdns.entries(),
            // The store numbers its saves.
            generation: 0,
        };
        self.saved = Some(store.save(state));
    }

    fn publish_catalog(&self, table: &IdentityTable) {
        let Some(tx) = &self.outputs.catalog else {
            return;
        };
        let mut c = Catalog::default();
        for r in self.model.endpoints.values() {
            let labels = table
                .get(&r.identity)
                .map(palisade_policies::identity::IdentitySource::label_strings)
                .unwrap_or_default();
            c.endpoints_by_id.insert(
                r.id.0,
                CatalogEndpoint {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    labels,
                },
            );
            c.endpoints_by_ip
                .insert(r.ip, (r.namespace.clone(), r.name.clone()));
            // Only where AUDIT flows of a default deny can be (selecting costs a selector
            // match per policy).
            let audited = self
                .applied
                .endpoints
                .get(&r.id)
                .is_some_and(|e| e.audit || e.staged.ingress || e.staged.egress);
            if audited {
                let by = self.selecting_policies(r, table);
                let names = |v: &[palisade_policies::model::PolicyRef]| {
                    v.iter().map(ToString::to_string).collect()
                };
                c.default_deny.insert(
                    r.id.0,
                    DefaultDenyBy {
                        ingress: names(&by.ingress),
                        egress: names(&by.egress),
                    },
                );
            }
        }
        for r in self.model.remotes.values() {
            if let RemoteSpec::Pod {
                namespace,
                name,
                ip,
                ..
            } = &r.spec
            {
                c.endpoints_by_ip
                    .entry(*ip)
                    .or_insert_with(|| (namespace.clone(), name.clone()));
            }
        }
        c.identities = self.model.identities.shared_table();
        c.namespace_modes.clone_from(&self.model.namespace_modes);
        // Every rule a map entry or an HTTP rule refers to (the table keeps only those): a
        // rule that lost its map entry to another one's still decides requests in the proxy.
        for (id, origin) in self.rules.iter() {
            let (policy, kind) = match origin.policy() {
                Some(p) => (p.to_string(), p.kind.short_name().to_string()),
                None => (String::new(), "agent".to_string()),
            };
            c.rules.insert(
                id.0,
                CatalogRule {
                    policy,
                    kind,
                    rule: origin.describe(),
                },
            );
        }
        tx.send_replace(Arc::new(c));
    }

    pub(crate) fn outputs_metrics(&self) -> Option<Arc<dyn EngineMetrics>> {
        self.outputs.metrics.clone()
    }

    pub(crate) fn outputs_events(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedSender<crate::revalidate::EngineEvent>> {
        self.outputs.events.clone()
    }

    /// Periodic housekeeping: expired conntrack entries. Returns (deleted, still live).
    pub fn gc(&mut self) -> Result<(usize, usize), EngineError> {
        Ok(self.datapath.gc_conntrack()?)
    }
}

/// Whether a map change can make an open connection need the L7 proxy (so the sweep that ends
/// such connections has to run, see `revalidate`): only a new or changed redirect, a removal
/// (which can leave a connection to a wider entry that redirects), or a change to the address
/// of an endpoint (whose own ingress may redirect) can. A learned DNS answer that only adds
/// allowed addresses cannot, and skips the sweep, which reads the whole conntrack table.
/// Either way the datapath stops a connection that needs the proxy on its next packet.
fn may_send_through_proxy(diff: &palisade_policies::mapstate::MapDiff) -> bool {
    use palisade_policies::mapstate::Action;
    !diff.policy_removals.is_empty()
        || !diff.ipcache_removals.is_empty()
        || !diff.endpoint_removals.is_empty()
        || !diff.endpoint_upserts.is_empty()
        || diff
            .policy_upserts
            .iter()
            .any(|(_, e)| matches!(e.action, Action::Redirect { .. }))
        || diff
            .ipcache_upserts
            .iter()
            .any(|(_, e)| e.endpoint.is_some())
}
