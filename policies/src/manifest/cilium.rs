//! The CiliumNetworkPolicy rule language: `palisade.io/v1` NetworkPolicy and
//! ClusterwideNetworkPolicy, and `cilium.io/v2` CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy.

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::cidr::{BareAddress, parse_cidr, parse_except};
use super::error::{FieldPath, Invalid, Problem};
use super::http::{HttpRuleDoc, http_rule};
use super::icmp::{IcmpRuleDoc, icmp_ports};
use super::meta::{ObjectMeta, Scope, object_id};
use super::ports::{IntOrString, end_port, port_number, validate_port_name};
use super::selector::{KeySyntax, LabelSelectorDoc, in_namespace, mentions_key};
use crate::fqdn::FqdnSelector;
use crate::labels::{LabelSelector, NAMESPACE_LABEL};
use crate::model::{
    DirectionPolicy, EndpointSelector, Entity, HttpRule, Peer, Peers, Policy, PolicyKind,
    PolicyRef, PolicySpec, Port, PortSpec, Protocol, Rule,
};

/// Which API group a document is written in: palisade.io/v1 is the Cilium rule language plus
/// a few extensions (`rules.http[].upgrades`) that cilium.io/v2 documents must not use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ApiGroup {
    Palisade,
    Cilium,
}

impl ApiGroup {
    fn of(api_version: &str) -> ApiGroup {
        if api_version == "palisade.io/v1" {
            ApiGroup::Palisade
        } else {
            ApiGroup::Cilium
        }
    }
}

/// The whole object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CiliumPolicyDoc {
    /// Already dispatched on by the caller; decides which extensions are allowed.
    #[serde(rename = "apiVersion")]
    api_version: String,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: Option<ObjectMeta>,
    spec: Option<RuleDoc>,
    specs: Option<Vec<RuleDoc>>,
    #[serde(rename = "status")]
    _status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleDoc {
    description: Option<String>,
    endpoint_selector: Option<LabelSelectorDoc>,
    node_selector: Option<IgnoredAny>,
    ingress: Option<Vec<IngressRuleDoc>>,
    ingress_deny: Option<Vec<IngressRuleDoc>>,
    egress: Option<Vec<EgressRuleDoc>>,
    egress_deny: Option<Vec<EgressRuleDoc>>,
    #[serde(rename = "labels")]
    _labels: Option<IgnoredAny>,
    enable_default_deny: Option<DefaultDenyDoc>,
    /// palisade.io/v1 only: the policy is in audit (see `crate::audit`).
    audit: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefaultDenyDoc {
    ingress: Option<bool>,
    egress: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IngressRuleDoc {
    from_endpoints: Option<Vec<LabelSelectorDoc>>,
    #[serde(rename = "fromCIDR")]
    from_cidr: Option<Vec<String>>,
    #[serde(rename = "fromCIDRSet")]
    from_cidr_set: Option<Vec<CidrRuleDoc>>,
    from_entities: Option<Vec<String>>,
    to_ports: Option<Vec<PortRuleDoc>>,
    icmps: Option<Vec<IcmpRuleDoc>>,
    from_requires: Option<IgnoredAny>,
    from_groups: Option<IgnoredAny>,
    from_nodes: Option<IgnoredAny>,
    authentication: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EgressRuleDoc {
    to_endpoints: Option<Vec<LabelSelectorDoc>>,
    #[serde(rename = "toCIDR")]
    to_cidr: Option<Vec<String>>,
    #[serde(rename = "toCIDRSet")]
    to_cidr_set: Option<Vec<CidrRuleDoc>>,
    to_entities: Option<Vec<String>>,
    to_ports: Option<Vec<PortRuleDoc>>,
    icmps: Option<Vec<IcmpRuleDoc>>,
    to_requires: Option<IgnoredAny>,
    to_services: Option<IgnoredAny>,
    #[serde(rename = "toFQDNs")]
    to_fqdns: Option<Vec<FqdnSelectorDoc>>,
    to_groups: Option<IgnoredAny>,
    to_nodes: Option<IgnoredAny>,
    authentication: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CidrRuleDoc {
    cidr: Option<String>,
    except: Option<Vec<String>>,
    cidr_group_ref: Option<IgnoredAny>,
    cidr_group_selector: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortRuleDoc {
    ports: Option<Vec<PortProtocolDoc>>,
    rules: Option<L7RulesDoc>,
    #[serde(rename = "terminatingTLS")]
    terminating_tls: Option<IgnoredAny>,
    #[serde(rename = "originatingTLS")]
    originating_tls: Option<IgnoredAny>,
    server_names: Option<IgnoredAny>,
    listener: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortProtocolDoc {
    /// A string in Cilium's schema; a YAML integer is accepted too, since that is how most
    /// people write a port.
    port: Option<IntOrString>,
    end_port: Option<i64>,
    protocol: Option<String>,
}

/// Cilium's FQDNSelector: exactly one of the two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FqdnSelectorDoc {
    match_name: Option<String>,
    match_pattern: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct L7RulesDoc {
    http: Option<Vec<HttpRuleDoc>>,
    dns: Option<Vec<FqdnSelectorDoc>>,
    kafka: Option<IgnoredAny>,
    l7proto: Option<IgnoredAny>,
    l7: Option<IgnoredAny>,
}

/// Names of a direction's peer fields, for error paths.
struct PeerFields {
    /// Ingress (`from*`) or egress (`to*`).
    ingress: bool,
    endpoints: &'static str,
    cidr: &'static str,
    cidr_set: &'static str,
    entities: &'static str,
}

const FROM: PeerFields = PeerFields {
    ingress: true,
    endpoints: "fromEndpoints",
    cidr: "fromCIDR",
    cidr_set: "fromCIDRSet",
    entities: "fromEntities",
};

const TO: PeerFields = PeerFields {
    ingress: false,
    endpoints: "toEndpoints",
    cidr: "toCIDR",
    cidr_set: "toCIDRSet",
    entities: "toEntities",
};

/// An ingress or egress rule, direction-neutral.
struct PeerRule<'a> {
    fields: &'static PeerFields,
    endpoints: &'a [LabelSelectorDoc],
    cidrs: &'a [String],
    cidr_sets: &'a [CidrRuleDoc],
    entities: &'a [String],
    to_ports: &'a [PortRuleDoc],
    icmps: &'a [IcmpRuleDoc],
    /// `toFQDNs` (egress only).
    fqdns: &'a [FqdnSelectorDoc],
    /// Cilium fields palisade does not implement, and whether each is set.
    unsupported: Vec<(&'static str, bool)>,
}

impl IngressRuleDoc {
    fn view(&self) -> PeerRule<'_> {
        PeerRule {
            fields: &FROM,
            endpoints: self.from_endpoints.as_deref().unwrap_or_default(),
            cidrs: self.from_cidr.as_deref().unwrap_or_default(),
            cidr_sets: self.from_cidr_set.as_deref().unwrap_or_default(),
            entities: self.from_entities.as_deref().unwrap_or_default(),
            to_ports: self.to_ports.as_deref().unwrap_or_default(),
            icmps: self.icmps.as_deref().unwrap_or_default(),
            fqdns: &[],
            unsupported: vec![
                ("fromRequires", self.from_requires.is_some()),
                ("fromGroups", self.from_groups.is_some()),
                ("fromNodes", self.from_nodes.is_some()),
                ("authentication", self.authentication.is_some()),
            ],
        }
    }
}

impl EgressRuleDoc {
    fn view(&self) -> PeerRule<'_> {
        PeerRule {
            fields: &TO,
            endpoints: self.to_endpoints.as_deref().unwrap_or_default(),
            cidrs: self.to_cidr.as_deref().unwrap_or_default(),
            cidr_sets: self.to_cidr_set.as_deref().unwrap_or_default(),
            entities: self.to_entities.as_deref().unwrap_or_default(),
            to_ports: self.to_ports.as_deref().unwrap_or_default(),
            icmps: self.icmps.as_deref().unwrap_or_default(),
            fqdns: self.to_fqdns.as_deref().unwrap_or_default(),
            unsupported: vec![
                ("toRequires", self.to_requires.is_some()),
                ("toServices", self.to_services.is_some()),
                ("toGroups", self.to_groups.is_some()),
                ("toNodes", self.to_nodes.is_some()),
                ("authentication", self.authentication.is_some()),
            ],
        }
    }
}

/// Whether rules allow or deny: deny rules cannot carry L7 rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    Deny,
}

pub(crate) fn translate(doc: CiliumPolicyDoc, scope: Scope) -> Result<Policy, Invalid> {
    let group = ApiGroup::of(&doc.api_version);
    let id = object_id(doc.metadata, scope)?;
    let namespace = id.namespace.as_deref();
    let ctx = Context { namespace, group };
    let root = FieldPath::root();
    let mut specs = Vec::new();
    let mut audit: Option<bool> = None;
    let specs_path = root.key("specs");
    let rules = doc.spec.iter().map(|r| (r, root.key("spec"))).chain(
        doc.specs
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| (r, specs_path.index(i))),
    );
    for (rule, path) in rules {
        specs.push(translate_rule(rule, ctx, &path)?);
        if let Some(a) = rule.audit {
            if group != ApiGroup::Palisade {
                return Err(path
                    .key("audit")
                    .invalid(Problem::PalisadeOnlyField("audit")));
            }
            if audit.is_some_and(|seen| seen != a) {
                return Err(path.key("audit").invalid(Problem::AuditDisagrees));
            }
            audit = Some(a);
        }
    }
    if specs.is_empty() {
        return Err(root.key("spec").invalid(Problem::NoSpecs));
    }
    let kind = match scope {
        Scope::Namespaced => PolicyKind::NetworkPolicy,
        Scope::Clusterwide => PolicyKind::ClusterwideNetworkPolicy,
    };
    Ok(Policy {
        id: PolicyRef {
            kind,
            namespace: id.namespace,
            name: id.name,
        },
        specs,
        audit: id.audit || audit == Some(true),
    })
}

/// What every rule of a document is translated with.
#[derive(Clone, Copy)]
struct Context<'a> {
    /// The policy's namespace; None for clusterwide policies.
    namespace: Option<&'a str>,
    group: ApiGroup,
}

fn translate_rule(rule: &RuleDoc, ctx: Context, path: &FieldPath) -> Result<PolicySpec, Invalid> {
    let namespace = ctx.namespace;
    if rule.node_selector.is_some() {
        return Err(path
            .key("nodeSelector")
            .invalid(Problem::Unsupported("nodeSelector")));
    }
    let selector_path = path.key("endpointSelector");
    let selector = rule
        .endpoint_selector
        .as_ref()
        .ok_or_else(|| selector_path.invalid(Problem::Required("endpointSelector")))?
        .to_selector(KeySyntax::Cilium, &selector_path)?;
    let subject = match namespace {
        Some(ns) => subject_in_namespace(selector, ns).map_err(|p| selector_path.invalid(p))?,
        None => selector,
    };
    let default_deny = rule.enable_default_deny.as_ref();
    let ingress: Vec<_> = rule
        .ingress
        .iter()
        .flatten()
        .map(IngressRuleDoc::view)
        .collect();
    let ingress_deny: Vec<_> = rule
        .ingress_deny
        .iter()
        .flatten()
        .map(IngressRuleDoc::view)
        .collect();
    let egress: Vec<_> = rule
        .egress
        .iter()
        .flatten()
        .map(EgressRuleDoc::view)
        .collect();
    let egress_deny: Vec<_> = rule
        .egress_deny
        .iter()
        .flatten()
        .map(EgressRuleDoc::view)
        .collect();
    Ok(PolicySpec {
        subject: EndpointSelector(subject),
        ingress: direction(
            (&ingress, &path.key("ingress")),
            (&ingress_deny, &path.key("ingressDeny")),
            default_deny.and_then(|d| d.ingress),
            ctx,
        )?,
        egress: direction(
            (&egress, &path.key("egress")),
            (&egress_deny, &path.key("egressDeny")),
            default_deny.and_then(|d| d.egress),
            ctx,
        )?,
        description: rule.description.clone(),
    })
}

/// Cilium silently replaces a namespace the endpointSelector of a namespaced policy names with
/// the policy's own; a policy that says one thing and does another is rejected instead.
fn subject_in_namespace(
    selector: LabelSelector,
    namespace: &str,
) -> Result<LabelSelector, Problem> {
    match selector.match_labels.get(NAMESPACE_LABEL) {
        Some(selected) if selected != namespace => Err(Problem::NamespaceConflict {
            policy_namespace: namespace.to_string(),
            selected: selected.clone(),
        }),
        _ => Ok(in_namespace(selector, namespace)),
    }
}

/// A peer selector of a namespaced policy stays in the policy's namespace unless it says which
/// namespace(s) it means: that is how Cilium lets such a policy reach other namespaces.
fn peer_selector(selector: LabelSelector, namespace: Option<&str>) -> LabelSelector {
    match namespace {
        Some(ns) if !mentions_key(&selector, NAMESPACE_LABEL) => in_namespace(selector, ns),
        _ => selector,
    }
}

fn direction(
    (allow, allow_path): (&[PeerRule], &FieldPath),
    (deny, deny_path): (&[PeerRule], &FieldPath),
    enable_default_deny: Option<bool>,
    ctx: Context,
) -> Result<DirectionPolicy, Invalid> {
    Ok(DirectionPolicy {
        default_deny: enable_default_deny.unwrap_or(!allow.is_empty() || !deny.is_empty()),
        allow: rules(allow, Verdict::Allow, ctx, allow_path)?,
        deny: rules(deny, Verdict::Deny, ctx, deny_path)?,
    })
}

fn rules(
    rules: &[PeerRule],
    verdict: Verdict,
    ctx: Context,
    path: &FieldPath,
) -> Result<Vec<Rule>, Invalid> {
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        out.extend(peer_rule(rule, verdict, ctx, &path.index(i))?);
    }
    Ok(out)
}

/// One manifest rule becomes one model rule per toPorts entry, plus one for its icmps; a rule
/// with neither becomes a single rule over every port.
fn peer_rule(
    rule: &PeerRule,
    verdict: Verdict,
    ctx: Context,
    path: &FieldPath,
) -> Result<Vec<Rule>, Invalid> {
    if let Some((field, _)) = rule.unsupported.iter().find(|(_, set)| *set) {
        return Err(path.key(field).invalid(Problem::Unsupported(field)));
    }
    if verdict == Verdict::Deny && !rule.fqdns.is_empty() {
        return Err(path
            .key("toFQDNs")
            .invalid(Problem::Unsupported("toFQDNs in egressDeny (as in Cilium)")));
    }
    let peers = peers(rule, ctx.namespace, path)?;
    let mut out = Vec::new();
    let to_ports_path = path.key("toPorts");
    for (i, port_rule) in rule.to_ports.iter().enumerate() {
        let (ports, l7) = port_rule_parts(port_rule, verdict, ctx.group, &to_ports_path.index(i))?;
        if rule.fields.ingress && l7.dns.is_some() {
            // DNS rules filter a workload's own lookups; on ingress there is nothing to filter.
            return Err(to_ports_path.index(i).key("rules").key("dns").invalid(
                Problem::Unsupported("rules.dns on ingress (egress only, as in Cilium)"),
            ));
        }
        out.push(Rule {
            peers: peers.clone(),
            ports,
            http: l7.http,
            dns: l7.dns,
        });
    }
    if !rule.icmps.is_empty() {
        out.push(Rule {
            peers: peers.clone(),
            ports: icmp_ports(rule.icmps, &path.key("icmps"))?,
            http: None,
            dns: None,
        });
    }
    if out.is_empty() {
        out.push(Rule {
            peers,
            ports: vec![],
            http: None,
            dns: None,
        });
    }
    Ok(out)
}

/// The union of every peer field. A rule with no peers but with ports applies to every peer;
/// a rule with neither (`{}`) selects nothing, as in Cilium.
fn peers(rule: &PeerRule, namespace: Option<&str>, path: &FieldPath) -> Result<Peers, Invalid> {
    let mut peers = Vec::new();
    let fields = rule.fields;
    let endpoints_path = path.key(fields.endpoints);
    for (i, doc) in rule.endpoints.iter().enumerate() {
        let selector = doc.to_selector(KeySyntax::Cilium, &endpoints_path.index(i))?;
        peers.push(Peer::Endpoints(EndpointSelector(peer_selector(
            selector, namespace,
        ))));
    }
    let cidr_path = path.key(fields.cidr);
    for (i, text) in rule.cidrs.iter().enumerate() {
        let cidr =
            parse_cidr(text, BareAddress::Allowed).map_err(|p| cidr_path.index(i).invalid(p))?;
        peers.push(Peer::Cidr {
            cidr,
            except: vec![],
        });
    }
    let cidr_set_path = path.key(fields.cidr_set);
    for (i, doc) in rule.cidr_sets.iter().enumerate() {
        peers.push(cidr_rule(doc, &cidr_set_path.index(i))?);
    }
    let entities_path = path.key(fields.entities);
    for (i, name) in rule.entities.iter().enumerate() {
        let entity = Entity::parse(name).ok_or_else(|| {
            entities_path
                .index(i)
                .invalid(Problem::UnknownEntity(name.clone()))
        })?;
        peers.push(Peer::Entity(entity));
    }
    let fqdns_path = path.key("toFQDNs");
    for (i, doc) in rule.fqdns.iter().enumerate() {
        peers.push(Peer::Fqdn(fqdn_selector(doc, &fqdns_path.index(i))?));
    }
    Ok(if !peers.is_empty() {
        Peers::Some(peers)
    } else if !rule.to_ports.is_empty() || !rule.icmps.is_empty() {
        Peers::All
    } else {
        Peers::Some(vec![])
    })
}

fn cidr_rule(doc: &CidrRuleDoc, path: &FieldPath) -> Result<Peer, Invalid> {
    if doc.cidr_group_ref.is_some() {
        return Err(path
            .key("cidrGroupRef")
            .invalid(Problem::Unsupported("cidrGroupRef")));
    }
    if doc.cidr_group_selector.is_some() {
        return Err(path
            .key("cidrGroupSelector")
            .invalid(Problem::Unsupported("cidrGroupSelector")));
    }
    let cidr_path = path.key("cidr");
    let text = doc
        .cidr
        .as_deref()
        .ok_or_else(|| cidr_path.invalid(Problem::Required("cidr")))?;
    let cidr = parse_cidr(text, BareAddress::Allowed).map_err(|p| cidr_path.invalid(p))?;
    let except_path = path.key("except");
    let except = doc
        .except
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, e)| {
            parse_except(cidr, e, BareAddress::Allowed).map_err(|p| except_path.index(i).invalid(p))
        })
        .collect::<Result<_, _>>()?;
    Ok(Peer::Cidr { cidr, except })
}

/// The L7 rules of one toPorts entry: HTTP or DNS (Cilium allows one kind per entry).
#[derive(Default)]
struct L7Parts {
    http: Option<Vec<HttpRule>>,
    dns: Option<Vec<FqdnSelector>>,
}

/// The ports and L7 rules of one toPorts entry.
fn port_rule_parts(
    doc: &PortRuleDoc,
    verdict: Verdict,
    group: ApiGroup,
    path: &FieldPath,
) -> Result<(Vec<PortSpec>, L7Parts), Invalid> {
    let unsupported = [
        ("terminatingTLS", doc.terminating_tls.is_some()),
        ("originatingTLS", doc.originating_tls.is_some()),
        ("serverNames", doc.server_names.is_some()),
        ("listener", doc.listener.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(path.key(field).invalid(Problem::Unsupported(field)));
    }
    let ports_path = path.key("ports");
    let ports = doc
        .ports
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| port_protocol(p, &ports_path.index(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let rules_path = path.key("rules");
    let l7 = match (&doc.rules, verdict) {
        (None, _) => L7Parts::default(),
        (Some(_), Verdict::Deny) => return Err(rules_path.invalid(Problem::RulesInDeny)),
        (Some(rules), Verdict::Allow) => l7_rules(rules, group, &rules_path)?,
    };
    if l7.http.is_some() {
        // HTTP runs over TCP only; ANY is fine, the proxy then sees the TCP part.
        if let Some((i, p)) = ports
            .iter()
            .enumerate()
            .find(|(_, p)| !matches!(p.protocol, Protocol::Tcp | Protocol::Any))
        {
            return Err(ports_path
                .index(i)
                .key("protocol")
                .invalid(Problem::HttpOnNonTcp(p.protocol)));
        }
    }
    if l7.dns.is_some() {
        // DNS rules need a port the proxy can serve: UDP or TCP (or ANY, both), never "every
        // port", and no named port (whose number is only known per destination).
        if ports.is_empty() {
            return Err(ports_path.invalid(Problem::DnsWithoutPort));
        }
        for (i, p) in ports.iter().enumerate() {
            if !matches!(p.protocol, Protocol::Tcp | Protocol::Udp | Protocol::Any) {
                return Err(ports_path
                    .index(i)
                    .key("protocol")
                    .invalid(Problem::DnsOnProtocol(p.protocol)));
            }
            if !matches!(p.port, Port::Range { .. }) {
                return Err(ports_path
                    .index(i)
                    .key("port")
                    .invalid(Problem::DnsWithoutPort));
            }
        }
    }
    Ok((ports, l7))
}

fn l7_rules(doc: &L7RulesDoc, group: ApiGroup, path: &FieldPath) -> Result<L7Parts, Invalid> {
    let unsupported = [
        ("kafka", doc.kafka.is_some()),
        ("l7proto", doc.l7proto.is_some()),
        ("l7", doc.l7.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(path.key(field).invalid(Problem::Unsupported(field)));
    }
    if doc.http.is_some() && doc.dns.is_some() {
        return Err(path.key("dns").invalid(Problem::HttpAndDns));
    }
    let mut out = L7Parts::default();
    if let Some(http) = &doc.http {
        let http_path = path.key("http");
        out.http = Some(
            http.iter()
                .enumerate()
                .map(|(i, r)| http_rule(r, group, &http_path.index(i)))
                .collect::<Result<_, _>>()?,
        );
    }
    if let Some(dns) = &doc.dns {
        let dns_path = path.key("dns");
        out.dns = Some(
            dns.iter()
                .enumerate()
                .map(|(i, r)| fqdn_selector(r, &dns_path.index(i)))
                .collect::<Result<_, _>>()?,
        );
    }
    Ok(out)
}

/// A `matchName` or `matchPattern` (exactly one).
fn fqdn_selector(doc: &FqdnSelectorDoc, path: &FieldPath) -> Result<FqdnSelector, Invalid> {
    match (&doc.match_name, &doc.match_pattern) {
        (Some(name), None) => FqdnSelector::name(name).map_err(|e| {
            path.key("matchName").invalid(Problem::BadDnsName {
                value: name.clone(),
                why: e,
            })
        }),
        (None, Some(pattern)) => FqdnSelector::pattern(pattern).map_err(|e| {
            path.key("matchPattern").invalid(Problem::BadDnsName {
                value: pattern.clone(),
                why: e,
            })
        }),
        (Some(_), Some(_)) => Err(path.invalid(Problem::NameAndPattern)),
        (None, None) => Err(path.invalid(Problem::Required("matchName or matchPattern"))),
    }
}

fn port_protocol(doc: &PortProtocolDoc, path: &FieldPath) -> Result<PortSpec, Invalid> {
    let protocol = match doc.protocol.as_deref() {
        None => Protocol::Any,
        Some(text) => protocol(text).map_err(|p| path.key("protocol").invalid(p))?,
    };
    let port_path = path.key("port");
    let value = port_value(doc.port.as_ref()).map_err(|p| port_path.invalid(p))?;
    // Go's zero value: `endPort: 0` is the same as no endPort.
    let port = match (value, doc.end_port.filter(|e| *e != 0)) {
        (PortValue::Any, None) => Port::Any,
        (PortValue::Named(name), None) => Port::Named(name),
        (PortValue::Number(port), None) => Port::Range { port, end: port },
        (PortValue::Number(port), Some(end)) => Port::Range {
            port,
            end: end_port(port, end).map_err(|p| path.key("endPort").invalid(p))?,
        },
        (_, Some(_)) => {
            return Err(path
                .key("endPort")
                .invalid(Problem::EndPortWithoutNumericPort));
        }
    };
    Ok(PortSpec { protocol, port })
}

enum PortValue {
    Any,
    Number(u16),
    Named(String),
}

/// Cilium's port string: absent, "" or "0" is every port, digits a port number, anything else
/// a named port.
fn port_value(value: Option<&IntOrString>) -> Result<PortValue, Problem> {
    let number = match value {
        None => return Ok(PortValue::Any),
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::Str(s)) if s.is_empty() => return Ok(PortValue::Any),
        Some(IntOrString::Str(s)) if s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<i64>()
            .map_err(|_| Problem::PortOutOfRange(s.clone()))?,
        Some(IntOrString::Str(name)) => {
            validate_port_name(name)?;
            return Ok(PortValue::Named(name.clone()));
        }
    };
    if number == 0 {
        Ok(PortValue::Any)
    } else {
        port_number(number).map(PortValue::Number)
    }
}

/// Cilium's L4Proto enum is case-sensitive.
fn protocol(text: &str) -> Result<Protocol, Problem> {
    match text {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        "ICMP" => Ok(Protocol::Icmp),
        "ANY" => Ok(Protocol::Any),
        "ICMPv6" => Err(Problem::Ipv6("protocol ICMPv6".into())),
        _ => Err(Problem::UnknownProtocol {
            value: text.to_string(),
            expected: "TCP, UDP, SCTP, ICMP or ANY",
        }),
    }
}

#[cfg(test)]
mod tests {
    use ipnetwork::Ipv4Network;

    use super::super::test_support::*;
    use crate::fqdn::FqdnSelector;
    use crate::labels::{LabelSelector, NAMESPACE_LABEL, Operator, Requirement};
    use crate::model::{
        DirectionPolicy, EndpointSelector, Entity, HeaderMatch, HttpRule, Peer, Peers, PolicyKind,
        Port, PortSpec, Protocol, Rule,
    };

    /// A palisade.io/v1 NetworkPolicy in namespace demo whose `spec:` is `spec` (indented lines).
    fn policy(spec: &str) -> String {
        format!(
            "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: demo}}\nspec:\n{spec}"
        )
    }

    fn clusterwide(spec: &str) -> String {
        format!(
            "apiVersion: palisade.io/v1\nkind: ClusterwideNetworkPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        )
    }

    /// The spec of a policy selecting everything, with `rules` (indented lines) appended.
    fn spec_with(rules: &str) -> crate::model::PolicySpec {
        parse_spec(&policy(&format!("  endpointSelector: {{}}\n{rules}")))
    }

    fn ingress(rules: &str) -> Vec<Rule> {
        spec_with(&format!("  ingress:\n{rules}")).ingress.allow
    }

    fn err_with(rules: &str) -> crate::manifest::ManifestError {
        parse_err(&policy(&format!("  endpointSelector: {{}}\n{rules}")))
    }

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn tcp(port: u16) -> PortSpec {
        PortSpec {
            protocol: Protocol::Tcp,
            port: Port::Range { port, end: port },
        }
    }

    fn any_proto(port: Port) -> PortSpec {
        PortSpec {
            protocol: Protocol::Any,
            port,
        }
    }

    fn icmp(t: u16) -> PortSpec {
        PortSpec {
            protocol: Protocol::Icmp,
            port: Port::Range { port: t, end: t },
        }
    }

    /// The ports of the single rule of `- toPorts: [{ports: [<port>]}]`.
    fn port(port: &str) -> PortSpec {
        let rules = ingress(&format!("  - toPorts:\n    - ports:\n      - {port}\n"));
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].ports.len(), 1);
        rules[0].ports[0].clone()
    }

    #[test]
    fn palisade_and_cilium_namespaced_kinds_become_network_policies() {
        for (api, kind) in [
            ("palisade.io/v1", "NetworkPolicy"),
            ("cilium.io/v2", "CiliumNetworkPolicy"),
        ] {
            let yaml = format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: p, namespace: demo}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n"
            );
            let policy = parse_one(&yaml);
            assert_eq!(policy.id.kind, PolicyKind::NetworkPolicy);
            assert_eq!(policy.id.namespace.as_deref(), Some("demo"));
            assert_eq!(
                policy.specs[0].subject,
                labels_in("demo", &[("app", "web")])
            );
        }
    }

    #[test]
    fn clusterwide_kinds_have_no_namespace_and_add_none() {
        for (api, kind) in [
            ("palisade.io/v1", "ClusterwideNetworkPolicy"),
            ("cilium.io/v2", "CiliumClusterwideNetworkPolicy"),
        ] {
            let yaml = format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: x}}}}]\n"
            );
            let policy = parse_one(&yaml);
            assert_eq!(policy.id.kind, PolicyKind::ClusterwideNetworkPolicy);
            assert_eq!(policy.id.namespace, None);
            assert_eq!(
                policy.specs[0].subject,
                EndpointSelector(labels(&[("app", "web")]))
            );
            assert_eq!(
                policy.specs[0].ingress.allow[0].peers,
                Peers::Some(vec![Peer::Endpoints(EndpointSelector(labels(&[(
                    "app", "x"
                )])))])
            );
        }
    }

    #[test]
    fn clusterwide_policy_with_a_namespace_is_rejected() {
        let yaml = clusterwide("  endpointSelector: {}\n")
            .replace("{name: p}", "{name: p, namespace: demo}");
        let err = parse_err(&yaml);
        assert_err(
            &err,
            1,
            Some("metadata.namespace"),
            "clusterwide policy has no namespace",
        );
        assert_eq!(err.object.as_deref(), Some("ClusterwideNetworkPolicy p"));
    }

    #[test]
    fn namespace_defaults_to_default() {
        let yaml =
            policy("  endpointSelector: {}\n").replace("{name: p, namespace: demo}", "{name: p}");
        let policy = parse_one(&yaml);
        assert_eq!(policy.id.namespace.as_deref(), Some("default"));
        assert_eq!(policy.specs[0].subject, labels_in("default", &[]));
    }

    #[test]
    fn spec_then_specs_each_become_a_policy_spec() {
        let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: demo}\nspec:\n  description: first\n  endpointSelector: {matchLabels: {app: a}}\nspecs:\n- description: second\n  endpointSelector: {matchLabels: {app: b}}\n- endpointSelector: {matchLabels: {app: c}}\n";
        let policy = parse_one(yaml);
        let subjects: Vec<_> = policy.specs.iter().map(|s| s.subject.clone()).collect();
        assert_eq!(
            subjects,
            vec![
                labels_in("demo", &[("app", "a")]),
                labels_in("demo", &[("app", "b")]),
                labels_in("demo", &[("app", "c")]),
            ]
        );
        let descriptions: Vec<_> = policy
            .specs
            .iter()
            .map(|s| s.description.as_deref())
            .collect();
        assert_eq!(descriptions, vec![Some("first"), Some("second"), None]);
        let only_specs = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspecs:\n- endpointSelector: {}\n";
        assert_eq!(parse_one(only_specs).specs.len(), 1);
    }

    #[test]
    fn a_policy_without_rules_is_rejected() {
        let base = "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\n";
        for rest in ["", "specs: []\n", "spec:\n"] {
            let err = parse_err(&format!("{base}{rest}"));
            assert_err(
                &err,
                1,
                Some("spec"),
                "spec or specs must define at least one rule",
            );
        }
    }

    #[test]
    fn errors_in_specs_name_their_index() {
        let yaml = "apiVersion: palisade.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspecs:\n- endpointSelector: {}\n- ingress: []\n";
        let err = parse_err(yaml);
        assert_err(
            &err,
            1,
            Some("specs[1].endpointSelector"),
            "endpointSelector is required",
        );
    }

    #[test]
    fn endpoint_selector_is_required_and_node_selector_unsupported() {
        let err = parse_err(&policy("  ingress: []\n"));
        assert_err(
            &err,
            1,
            Some("spec.endpointSelector"),
            "endpointSelector is required",
        );
        let err = parse_err(&policy("  nodeSelector: {}\n"));
        assert_err(
            &err,
            1,
            Some("spec.nodeSelector"),
            "nodeSelector is not supported by palisade",
        );
    }

    #[test]
    fn rule_labels_are_accepted_and_ignored() {
        let spec = spec_with("  labels: [{key: owner, value: team-a, source: k8s}]\n");
        assert_eq!(spec, spec_with(""));
    }

    #[test]
    fn selector_source_prefixes_are_stripped() {
        let spec = parse_spec(&policy(
            "  endpointSelector:\n    matchLabels: {'k8s:app': web, 'any:tier': front}\n    matchExpressions: [{key: 'k8s:env', operator: In, values: [prod]}]\n",
        ));
        let mut expected = labels(&[("app", "web"), ("tier", "front"), (NAMESPACE_LABEL, "demo")]);
        expected.match_expressions.push(Requirement {
            key: "env".into(),
            operator: Operator::In,
            values: ["prod".to_string()].into(),
        });
        assert_eq!(spec.subject, EndpointSelector(expected));
    }

    #[test]
    fn reserved_labels_in_endpoint_selectors_point_to_entities() {
        let err =
            err_with("  ingress:\n  - fromEndpoints:\n    - matchLabels: {'reserved:host': ''}\n");
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].fromEndpoints[0].matchLabels.reserved:host"),
            "use fromEntities/toEntities",
        );
        let err = parse_err(&policy(
            "  endpointSelector: {matchLabels: {'cidr:10.0.0.0/8': ''}}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.endpointSelector.matchLabels.cidr:10.0.0.0/8"),
            "label source \"cidr\"",
        );
    }

    #[test]
    fn subject_naming_its_own_namespace_is_accepted() {
        let spec = parse_spec(&policy(
            "  endpointSelector: {matchLabels: {'k8s:io.kubernetes.pod.namespace': demo}}\n",
        ));
        assert_eq!(spec.subject, labels_in("demo", &[]));
    }

    #[test]
    fn subject_naming_another_namespace_is_rejected() {
        let err = parse_err(&policy(
            "  endpointSelector: {matchLabels: {io.kubernetes.pod.namespace: other}}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.endpointSelector"),
            "cannot select namespace \"other\"",
        );
    }

    #[test]
    fn peer_selectors_stay_in_the_policy_namespace_unless_they_name_one() {
        let rules = ingress(
            "  - fromEndpoints:\n    - matchLabels: {app: a}\n    - matchLabels: {app: b, 'k8s:io.kubernetes.pod.namespace': prod}\n    - matchExpressions: [{key: io.kubernetes.pod.namespace, operator: In, values: [x, y]}]\n    - {}\n",
        );
        let Peers::Some(peers) = &rules[0].peers else {
            panic!("{rules:?}")
        };
        assert_eq!(
            peers[0],
            Peer::Endpoints(labels_in("demo", &[("app", "a")]))
        );
        assert_eq!(
            peers[1],
            Peer::Endpoints(labels_in("prod", &[("app", "b")]))
        );
        let Peer::Endpoints(EndpointSelector(third)) = &peers[2] else {
            panic!()
        };
        assert!(third.match_labels.is_empty(), "{third:?}");
        assert_eq!(peers[3], Peer::Endpoints(labels_in("demo", &[])));
    }

    #[test]
    fn namespace_labels_select_by_namespace_label_but_stay_in_the_policy_namespace() {
        // Only the namespace key itself lifts the restriction, as in Cilium.
        let rules = ingress(
            "  - fromEndpoints:\n    - matchLabels: {io.cilium.k8s.namespace.labels.team: a}\n",
        );
        assert_eq!(
            rules[0].peers,
            Peers::Some(vec![Peer::Endpoints(labels_in(
                "demo",
                &[("io.cilium.k8s.namespace.labels.team", "a")]
            ))])
        );
    }

    #[test]
    fn from_cidr_takes_cidrs_and_bare_addresses() {
        let rules = ingress("  - fromCIDR: [10.0.0.0/8, 192.168.1.7, 172.16.5.5/12]\n");
        assert_eq!(
            rules[0].peers,
            Peers::Some(vec![
                Peer::Cidr {
                    cidr: net("10.0.0.0/8"),
                    except: vec![]
                },
                Peer::Cidr {
                    cidr: net("192.168.1.7/32"),
                    except: vec![]
                },
                Peer::Cidr {
                    cidr: net("172.16.0.0/12"),
                    except: vec![]
                },
            ])
        );
    }

    #[test]
    fn invalid_or_ipv6_cidrs_are_rejected_with_their_path() {
        let err = err_with("  egress:\n  - toCIDR: [10.0.0.0/8, 10.0.0.0/40]\n");
        assert_err(
            &err,
            1,
            Some("spec.egress[0].toCIDR[1]"),
            "invalid CIDR \"10.0.0.0/40\"",
        );
        let err = err_with("  ingress:\n  - fromCIDR: ['2001:db8::/32']\n");
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].fromCIDR[0]"),
            "IPv6 is not supported yet",
        );
        let err = err_with("  ingress:\n  - fromCIDRSet: [{cidr: 'fd00::/8'}]\n");
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].fromCIDRSet[0].cidr"),
            "IPv6 is not supported yet",
        );
    }

    #[test]
    fn cidr_set_keeps_its_exceptions() {
        let rules =
            spec_with("  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]\n")
                .egress
                .allow;
        assert_eq!(
            rules[0].peers,
            Peers::Some(vec![Peer::Cidr {
                cidr: net("10.0.0.0/8"),
                except: vec![net("10.96.0.0/12")]
            }])
        );
    }

    #[test]
    fn cidr_set_errors_name_their_field() {
        let err =
            err_with("  ingress:\n  - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.0.0.0/8]}]\n");
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].fromCIDRSet[0].except[0]"),
            "not strictly inside",
        );
        let err = err_with("  ingress:\n  - fromCIDRSet: [{except: []}]\n");
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].fromCIDRSet[0].cidr"),
            "cidr is required",
        );
        for field in ["cidrGroupRef", "cidrGroupSelector"] {
            let err = err_with(&format!("  ingress:\n  - fromCIDRSet: [{{{field}: x}}]\n"));
            assert_err(
                &err,
                1,
                Some(&format!("spec.ingress[0].fromCIDRSet[0].{field}")),
                "is not supported by palisade",
            );
        }
    }

    #[test]
    fn entities_become_entity_peers() {
        let rules =
            ingress("  - fromEntities: [world, host, remote-node, cluster, kube-apiserver, all]\n");
        assert_eq!(
            rules[0].peers,
            Peers::Some(
                [
                    Entity::World,
                    Entity::Host,
                    Entity::RemoteNode,
                    Entity::Cluster,
                    Entity::KubeApiserver,
                    Entity::All
                ]
                .into_iter()
                .map(Peer::Entity)
                .collect()
            )
        );
    }

    #[test]
    fn every_listed_entity_name_parses() {
        for name in crate::manifest::error::ENTITY_NAMES.split(", ") {
            assert!(Entity::parse(name).is_some(), "{name}");
        }
    }

    #[test]
    fn unknown_entity_is_rejected_listing_the_valid_ones() {
        let err = err_with("  egress:\n  - toEntities: [world, internet]\n");
        assert_err(
            &err,
            1,
            Some("spec.egress[0].toEntities[1]"),
            "unknown entity \"internet\"",
        );
        assert!(err.reason.contains("world, host, remote-node"), "{err}");
    }

    #[test]
    fn peers_of_a_rule_are_the_union_of_its_peer_fields_in_field_order() {
        let rules = ingress(
            "  - fromEntities: [host]\n    fromCIDRSet: [{cidr: 10.0.0.0/8}]\n    fromCIDR: [1.1.1.1]\n    fromEndpoints: [{matchLabels: {app: a}}]\n",
        );
        assert_eq!(
            rules[0].peers,
            Peers::Some(vec![
                Peer::Endpoints(labels_in("demo", &[("app", "a")])),
                Peer::Cidr {
                    cidr: net("1.1.1.1/32"),
                    except: vec![]
                },
                Peer::Cidr {
                    cidr: net("10.0.0.0/8"),
                    except: vec![]
                },
                Peer::Entity(Entity::Host),
            ])
        );
    }

    #[test]
    fn empty_rule_selects_nothing_but_enables_default_deny() {
        let spec = spec_with("  ingress:\n  - {}\n");
        assert!(spec.ingress.default_deny);
        assert_eq!(
            spec.ingress.allow,
            vec![Rule {
                peers: Peers::Some(vec![]),
                ports: vec![],
                http: None,
                dns: None,
            }]
        );
        assert_eq!(spec.egress, DirectionPolicy::default());
        // Empty peer lists are no peers.
        assert_eq!(
            ingress("  - fromEndpoints: []\n")[0].peers,
            Peers::Some(vec![])
        );
    }

    #[test]
    fn rule_with_ports_but_no_peers_applies_to_every_peer() {
        let rules = ingress("  - toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n");
        assert_eq!(
            rules,
            vec![Rule {
                peers: Peers::All,
                ports: vec![tcp(80)],
                http: None,
                dns: None,
            }]
        );
        let rules = ingress("  - icmps: [{fields: [{type: 8}]}]\n");
        assert_eq!(
            rules,
            vec![Rule {
                peers: Peers::All,
                ports: vec![icmp(8)],
                http: None,
                dns: None,
            }]
        );
    }

    #[test]
    fn rule_with_peers_and_no_ports_covers_every_port() {
        let rules = ingress("  - fromEntities: [world]\n");
        assert_eq!(
            rules,
            vec![Rule {
                peers: Peers::Some(vec![Peer::Entity(Entity::World)]),
                ports: vec![],
                http: None,
                dns: None,
            }]
        );
    }

    #[test]
    fn each_to_ports_entry_becomes_its_own_rule_and_icmps_one_more() {
        let rules = ingress(
            "  - fromEntities: [world]\n    toPorts:\n    - ports: [{port: '80', protocol: TCP}]\n      rules: {http: [{method: GET}]}\n    - ports: [{port: '53', protocol: UDP}, {port: '53', protocol: TCP}]\n    icmps: [{fields: [{type: EchoRequest}, {type: 0}]}]\n",
        );
        let peers = Peers::Some(vec![Peer::Entity(Entity::World)]);
        assert_eq!(
            rules,
            vec![
                Rule {
                    peers: peers.clone(),
                    ports: vec![tcp(80)],
                    http: Some(vec![HttpRule {
                        method: Some("GET".into()),
                        ..HttpRule::default()
                    }]),
                    dns: None,
                },
                Rule {
                    peers: peers.clone(),
                    ports: vec![
                        PortSpec {
                            protocol: Protocol::Udp,
                            port: Port::Range { port: 53, end: 53 }
                        },
                        tcp(53)
                    ],
                    http: None,
                    dns: None,
                },
                Rule {
                    peers,
                    ports: vec![icmp(8), icmp(0)],
                    http: None,
                    dns: None,
                },
            ]
        );
    }

    #[test]
    fn port_rule_without_ports_covers_every_port() {
        for yaml in ["  - toPorts: [{}]\n", "  - toPorts: [{ports: []}]\n"] {
            let rules = ingress(yaml);
            assert_eq!(
                rules,
                vec![Rule {
                    peers: Peers::All,
                    ports: vec![],
                    http: None,
                    dns: None,
                }]
            );
        }
    }

    #[test]
    fn port_strings_follow_cilium() {
        assert_eq!(port("{}"), any_proto(Port::Any));
        assert_eq!(port("{port: ''}"), any_proto(Port::Any));
        assert_eq!(port("{port: '0'}"), any_proto(Port::Any));
        assert_eq!(
            port("{port: '8080'}"),
            any_proto(Port::Range {
                port: 8080,
                end: 8080
            })
        );
        assert_eq!(
            port("{port: 8080}"),
            any_proto(Port::Range {
                port: 8080,
                end: 8080
            })
        );
        assert_eq!(port("{port: http}"), any_proto(Port::Named("http".into())));
        assert_eq!(
            port("{port: '8000', endPort: 8099}"),
            any_proto(Port::Range {
                port: 8000,
                end: 8099
            })
        );
        assert_eq!(
            port("{port: '8000', endPort: 0}"),
            any_proto(Port::Range {
                port: 8000,
                end: 8000
            })
        );
    }

    #[test]
    fn protocols_are_tcp_udp_sctp_icmp_or_any() {
        for (text, protocol) in [
            ("TCP", Protocol::Tcp),
            ("UDP", Protocol::Udp),
            ("SCTP", Protocol::Sctp),
            ("ICMP", Protocol::Icmp),
            ("ANY", Protocol::Any),
        ] {
            assert_eq!(
                port(&format!("{{port: '1', protocol: {text}}}")).protocol,
                protocol
            );
        }
    }

    #[test]
    fn invalid_ports_are_rejected_with_their_path() {
        let at = |field: &str| format!("spec.ingress[0].toPorts[0].ports[0].{field}");
        let cases = [
            ("{port: '65536'}", "port", "out of range"),
            ("{port: '99999999999999999999999'}", "port", "out of range"),
            ("{port: -1}", "port", "out of range"),
            ("{port: Web}", "port", "lowercase"),
            (
                "{port: http, endPort: 90}",
                "endPort",
                "requires a numeric port",
            ),
            ("{endPort: 90}", "endPort", "requires a numeric port"),
            (
                "{port: '90', endPort: 89}",
                "endPort",
                "between port 90 and 65535",
            ),
            (
                "{port: '90', protocol: tcp}",
                "protocol",
                "unknown protocol \"tcp\"",
            ),
            (
                "{port: '90', protocol: ICMPv6}",
                "protocol",
                "IPv6 is not supported yet",
            ),
        ];
        for (port, field, needle) in cases {
            let err = err_with(&format!(
                "  ingress:\n  - toPorts:\n    - ports:\n      - {port}\n"
            ));
            assert_err(&err, 1, Some(&at(field)), needle);
        }
    }

    #[test]
    fn http_rules_make_an_l7_rule() {
        let rules = ingress(
            "  - toPorts:\n    - ports: [{port: '80'}]\n      rules:\n        http:\n        - method: GET\n          path: /api/.*\n          host: api.example.com\n          headers: ['X-Team: a']\n          headerMatches: [{name: X-Env, value: prod}]\n",
        );
        assert_eq!(
            rules[0].http,
            Some(vec![HttpRule {
                method: Some("GET".into()),
                path: Some("/api/.*".into()),
                host: Some("api.example.com".into()),
                headers: vec![
                    HeaderMatch {
                        name: "X-Team".into(),
                        value: Some("a".into())
                    },
                    HeaderMatch {
                        name: "X-Env".into(),
                        value: Some("prod".into())
                    },
                ],
                upgrades: vec![],
            }])
        );
    }

    const UPGRADES: &str = "  ingress:\n  - toPorts:\n    - ports: [{port: '80'}]\n      rules:\n        http:\n        - {path: /attach, upgrades: [SPDY/3.1, websocket]}\n";

    #[test]
    fn palisade_http_rules_may_list_upgrades() {
        let spec = spec_with(UPGRADES);
        assert_eq!(
            spec.ingress.allow[0].http,
            Some(vec![HttpRule {
                path: Some("/attach".into()),
                upgrades: vec!["spdy/3.1".into(), "websocket".into()],
                ..HttpRule::default()
            }])
        );
    }

    #[test]
    fn cilium_http_rules_have_no_upgrades_field() {
        for (api, kind) in [
            ("cilium.io/v2", "CiliumNetworkPolicy"),
            ("cilium.io/v2", "CiliumClusterwideNetworkPolicy"),
        ] {
            let yaml = format!(
                "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{}}\n{UPGRADES}"
            );
            let err = parse_err(&yaml);
            assert_eq!(
                err.field.as_deref(),
                Some("spec.ingress[0].toPorts[0].rules.http[0].upgrades"),
                "{err}"
            );
            assert!(err.reason.starts_with("unknown field `upgrades`"), "{err}");
        }
    }

    #[test]
    fn a_bad_upgrade_protocol_names_its_field() {
        let err = err_with(&UPGRADES.replace("SPDY/3.1", "'spdy 3'"));
        assert_eq!(
            err.field.as_deref(),
            Some("spec.ingress[0].toPorts[0].rules.http[0].upgrades[0]"),
            "{err}"
        );
        assert!(err.reason.starts_with("invalid upgrade protocol"), "{err}");
        let err = err_with(&UPGRADES.replace("SPDY/3.1", "h2c"));
        assert!(err.reason.contains("never honoured"), "{err}");
    }

    #[test]
    fn empty_http_list_allows_all_http_while_no_http_is_plain_l4() {
        let rules = ingress("  - toPorts: [{ports: [{port: '80'}], rules: {http: []}}]\n");
        assert_eq!(rules[0].http, Some(vec![]));
        let rules = ingress("  - toPorts: [{ports: [{port: '80'}], rules: {}}]\n");
        assert_eq!(rules[0].http, None);
        let rules = ingress("  - toPorts: [{ports: [{port: '80'}], rules: {http: [{}]}}]\n");
        assert_eq!(rules[0].http, Some(vec![HttpRule::default()]));
    }

    #[test]
    fn invalid_http_regex_names_its_field() {
        let err = err_with(
            "  ingress:\n  - toPorts: [{ports: [{port: '80'}], rules: {http: [{}, {path: '/a/(b'}]}}]\n",
        );
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].toPorts[0].rules.http[1].path"),
            "path \"/a/(b\" is not a valid regular expression",
        );
    }

    #[test]
    fn http_rules_need_tcp_ports() {
        let err = err_with(
            "  ingress:\n  - toPorts: [{ports: [{port: '80', protocol: TCP}, {port: '53', protocol: UDP}], rules: {http: []}}]\n",
        );
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].toPorts[0].ports[1].protocol"),
            "HTTP rules apply only to TCP",
        );
    }

    fn egress(rules: &str) -> Vec<Rule> {
        spec_with(&format!("  egress:\n{rules}")).egress.allow
    }

    #[test]
    fn to_fqdns_selectors_become_fqdn_peers() {
        let rules = egress(
            "  - toFQDNs: [{matchName: API.Example.com.}, {matchPattern: '*.cdn.test'}]\n    toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n",
        );
        assert_eq!(
            rules[0].peers,
            Peers::Some(vec![
                Peer::Fqdn(FqdnSelector::MatchName("api.example.com".into())),
                Peer::Fqdn(FqdnSelector::MatchPattern("*.cdn.test".into())),
            ])
        );
    }

    #[test]
    fn dns_rules_are_read_on_their_ports() {
        let rules = egress(
            "  - toEndpoints: [{matchLabels: {k8s-app: kube-dns}}]\n    toPorts:\n    - ports: [{port: '53', protocol: ANY}]\n      rules:\n        dns: [{matchPattern: '*'}, {matchName: a.test}]\n",
        );
        assert_eq!(
            rules[0].dns,
            Some(vec![
                FqdnSelector::MatchPattern("*".into()),
                FqdnSelector::MatchName("a.test".into()),
            ])
        );
        assert_eq!(rules[0].http, None);
    }

    #[test]
    fn bad_fqdn_selectors_name_their_field() {
        let err = err_with("  egress:\n  - toFQDNs: [{matchName: 'a..b'}]\n");
        assert_err(
            &err,
            1,
            Some("spec.egress[0].toFQDNs[0].matchName"),
            "is not a DNS name: the name has an empty label",
        );
        let err = err_with("  egress:\n  - toFQDNs: [{matchName: a, matchPattern: b}]\n");
        assert_err(
            &err,
            1,
            Some("spec.egress[0].toFQDNs[0]"),
            "either matchName or matchPattern",
        );
        let err = err_with("  egress:\n  - toFQDNs: [{}]\n");
        assert_err(&err, 1, Some("spec.egress[0].toFQDNs[0]"), "is required");
        let err = err_with("  egress:\n  - toFQDNs: [{matchRegex: a}]\n");
        assert_err(
            &err,
            1,
            Some("spec.egress[0].toFQDNs[0].matchRegex"),
            "unknown field",
        );
        let err = err_with(
            "  egress:\n  - toPorts: [{ports: [{port: '53'}], rules: {dns: [{matchPattern: 'a b'}]}}]\n",
        );
        assert_err(
            &err,
            1,
            Some("spec.egress[0].toPorts[0].rules.dns[0].matchPattern"),
            "character ' ' cannot appear",
        );
    }

    #[test]
    fn dns_rules_on_ingress_are_rejected_by_name() {
        let err = err_with(
            "  ingress:\n  - toPorts: [{ports: [{port: '53', protocol: UDP}], rules: {dns: [{matchPattern: '*'}]}}]\n",
        );
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].toPorts[0].rules.dns"),
            "rules.dns on ingress",
        );
    }

    #[test]
    fn dns_rules_need_udp_or_tcp_port_numbers() {
        let err = err_with(
            "  egress:\n  - toPorts: [{ports: [{port: '53', protocol: SCTP}], rules: {dns: []}}]\n",
        );
        assert_err(
            &err,
            1,
            Some("spec.egress[0].toPorts[0].ports[0].protocol"),
            "DNS rules apply only to UDP and TCP",
        );
        let err = err_with("  egress:\n  - toPorts: [{rules: {dns: []}}]\n");
        assert_err(
            &err,
            1,
            Some("spec.egress[0].toPorts[0].ports"),
            "DNS rules need the port numbers",
        );
        let err = err_with(
            "  egress:\n  - toPorts: [{ports: [{port: '53'}], rules: {dns: [], http: []}}]\n",
        );
        assert_err(
            &err,
            1,
            Some("spec.egress[0].toPorts[0].rules.dns"),
            "both HTTP and DNS",
        );
    }

    #[test]
    fn to_fqdns_in_egress_deny_is_refused() {
        let err = err_with("  egressDeny:\n  - toFQDNs: [{matchName: a.test}]\n");
        assert_err(
            &err,
            1,
            Some("spec.egressDeny[0].toFQDNs"),
            "not supported by palisade",
        );
    }

    #[test]
    fn other_l7_protocols_are_not_supported() {
        for (field, value) in [("kafka", "[]"), ("l7proto", "x"), ("l7", "[]")] {
            let err = err_with(&format!(
                "  egress:\n  - toPorts: [{{ports: [{{port: '53'}}], rules: {{{field}: {value}}}}}]\n"
            ));
            assert_err(
                &err,
                1,
                Some(&format!("spec.egress[0].toPorts[0].rules.{field}")),
                &format!("{field} is not supported by palisade"),
            );
        }
    }

    #[test]
    fn tls_and_listener_port_rule_fields_are_not_supported() {
        for field in [
            "terminatingTLS",
            "originatingTLS",
            "serverNames",
            "listener",
        ] {
            let err = err_with(&format!(
                "  ingress:\n  - toPorts: [{{ports: [{{port: '443'}}], {field}: x}}]\n"
            ));
            assert_err(
                &err,
                1,
                Some(&format!("spec.ingress[0].toPorts[0].{field}")),
                &format!("{field} is not supported by palisade"),
            );
        }
    }

    #[test]
    fn unsupported_cilium_peer_fields_are_named() {
        for field in ["fromRequires", "fromGroups", "fromNodes", "authentication"] {
            let err = err_with(&format!("  ingress:\n  - {field}: x\n"));
            assert_err(
                &err,
                1,
                Some(&format!("spec.ingress[0].{field}")),
                &format!("{field} is not supported by palisade"),
            );
        }
        for field in [
            "toRequires",
            "toServices",
            "toGroups",
            "toNodes",
            "authentication",
        ] {
            let err = err_with(&format!("  egress:\n  - {{}}\n  - {field}: x\n"));
            assert_err(
                &err,
                1,
                Some(&format!("spec.egress[1].{field}")),
                &format!("{field} is not supported by palisade"),
            );
        }
        let err = err_with("  ingressDeny:\n  - fromRequires: []\n");
        assert_err(
            &err,
            1,
            Some("spec.ingressDeny[0].fromRequires"),
            "not supported by palisade",
        );
    }

    #[test]
    fn unknown_field_is_rejected_with_its_path() {
        let cases = [
            (
                "  ingress:\n  - fromEndpoint: []\n",
                "spec.ingress[0].fromEndpoint",
            ),
            (
                "  egress:\n  - fromEndpoints: []\n",
                "spec.egress[0].fromEndpoints",
            ),
            (
                "  ingress:\n  - toPorts: [{ports: [{port: '80', proto: TCP}]}]\n",
                "spec.ingress[0].toPorts[0].ports[0].proto",
            ),
            (
                "  ingress:\n  - toPorts: [{rules: {http: [{methods: GET}]}}]\n",
                "spec.ingress[0].toPorts[0].rules.http[0].methods",
            ),
            (
                "  enableDefaultDeny: {ingres: true}\n",
                "spec.enableDefaultDeny.ingres",
            ),
            ("  podSelector: {}\n", "spec.podSelector"),
            (
                "  ingress:\n  - icmps: [{fields: [{type: 8, code: 0}]}]\n",
                "spec.ingress[0].icmps[0].fields[0].code",
            ),
        ];
        for (rules, field) in cases {
            let err = err_with(rules);
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
            assert!(err.reason.starts_with("unknown field"), "{err}");
        }
    }

    #[test]
    fn deny_rules_go_to_deny_and_enable_default_deny() {
        let spec = spec_with(
            "  ingressDeny:\n  - fromEntities: [world]\n    toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n  egressDeny:\n  - toCIDR: [169.254.169.254]\n",
        );
        assert!(spec.ingress.default_deny);
        assert!(spec.ingress.allow.is_empty());
        assert_eq!(
            spec.ingress.deny,
            vec![Rule {
                peers: Peers::Some(vec![Peer::Entity(Entity::World)]),
                ports: vec![tcp(22)],
                http: None,
                dns: None,
            }]
        );
        assert!(spec.egress.default_deny);
        assert_eq!(
            spec.egress.deny,
            vec![Rule {
                peers: Peers::Some(vec![Peer::Cidr {
                    cidr: net("169.254.169.254/32"),
                    except: vec![]
                }]),
                ports: vec![],
                http: None,
                dns: None,
            }]
        );
    }

    #[test]
    fn l7_rules_in_deny_rules_are_rejected() {
        let err =
            err_with("  egressDeny:\n  - toPorts: [{ports: [{port: '80'}], rules: {http: []}}]\n");
        assert_err(
            &err,
            1,
            Some("spec.egressDeny[0].toPorts[0].rules"),
            "not allowed in deny rules",
        );
    }

    #[test]
    fn icmps_work_in_deny_rules() {
        let spec = spec_with("  egressDeny:\n  - icmps: [{fields: [{type: 8}]}]\n");
        assert_eq!(
            spec.egress.deny,
            vec![Rule {
                peers: Peers::All,
                ports: vec![icmp(8)],
                http: None,
                dns: None,
            }]
        );
    }

    #[test]
    fn enable_default_deny_overrides_the_default() {
        let spec = spec_with(
            "  enableDefaultDeny: {ingress: false}\n  ingress:\n  - fromEntities: [world]\n",
        );
        assert!(!spec.ingress.default_deny);
        assert_eq!(spec.ingress.allow.len(), 1);
        let spec = spec_with("  enableDefaultDeny: {egress: true}\n");
        assert!(spec.egress.default_deny);
        assert!(!spec.ingress.default_deny);
        let spec = spec_with("  enableDefaultDeny: {}\n  egress:\n  - {}\n");
        assert!(spec.egress.default_deny);
    }

    #[test]
    fn empty_rule_lists_do_not_enable_default_deny() {
        let spec = spec_with("  ingress: []\n  ingressDeny: []\n  egress: []\n");
        assert_eq!(spec.ingress, DirectionPolicy::default());
        assert_eq!(spec.egress, DirectionPolicy::default());
    }

    #[test]
    fn egress_peer_fields_mirror_ingress() {
        let rules = spec_with(
            "  egress:\n  - toEndpoints: [{matchLabels: {app: db}}]\n    toCIDR: [10.0.0.1]\n    toEntities: [kube-apiserver]\n    toPorts: [{ports: [{port: '5432', protocol: TCP}]}]\n",
        )
        .egress
        .allow;
        assert_eq!(
            rules,
            vec![Rule {
                peers: Peers::Some(vec![
                    Peer::Endpoints(labels_in("demo", &[("app", "db")])),
                    Peer::Cidr {
                        cidr: net("10.0.0.1/32"),
                        except: vec![]
                    },
                    Peer::Entity(Entity::KubeApiserver),
                ]),
                ports: vec![tcp(5432)],
                http: None,
                dns: None,
            }]
        );
    }

    #[test]
    fn clusterwide_peer_selectors_are_not_restricted() {
        let spec = parse_spec(&clusterwide(
            "  endpointSelector: {}\n  egress:\n  - toEndpoints: [{}]\n",
        ));
        assert_eq!(spec.subject, EndpointSelector(LabelSelector::everything()));
        assert_eq!(
            spec.egress.allow[0].peers,
            Peers::Some(vec![Peer::Endpoints(EndpointSelector(
                LabelSelector::everything()
            ))])
        );
    }
}
