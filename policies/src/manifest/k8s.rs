//! `networking.k8s.io/v1` NetworkPolicy, with upstream semantics.

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::cidr::{BareAddress, parse_cidr, parse_except};
use super::error::{FieldPath, Invalid, Problem};
use super::meta::{ObjectMeta, Scope, object_id};
use super::ports::{IntOrString, end_port, port_number, validate_port_name};
use super::selector::{KeySyntax, LabelSelectorDoc, and, in_namespace, in_some_namespace};
use crate::labels::NAMESPACE_LABELS_PREFIX;
use crate::model::{
    DirectionPolicy, EndpointSelector, Peer, Peers, Policy, PolicyKind, PolicyRef, PolicySpec,
    Port, PortSpec, Protocol, Rule,
};

/// The whole object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NetworkPolicyDoc {
    /// Already dispatched on by the caller.
    #[serde(rename = "apiVersion")]
    _api_version: IgnoredAny,
    #[serde(rename = "kind")]
    _kind: IgnoredAny,
    metadata: Option<ObjectMeta>,
    spec: Option<SpecDoc>,
    #[serde(rename = "status")]
    _status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SpecDoc {
    pod_selector: Option<LabelSelectorDoc>,
    policy_types: Option<Vec<String>>,
    ingress: Option<Vec<IngressRuleDoc>>,
    egress: Option<Vec<EgressRuleDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngressRuleDoc {
    from: Option<Vec<PeerDoc>>,
    ports: Option<Vec<PortDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressRuleDoc {
    to: Option<Vec<PeerDoc>>,
    ports: Option<Vec<PortDoc>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PeerDoc {
    pod_selector: Option<LabelSelectorDoc>,
    namespace_selector: Option<LabelSelectorDoc>,
    ip_block: Option<IpBlockDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpBlockDoc {
    cidr: String,
    except: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortDoc {
    protocol: Option<String>,
    port: Option<IntOrString>,
    end_port: Option<i64>,
}

/// One rule of either direction: its peers (`from` or `to`) and ports.
struct RuleDoc<'a> {
    peers_field: &'static str,
    peers: Option<&'a [PeerDoc]>,
    ports: Option<&'a [PortDoc]>,
}

pub(crate) fn translate(doc: NetworkPolicyDoc) -> Result<Policy, Invalid> {
    let id = object_id(doc.metadata, Scope::Namespaced)?;
    // object_id always gives namespaced objects a namespace.
    let namespace = id.namespace.clone().unwrap_or_default();
    let spec_path = FieldPath::root().key("spec");
    let spec = doc
        .spec
        .ok_or_else(|| spec_path.invalid(Problem::Required("spec")))?;
    let spec = translate_spec(&spec, &namespace, &spec_path)?;
    Ok(Policy {
        id: PolicyRef {
            kind: PolicyKind::KubernetesNetworkPolicy,
            namespace: id.namespace,
            name: id.name,
        },
        specs: vec![spec],
        audit: id.audit,
    })
}

fn translate_spec(
    spec: &SpecDoc,
    namespace: &str,
    path: &FieldPath,
) -> Result<PolicySpec, Invalid> {
    let selector_path = path.key("podSelector");
    let pod_selector = spec
        .pod_selector
        .as_ref()
        .ok_or_else(|| selector_path.invalid(Problem::Required("podSelector")))?
        .to_selector(KeySyntax::Kubernetes, &selector_path)?;
    let ingress_rules: Vec<RuleDoc> = spec
        .ingress
        .iter()
        .flatten()
        .map(|r| RuleDoc {
            peers_field: "from",
            peers: r.from.as_deref(),
            ports: r.ports.as_deref(),
        })
        .collect();
    let egress_rules: Vec<RuleDoc> = spec
        .egress
        .iter()
        .flatten()
        .map(|r| RuleDoc {
            peers_field: "to",
            peers: r.to.as_deref(),
            ports: r.ports.as_deref(),
        })
        .collect();
    let (ingress_on, egress_on) =
        policy_types(spec.policy_types.as_deref(), !egress_rules.is_empty(), path)?;
    Ok(PolicySpec {
        subject: EndpointSelector(in_namespace(pod_selector, namespace)),
        ingress: direction(&ingress_rules, ingress_on, namespace, &path.key("ingress"))?,
        egress: direction(&egress_rules, egress_on, namespace, &path.key("egress"))?,
        description: None,
    })
}

/// Which directions the policy governs: `policyTypes` if given, else Ingress always and Egress
/// when egress rules exist (upstream defaulting).
fn policy_types(
    types: Option<&[String]>,
    has_egress_rules: bool,
    path: &FieldPath,
) -> Result<(bool, bool), Invalid> {
    let types = types.unwrap_or_default();
    if types.is_empty() {
        return Ok((true, has_egress_rules));
    }
    let (mut ingress, mut egress) = (false, false);
    for (i, t) in types.iter().enumerate() {
        match t.as_str() {
            "Ingress" => ingress = true,
            "Egress" => egress = true,
            _ => {
                return Err(path
                    .key("policyTypes")
                    .index(i)
                    .invalid(Problem::UnknownPolicyType(t.clone())));
            }
        }
    }
    Ok((ingress, egress))
}

/// Rules of a direction the policy does not govern are still validated (the API server would
/// reject them too) but have no effect.
fn direction(
    rules: &[RuleDoc],
    governed: bool,
    namespace: &str,
    path: &FieldPath,
) -> Result<DirectionPolicy, Invalid> {
    let allow = rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(r, namespace, &path.index(i)))
        .collect::<Result<Vec<_>, _>>()?;
    if !governed {
        return Ok(DirectionPolicy::default());
    }
    Ok(DirectionPolicy {
        default_deny: true,
        allow,
        deny: vec![],
    })
}

fn rule(doc: &RuleDoc, namespace: &str, path: &FieldPath) -> Result<Rule, Invalid> {
    let peers_path = path.key(doc.peers_field);
    let peers = match doc.peers.unwrap_or_default() {
        [] => Peers::All,
        peers => Peers::Some(
            peers
                .iter()
                .enumerate()
                .map(|(i, p)| peer(p, namespace, &peers_path.index(i)))
                .collect::<Result<_, _>>()?,
        ),
    };
    let ports_path = path.key("ports");
    let ports = doc
        .ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, p)| port(p, &ports_path.index(i)))
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        peers,
        ports,
        http: None,
    })
}

fn peer(doc: &PeerDoc, namespace: &str, path: &FieldPath) -> Result<Peer, Invalid> {
    match (&doc.pod_selector, &doc.namespace_selector, &doc.ip_block) {
        (None, None, None) => Err(path.invalid(Problem::EmptyPeer)),
        (None, None, Some(block)) => ip_block(block, &path.key("ipBlock")),
        (_, _, Some(_)) => Err(path.invalid(Problem::IpBlockWithSelector)),
        (Some(pods), None, None) => {
            let pods = pods.to_selector(KeySyntax::Kubernetes, &path.key("podSelector"))?;
            Ok(Peer::Endpoints(EndpointSelector(in_namespace(
                pods, namespace,
            ))))
        }
        (pods, Some(namespaces), None) => {
            let namespaces = namespaces
                .to_selector(KeySyntax::Kubernetes, &path.key("namespaceSelector"))?
                .prefixed(NAMESPACE_LABELS_PREFIX);
            let selector = match pods {
                Some(pods) => and(
                    pods.to_selector(KeySyntax::Kubernetes, &path.key("podSelector"))?,
                    namespaces,
                ),
                None => namespaces,
            };
            // Only workloads that belong to a namespace are namespace-selected.
            Ok(Peer::Endpoints(EndpointSelector(
                selector.with_requirement(in_some_namespace()),
            )))
        }
    }
}

fn ip_block(doc: &IpBlockDoc, path: &FieldPath) -> Result<Peer, Invalid> {
    let cidr =
        parse_cidr(&doc.cidr, BareAddress::Rejected).map_err(|p| path.key("cidr").invalid(p))?;
    let except_path = path.key("except");
    let except = doc
        .except
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, e)| {
            parse_except(cidr, e, BareAddress::Rejected)
                .map_err(|p| except_path.index(i).invalid(p))
        })
        .collect::<Result<_, _>>()?;
    Ok(Peer::Cidr { cidr, except })
}

fn port(doc: &PortDoc, path: &FieldPath) -> Result<PortSpec, Invalid> {
    let protocol = match doc.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(text) => protocol(text).map_err(|p| path.key("protocol").invalid(p))?,
    };
    let port = match (&doc.port, doc.end_port) {
        (None, None) => Port::Any,
        (Some(IntOrString::Str(name)), None) => {
            validate_port_name(name).map_err(|p| path.key("port").invalid(p))?;
            Port::Named(name.clone())
        }
        (Some(IntOrString::Int(n)), end) => {
            let port = port_number(*n).map_err(|p| path.key("port").invalid(p))?;
            let end = match end {
                Some(end) => end_port(port, end).map_err(|p| path.key("endPort").invalid(p))?,
                None => port,
            };
            Port::Range { port, end }
        }
        (_, Some(_)) => {
            return Err(path
                .key("endPort")
                .invalid(Problem::EndPortWithoutNumericPort));
        }
    };
    Ok(PortSpec { protocol, port })
}

/// Kubernetes' Protocol enum is case-sensitive.
fn protocol(text: &str) -> Result<Protocol, Problem> {
    match text {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        _ => Err(Problem::UnknownProtocol {
            value: text.to_string(),
            expected: "TCP, UDP or SCTP",
        }),
    }
}

#[cfg(test)]
mod tests {
    use ipnetwork::Ipv4Network;

    use super::super::test_support::*;
    use crate::labels::{LabelSelector, NAMESPACE_LABEL, Operator, Requirement};
    use crate::model::{
        DirectionPolicy, EndpointSelector, Peer, Peers, PolicyKind, Port, PortSpec, Protocol, Rule,
    };

    /// A NetworkPolicy in namespace demo with `spec` (indented YAML lines under `spec:`).
    fn policy(spec: &str) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: demo\nspec:\n{spec}"
        )
    }

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn exists(key: &str) -> Requirement {
        Requirement {
            key: key.into(),
            operator: Operator::Exists,
            values: std::collections::BTreeSet::default(),
        }
    }

    fn allow_all_rule() -> Rule {
        Rule {
            peers: Peers::All,
            ports: vec![],
            http: None,
        }
    }

    /// The ingress rules of a policy whose spec is `podSelector: {}` plus `ingress` lines.
    fn ingress_rules(ingress: &str) -> Vec<Rule> {
        parse_spec(&policy(&format!(
            "  podSelector: {{}}\n  ingress:\n{ingress}"
        )))
        .ingress
        .allow
    }

    fn single_peer(ingress: &str) -> Peer {
        match ingress_rules(ingress).as_slice() {
            [
                Rule {
                    peers: Peers::Some(peers),
                    ..
                },
            ] if peers.len() == 1 => peers[0].clone(),
            other => panic!("expected one rule with one peer, got {other:?}"),
        }
    }

    fn egress_ports(ports: &str) -> Vec<PortSpec> {
        let spec = parse_spec(&policy(&format!(
            "  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n{ports}"
        )));
        spec.egress.allow[0].ports.clone()
    }

    #[test]
    fn empty_pod_selector_denies_all_ingress_of_every_pod_in_the_namespace() {
        let policy = parse_one(&policy("  podSelector: {}\n"));
        assert_eq!(policy.id.kind, PolicyKind::KubernetesNetworkPolicy);
        assert_eq!(policy.id.namespace.as_deref(), Some("demo"));
        assert_eq!(policy.id.name, "p");
        let spec = &policy.specs[0];
        assert_eq!(spec.subject, labels_in("demo", &[]));
        assert_eq!(
            spec.ingress,
            DirectionPolicy {
                default_deny: true,
                allow: vec![],
                deny: vec![]
            }
        );
        assert_eq!(spec.egress, DirectionPolicy::default());
        assert_eq!(spec.description, None);
    }

    #[test]
    fn namespace_defaults_to_default() {
        let yaml = policy("  podSelector: {}\n").replace("  namespace: demo\n", "");
        let policy = parse_one(&yaml);
        assert_eq!(policy.id.namespace.as_deref(), Some("default"));
        assert_eq!(policy.specs[0].subject, labels_in("default", &[]));
    }

    #[test]
    fn pod_selector_is_restricted_to_the_policy_namespace() {
        let spec = parse_spec(&policy(
            "  podSelector:\n    matchLabels: {app: db}\n    matchExpressions: [{key: tier, operator: NotIn, values: [test]}]\n",
        ));
        let mut expected = labels(&[("app", "db"), (NAMESPACE_LABEL, "demo")]);
        expected.match_expressions.push(Requirement {
            key: "tier".into(),
            operator: Operator::NotIn,
            values: ["test".to_string()].into(),
        });
        assert_eq!(spec.subject, EndpointSelector(expected));
    }

    #[test]
    fn pod_selector_is_required() {
        let err = parse_err(&policy("  ingress: []\n"));
        assert_err(&err, 1, Some("spec.podSelector"), "podSelector is required");
        let err = parse_err(&policy("  podSelector:\n"));
        assert_err(&err, 1, Some("spec.podSelector"), "podSelector is required");
        let err = parse_err(&policy("").replace("spec:\n", ""));
        assert_err(&err, 1, Some("spec"), "spec is required");
    }

    #[test]
    fn invalid_metadata_names_are_rejected() {
        let err = parse_err(&policy("  podSelector: {}\n").replace("name: p", "name: P"));
        assert_err(&err, 1, Some("metadata.name"), "DNS-1123 subdomain");
        let err = parse_err(
            &policy("  podSelector: {}\n").replace("namespace: demo", "namespace: de.mo"),
        );
        assert_err(&err, 1, Some("metadata.namespace"), "DNS-1123 label");
        let err = parse_err(&policy("  podSelector: {}\n").replace("  name: p\n", ""));
        assert_err(&err, 1, Some("metadata.name"), "name is required");
    }

    #[test]
    fn empty_rule_allows_all_peers_on_all_ports() {
        assert_eq!(ingress_rules("  - {}\n"), vec![allow_all_rule()]);
        assert_eq!(
            ingress_rules("  - from: []\n    ports: []\n"),
            vec![allow_all_rule()]
        );
    }

    #[test]
    fn empty_ingress_list_allows_nothing() {
        let spec = parse_spec(&policy("  podSelector: {}\n  ingress: []\n"));
        assert!(spec.ingress.default_deny);
        assert!(spec.ingress.allow.is_empty());
    }

    #[test]
    fn pod_selector_alone_selects_pods_in_the_policy_namespace() {
        let peer = single_peer("  - from:\n    - podSelector: {matchLabels: {app: web}}\n");
        assert_eq!(peer, Peer::Endpoints(labels_in("demo", &[("app", "web")])));
        let peer = single_peer("  - from:\n    - podSelector: {}\n");
        assert_eq!(peer, Peer::Endpoints(labels_in("demo", &[])));
    }

    #[test]
    fn namespace_selector_alone_selects_all_pods_in_matching_namespaces() {
        let peer = single_peer("  - from:\n    - namespaceSelector: {matchLabels: {team: a}}\n");
        let expected = labels(&[("io.cilium.k8s.namespace.labels.team", "a")])
            .with_requirement(exists(NAMESPACE_LABEL));
        assert_eq!(peer, Peer::Endpoints(EndpointSelector(expected)));
    }

    #[test]
    fn empty_namespace_selector_selects_all_pods_in_all_namespaces() {
        let peer = single_peer("  - from:\n    - namespaceSelector: {}\n");
        let expected = LabelSelector::default().with_requirement(exists(NAMESPACE_LABEL));
        assert_eq!(peer, Peer::Endpoints(EndpointSelector(expected)));
    }

    #[test]
    fn namespace_selector_expressions_are_prefixed_too() {
        let peer = single_peer(
            "  - from:\n    - namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [prod]}]}\n",
        );
        let Peer::Endpoints(EndpointSelector(s)) = peer else {
            panic!("{peer:?}")
        };
        assert_eq!(
            s.match_expressions[0].key,
            "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"
        );
        assert_eq!(s.match_expressions[1], exists(NAMESPACE_LABEL));
    }

    #[test]
    fn pod_and_namespace_selector_in_one_peer_are_anded() {
        let peer = single_peer(
            "  - from:\n    - podSelector: {matchLabels: {app: web}}\n      namespaceSelector: {matchLabels: {team: a}}\n",
        );
        let expected = labels(&[("app", "web"), ("io.cilium.k8s.namespace.labels.team", "a")])
            .with_requirement(exists(NAMESPACE_LABEL));
        assert_eq!(peer, Peer::Endpoints(EndpointSelector(expected)));
    }

    #[test]
    fn pod_and_namespace_selector_in_separate_peers_are_ored() {
        let rules = ingress_rules(
            "  - from:\n    - podSelector: {matchLabels: {app: web}}\n    - namespaceSelector: {matchLabels: {team: a}}\n",
        );
        let Peers::Some(peers) = &rules[0].peers else {
            panic!()
        };
        assert_eq!(peers.len(), 2);
    }

    #[test]
    fn empty_peer_is_rejected() {
        let err = parse_err(&policy(
            "  podSelector: {}\n  ingress:\n  - from:\n    - {}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].from[0]"),
            "must set ipBlock, or podSelector",
        );
    }

    #[test]
    fn ip_block_combined_with_a_selector_is_rejected() {
        for selector in ["podSelector", "namespaceSelector"] {
            let err = parse_err(&policy(&format!(
                "  podSelector: {{}}\n  egress:\n  - to:\n    - ipBlock: {{cidr: 10.0.0.0/8}}\n      {selector}: {{}}\n"
            )));
            assert_err(
                &err,
                1,
                Some("spec.egress[0].to[0]"),
                "ipBlock cannot be combined",
            );
        }
    }

    #[test]
    fn ip_block_becomes_a_cidr_peer_with_its_exceptions() {
        let peer = single_peer(
            "  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.0.0/16]}\n",
        );
        assert_eq!(
            peer,
            Peer::Cidr {
                cidr: net("10.0.0.0/8"),
                except: vec![net("10.1.0.0/16"), net("10.2.0.0/16")]
            }
        );
    }

    #[test]
    fn ip_block_host_bits_are_cleared() {
        let peer = single_peer(
            "  - from:\n    - ipBlock: {cidr: 192.168.1.77/24, except: [192.168.1.130/25]}\n",
        );
        assert_eq!(
            peer,
            Peer::Cidr {
                cidr: net("192.168.1.0/24"),
                except: vec![net("192.168.1.128/25")]
            }
        );
    }

    #[test]
    fn invalid_cidr_is_rejected_with_its_path() {
        let err = parse_err(&policy(
            "  podSelector: {}\n  ingress:\n  - from:\n    - podSelector: {}\n    - ipBlock: {cidr: 10.0.0.0/33}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].from[1].ipBlock.cidr"),
            "invalid CIDR \"10.0.0.0/33\"",
        );
        let err = parse_err(&policy(
            "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.1}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].from[0].ipBlock.cidr"),
            "/prefix",
        );
    }

    #[test]
    fn ipv6_ip_block_is_not_supported_yet() {
        let err = parse_err(&policy(
            "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 'fd00::/8'}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].from[0].ipBlock.cidr"),
            "IPv6 is not supported yet",
        );
    }

    #[test]
    fn except_outside_the_cidr_is_rejected() {
        for except in ["11.0.0.0/16", "10.0.0.0/8", "'fd00::/16'"] {
            let err = parse_err(&policy(&format!(
                "  podSelector: {{}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.0.0/16, {except}]}}\n"
            )));
            assert_eq!(
                err.field.as_deref(),
                Some("spec.ingress[0].from[0].ipBlock.except[1]"),
                "{err}"
            );
        }
        let err = parse_err(&policy(
            "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}\n",
        ));
        assert!(
            err.reason.contains("not strictly inside cidr 10.0.0.0/8"),
            "{err}"
        );
    }

    #[test]
    fn ip_block_cidr_is_required() {
        let err = parse_err(&policy(
            "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {except: []}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].from[0].ipBlock"),
            "missing field `cidr`",
        );
    }

    #[test]
    fn ports_default_to_tcp() {
        assert_eq!(
            egress_ports("    - port: 53\n    - {protocol: UDP, port: 53}\n    - protocol: SCTP\n"),
            vec![
                PortSpec {
                    protocol: Protocol::Tcp,
                    port: Port::Range { port: 53, end: 53 }
                },
                PortSpec {
                    protocol: Protocol::Udp,
                    port: Port::Range { port: 53, end: 53 }
                },
                PortSpec {
                    protocol: Protocol::Sctp,
                    port: Port::Any
                },
            ]
        );
    }

    #[test]
    fn end_port_makes_a_range() {
        assert_eq!(
            egress_ports("    - {port: 32000, endPort: 32768}\n    - {port: 80, endPort: 80}\n"),
            vec![
                PortSpec {
                    protocol: Protocol::Tcp,
                    port: Port::Range {
                        port: 32000,
                        end: 32768
                    }
                },
                PortSpec {
                    protocol: Protocol::Tcp,
                    port: Port::Range { port: 80, end: 80 }
                },
            ]
        );
    }

    #[test]
    fn named_port_is_kept_by_name() {
        assert_eq!(
            egress_ports("    - port: http-alt\n"),
            vec![PortSpec {
                protocol: Protocol::Tcp,
                port: Port::Named("http-alt".into())
            }]
        );
    }

    #[test]
    fn invalid_ports_are_rejected() {
        let cases = [
            (
                "    - port: 0\n",
                "spec.egress[0].ports[0].port",
                "out of range",
            ),
            (
                "    - port: 65536\n",
                "spec.egress[0].ports[0].port",
                "out of range",
            ),
            (
                "    - port: HTTP\n",
                "spec.egress[0].ports[0].port",
                "lowercase",
            ),
            (
                "    - port: '80'\n",
                "spec.egress[0].ports[0].port",
                "at least one letter",
            ),
            (
                "    - port: a--b\n",
                "spec.egress[0].ports[0].port",
                "\"--\"",
            ),
            (
                "    - {port: 80, protocol: ICMP}\n",
                "spec.egress[0].ports[0].protocol",
                "unknown protocol \"ICMP\"",
            ),
            (
                "    - {port: 80, protocol: tcp}\n",
                "spec.egress[0].ports[0].protocol",
                "unknown protocol \"tcp\"",
            ),
            (
                "    - {port: 80, endPort: 79}\n",
                "spec.egress[0].ports[0].endPort",
                "between port 80 and 65535",
            ),
            (
                "    - {port: 80, endPort: 65536}\n",
                "spec.egress[0].ports[0].endPort",
                "between port 80 and 65535",
            ),
            (
                "    - {port: http, endPort: 90}\n",
                "spec.egress[0].ports[0].endPort",
                "requires a numeric port",
            ),
            (
                "    - {endPort: 90}\n",
                "spec.egress[0].ports[0].endPort",
                "requires a numeric port",
            ),
            (
                "    - {port: 1.5}\n",
                "spec.egress[0].ports[0].port",
                "an integer or a string",
            ),
        ];
        for (ports, field, needle) in cases {
            let yaml = policy(&format!(
                "  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n{ports}"
            ));
            assert_err(&parse_err(&yaml), 1, Some(field), needle);
        }
    }

    #[test]
    fn rules_with_ports_and_peers_keep_both() {
        let rules = ingress_rules(
            "  - from:\n    - podSelector: {matchLabels: {app: web}}\n    ports:\n    - port: 5432\n",
        );
        assert_eq!(
            rules,
            vec![Rule {
                peers: Peers::Some(vec![Peer::Endpoints(labels_in("demo", &[("app", "web")]))]),
                ports: vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: Port::Range {
                        port: 5432,
                        end: 5432
                    }
                }],
                http: None,
            }]
        );
    }

    #[test]
    fn policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() {
        let spec = parse_spec(&policy("  podSelector: {}\n  egress:\n  - {}\n"));
        assert!(spec.ingress.default_deny);
        assert!(spec.egress.default_deny);
        assert_eq!(spec.egress.allow, vec![allow_all_rule()]);
        // An empty egress list is no egress rules: egress is not governed.
        let spec = parse_spec(&policy("  podSelector: {}\n  egress: []\n"));
        assert_eq!(spec.egress, DirectionPolicy::default());
        // Empty policyTypes is the same as absent.
        let spec = parse_spec(&policy("  podSelector: {}\n  policyTypes: []\n"));
        assert!(spec.ingress.default_deny);
        assert!(!spec.egress.default_deny);
    }

    #[test]
    fn egress_only_policy_leaves_ingress_alone() {
        let spec = parse_spec(&policy("  podSelector: {}\n  policyTypes: [Egress]\n"));
        assert_eq!(spec.ingress, DirectionPolicy::default());
        assert_eq!(
            spec.egress,
            DirectionPolicy {
                default_deny: true,
                allow: vec![],
                deny: vec![]
            }
        );
    }

    #[test]
    fn rules_of_a_direction_not_in_policy_types_are_ignored_but_validated() {
        let spec = parse_spec(&policy(
            "  podSelector: {}\n  policyTypes: [Egress]\n  ingress:\n  - {}\n",
        ));
        assert_eq!(spec.ingress, DirectionPolicy::default());
        let err = parse_err(&policy(
            "  podSelector: {}\n  policyTypes: [Egress]\n  ingress:\n  - from:\n    - ipBlock: {cidr: bogus}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].from[0].ipBlock.cidr"),
            "invalid CIDR",
        );
    }

    #[test]
    fn both_policy_types_govern_both_directions() {
        let spec = parse_spec(&policy(
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
        ));
        assert!(spec.ingress.default_deny && spec.egress.default_deny);
    }

    #[test]
    fn unknown_policy_type_is_named() {
        let err = parse_err(&policy(
            "  podSelector: {}\n  policyTypes: [Ingress, Both]\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.policyTypes[1]"),
            "unknown policy type \"Both\"",
        );
    }

    #[test]
    fn unknown_field_is_rejected_with_its_path() {
        let cases = [
            ("  podSelector: {}\n  ingres: []\n", "spec.ingres"),
            (
                "  podSelector: {matchLabel: {a: b}}\n",
                "spec.podSelector.matchLabel",
            ),
            (
                "  podSelector: {}\n  ingress:\n  - from:\n    - ipBlock: {cidr: 10.0.0.0/8, expect: []}\n",
                "spec.ingress[0].from[0].ipBlock.expect",
            ),
            (
                "  podSelector: {}\n  egress:\n  - from: []\n",
                "spec.egress[0].from",
            ),
            (
                "  podSelector: {}\n  ingress:\n  - ports:\n    - {port: 80, name: x}\n",
                "spec.ingress[0].ports[0].name",
            ),
            // Cilium fields are not Kubernetes fields.
            ("  endpointSelector: {}\n", "spec.endpointSelector"),
        ];
        for (spec, field) in cases {
            let err = parse_err(&policy(spec));
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
            assert!(err.reason.starts_with("unknown field"), "{err}");
        }
    }

    #[test]
    fn wrong_types_are_rejected_with_their_path() {
        let err = parse_err(&policy("  podSelector: {matchLabels: {version: 2}}\n"));
        assert_err(
            &err,
            1,
            Some("spec.podSelector.matchLabels.version"),
            "invalid type",
        );
        let err = parse_err(&policy("  podSelector: {}\n  ingress: {}\n"));
        assert_err(&err, 1, Some("spec.ingress"), "expected a sequence");
    }

    #[test]
    fn invalid_selectors_are_rejected_with_their_path() {
        let err = parse_err(&policy(
            "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchExpressions: [{key: team, operator: Equals, values: [a]}]}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator"),
            "\"Equals\"",
        );
        let err = parse_err(&policy("  podSelector: {matchLabels: {'k8s:app': web}}\n"));
        assert_err(
            &err,
            1,
            Some("spec.podSelector.matchLabels.k8s:app"),
            "label key \"k8s:app\" is invalid",
        );
        let err = parse_err(&policy(
            "  podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}\n",
        ));
        assert_err(
            &err,
            1,
            Some("spec.podSelector.matchExpressions[0].values"),
            "must not have values",
        );
    }

    #[test]
    fn a_pod_selector_naming_another_namespace_selects_nothing() {
        // Pod labels cannot carry another namespace in the flat identity labels, so upstream
        // semantics (a pod label that no pod here can have) is "nothing".
        let spec = parse_spec(&policy(
            "  podSelector: {matchLabels: {io.kubernetes.pod.namespace: other}}\n",
        ));
        let s = &spec.subject.0;
        assert_eq!(
            s.match_labels.get(NAMESPACE_LABEL).map(String::as_str),
            Some("other")
        );
        assert_eq!(s.match_expressions[0].key, NAMESPACE_LABEL);
        assert_eq!(s.match_expressions[0].operator, Operator::In);
    }
}
