//! Arbitrary bytes as a manifest, as `palisade policy apply -f` and the policy directory hand
//! them to the agent. Parsing must not panic, must be deterministic, and must reject with an
//! error that names its document on one line. An accepted manifest must compile, against a
//! small fixed cluster, into map state that keeps the promises the datapath and the proxy rely
//! on: every endpoint has an answer, deny beats allow whichever is more specific, namespaced
//! policies select only their namespace, redirects have HTTP rules behind them.
#![no_main]

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use palisade_policies::compile::{
    self, CompileInput, EnforcementMode, L7Policy, RuleTable, Settings,
};
use palisade_policies::endpoint::{Endpoint, EndpointId, LinkLayer, NamedPort};
use palisade_policies::fqdn::LearnedNames;
use palisade_policies::identity::{
    Identity, IdentityAllocator, IdentityTable, workload_identity_labels,
};
use palisade_policies::l7::{L7Matcher, ProxyPolicy, RequestView};
use palisade_policies::labels::{Labels, NAMESPACE_NAME_LABEL};
use palisade_policies::manifest::{ManifestError, parse_manifests};
use palisade_policies::mapstate::{Action, MapState, PolicyKey, PortPrefix, Verdict, diff};
use palisade_policies::model::{Direction, Policy, PolicyKind, PolicyRef};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const PROXY_PORT: u16 = 15001;
const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
/// Peers beside the endpoints: the node, and addresses outside the cluster.
const OTHER_PEERS: [Ipv4Addr; 3] = [
    HOST,
    Ipv4Addr::new(8, 8, 8, 8),
    Ipv4Addr::new(192, 168, 1, 1),
];
const PROTOCOLS: [u8; 3] = [TCP, UDP, ICMP];
const PORTS: [u16; 5] = [53, 80, 5432, 8080, 65535];

/// The namespaces and pods the examples, the demo and the conformance cases talk about.
struct Cluster {
    alloc: IdentityAllocator,
    endpoints: BTreeMap<EndpointId, Endpoint>,
    /// Identity labels of each endpoint.
    labels: BTreeMap<EndpointId, Labels>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn port(spec: &str) -> NamedPort {
    NamedPort::parse(spec).expect("a valid named port")
}

/// Namespace, name, pod labels, address, named ports.
type Pod = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    [u8; 4],
    Vec<NamedPort>,
);

static CLUSTER: LazyLock<Cluster> = LazyLock::new(|| {
    let namespaces: BTreeMap<&str, Labels> = [
        ("demo", labels(&[(NAMESPACE_NAME_LABEL, "demo")])),
        (
            "shop",
            labels(&[(NAMESPACE_NAME_LABEL, "shop"), ("team", "payments")]),
        ),
        ("x", labels(&[(NAMESPACE_NAME_LABEL, "x"), ("ns", "x")])),
        (
            "kube-system",
            labels(&[(NAMESPACE_NAME_LABEL, "kube-system")]),
        ),
    ]
    .into();
    let pods: [Pod; 6] = [
        (
            "demo",
            "frontend",
            &[("app", "frontend")],
            [10, 200, 0, 2],
            vec![port("http=80/TCP")],
        ),
        (
            "demo",
            "api",
            &[("app", "api")],
            [10, 200, 0, 3],
            vec![port("http=8080/TCP"), port("metrics=8081/TCP")],
        ),
        (
            "shop",
            "db",
            &[("app", "db"), ("tier", "data")],
            [10, 200, 0, 4],
            vec![port("postgres=5432/TCP")],
        ),
        (
            "shop",
            "backend",
            &[("app", "backend"), ("tier", "api")],
            [10, 200, 0, 5],
            vec![port("http=8080/TCP")],
        ),
        (
            "x",
            "a",
            &[("pod", "a")],
            [10, 200, 1, 10],
            vec![port("serve-80-tcp=80/TCP"), port("serve-80-udp=80/UDP")],
        ),
        (
            "kube-system",
            "dns",
            &[("k8s-app", "kube-dns")],
            [10, 200, 2, 53],
            vec![port("dns=53/UDP"), port("dns-tcp=53/TCP")],
        ),
    ];
    let mut alloc = IdentityAllocator::default();
    let mut endpoints = BTreeMap::new();
    let mut identity_labels = BTreeMap::new();
    for (n, (ns, name, pod_labels, ip, named_ports)) in (1..).zip(pods) {
        let l = workload_identity_labels(ns, &namespaces[ns], &labels(pod_labels));
        let identity = alloc.acquire(&l).expect("a workload identity");
        let id = EndpointId(n);
        endpoints.insert(
            id,
            Endpoint {
                id,
                name: name.to_string(),
                namespace: ns.to_string(),
                identity,
                ip: Ipv4Addr::from(ip),
                ifindex: 100 + n,
                named_ports,
                link: LinkLayer::default(),
            },
        );
        identity_labels.insert(id, l);
    }
    Cluster {
        alloc,
        endpoints,
        labels: identity_labels,
    }
});

fuzz_target!(|data: &[u8]| {
    let yaml = String::from_utf8_lossy(data);
    let parsed = parse_manifests(&yaml);
    assert_eq!(
        parsed,
        parse_manifests(&yaml),
        "parsing is not deterministic"
    );
    match parsed {
        Err(e) => check_error(&e),
        Ok(policies) => check_policies(&policies),
    }
});

/// The error names its document, reads as one line, and travels whole through the API's
/// JSON error body.
fn check_error(e: &ManifestError) {
    assert!(e.document >= 1, "{e:?}");
    let line = e.to_string();
    assert!(
        line.starts_with(&format!("document {}", e.document)),
        "{line:?}"
    );
    assert!(!line.contains('\n'), "not one line: {line:?}");
    let json = serde_json::to_string(e).expect("a ManifestError serializes");
    let back: ManifestError = serde_json::from_str(&json).expect("and deserializes");
    assert_eq!(&back, e);
}

struct Compiled {
    enforcement: EnforcementMode,
    state: MapState,
    l7: L7Policy,
    rules: RuleTable,
}

fn check_policies(policies: &[Policy]) {
    let mut by_id: BTreeMap<PolicyRef, Policy> = BTreeMap::new();
    for p in policies {
        assert_eq!(
            p.id.namespace.is_none(),
            p.id.kind == PolicyKind::ClusterwideNetworkPolicy,
            "{:?}",
            p.id
        );
        assert!(
            by_id.insert(p.id.clone(), p.clone()).is_none(),
            "policy {} accepted twice",
            p.id
        );
        let json = serde_json::to_string(p).expect("a policy serializes");
        let back: Policy = serde_json::from_str(&json).expect("and deserializes");
        assert_eq!(&back, p, "JSON round trip");
    }
    let cluster = &*CLUSTER;
    check_namespaces(cluster, policies);

    let mut alloc = cluster.alloc.clone();
    alloc
        .sync_cidrs(&compile::policy_cidrs(by_id.values()))
        .expect("a CIDR identity for every prefix");
    let identities = alloc.table();
    let run = |settings: Settings| {
        let input = CompileInput {
            endpoints: &cluster.endpoints,
            identities,
            policies: &by_id,
            host_addresses: &[HOST],
            remote: &BTreeMap::new(),
            fqdns: &LearnedNames::new(),
            settings,
        };
        let mut rules = RuleTable::default();
        let (state, l7) = compile::compile_with_l7(&input, &mut rules);
        rules.retain_used_with(&state, &l7);
        Compiled {
            enforcement: settings.enforcement,
            state,
            l7,
            rules,
        }
    };

    let settings = Settings {
        proxy_port: Some(PROXY_PORT),
        ..Settings::default()
    };
    let enforced = run(settings);
    let again = run(settings);
    assert_eq!(
        enforced.state, again.state,
        "compiling is not deterministic"
    );
    assert_eq!(enforced.l7, again.l7, "compiling is not deterministic");
    check_state(cluster, &by_id, &identities, &enforced);

    // Enforcement off: nothing in the policy map, everything allowed.
    let open = run(Settings {
        enforcement: EnforcementMode::Never,
        ..settings
    });
    assert!(open.state.policy.is_empty());
    assert!(open.l7.rules.is_empty());
    assert!(
        open.state
            .endpoints
            .values()
            .all(|e| !e.ingress_enforced && !e.egress_enforced)
    );
    assert_eq!(open.state.ipcache, enforced.state.ipcache);
    // The diff from one to the other, applied whole, is the other.
    let d = diff(&open.state, &enforced.state);
    let mut applied = open.state.clone();
    applied.apply_prefix(&d, d.len());
    assert_eq!(applied, enforced.state, "diff applied whole");

    let closed = run(Settings {
        enforcement: EnforcementMode::Always,
        ..settings
    });
    assert!(
        closed
            .state
            .endpoints
            .values()
            .all(|e| e.ingress_enforced && e.egress_enforced)
    );
    check_state(cluster, &by_id, &identities, &closed);
}

/// A namespaced policy selects endpoints of its own namespace only.
fn check_namespaces(cluster: &Cluster, policies: &[Policy]) {
    for p in policies {
        let Some(ns) = &p.id.namespace else {
            continue;
        };
        for spec in &p.specs {
            for ep in cluster.endpoints.values() {
                if spec.subject.0.matches(&cluster.labels[&ep.id]) {
                    assert_eq!(
                        &ep.namespace, ns,
                        "policy {} selects {}/{}",
                        p.id, ep.namespace, ep.name
                    );
                }
            }
        }
    }
}

struct Request;

impl RequestView for Request {
    fn method(&self) -> &'static str {
        "GET"
    }
    fn path(&self) -> &'static str {
        "/api/products/42"
    }
    fn host(&self) -> Option<&str> {
        Some("backend:8080")
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        name.eq_ignore_ascii_case("x-request-source")
            .then_some(b"frontend".as_slice())
    }
}

fn check_state(
    cluster: &Cluster,
    policies: &BTreeMap<PolicyRef, Policy>,
    identities: &IdentityTable,
    compiled: &Compiled,
) {
    let Compiled {
        enforcement,
        state,
        l7,
        rules,
    } = compiled;
    assert_eq!(state.endpoints.len(), cluster.endpoints.len());
    for ep in cluster.endpoints.values() {
        let entry = state.endpoints[&ep.id];
        assert_eq!(
            (entry.identity, entry.ip, entry.ifindex),
            (ep.identity, ep.ip, ep.ifindex)
        );
        assert_eq!(state.ipcache_lookup(ep.ip).endpoint, Some(ep.id));
    }
    for (key, entry) in &state.policy {
        assert!(state.endpoints.contains_key(&key.endpoint), "{key:?}");
        assert!(
            key.protocol.is_some() || key.port == PortPrefix::ANY,
            "{key:?}"
        );
        let origin = rules
            .get(entry.rule)
            .unwrap_or_else(|| panic!("entry {key:?} has an unknown rule {:?}", entry.rule));
        if let Some(p) = origin.policy() {
            assert!(policies.contains_key(p), "{origin:?}");
        }
        if let Action::Redirect { proxy_port } = entry.action {
            assert_eq!(proxy_port, PROXY_PORT);
            assert!(
                l7.rules.contains_key(&(key.endpoint, key.direction)),
                "redirect without HTTP rules: {key:?}"
            );
        }
    }
    for ((ep, _), side) in &l7.rules {
        assert!(state.endpoints.contains_key(ep));
        for r in side {
            assert!(rules.get(r.rule).is_some(), "L7 rule {:?} unknown", r.rule);
        }
    }
    let matcher = L7Matcher::new(l7).expect("accepted HTTP rules compile");
    let proxy = ProxyPolicy::new(l7, state).expect("accepted HTTP rules compile");

    let peers: Vec<Ipv4Addr> = cluster
        .endpoints
        .values()
        .map(|e| e.ip)
        .chain(OTHER_PEERS)
        .collect();
    for ep in cluster.endpoints.values() {
        let selected = !compile::selecting_specs(policies, identities, ep).is_empty();
        let entry = state.endpoints[&ep.id];
        if !selected && *enforcement == EnforcementMode::Default {
            assert!(!entry.ingress_enforced && !entry.egress_enforced);
            assert!(state.policy.keys().all(|k| k.endpoint != ep.id));
        }
        for direction in Direction::BOTH {
            let enforced = match direction {
                Direction::Ingress => entry.ingress_enforced,
                Direction::Egress => entry.egress_enforced,
            };
            for &peer in &peers {
                for protocol in PROTOCOLS {
                    for port in PORTS {
                        let decision = state
                            .decide(ep.id, direction, peer, protocol, port)
                            .expect("an answer for every endpoint");
                        assert_eq!(decision.enforced, enforced);
                        let what = || {
                            format!(
                                "{}/{} {direction:?} peer {peer} proto {protocol} port {port}: {decision:?}",
                                ep.namespace, ep.name
                            )
                        };
                        // Deny beats redirect beats allow, whichever entry is more specific:
                        // no entry on the lookup path of any candidate identity outranks the
                        // one that decided.
                        let rank = decision.matched.map_or(0, |(_, e)| e.action.rank());
                        let mut candidates = vec![decision.peer.identity, Identity::ANY];
                        candidates.extend(decision.peer.cidr_identity);
                        for identity in candidates {
                            let mut key = Some(PolicyKey {
                                endpoint: ep.id,
                                identity,
                                direction,
                                protocol: Some(protocol),
                                port: PortPrefix::exact(port),
                            });
                            while let Some(k) = key {
                                if let Some(e) = state.policy.get(&k) {
                                    assert!(e.action.rank() <= rank, "{k:?} outranks {}", what());
                                }
                                key = k.parent();
                            }
                        }
                        match decision.verdict {
                            Verdict::Allowed => {
                                assert!(decision.matched.is_some() || !enforced, "{}", what());
                            }
                            Verdict::DeniedByDefault => {
                                assert!(enforced && decision.matched.is_none(), "{}", what());
                                assert!(
                                    !(peer == HOST && direction == Direction::Ingress),
                                    "the node may always reach its endpoints: {}",
                                    what()
                                );
                            }
                            Verdict::DeniedByRule => {
                                assert!(
                                    matches!(
                                        decision.matched,
                                        Some((_, e)) if e.action == Action::Deny
                                    ),
                                    "{}",
                                    what()
                                );
                            }
                            Verdict::Redirected { proxy_port } => {
                                assert_eq!(proxy_port, PROXY_PORT, "{}", what());
                                if protocol == TCP {
                                    let ids: Vec<Identity> =
                                        std::iter::once(decision.peer.identity)
                                            .chain(decision.peer.cidr_identity)
                                            .collect();
                                    assert!(
                                        matcher
                                            .decide(ep.id, direction, &ids, port, &Request)
                                            .is_some(),
                                        "redirected, but no HTTP rule covers it: {}",
                                        what()
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        // The proxy judges a request from every peer without trouble.
        for &peer in &peers {
            let _ = proxy.judge(
                SocketAddrV4::new(peer, 40000),
                SocketAddrV4::new(ep.ip, 8080),
                &Request,
            );
        }
    }
}
