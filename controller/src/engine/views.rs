//! Read-only views of the engine's state for the API: endpoints, identities, policies,
//! status, and `policy trace`, which answers from the very map state the datapath holds.

use palisade_common::{conntrack as ct, direction as dir_code, metrics, reason};
use palisade_policies::{
    compile::{self, RuleOrigin},
    identity::{IdentitySource, IdentityTable},
    mapstate::{Decision, Verdict},
    model::{Direction, Protocol},
};

use super::{EndpointRecord, Engine, EngineError, PolicySource};
use crate::api::types::{
    ConntrackView, CounterView, EndpointView, IdentityView, PolicyView, SelectingPolicies,
    StatusView, TraceRequest, TraceResult, TraceSide,
};
use crate::datapath::Datapath;
use crate::plumbing::Plumbing;

fn kind_name(src: &IdentitySource) -> &'static str {
    match src {
        IdentitySource::Reserved { .. } => "reserved",
        IdentitySource::Workload { .. } => "workload",
        IdentitySource::Cidr { .. } => "cidr",
        IdentitySource::CidrEndpointAlias { .. } => "cidr-endpoint-alias",
    }
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    fn selecting(&self, rec: &EndpointRecord, table: &IdentityTable) -> SelectingPolicies {
        let policies = self.policies();
        let specs = compile::selecting_specs(policies, table, &rec.to_endpoint());
        let mut out = SelectingPolicies::default();
        for (p, _, spec) in specs {
            let name = p.id.to_string();
            for (d, list) in [
                (Direction::Ingress, &mut out.ingress),
                (Direction::Egress, &mut out.egress),
            ] {
                let dp = spec.direction(d);
                if (dp.default_deny || !dp.allow.is_empty() || !dp.deny.is_empty())
                    && !list.contains(&name)
                {
                    list.push(name.clone());
                }
            }
        }
        out
    }

    fn view_of(&self, rec: &EndpointRecord, table: &IdentityTable) -> EndpointView {
        let entry = self.applied.endpoints.get(&rec.id);
        EndpointView {
            id: rec.id.0,
            name: rec.name.clone(),
            namespace: rec.namespace.clone(),
            labels: rec.labels.clone(),
            ip: rec.ip,
            identity: rec.identity.0,
            interface: rec.host_ifname.clone(),
            ifindex: rec.ifindex,
            netns: rec.name.clone(),
            named_ports: rec.named_ports.clone(),
            ingress_enforced: entry.is_some_and(|e| e.ingress_enforced),
            egress_enforced: entry.is_some_and(|e| e.egress_enforced),
            policies: self.selecting(rec, table),
        }
    }

    pub fn endpoint_view(&self, name: &str) -> Result<EndpointView, EngineError> {
        let rec = self
            .model
            .endpoints
            .get(name)
            .ok_or_else(|| EngineError::NoSuchEndpoint(name.to_string()))?;
        Ok(self.view_of(rec, &self.model.identities.table()))
    }

    pub fn endpoint_list(&self) -> Vec<EndpointView> {
        let table = self.model.identities.table();
        let mut v: Vec<EndpointView> = self
            .model
            .endpoints
            .values()
            .map(|r| self.view_of(r, &table))
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
                id: id.0,
                kind: kind_name(src).to_string(),
                labels: src.label_strings(),
                endpoints: self
                    .model
                    .endpoints
                    .values()
                    .filter(|e| e.identity == *id)
                    .map(|e| format!("{}/{}", e.namespace, e.name))
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
                let source = self
                    .model
                    .policy_sources
                    .get(&p.id)
                    .map_or_else(String::new, PolicySource::describe);
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
                    .map(|e| format!("{}/{}", e.namespace, e.name))
                    .collect();
                let count = |f: fn(&palisade_policies::model::PolicySpec) -> usize| {
                    p.specs.iter().map(f).sum()
                };
                PolicyView {
                    kind: p.id.kind.short_name().to_string(),
                    namespace: p.id.namespace.clone(),
                    name: p.id.name.clone(),
                    source,
                    selects,
                    ingress_rules: count(|s| s.ingress.allow.len()),
                    ingress_deny_rules: count(|s| s.ingress.deny.len()),
                    egress_rules: count(|s| s.egress.allow.len()),
                    egress_deny_rules: count(|s| s.egress.deny.len()),
                    ingress_default_deny: p.specs.iter().any(|s| s.ingress.default_deny),
                    egress_default_deny: p.specs.iter().any(|s| s.egress.default_deny),
                }
            })
            .collect()
    }

    fn find(&self, ns_name: &str) -> Result<&EndpointRecord, EngineError> {
        let (ns, name) = ns_name
            .split_once('/')
            .ok_or_else(|| EngineError::BadRequest(format!("{ns_name:?} is not NAMESPACE/NAME")))?;
        let rec = self
            .model
            .endpoints
            .get(name)
            .ok_or_else(|| EngineError::NoSuchEndpoint(name.to_string()))?;
        if rec.namespace != ns {
            return Err(EngineError::WrongNamespace {
                name: name.to_string(),
                actual: rec.namespace.clone(),
                asked: ns.to_string(),
            });
        }
        Ok(rec)
    }

    fn trace_side(
        &self,
        rec: &EndpointRecord,
        direction: Direction,
        decision: &Decision,
        table: &IdentityTable,
        what: &str,
    ) -> TraceSide {
        let policies = self.policies();
        let enforcing: Vec<String> = compile::selecting_specs(policies, table, &rec.to_endpoint())
            .into_iter()
            .filter(|(_, _, s)| s.direction(direction).default_deny)
            .map(|(p, _, _)| p.id.to_string())
            .collect();
        let origin: Option<&RuleOrigin> =
            decision.matched.and_then(|(_, e)| self.rules.get(e.rule));
        let rule = origin.map(RuleOrigin::describe);
        let policy = origin.and_then(|o| o.policy()).map(ToString::to_string);
        let peer = decision.peer.identity;
        let ep = format!("{}/{}", rec.namespace, rec.name);
        let (verdict, reason) = match decision.verdict {
            Verdict::Allowed if decision.matched.is_some() => (
                "ALLOWED",
                format!(
                    "allowed by {}",
                    rule.clone().unwrap_or_else(|| "an unknown rule".into())
                ),
            ),
            Verdict::Allowed => (
                "ALLOWED",
                format!("no policy puts {ep} in default deny for {direction}: allowed"),
            ),
            Verdict::Redirected { proxy_port } => (
                "ALLOWED",
                format!(
                    "redirected to the L7 proxy (port {proxy_port}) by {}; HTTP rules decide per request",
                    rule.clone().unwrap_or_default()
                ),
            ),
            Verdict::DeniedByRule => (
                "DENIED",
                format!("denied by {}", rule.clone().unwrap_or_default()),
            ),
            Verdict::DeniedByDefault => (
                "DENIED",
                format!(
                    "default deny: {ep} is selected for {direction} by {} and no rule allows identity {peer} on {what}",
                    enforcing.join(", ")
                ),
            ),
        };
        TraceSide {
            endpoint: ep,
            direction: direction.to_string(),
            enforced: decision.enforced,
            enforcing_policies: enforcing,
            peer_identity: peer.0,
            peer_labels: table
                .get(&peer)
                .map(IdentitySource::label_strings)
                .unwrap_or_default(),
            verdict: verdict.to_string(),
            reason,
            rule,
            policy,
        }
    }

    pub fn trace(&self, req: &TraceRequest) -> Result<TraceResult, EngineError> {
        let src = self.find(&req.from)?;
        let dst = self.find(&req.to)?;
        let protocol = match req.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(p) => match Protocol::parse(p) {
                Some(Protocol::Any) | None => {
                    return Err(EngineError::BadRequest(format!(
                        "protocol {p:?} is not TCP, UDP, SCTP or ICMP"
                    )));
                }
                Some(p) => p,
            },
        };
        let proto_num = protocol.number().expect("not Any");
        let what = format!("{}/{}", req.port, protocol);
        let table = self.model.identities.table();
        let missing = |r: &EndpointRecord| {
            EngineError::NoSuchEndpoint(format!("{} (not in the datapath yet)", r.name))
        };
        let egress = self
            .applied
            .decide(src.id, Direction::Egress, dst.ip, proto_num, req.port)
            .ok_or_else(|| missing(src))?;
        let ingress = self
            .applied
            .decide(dst.id, Direction::Ingress, src.ip, proto_num, req.port)
            .ok_or_else(|| missing(dst))?;
        let egress = self.trace_side(src, Direction::Egress, &egress, &table, &what);
        let ingress = self.trace_side(dst, Direction::Ingress, &ingress, &table, &what);
        let verdict = if egress.verdict == "ALLOWED" && ingress.verdict == "ALLOWED" {
            "ALLOWED"
        } else {
            "DENIED"
        };
        Ok(TraceResult {
            verdict: verdict.to_string(),
            protocol: protocol.to_string(),
            port: req.port,
            source_identity: src.identity.0,
            destination_identity: dst.identity.0,
            egress,
            ingress,
        })
    }

    pub fn conntrack(&self) -> Result<Vec<ConntrackView>, EngineError> {
        let now = crate::datapath::monotonic_now_ns();
        let by_id: std::collections::BTreeMap<u32, String> = self
            .model
            .endpoints
            .values()
            .map(|e| (e.id.0, format!("{}/{}", e.namespace, e.name)))
            .collect();
        let v4 = |a: &[u8; 16]| std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]);
        let mut out: Vec<ConntrackView> = self
            .datapath
            .conntrack_dump()?
            .into_iter()
            .map(|(k, e)| {
                let mut flags = Vec::new();
                for (bit, word) in [
                    (ct::CT_FLAG_SEEN_REPLY, "established"),
                    (ct::CT_FLAG_FIN_FORWARD, "fin-forward"),
                    (ct::CT_FLAG_FIN_REPLY, "fin-reply"),
                    (ct::CT_FLAG_PROXY_REDIRECT, "proxy"),
                    (ct::CT_FLAG_AUDIT, "audit"),
                ] {
                    if e.flags & bit != 0 {
                        flags.push(word.to_string());
                    }
                }
                let icmp = k.protocol == palisade_common::proto::ICMP;
                ConntrackView {
                    source: v4(&k.saddr),
                    destination: v4(&k.daddr),
                    source_port: if icmp { 0 } else { u16::from_be(k.sport_be) },
                    destination_port: if icmp { 0 } else { u16::from_be(k.dport_be) },
                    protocol: crate::flows::protocol_name(k.protocol),
                    scope: if k.scope == dir_code::INGRESS {
                        "ingress"
                    } else {
                        "egress"
                    }
                    .to_string(),
                    endpoint: by_id
                        .get(&e.endpoint_id)
                        .cloned()
                        .unwrap_or_else(|| format!("#{}", e.endpoint_id)),
                    peer_identity: e.peer_identity,
                    rule: self
                        .rules
                        .get(palisade_policies::mapstate::RuleId(e.rule_id))
                        .map(RuleOrigin::describe)
                        .unwrap_or_default(),
                    packets: e.packets,
                    bytes: e.bytes,
                    expires_in_seconds: e.expires_ns.saturating_sub(now) / 1_000_000_000,
                    flags,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.endpoint, a.source, a.source_port).cmp(&(&b.endpoint, b.source, b.source_port))
        });
        Ok(out)
    }

    pub fn status(&self, flows_stored: usize) -> StatusView {
        let counters = self
            .datapath
            .counters()
            .unwrap_or_default()
            .into_iter()
            .map(|c| CounterView {
                direction: match c.direction {
                    dir_code::INGRESS => "ingress",
                    dir_code::EGRESS => "egress",
                    _ => "datapath",
                }
                .to_string(),
                outcome: match c.outcome {
                    metrics::OUTCOME_FORWARDED => "FORWARDED".to_string(),
                    metrics::OUTCOME_REDIRECTED => "REDIRECTED".to_string(),
                    metrics::OUTCOME_AUDIT => "AUDIT".to_string(),
                    metrics::OUTCOME_EVENTS_LOST => "EVENTS_LOST".to_string(),
                    metrics::OUTCOME_EVENTS_RATE_LIMITED => "EVENTS_RATE_LIMITED".to_string(),
                    other => reason::drop_reason_name(other).to_string(),
                },
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect();
        let namespaces = self
            .model
            .namespaces
            .keys()
            .chain(self.model.endpoints.values().map(|e| &e.namespace))
            .map(|ns| (ns.clone(), self.namespace_labels(ns)))
            .collect();
        StatusView {
            version: env!("CARGO_PKG_VERSION").to_string(),
            mode: "local".to_string(),
            node_ip: self.cfg.node_ip,
            pod_cidr: self.cfg.pod_cidr.to_string(),
            enforcement: format!("{:?}", self.cfg.settings.enforcement).to_lowercase(),
            endpoints: self.model.endpoints.len(),
            identities: self.model.identities.table().len(),
            policies: self.model.policies.len(),
            policy_map_entries: self.applied.policy.len(),
            ipcache_entries: self.applied.ipcache.len(),
            maps_in_sync: self.datapath.read_state().is_ok_and(|s| s == self.applied),
            conntrack_entries: self.datapath.conntrack_count(),
            flows_stored,
            counters,
            namespaces,
        }
    }
}
