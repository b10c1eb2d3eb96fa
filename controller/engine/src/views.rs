//! Read-only views of the engine's state: endpoints, identities, policies, status, and
//! `policy trace`, which answers from the very map state the datapath holds. Typed: the API
//! server turns them into its wire shapes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use palisade_policies::{
    audit::{AuditReason, AuditScopes, NamespaceMode},
    compile::{self, EnforcementMode, RuleOrigin},
    endpoint::{EndpointId, NamedPort},
    identity::{Identity, IdentitySource, IdentityTable},
    labels::Labels,
    mapstate::{Decision, Verdict},
    model::{Direction, PolicyRef, PolicySpec, Protocol},
};

use crate::datapath::Datapath;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::model::{CniAttachment, EndpointRecord, NetnsRef, PolicySource, RemoteSpec};

/// The protocol a trace asks about, and its number.
pub(crate) fn trace_protocol(requested: Option<&str>) -> Result<(Protocol, u8), EngineError> {
    let protocol = match requested {
        None => Protocol::Tcp,
        Some(p) => match Protocol::parse(p) {
            Some(Protocol::Any) | None => {
                return Err(EngineError::UnsupportedTraceProtocol {
                    value: p.to_string(),
                });
            }
            Some(p) => p,
        },
    };
    let Some(number) = protocol.number() else {
        return Err(EngineError::UnsupportedTraceProtocol {
            value: protocol.to_string(),
        });
    };
    Ok((protocol, number))
}
use crate::plumbing::Plumbing;

/// Policies selecting an endpoint, per direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelectingPolicies {
    pub ingress: Vec<PolicyRef>,
    pub egress: Vec<PolicyRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointView {
    pub id: EndpointId,
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub ip: Ipv4Addr,
    pub identity: Identity,
    /// Host-side interface in the node namespace.
    pub interface: String,
    pub ifindex: u32,
    /// `ip netns` name of the endpoint's namespace, or the path a container runtime gave.
    pub netns: String,
    pub named_ports: Vec<NamedPort>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub policies: SelectingPolicies,
    /// For a container a runtime attached: its CNI attachment.
    pub attachment: Option<CniAttachment>,
    /// Its labels are not known yet; it holds the `init` identity.
    pub pending_labels: bool,
    /// Which scope puts it in audit, if any (agent, its namespace's mode, or itself).
    pub audit: Option<AuditReason>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    Reserved,
    Workload,
    Cidr,
    CidrEndpointAlias,
}

impl IdentityKind {
    fn of(src: &IdentitySource) -> Self {
        match src {
            IdentitySource::Reserved { .. } => IdentityKind::Reserved,
            IdentitySource::Workload { .. } => IdentityKind::Workload,
            IdentitySource::Cidr { .. } => IdentityKind::Cidr,
            IdentitySource::CidrEndpointAlias { .. } => IdentityKind::CidrEndpointAlias,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Reserved => "reserved",
            IdentityKind::Workload => "workload",
            IdentityKind::Cidr => "cidr",
            IdentityKind::CidrEndpointAlias => "cidr-endpoint-alias",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityView {
    pub id: Identity,
    pub kind: IdentityKind,
    /// Cilium-style labels: `k8s:app=web`, `reserved:host`, `cidr:10.0.0.0/8`.
    pub labels: Vec<String>,
    /// Endpoints (`ns/name`) holding this identity.
    pub endpoints: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyView {
    pub id: PolicyRef,
    pub source: Option<PolicySource>,
    /// Endpoints (`ns/name`) the policy selects.
    pub selects: Vec<String>,
    pub ingress_rules: usize,
    pub ingress_deny_rules: usize,
    pub egress_rules: usize,
    pub egress_deny_rules: usize,
    pub ingress_default_deny: bool,
    pub egress_default_deny: bool,
    /// In audit: evaluated and reported, not enforced.
    pub audit: bool,
}

/// What `policy trace` is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceQuery {
    /// `NS/NAME` of the source endpoint.
    pub from: String,
    /// `NS/NAME` of the destination endpoint.
    pub to: String,
    pub port: u16,
    /// TCP (default), UDP, SCTP or ICMP.
    pub protocol: Option<String>,
}

/// One side's check (source egress or destination ingress).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSide {
    /// `ns/name`.
    pub endpoint: String,
    pub direction: Direction,
    pub enforced: bool,
    /// Policies selecting this endpoint that put this direction in default deny.
    pub enforcing_policies: Vec<PolicyRef>,
    pub peer_identity: Identity,
    pub peer_labels: Vec<String>,
    pub allowed: bool,
    /// Why, in words.
    pub reason: String,
    /// The rule that decided it, in words, when one did.
    pub rule: Option<String>,
    pub policy: Option<PolicyRef>,
    /// Kubernetes mode: the side is a pod of that node, which judges it; this node does not.
    pub judged_on: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceResult {
    pub allowed: bool,
    pub protocol: Protocol,
    pub port: u16,
    pub source_identity: Identity,
    pub destination_identity: Identity,
    pub egress: TraceSide,
    pub ingress: TraceSide,
}

/// The engine's part of the agent's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineStatus {
    pub node_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Network,
    pub enforcement: EnforcementMode,
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    pub policy_map_entries: usize,
    pub ipcache_entries: usize,
    /// True when the maps hold exactly what the engine compiled.
    pub maps_in_sync: bool,
    /// Every namespace known, with its effective labels.
    pub namespaces: BTreeMap<String, Labels>,
    /// Agent-wide audit (`--audit`).
    pub audit: bool,
    /// Every namespace known, with its mode.
    pub namespace_modes: BTreeMap<String, NamespaceMode>,
    /// Endpoints (`ns/name`) in audit on their own.
    pub audit_endpoints: Vec<String>,
    /// Policies in audit.
    pub audit_policies: Vec<PolicyRef>,
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    pub(crate) fn selecting_policies(
        &self,
        rec: &EndpointRecord,
        table: &IdentityTable,
    ) -> SelectingPolicies {
        self.selecting(rec, table)
    }

    fn selecting(&self, rec: &EndpointRecord, table: &IdentityTable) -> SelectingPolicies {
        let policies = self.policies();
        let specs = compile::selecting_specs(policies, table, &rec.to_endpoint());
        let mut out = SelectingPolicies::default();
        for (p, _, spec) in specs {
            for (d, list) in [
                (Direction::Ingress, &mut out.ingress),
                (Direction::Egress, &mut out.egress),
            ] {
                let dp = spec.direction(d);
                if (dp.default_deny || !dp.allow.is_empty() || !dp.deny.is_empty())
                    && !list.contains(&p.id)
                {
                    list.push(p.id.clone());
                }
            }
        }
        out
    }

    fn view_of(&self, rec: &EndpointRecord, table: &IdentityTable) -> EndpointView {
        let entry = self.applied.endpoints.get(&rec.id);
        EndpointView {
            id: rec.id,
            name: rec.name.clone(),
            namespace: rec.namespace.clone(),
            labels: rec.labels.clone(),
            ip: rec.ip,
            identity: rec.identity,
            interface: rec.host_ifname.clone(),
            ifindex: rec.ifindex,
            netns: match rec.netns() {
                NetnsRef::Named(n) => n,
                NetnsRef::Path(p) => p.display().to_string(),
            },
            named_ports: rec.named_ports.clone(),
            ingress_enforced: entry.is_some_and(|e| e.ingress_enforced),
            egress_enforced: entry.is_some_and(|e| e.egress_enforced),
            policies: self.selecting(rec, table),
            attachment: rec.attachment().cloned(),
            pending_labels: rec.pending_labels,
            audit: self.audit_reason(rec),
        }
    }

    /// Which scope puts an endpoint in audit.
    pub(crate) fn audit_reason(&self, rec: &EndpointRecord) -> Option<AuditReason> {
        let own = self.audit_endpoints();
        AuditScopes {
            namespaces: &self.model.namespace_modes,
            endpoints: &own,
        }
        .reason(self.cfg.settings.audit, rec.id, &rec.namespace)
    }

    pub fn endpoint_view(&self, name: &str) -> Result<EndpointView, EngineError> {
        let rec = self.record(name)?;
        Ok(self.view_of(rec, self.model.identities.table()))
    }

    pub fn endpoint_list(&self) -> Vec<EndpointView> {
        let table = self.model.identities.table();
        let mut v: Vec<EndpointView> = self
            .model
            .endpoints
            .values()
            .map(|r| self.view_of(r, table))
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        v
    }

    pub fn identity_list(&self) -> Vec<IdentityView> {
        self.model
            .identities
            .table()
            .iter()
            .map(|(id, src)| IdentityView {
                id: *id,
                kind: IdentityKind::of(src),
                labels: src.label_strings(),
                endpoints: self
                    .model
                    .endpoints
                    .values()
                    .filter(|e| e.identity == *id)
                    .map(EndpointRecord::qualified_name)
                    .collect(),
            })
            .collect()
    }

    pub fn policy_list(&self) -> Vec<PolicyView> {
        let table = self.model.identities.table();
        self.model
            .policies
            .values()
            .map(|p| {
                let selects = self
                    .model
                    .endpoints
                    .values()
                    .filter(|e| {
                        table
                            .get(&e.identity)
                            .and_then(IdentitySource::workload_labels)
                            .is_some_and(|l| p.specs.iter().any(|s| s.subject.0.matches(l)))
                    })
                    .map(EndpointRecord::qualified_name)
                    .collect();
                let count = |f: fn(&PolicySpec) -> usize| p.specs.iter().map(f).sum();
                PolicyView {
                    id: p.id.clone(),
                    source: self.model.policy_sources.get(&p.id).cloned(),
                    selects,
                    ingress_rules: count(|s| s.ingress.allow.len()),
                    ingress_deny_rules: count(|s| s.ingress.deny.len()),
                    egress_rules: count(|s| s.egress.allow.len()),
                    egress_deny_rules: count(|s| s.egress.deny.len()),
                    ingress_default_deny: p.specs.iter().any(|s| s.ingress.default_deny),
                    egress_default_deny: p.specs.iter().any(|s| s.egress.default_deny),
                    audit: p.audit,
                }
            })
            .collect()
    }

    pub(crate) fn find(&self, ns_name: &str) -> Result<&EndpointRecord, EngineError> {
        let (ns, name) = ns_name
            .split_once('/')
            .ok_or_else(|| EngineError::NotNamespacedName {
                value: ns_name.to_string(),
            })?;
        if let Some(rec) = self.model.endpoints.get(ns_name) {
            return Ok(rec);
        }
        let rec = self.record(name)?;
        Err(EngineError::WrongNamespace {
            name: name.to_string(),
            actual: rec.namespace.clone(),
            asked: ns.to_string(),
        })
    }

    pub(crate) fn trace_side(
        &self,
        rec: &EndpointRecord,
        direction: Direction,
        decision: &Decision,
        table: &IdentityTable,
        what: &str,
    ) -> TraceSide {
        let policies = self.policies();
        let enforcing: Vec<PolicyRef> =
            compile::selecting_specs(policies, table, &rec.to_endpoint())
                .into_iter()
                .filter(|(_, _, s)| s.direction(direction).default_deny)
                .map(|(p, _, _)| p.id.clone())
                .collect();
        // A staged deny's entry names the staged rule, not the allowing one.
        let origin: Option<&RuleOrigin> = decision
            .matched
            .filter(|_| decision.staged_deny.is_none())
            .and_then(|(_, e)| self.rules.get(e.rule));
        let rule = origin.map(RuleOrigin::describe);
        let policy = origin.and_then(|o| o.policy()).cloned();
        let peer = decision.peer.identity;
        let ep = rec.qualified_name();
        let staged = decision.staged_deny.map(|r| {
            self.rules.get(r).map_or_else(
                || "the default deny of a policy in audit".to_string(),
                RuleOrigin::describe,
            )
        });
        let (allowed, reason) = match decision.verdict {
            Verdict::Allowed if staged.is_some() => (
                true,
                format!(
                    "allowed by the policies in force, but {} would deny it (in audit: reported as AUDIT)",
                    staged.clone().unwrap_or_default()
                ),
            ),
            Verdict::Allowed if decision.matched.is_some() => (
                true,
                format!(
                    "allowed by {}",
                    rule.clone().unwrap_or_else(|| "an unknown rule".into())
                ),
            ),
            Verdict::Allowed => (
                true,
                format!("no policy puts {ep} in default deny for {direction}: allowed"),
            ),
            Verdict::Redirected { proxy_port } => (
                true,
                format!(
                    "redirected to the L7 proxy (port {proxy_port}) by {}; HTTP rules decide per request",
                    rule.clone().unwrap_or_default()
                ),
            ),
            Verdict::DeniedByRule => (
                false,
                format!("denied by {}", rule.clone().unwrap_or_default()),
            ),
            Verdict::DeniedByDefault => (
                false,
                format!(
                    "default deny: {ep} is selected for {direction} by {} and no rule allows identity {peer} on {what}",
                    enforcing
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
        TraceSide {
            endpoint: ep,
            direction,
            enforced: decision.enforced,
            enforcing_policies: enforcing,
            peer_identity: peer,
            peer_labels: table
                .get(&peer)
                .map(IdentitySource::label_strings)
                .unwrap_or_default(),
            allowed,
            reason,
            rule,
            policy,
            judged_on: None,
        }
    }

    /// A pod of another node (Kubernetes mode), by `ns/name`: its address, identity, node.
    fn find_remote(&self, ns_name: &str) -> Option<(Ipv4Addr, Identity, String)> {
        match self
            .model
            .remotes
            .get(&format!("pod/{ns_name}"))
            .map(|r| (&r.spec, r.identity))
        {
            Some((RemoteSpec::Pod { ip, node, .. }, identity)) => {
                Some((*ip, identity, node.clone()))
            }
            _ => None,
        }
    }

    /// The side of a trace another node judges.
    fn remote_side(ns_name: &str, direction: Direction, node: &str, peer: Identity) -> TraceSide {
        TraceSide {
            endpoint: ns_name.to_string(),
            direction,
            enforced: false,
            enforcing_policies: Vec::new(),
            peer_identity: peer,
            peer_labels: Vec::new(),
            allowed: true,
            reason: format!(
                "{ns_name} runs on node {node}, whose agent judges its {direction}; trace there for that side"
            ),
            rule: None,
            policy: None,
            judged_on: Some(node.to_string()),
        }
    }

    pub fn trace(&self, req: &TraceQuery) -> Result<TraceResult, EngineError> {
        // Kubernetes mode: one side may be a pod of another node.
        let remote_src = self.find(&req.from).err().and(self.find_remote(&req.from));
        let remote_dst = self.find(&req.to).err().and(self.find_remote(&req.to));
        if remote_src.is_some() || remote_dst.is_some() {
            return self.trace_across_nodes(req, remote_src, remote_dst);
        }
        let src = self.find(&req.from)?;
        let dst = self.find(&req.to)?;
        let (protocol, proto_num) = trace_protocol(req.protocol.as_deref())?;
        let what = format!("{}/{}", req.port, protocol);
        let table = self.model.identities.table();
        let missing = |r: &EndpointRecord| EngineError::EndpointNotInDatapath {
            name: r.name.clone(),
        };
        let egress = self
            .applied
            .decide(src.id, Direction::Egress, dst.ip, proto_num, req.port)
            .ok_or_else(|| missing(src))?;
        let ingress = self
            .applied
            .decide(dst.id, Direction::Ingress, src.ip, proto_num, req.port)
            .ok_or_else(|| missing(dst))?;
        let egress = self.trace_side(src, Direction::Egress, &egress, table, &what);
        let ingress = self.trace_side(dst, Direction::Ingress, &ingress, table, &what);
        Ok(TraceResult {
            allowed: egress.allowed && ingress.allowed,
            protocol,
            port: req.port,
            source_identity: src.identity,
            destination_identity: dst.identity,
            egress,
            ingress,
        })
    }

    /// A trace where one side is a pod of another node: this node judges its own side.
    fn trace_across_nodes(
        &self,
        req: &TraceQuery,
        remote_src: Option<(Ipv4Addr, Identity, String)>,
        remote_dst: Option<(Ipv4Addr, Identity, String)>,
    ) -> Result<TraceResult, EngineError> {
        let (protocol, proto_num) = trace_protocol(req.protocol.as_deref())?;
        let what = format!("{}/{}", req.port, protocol);
        let table = self.model.identities.table();
        let missing = |r: &EndpointRecord| EngineError::EndpointNotInDatapath {
            name: r.name.clone(),
        };
        match (remote_src, remote_dst) {
            (None, Some((ip, identity, node))) => {
                let src = self.find(&req.from)?;
                let decision = self
                    .applied
                    .decide(src.id, Direction::Egress, ip, proto_num, req.port)
                    .ok_or_else(|| missing(src))?;
                let egress = self.trace_side(src, Direction::Egress, &decision, table, &what);
                Ok(TraceResult {
                    allowed: egress.allowed,
                    protocol,
                    port: req.port,
                    source_identity: src.identity,
                    destination_identity: identity,
                    ingress: Self::remote_side(&req.to, Direction::Ingress, &node, src.identity),
                    egress,
                })
            }
            (Some((ip, identity, node)), None) => {
                let dst = self.find(&req.to)?;
                let decision = self
                    .applied
                    .decide(dst.id, Direction::Ingress, ip, proto_num, req.port)
                    .ok_or_else(|| missing(dst))?;
                let ingress = self.trace_side(dst, Direction::Ingress, &decision, table, &what);
                Ok(TraceResult {
                    allowed: ingress.allowed,
                    protocol,
                    port: req.port,
                    source_identity: identity,
                    destination_identity: dst.identity,
                    egress: Self::remote_side(&req.from, Direction::Egress, &node, dst.identity),
                    ingress,
                })
            }
            _ => Err(EngineError::NotOnThisNode {
                from: req.from.clone(),
                to: req.to.clone(),
            }),
        }
    }

    /// The status, with the maps read back now to tell whether they are in sync.
    pub fn status(&self) -> EngineStatus {
        EngineStatus {
            maps_in_sync: self.datapath.read_state().is_ok_and(|s| s == self.applied),
            ..self.status_snapshot()
        }
    }

    /// The status as of the last read-back of the maps (cheap: nothing is read).
    pub fn status_snapshot(&self) -> EngineStatus {
        let namespaces: BTreeMap<String, Labels> = self
            .model
            .namespaces
            .keys()
            .chain(self.model.endpoints.values().map(|e| &e.namespace))
            .chain(self.model.namespace_modes.keys())
            .map(|ns| (ns.clone(), self.namespace_labels(ns)))
            .collect();
        EngineStatus {
            node_ip: self.cfg.node_ip,
            pod_cidr: self.cfg.pod_cidr,
            enforcement: self.cfg.settings.enforcement,
            endpoints: self.model.endpoints.len(),
            identities: self.model.identities.table().len(),
            policies: self.model.policies.len(),
            policy_map_entries: self.applied.policy.len(),
            ipcache_entries: self.applied.ipcache.len(),
            maps_in_sync: self.maps_verified,
            namespace_modes: namespaces
                .keys()
                .map(|ns: &String| (ns.clone(), self.namespace_mode(ns)))
                .collect(),
            namespaces,
            audit: self.cfg.settings.audit,
            audit_endpoints: self
                .model
                .endpoints
                .values()
                .filter(|e| e.audit)
                .map(EndpointRecord::qualified_name)
                .collect(),
            audit_policies: self
                .model
                .policies
                .values()
                .filter(|p| p.audit)
                .map(|p| p.id.clone())
                .collect(),
        }
    }
}
