//! The engine's typed views in the API's wire shapes (palisade_api::types), and back for
//! requests. The shapes are a stable contract (docs/api.md); the engine's types are free to
//! change.

use std::collections::BTreeMap;

use palisade_api::types as wire;
use palisade_common::{conntrack as ct, direction as dir_code, metrics, proto};
use palisade_engine::attachments::AttachmentStatus;
use palisade_engine::catalog::Catalog;
use palisade_engine::fqdn_trace::{FqdnTraceQuery, FqdnTraceResult, LookupVerdict};
use palisade_engine::model::{AttachmentSpec, CniAttachment, EndpointSpec, LabelChange};
use palisade_engine::modes::ModeChange;
use palisade_engine::views::{
    EndpointView, IdentityView, PolicyView, TraceQuery, TraceResult, TraceSide,
};
use palisade_engine::{PolicyChange, PolicyUpdate};
use palisade_policies::model::PolicyRef;

use crate::datapath::monotonic_now_ns;
use crate::flows::protocol_name;
use crate::status::NodeStatus;

fn names(ids: &[PolicyRef]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

fn verdict(allowed: bool) -> String {
    if allowed { "ALLOWED" } else { "DENIED" }.to_string()
}

pub fn endpoint_spec(r: wire::EndpointAddRequest) -> EndpointSpec {
    EndpointSpec {
        name: r.name,
        namespace: r.namespace,
        labels: r.labels,
        ip: r.ip,
        named_ports: r.named_ports,
    }
}

pub fn label_change(c: wire::LabelChange) -> LabelChange {
    LabelChange {
        set: c.set,
        remove: c.remove,
    }
}

pub fn trace_query(r: wire::TraceRequest) -> TraceQuery {
    TraceQuery {
        from: r.from,
        to: r.to,
        port: r.port,
        protocol: r.protocol,
    }
}

pub fn fqdn_trace_query(r: wire::FqdnTraceRequest) -> FqdnTraceQuery {
    FqdnTraceQuery {
        from: r.from,
        name: r.name,
        port: r.port,
        protocol: r.protocol,
    }
}

pub fn endpoint(v: EndpointView) -> wire::EndpointView {
    wire::EndpointView {
        id: v.id.0,
        name: v.name,
        namespace: v.namespace,
        labels: v.labels,
        ip: v.ip,
        identity: v.identity.0,
        interface: v.interface,
        ifindex: v.ifindex,
        netns: v.netns,
        named_ports: v.named_ports,
        ingress_enforced: v.ingress_enforced,
        egress_enforced: v.egress_enforced,
        policies: wire::SelectingPolicies {
            ingress: names(&v.policies.ingress),
            egress: names(&v.policies.egress),
        },
        container_id: v.attachment.map(|a| a.container_id),
        pending_labels: v.pending_labels,
        audit: v.audit.map(|r| r.to_string()),
    }
}

pub fn attachment_spec(r: wire::AttachmentRequest) -> AttachmentSpec {
    AttachmentSpec {
        attachment: CniAttachment {
            network: r.network,
            container_id: r.container_id,
            ifname: r.ifname,
            netns: r.netns.into(),
            chained: r.chained,
        },
        host_ifname: r.host_ifname,
        ip: r.ip,
        name: r.name,
        namespace: r.namespace,
        labels: r.labels,
        named_ports: r.named_ports,
    }
}

pub fn attachment_status(s: AttachmentStatus) -> wire::AttachmentStatusView {
    wire::AttachmentStatusView {
        endpoint: endpoint(s.endpoint),
        interface_present: s.interface_present,
        programs_attached: s.programs_attached,
        in_datapath: s.in_datapath,
    }
}

pub fn identity(v: IdentityView) -> wire::IdentityView {
    wire::IdentityView {
        id: v.id.0,
        kind: v.kind.as_str().to_string(),
        labels: v.labels,
        endpoints: v.endpoints,
    }
}

pub fn fqdn(v: palisade_engine::FqdnView) -> wire::FqdnView {
    wire::FqdnView {
        endpoint: v.endpoint,
        name: v.name,
        address: v.address,
        expires: v.expires,
        ttl_remaining: v.ttl_remaining,
        held_by_connections: v.held_by_connections,
        identity: v.identity.map(|i| i.0),
    }
}

pub fn policy(v: PolicyView) -> wire::PolicyView {
    wire::PolicyView {
        kind: v.id.kind.short_name().to_string(),
        namespace: v.id.namespace,
        name: v.id.name,
        source: v.source.map(|s| s.to_string()).unwrap_or_default(),
        selects: v.selects,
        ingress_rules: v.ingress_rules,
        ingress_deny_rules: v.ingress_deny_rules,
        egress_rules: v.egress_rules,
        egress_deny_rules: v.egress_deny_rules,
        ingress_default_deny: v.ingress_default_deny,
        egress_default_deny: v.egress_default_deny,
        audit: v.audit,
    }
}

fn policy_change(c: PolicyChange) -> wire::PolicyApplied {
    wire::PolicyApplied {
        kind: c.id.kind.short_name().to_string(),
        namespace: c.id.namespace,
        name: c.id.name,
        action: c.action.as_str().to_string(),
    }
}

pub fn apply_result(u: PolicyUpdate) -> wire::PolicyApplyResult {
    wire::PolicyApplyResult {
        policies: u.policies.into_iter().map(policy_change).collect(),
        map_operations: u.map_operations,
    }
}

pub fn delete_result(u: PolicyUpdate) -> wire::PolicyDeleteResult {
    wire::PolicyDeleteResult {
        deleted: u.policies.into_iter().map(policy_change).collect(),
        map_operations: u.map_operations,
    }
}

fn trace_side(s: TraceSide) -> wire::TraceSide {
    wire::TraceSide {
        endpoint: s.endpoint,
        direction: s.direction.to_string(),
        enforced: s.enforced,
        enforcing_policies: names(&s.enforcing_policies),
        peer_identity: s.peer_identity.0,
        peer_labels: s.peer_labels,
        verdict: verdict(s.allowed),
        reason: s.reason,
        rule: s.rule,
        policy: s.policy.map(|p| p.to_string()),
        judged_on: s.judged_on,
    }
}

pub fn trace(t: TraceResult) -> wire::TraceResult {
    wire::TraceResult {
        verdict: verdict(t.allowed),
        protocol: t.protocol.to_string(),
        port: t.port,
        source_identity: t.source_identity.0,
        destination_identity: t.destination_identity.0,
        egress: trace_side(t.egress),
        ingress: trace_side(t.ingress),
    }
}

pub fn fqdn_trace(t: FqdnTraceResult) -> wire::FqdnTraceResult {
    wire::FqdnTraceResult {
        verdict: verdict(t.allowed),
        endpoint: t.endpoint,
        name: t.name,
        protocol: t.protocol.to_string(),
        port: t.port,
        source_identity: t.source_identity.0,
        enforced: t.enforced,
        selected_by: t.selected_by,
        lookup: match t.lookup {
            LookupVerdict::Answered => "ANSWERED",
            LookupVerdict::Refused => "REFUSED",
            LookupVerdict::NotProxied => "NOT-PROXIED",
        }
        .to_string(),
        lookup_rules: t.lookup_rules,
        addresses: t
            .addresses
            .into_iter()
            .map(|a| wire::FqdnTraceAddress {
                address: a.address,
                ttl_remaining: a.ttl_remaining,
                held_by_connections: a.held_by_connections,
                egress: trace_side(a.egress),
            })
            .collect(),
        reason: t.reason,
    }
}

pub fn status(s: NodeStatus, mode: &str) -> wire::StatusView {
    let e = s.engine;
    wire::StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        mode: mode.to_string(),
        node_ip: e.node_ip,
        pod_cidr: e.pod_cidr.to_string(),
        enforcement: e.enforcement.as_str().to_string(),
        endpoints: e.endpoints,
        identities: e.identities,
        policies: e.policies,
        policy_map_entries: e.policy_map_entries,
        ipcache_entries: e.ipcache_entries,
        maps_in_sync: e.maps_in_sync,
        conntrack_entries: s.conntrack_entries,
        flows_stored: s.flows_stored,
        counters: s
            .counters
            .into_iter()
            .map(|c| wire::CounterView {
                direction: metrics::direction_name(c.direction).to_string(),
                outcome: metrics::outcome_name(c.outcome).to_string(),
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect(),
        audit: wire::AuditView {
            agent: e.audit,
            namespace_modes: e
                .namespace_modes
                .iter()
                .map(|(ns, m)| (ns.clone(), m.as_str().to_string()))
                .collect(),
            endpoints: e.audit_endpoints,
            policies: names(&e.audit_policies),
            violations: s.violations,
        },
        namespaces: e.namespaces,
    }
}

pub fn mode_change(c: ModeChange) -> wire::NamespaceModeView {
    wire::NamespaceModeView {
        namespace: c.namespace,
        mode: c.mode.as_str().to_string(),
        previous: c.previous.as_str().to_string(),
        endpoints: c.endpoints,
        map_operations: c.map_operations,
    }
}

/// The conntrack table in words, named from the catalog.
pub fn conntrack(
    entries: Vec<(ct::CtKey, ct::CtEntry)>,
    catalog: &Catalog,
) -> Vec<wire::ConntrackView> {
    let now = monotonic_now_ns();
    let by_id: BTreeMap<u32, String> = catalog
        .endpoints_by_id
        .iter()
        .map(|(id, e)| (*id, format!("{}/{}", e.namespace, e.name)))
        .collect();
    let v4 = |a: &[u8; 16]| std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]);
    let mut out: Vec<wire::ConntrackView> = entries
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
            let icmp = k.protocol == proto::ICMP;
            wire::ConntrackView {
                source: v4(&k.saddr),
                destination: v4(&k.daddr),
                source_port: if icmp { 0 } else { u16::from_be(k.sport_be) },
                destination_port: if icmp { 0 } else { u16::from_be(k.dport_be) },
                protocol: protocol_name(k.protocol),
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
                rule: catalog
                    .rules
                    .get(&e.rule_id)
                    .map(|r| r.rule.clone())
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
    out
}
