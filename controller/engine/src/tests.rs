//! Engine behaviour without root: an in-memory datapath and fake plumbing.

use std::net::Ipv4Addr;

use palisade_policies::audit::NamespaceMode;
use palisade_policies::compile::Settings;
use palisade_policies::endpoint::EndpointId;
use palisade_policies::identity::Identity;
use palisade_policies::labels::{self, Labels};
use palisade_policies::manifest;
use palisade_policies::mapstate::Verdict;
use palisade_policies::model::Direction;

use crate::datapath::memory::MemoryDatapath;
use std::collections::BTreeMap;

use crate::model::{Changes, ClusterDelta, EndpointSpec, LabelChange, RemoteSpec};
use crate::plumbing::memory::MemoryPlumbing;
use crate::store::{MemoryStore, StateStore};
use crate::views::{EndpointView, TraceQuery};
use crate::{Engine, EngineConfig, EngineError, ErrorClass, Outputs, PolicyAction, PolicyUpdate};

type TestEngine = Engine<MemoryDatapath, MemoryPlumbing>;

fn config() -> EngineConfig {
    EngineConfig {
        pod_cidr: "10.200.0.0/16".parse().unwrap(),
        node_ip: Ipv4Addr::new(10, 200, 0, 1),
        settings: Settings::default(),
        cluster_identities: false,
        file_policies: Vec::new(),
        fqdn: crate::fqdn::FqdnLimits::default(),
    }
}

async fn engine_with(
    datapath: MemoryDatapath,
    plumbing: MemoryPlumbing,
    store: Option<MemoryStore>,
) -> TestEngine {
    let store = store.map(|s| Box::new(s) as Box<dyn StateStore>);
    Engine::start(config(), datapath, plumbing, store, Outputs::default())
        .await
        .unwrap()
}

async fn engine() -> TestEngine {
    engine_with(MemoryDatapath::default(), MemoryPlumbing::default(), None).await
}

fn labels(s: &str) -> Labels {
    labels::parse_label_list(s).unwrap()
}

/// What the API does with a manifest: parse it (off the engine task), then apply.
fn apply(e: &mut TestEngine, text: &str) -> Result<PolicyUpdate, EngineError> {
    let parsed = manifest::parse_manifests(text)?;
    e.policy_apply(parsed)
}

async fn add(e: &mut TestEngine, name: &str, ns: &str, l: &str) -> EndpointView {
    e.endpoint_add(EndpointSpec {
        name: name.into(),
        namespace: ns.into(),
        labels: labels(l),
        ip: None,
        named_ports: vec![],
    })
    .await
    .unwrap()
}

fn verdict(e: &TestEngine, from: &str, to: &str, port: u16) -> Verdict {
    let s = e.record(from).unwrap();
    let d = e.record(to).unwrap();
    let out = e
        .applied
        .decide(s.id, Direction::Egress, d.ip, 6, port)
        .unwrap()
        .verdict;
    let inn = e
        .applied
        .decide(d.id, Direction::Ingress, s.ip, 6, port)
        .unwrap()
        .verdict;
    match (out, inn) {
        (Verdict::Allowed, Verdict::Allowed) => Verdict::Allowed,
        (Verdict::Allowed, other) => other,
        (other, _) => other,
    }
}

const ALLOW_FRONTEND_TO_BACKEND: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: backend
  namespace: demo
spec:
  podSelector:
    matchLabels:
      app: backend
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app: frontend
    ports:
    - port: 8080
";

#[tokio::test]
async fn endpoint_add_plumbs_attaches_and_writes_maps() {
    let mut e = engine().await;
    let v = add(&mut e, "frontend", "demo", "app=frontend").await;
    assert_eq!(v.ip, Ipv4Addr::new(10, 200, 0, 2));
    assert_eq!(v.identity, Identity(256));
    assert!(e.datapath.attached.contains(&("pal1".to_string(), 101)));
    assert!(e.plumbing.up.contains(&101));
    assert_eq!(e.datapath.state, e.applied);
    assert!(e.applied.endpoints.contains_key(&EndpointId(1)));
}

#[tokio::test]
async fn bad_endpoint_requests_are_rejected_before_anything_is_made() {
    let mut e = engine().await;
    let _ = add(&mut e, "frontend", "demo", "app=frontend").await;
    let req = |name: &str, ns: &str, l: &str, ip: Option<Ipv4Addr>| EndpointSpec {
        name: name.into(),
        namespace: ns.into(),
        labels: labels::parse_label_list(l).unwrap_or_default(),
        ip,
        named_ports: vec![],
    };
    let dup = e
        .endpoint_add(req("frontend", "demo", "", None))
        .await
        .unwrap_err();
    assert!(matches!(dup, EngineError::EndpointExists { .. }), "{dup}");
    let bad = e
        .endpoint_add(req("Bad_Name", "demo", "", None))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("endpoint name"), "{bad}");
    let taken = e
        .endpoint_add(req("x", "demo", "", Some(Ipv4Addr::new(10, 200, 0, 2))))
        .await
        .unwrap_err();
    assert!(
        taken
            .to_string()
            .contains("already used by endpoint demo/frontend"),
        "{taken}"
    );
    let node = e
        .endpoint_add(req("y", "demo", "", Some(Ipv4Addr::new(10, 200, 0, 1))))
        .await
        .unwrap_err();
    assert!(node.to_string().contains("the node"), "{node}");
    assert_eq!(e.model.endpoints.len(), 1);
    assert_eq!(e.plumbing.netns.len(), 1);
}

#[tokio::test]
async fn policy_apply_enforces_and_delete_restores() {
    let mut e = engine().await;
    add(&mut e, "frontend", "demo", "app=frontend").await;
    add(&mut e, "backend", "demo", "app=backend").await;
    add(&mut e, "other", "demo", "app=other").await;
    assert_eq!(verdict(&e, "other", "backend", 8080), Verdict::Allowed);

    let r = apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap();
    assert_eq!(r.policies[0].action, PolicyAction::Created);
    assert!(r.map_operations > 0);
    assert_eq!(verdict(&e, "frontend", "backend", 8080), Verdict::Allowed);
    assert_eq!(
        verdict(&e, "frontend", "backend", 9090),
        Verdict::DeniedByDefault
    );
    assert_eq!(
        verdict(&e, "other", "backend", 8080),
        Verdict::DeniedByDefault
    );
    assert_eq!(e.datapath.state, e.applied);

    let again = apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap();
    assert_eq!(again.policies[0].action, PolicyAction::Unchanged);
    assert_eq!(again.map_operations, 0);

    e.policy_delete(Some("demo"), "backend").unwrap();
    assert_eq!(verdict(&e, "other", "backend", 8080), Verdict::Allowed);
    assert!(e.datapath.state.policy.is_empty());
    assert!(matches!(
        e.policy_delete(Some("demo"), "backend"),
        Err(EngineError::NoSuchPolicy { .. })
    ));
}

#[tokio::test]
async fn rejected_manifest_changes_nothing() {
    let mut e = engine().await;
    add(&mut e, "backend", "demo", "app=backend").await;
    apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap();
    let before = e.applied.clone();
    let bad = format!(
        "{ALLOW_FRONTEND_TO_BACKEND}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: x}}\nspec: {{podSelector: {{}}, bogus: 1}}\n"
    );
    let err = apply(&mut e, &bad).unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
    assert_eq!(e.applied, before);
    assert_eq!(e.model.policies.len(), 1);
}

#[tokio::test]
async fn failed_map_write_rolls_back_maps_and_model() {
    let mut e = engine().await;
    add(&mut e, "frontend", "demo", "app=frontend").await;
    add(&mut e, "backend", "demo", "app=backend").await;
    let before_maps = e.datapath.state.clone();
    e.datapath.fail_after = Some(1);
    let err = apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap_err();
    assert!(matches!(err, EngineError::RolledBack(_)), "{err}");
    assert!(err.to_string().contains("full"), "{err}");
    assert_eq!(e.datapath.state, before_maps);
    assert_eq!(e.applied, before_maps);
    assert!(e.model.policies.is_empty());
    e.datapath.fail_after = None;
    apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap();
    assert_eq!(verdict(&e, "frontend", "backend", 8080), Verdict::Allowed);
}

#[tokio::test]
async fn label_change_moves_endpoint_in_and_out_of_a_policy() {
    let mut e = engine().await;
    add(&mut e, "client", "demo", "app=other").await;
    add(&mut e, "backend", "demo", "app=backend").await;
    apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap();
    assert_eq!(
        verdict(&e, "client", "backend", 8080),
        Verdict::DeniedByDefault
    );
    let v = e
        .endpoint_label(
            "client",
            &LabelChange {
                set: labels("app=frontend"),
                remove: vec![],
            },
        )
        .unwrap();
    assert_eq!(verdict(&e, "client", "backend", 8080), Verdict::Allowed);
    let old_identity = v.identity;
    e.endpoint_label(
        "client",
        &LabelChange {
            set: Labels::new(),
            remove: vec!["app".into()],
        },
    )
    .unwrap();
    assert_eq!(
        verdict(&e, "client", "backend", 8080),
        Verdict::DeniedByDefault
    );
    assert_eq!(e.model.identities.refs(old_identity), 0);
}

#[tokio::test]
async fn namespace_labels_feed_namespace_selectors() {
    let mut e = engine().await;
    add(&mut e, "client", "team-a", "app=client").await;
    add(&mut e, "server", "demo", "app=server").await;
    apply(
        &mut e,
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-trusted, namespace: demo}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {trust: "yes"}}
"#,
    )
    .unwrap();
    assert_eq!(
        verdict(&e, "client", "server", 80),
        Verdict::DeniedByDefault
    );
    e.namespace_label(
        "team-a",
        &LabelChange {
            set: labels("trust=yes"),
            remove: vec![],
        },
    )
    .unwrap();
    assert_eq!(verdict(&e, "client", "server", 80), Verdict::Allowed);
    let err = e
        .namespace_label(
            "team-a",
            &LabelChange {
                set: labels("kubernetes.io/metadata.name=x"),
                remove: vec![],
            },
        )
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Invalid);
}

#[tokio::test]
async fn endpoint_delete_removes_everything_it_had() {
    let mut e = engine().await;
    add(&mut e, "frontend", "demo", "app=frontend").await;
    e.endpoint_delete("frontend").await.unwrap();
    assert!(e.applied.endpoints.is_empty());
    assert!(
        e.datapath
            .state
            .ipcache
            .keys()
            .all(|k| k.prefix() != 32 || k.ip() == Ipv4Addr::new(10, 200, 0, 1))
    );
    assert!(e.datapath.attached.is_empty());
    assert!(e.plumbing.netns.is_empty());
    assert!(matches!(
        e.endpoint_delete("frontend").await,
        Err(EngineError::NoSuchEndpoint { .. })
    ));
}

#[tokio::test]
async fn restart_keeps_identities_endpoints_and_policies_and_rewrites_nothing() {
    let store = MemoryStore::default();
    let mut e = engine_with(
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        Some(store.clone()),
    )
    .await;
    add(&mut e, "frontend", "demo", "app=frontend").await;
    let backend = add(&mut e, "backend", "demo", "app=backend").await;
    apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap();
    let maps = e.datapath.state.clone();
    let Engine {
        datapath, plumbing, ..
    } = e;

    // The new agent finds the pinned maps as the old one left them.
    let restarted = engine_with(
        MemoryDatapath {
            state: datapath.state,
            ..MemoryDatapath::default()
        },
        plumbing,
        Some(store),
    )
    .await;
    assert_eq!(
        restarted.record("backend").unwrap().identity,
        backend.identity
    );
    assert_eq!(restarted.model.policies.len(), 1);
    assert_eq!(restarted.datapath.state, maps, "no map entry rewritten");
    assert_eq!(restarted.datapath.revision, 0, "nothing to revalidate");
    assert_eq!(
        verdict(&restarted, "frontend", "backend", 8080),
        Verdict::Allowed
    );
    assert_eq!(restarted.datapath.attached.len(), 2);
}

#[tokio::test]
async fn trace_names_the_allowing_rule_and_the_default_deny() {
    let mut e = engine().await;
    add(&mut e, "frontend", "demo", "app=frontend").await;
    add(&mut e, "backend", "demo", "app=backend").await;
    apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap();
    let ok = e
        .trace(&TraceQuery {
            from: "demo/frontend".into(),
            to: "demo/backend".into(),
            port: 8080,
            protocol: None,
        })
        .unwrap();
    assert!(ok.allowed);
    assert_eq!(
        ok.ingress
            .policy
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("demo/backend")
    );
    assert!(
        ok.ingress.reason.contains("demo/backend ingress rule 0"),
        "{}",
        ok.ingress.reason
    );
    let denied = e
        .trace(&TraceQuery {
            from: "demo/frontend".into(),
            to: "demo/backend".into(),
            port: 22,
            protocol: Some("tcp".into()),
        })
        .unwrap();
    assert!(!denied.allowed);
    assert!(
        denied.ingress.reason.contains("default deny"),
        "{}",
        denied.ingress.reason
    );
    assert_eq!(
        denied
            .ingress
            .enforcing_policies
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        vec!["demo/backend".to_string()]
    );
    assert!(
        e.trace(&TraceQuery {
            from: "other/frontend".into(),
            to: "demo/backend".into(),
            port: 1,
            protocol: None,
        })
        .is_err()
    );
}

const L7_ON_BACKEND: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: backend-l7, namespace: demo}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/public/.*"}]
"#;

fn tcp(
    endpoint: EndpointId,
    scope: Direction,
    from: (Ipv4Addr, u16),
    to: (Ipv4Addr, u16),
) -> crate::datapath::TrackedConnection {
    crate::datapath::TrackedConnection {
        endpoint,
        scope,
        protocol: 6,
        source: std::net::SocketAddrV4::new(from.0, from.1),
        destination: std::net::SocketAddrV4::new(to.0, to.1),
        through_proxy: false,
        from_proxy: false,
        rule: palisade_policies::mapstate::RuleId::NONE,
        open: true,
    }
}

#[tokio::test]
async fn http_rules_end_open_connections_that_bypass_the_proxy() {
    let settings = Settings {
        proxy_port: Some(15001),
        ..Settings::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut e = Engine::start(
        EngineConfig {
            settings,
            ..config()
        },
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        None,
        Outputs {
            events: Some(tx),
            ..Outputs::default()
        },
    )
    .await
    .unwrap();
    let f = add(&mut e, "frontend", "demo", "app=frontend").await;
    let b = add(&mut e, "backend", "demo", "app=backend").await;
    let o = add(&mut e, "other", "demo", "app=other").await;
    let to_backend = (b.ip, 8080);
    let open = vec![
        // frontend -> backend:8080, as both sides track it: to be ended.
        tcp(f.id, Direction::Egress, (f.ip, 40000), to_backend),
        tcp(b.id, Direction::Ingress, (f.ip, 40000), to_backend),
        // other -> backend:8080: the new policy denies it; the datapath drops it.
        tcp(o.id, Direction::Egress, (o.ip, 40001), to_backend),
        // frontend -> backend:22: not covered by the HTTP rules.
        tcp(f.id, Direction::Egress, (f.ip, 40002), (b.ip, 22)),
        // Already through the proxy: it keeps going.
        crate::datapath::TrackedConnection {
            through_proxy: true,
            ..tcp(f.id, Direction::Egress, (f.ip, 40003), to_backend)
        },
    ];
    e.datapath.tracked = open;
    let update = apply(&mut e, L7_ON_BACKEND).unwrap();
    assert!(update.map_operations > 0);
    e.end_connections_needing_proxy().await;
    let mut ended = e.plumbing.ended.clone();
    ended.sort();
    let pair = |ns: &str, local: (Ipv4Addr, u16), remote: (Ipv4Addr, u16)| {
        (
            ns.to_string(),
            crate::plumbing::SocketPair {
                local: std::net::SocketAddrV4::new(local.0, local.1),
                remote: std::net::SocketAddrV4::new(remote.0, remote.1),
            },
        )
    };
    let mut want = vec![
        pair("backend", to_backend, (f.ip, 40000)),
        pair("frontend", (f.ip, 40000), to_backend),
    ];
    want.sort();
    assert_eq!(ended, want, "both ends, and nothing else");
    let mut events = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        events.push(ev);
    }
    assert_eq!(events.len(), 2, "{events:?}");
    // Nothing more to end until the next change.
    e.plumbing.ended.clear();
    e.end_connections_needing_proxy().await;
    assert!(e.plumbing.ended.is_empty());
}

// ---- partial failures: whatever step fails, model and maps agree and the caller is told ----

use crate::datapath::memory::DatapathStep;
use crate::plumbing::memory::PlumbingStep;

#[tokio::test]
async fn a_failed_revision_bump_undoes_the_map_write() {
    let mut e = engine().await;
    add(&mut e, "frontend", "demo", "app=frontend").await;
    add(&mut e, "backend", "demo", "app=backend").await;
    let (maps, revision) = (e.datapath.state.clone(), e.datapath.revision);
    e.datapath.fail.insert(DatapathStep::Revision);
    let err = apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap_err();
    assert!(matches!(err, EngineError::RevisionNotBumped(_)), "{err}");
    assert!(err.to_string().contains("nothing changed"), "{err}");
    assert_eq!(
        e.datapath.state, maps,
        "the written entries were taken back"
    );
    assert_eq!(e.applied, maps);
    assert_eq!(e.datapath.revision, revision);
    assert!(e.model.policies.is_empty());
    e.datapath.fail.clear();
    apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap();
    assert_eq!(verdict(&e, "frontend", "backend", 8080), Verdict::Allowed);
}

#[tokio::test]
async fn when_the_undo_fails_too_the_engine_believes_the_maps_and_repairs_next_time() {
    let mut e = engine().await;
    add(&mut e, "frontend", "demo", "app=frontend").await;
    add(&mut e, "backend", "demo", "app=backend").await;
    e.datapath.fail.insert(DatapathStep::Revision);
    let before = e.datapath.state.clone();
    // The write goes through; the undo (the next apply) fails at its first operation.
    e.datapath.fail_after_applies = Some((e.datapath.applies + 1, 0));
    let err = apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap_err();
    assert!(matches!(err, EngineError::RevisionNotBumped(_)), "{err}");
    assert_ne!(e.datapath.state, before, "the undo did not happen");
    assert_eq!(
        e.applied, e.datapath.state,
        "the engine knows what the maps hold"
    );
    assert!(
        e.model.policies.is_empty(),
        "the change is not in the model"
    );
    // The next change repairs the maps towards the model.
    e.datapath.fail.clear();
    e.datapath.fail_after_applies = None;
    e.namespace_label(
        "demo",
        &LabelChange {
            set: labels("team=a"),
            remove: vec![],
        },
    )
    .unwrap();
    assert_eq!(e.datapath.state, e.applied);
    assert_eq!(verdict(&e, "frontend", "backend", 9090), Verdict::Allowed);
}

#[tokio::test]
async fn a_failed_save_is_told_to_the_caller_while_the_change_stands() {
    let store = MemoryStore::default();
    let e = engine_with(
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        Some(store.clone()),
    )
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(e.run(rx));
    let spec = EndpointSpec {
        name: "frontend".into(),
        namespace: "demo".into(),
        labels: labels("app=frontend"),
        ip: None,
        named_ports: vec![],
    };
    crate::ask(&tx, |r| crate::Command::EndpointAdd(spec, r))
        .await
        .unwrap();
    store.fail_saves(true);
    let parsed = manifest::parse_manifests(ALLOW_FRONTEND_TO_BACKEND).unwrap();
    let err = crate::ask(&tx, |r| crate::Command::PolicyApply(parsed, r))
        .await
        .unwrap_err();
    assert!(matches!(err, crate::AskError::NotSaved(_)), "{err}");
    assert!(err.to_string().contains("in force"), "{err}");
    assert!(
        err.to_string()
            .contains("restarted agent would not have it"),
        "{err}"
    );
    // The change stands.
    let policies = crate::ask(&tx, crate::Command::PolicyList).await.unwrap();
    assert_eq!(policies.len(), 1);
    assert!(
        store.kept().unwrap().policies.is_empty(),
        "the store has the old state"
    );
    // Reads are never held by the store.
    crate::ask(&tx, crate::Command::Status).await.unwrap();
    store.fail_saves(false);
    drop(tx);
    task.await.unwrap();
}

#[tokio::test]
async fn a_failed_attach_or_activation_leaves_no_endpoint_behind() {
    for step in [Some(DatapathStep::Attach), None] {
        let mut e = engine().await;
        add(&mut e, "backend", "demo", "app=backend").await;
        let before = e.datapath.state.clone();
        match step {
            Some(s) => {
                e.datapath.fail.insert(s);
            }
            None => {
                e.plumbing.fail.insert(PlumbingStep::Activate);
            }
        }
        let err = e
            .endpoint_add(EndpointSpec {
                name: "frontend".into(),
                namespace: "demo".into(),
                labels: labels("app=frontend"),
                ip: None,
                named_ports: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Internal, "{err}");
        assert_eq!(e.model.endpoints.len(), 1, "{err}");
        assert_eq!(e.datapath.state, before, "{err}");
        assert_eq!(e.applied, before, "{err}");
        assert!(!e.plumbing.netns.contains("frontend"), "{err}");
    }
}

#[tokio::test]
async fn a_delete_whose_cleanup_fails_says_what_is_left() {
    let mut e = engine().await;
    add(&mut e, "frontend", "demo", "app=frontend").await;
    e.plumbing.fail.insert(PlumbingStep::Delete);
    let err = e.endpoint_delete("frontend").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("was removed from policy, but its network plumbing was not"),
        "{err}"
    );
    assert!(e.model.endpoints.is_empty());
    assert!(e.applied.endpoints.is_empty());
    assert_eq!(e.datapath.state, e.applied);
}

#[tokio::test]
async fn failing_to_end_connections_never_fails_the_change() {
    let mut e = engine().await;
    let f = add(&mut e, "frontend", "demo", "app=frontend").await;
    let b = add(&mut e, "backend", "demo", "app=backend").await;
    e.datapath.tracked = vec![tcp(f.id, Direction::Egress, (f.ip, 40000), (b.ip, 8080))];
    e.plumbing.fail.insert(PlumbingStep::EndConnections);
    e.datapath.fail.insert(DatapathStep::Connections);
    apply(&mut e, ALLOW_FRONTEND_TO_BACKEND).unwrap();
    e.end_connections_needing_proxy().await;
    assert_eq!(e.datapath.state, e.applied);
}

// ---- containers attached through the CNI plugin ----

use crate::model::{AttachmentSpec, CniAttachment};

/// A veth a CNI plugin made: its host side exists in the node, its container side in `netns`.
fn cni_veth(e: &mut TestEngine, host_ifname: &str, ifindex: u32, netns: &str) {
    e.plumbing.links.insert(host_ifname.into(), ifindex);
    e.plumbing.netns_paths.insert(netns.into());
}

fn attachment(container: &str, host: &str, ip: Ipv4Addr, labels: Option<&str>) -> AttachmentSpec {
    AttachmentSpec {
        attachment: CniAttachment {
            network: if container.ends_with('x') {
                "other"
            } else {
                "net"
            }
            .into(),
            container_id: container.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/cni-{container}").into(),
            chained: false,
        },
        host_ifname: host.into(),
        ip,
        name: format!("ctr-{container}"),
        namespace: "shop".into(),
        labels: labels.map(self::labels),
        named_ports: vec![],
    }
}

#[tokio::test]
async fn an_attached_container_is_judged_before_it_carries_anything() {
    let mut e = engine().await;
    cni_veth(&mut e, "palabc", 500, "/run/netns/cni-abc");
    let v = e
        .attachment_add(attachment(
            "abc",
            "palabc",
            Ipv4Addr::new(10, 88, 0, 2),
            Some("app=web"),
        ))
        .await
        .unwrap();
    assert_eq!(v.name, "ctr-abc");
    assert_eq!(v.identity, Identity(256));
    assert!(!v.pending_labels);
    assert!(e.datapath.attached.contains(&("palabc".to_string(), 500)));
    assert!(
        e.plumbing.up.contains(&500),
        "standalone: the host side is routed"
    );
    assert_eq!(e.applied.endpoints[&v.id].ifindex, 500);
    let status = e.attachment_check("abc", "eth0").unwrap();
    assert!(status.programs_attached && status.in_datapath && status.interface_present);

    // Chained: the previous plugin routes it; palisade only judges it.
    cni_veth(&mut e, "vethdef", 501, "/run/netns/cni-def");
    let mut chained = attachment(
        "def",
        "vethdef",
        Ipv4Addr::new(10, 88, 0, 3),
        Some("app=db"),
    );
    chained.attachment.chained = true;
    e.attachment_add(chained).await.unwrap();
    assert!(e.datapath.attached.contains(&("vethdef".to_string(), 501)));
    assert!(!e.plumbing.up.contains(&501));
}

#[tokio::test]
async fn a_bridge_port_is_known_as_one_in_the_endpoint_map() {
    let mut e = engine().await;
    cni_veth(&mut e, "vethbr", 502, "/run/netns/cni-br");
    e.plumbing.bridge_ports.insert(502);
    let mut chained = attachment("br", "vethbr", Ipv4Addr::new(10, 88, 0, 4), Some("app=web"));
    chained.attachment.chained = true;
    let bridged = e.attachment_add(chained).await.unwrap();
    let plain = add(&mut e, "plain", "shop", "app=web").await;
    let link = e.applied.endpoints[&bridged.id].link;
    assert!(link.bridge.is_some(), "the bridge is in the map: {link:?}");
    assert_ne!(link.host_mac, [0; 6]);
    assert!(e.applied.endpoints[&plain.id].link.bridge.is_none());
}

#[tokio::test]
async fn a_container_without_labels_holds_init_and_is_enforced_until_they_are_known() {
    let mut e = engine().await;
    add(&mut e, "client", "shop", "app=client").await;
    cni_veth(&mut e, "palabc", 500, "/run/netns/cni-abc");
    let v = e
        .attachment_add(attachment(
            "abc",
            "palabc",
            Ipv4Addr::new(10, 88, 0, 2),
            None,
        ))
        .await
        .unwrap();
    assert_eq!(v.identity, Identity::INIT);
    assert!(v.pending_labels);
    assert!(
        v.ingress_enforced && v.egress_enforced,
        "never an unenforced window"
    );
    assert_eq!(
        verdict(&e, "client", "ctr-abc", 80),
        Verdict::DeniedByDefault
    );
    // The runtime tells its labels, and its namespace: it moves there.
    let known = e
        .endpoint_resolve("shop/ctr-abc", "store", labels("app=web"))
        .unwrap();
    assert_eq!(known.namespace, "store");
    assert_ne!(known.identity, Identity::INIT);
    assert!(!known.ingress_enforced, "no policy selects it now");
    assert_eq!(verdict(&e, "client", "store/ctr-abc", 80), Verdict::Allowed);
    assert!(matches!(
        e.endpoint_resolve("store/ctr-abc", "store", labels("app=x")),
        Err(EngineError::LabelsKnown { .. })
    ));
}

#[tokio::test]
async fn bad_attachments_are_refused_and_leave_nothing() {
    let mut e = engine().await;
    cni_veth(&mut e, "palabc", 500, "/run/netns/cni-abc");
    e.attachment_add(attachment(
        "abc",
        "palabc",
        Ipv4Addr::new(10, 88, 0, 2),
        Some("app=web"),
    ))
    .await
    .unwrap();
    let before = e.applied.clone();
    let again = e
        .attachment_add(attachment(
            "abc",
            "palabc",
            Ipv4Addr::new(10, 88, 0, 9),
            Some("app=web"),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(again, EngineError::AttachmentExists { .. }),
        "{again}"
    );
    let missing = e
        .attachment_add(attachment(
            "xyz",
            "nope0",
            Ipv4Addr::new(10, 88, 0, 3),
            Some("app=web"),
        ))
        .await
        .unwrap_err();
    assert!(
        missing.to_string().contains("interface nope0 not found"),
        "{missing}"
    );
    let taken = e
        .attachment_add(attachment(
            "xy2",
            "palabc",
            Ipv4Addr::new(10, 88, 0, 2),
            Some("app=web"),
        ))
        .await
        .unwrap_err();
    assert!(
        taken
            .to_string()
            .contains("already used by endpoint shop/ctr-abc"),
        "{taken}"
    );
    let mut bad = attachment(
        "xy3",
        "palabc",
        Ipv4Addr::new(10, 88, 0, 4),
        Some("app=web"),
    );
    bad.name = "-bad".into();
    assert!(e.attachment_add(bad).await.is_err());
    assert_eq!(e.applied, before);
    assert_eq!(e.model.endpoints.len(), 1);
}

#[tokio::test]
async fn deleting_an_attachment_is_idempotent_and_leaves_the_veth_to_its_plugin() {
    let mut e = engine().await;
    cni_veth(&mut e, "palabc", 500, "/run/netns/cni-abc");
    e.attachment_add(attachment(
        "abc",
        "palabc",
        Ipv4Addr::new(10, 88, 0, 2),
        Some("app=web"),
    ))
    .await
    .unwrap();
    assert!(e.attachment_delete("abc", "eth0").await.unwrap());
    assert!(
        !e.attachment_delete("abc", "eth0").await.unwrap(),
        "twice is fine"
    );
    assert!(e.applied.endpoints.is_empty());
    assert!(e.datapath.attached.is_empty());
    assert!(
        e.plumbing.links.contains_key("palabc"),
        "the CNI plugin removes its veth"
    );
    assert!(matches!(
        e.attachment_check("abc", "eth0"),
        Err(EngineError::NoSuchAttachment { .. })
    ));
}

#[tokio::test]
async fn gc_removes_attachments_the_runtime_no_longer_has() {
    let mut e = engine().await;
    add(&mut e, "own", "shop", "app=own").await;
    // a4x is on another network: that network's GC is not this one's.
    for (i, c) in ["a1", "a2", "a3", "a4x"].into_iter().enumerate() {
        let host = format!("pal{c}");
        let index = 500 + u32::try_from(i).unwrap();
        cni_veth(&mut e, &host, index, &format!("/run/netns/cni-{c}"));
        let ip = Ipv4Addr::new(10, 88, 0, 2 + u8::try_from(i).unwrap());
        e.attachment_add(attachment(c, &host, ip, Some("app=web")))
            .await
            .unwrap();
    }
    let valid: std::collections::BTreeSet<(String, String)> =
        [("a2".to_string(), "eth0".to_string())].into();
    let mut removed = e.attachment_gc("net", &valid).await.unwrap();
    removed.sort();
    assert_eq!(
        removed,
        vec!["shop/ctr-a1".to_string(), "shop/ctr-a3".to_string()]
    );
    assert_eq!(
        e.model.endpoints.len(),
        3,
        "palisade's own endpoints and another network's are not this GC's"
    );
}

#[tokio::test]
async fn a_restarted_engine_keeps_attachments_whose_container_is_still_there() {
    let store = MemoryStore::default();
    let mut e = engine_with(
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        Some(store.clone()),
    )
    .await;
    cni_veth(&mut e, "palkeep", 500, "/run/netns/cni-keep");
    cni_veth(&mut e, "palgone", 501, "/run/netns/cni-gone");
    e.attachment_add(attachment(
        "keep",
        "palkeep",
        Ipv4Addr::new(10, 88, 0, 2),
        Some("app=web"),
    ))
    .await
    .unwrap();
    e.attachment_add(attachment(
        "gone",
        "palgone",
        Ipv4Addr::new(10, 88, 0, 3),
        None,
    ))
    .await
    .unwrap();
    let Engine {
        datapath,
        mut plumbing,
        ..
    } = e;
    // The second container went away while the agent was down.
    plumbing
        .netns_paths
        .remove(std::path::Path::new("/run/netns/cni-gone"));
    let restarted = engine_with(
        MemoryDatapath {
            state: datapath.state,
            ..MemoryDatapath::default()
        },
        plumbing,
        Some(store),
    )
    .await;
    assert!(restarted.record("shop/ctr-keep").is_ok());
    assert!(restarted.record("shop/ctr-gone").is_err());
    assert!(
        restarted
            .datapath
            .attached
            .contains(&("palkeep".to_string(), 500))
    );
    assert!(
        restarted.plumbing.links.contains_key("palgone"),
        "a runtime's veth is never palisade's to delete"
    );
}

// Kubernetes mode: the cluster's identities, namespaces, remote pods and policies.

async fn cluster_engine(
    datapath: MemoryDatapath,
    plumbing: MemoryPlumbing,
    store: MemoryStore,
) -> TestEngine {
    Engine::start(
        EngineConfig {
            cluster_identities: true,
            ..config()
        },
        datapath,
        plumbing,
        Some(Box::new(store) as Box<dyn StateStore>),
        Outputs::default(),
    )
    .await
    .unwrap()
}

const SHOP_WEB_FROM_CLIENTS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 80}]\n";

fn shop_labels() -> Labels {
    labels("team=blue")
}

/// The identity labels of a pod of `shop` with `pod` labels, as every node computes them.
fn shop_identity(pod: &str) -> Labels {
    let mut ns = shop_labels();
    ns.insert(labels::NAMESPACE_NAME_LABEL.into(), "shop".into());
    palisade_policies::identity::workload_identity_labels("shop", &ns, &labels(pod))
}

fn remote_pod(name: &str, pod: &str, ip: [u8; 4]) -> (String, RemoteSpec) {
    (
        format!("pod/shop/{name}"),
        RemoteSpec::Pod {
            namespace: "shop".into(),
            name: name.into(),
            labels: labels(pod),
            ip: ip.into(),
            node: "node-b".into(),
        },
    )
}

fn policy(
    text: &str,
) -> (
    palisade_policies::model::PolicyRef,
    palisade_policies::model::Policy,
) {
    let p = manifest::parse_manifests(text).unwrap().remove(0);
    (p.id.clone(), p)
}

/// The first sync of a node: the cluster's numbers, a namespace, two pods of another node,
/// that node, and a policy; then this node's pod, attached by CNI, takes its labels.
/// The pod `shop/web` (10.0.0.9) attached through CNI on veth `palweb`, with `labels` known
/// at ADD or none yet.
async fn attach_web(e: &mut TestEngine, labels: Option<&str>) {
    cni_veth(e, "palweb", 500, "/run/netns/cni-web");
    let mut web = attachment("web", "palweb", Ipv4Addr::new(10, 0, 0, 9), labels);
    web.name = "web".into();
    e.attachment_add(web).await.unwrap();
}

/// A cluster engine with in-memory edges, after the first sync.
async fn synced_cluster_engine() -> TestEngine {
    let mut e = cluster_engine(
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        MemoryStore::default(),
    )
    .await;
    e.cluster_update(first_sync()).unwrap();
    e
}

/// A cluster engine after the first sync, with `shop/web` attached (no labels yet).
async fn cluster_engine_with_web() -> TestEngine {
    let mut e = synced_cluster_engine().await;
    attach_web(&mut e, None).await;
    e
}

fn first_sync() -> ClusterDelta {
    ClusterDelta {
        identities: Some(
            [
                (shop_identity("app=web"), Identity(70_000)),
                (shop_identity("app=client"), Identity(70_001)),
                (shop_identity("app=other"), Identity(70_002)),
            ]
            .into(),
        ),
        namespaces: Changes {
            replace_all: true,
            upsert: vec![("shop".into(), shop_labels())],
            delete: vec![],
        },
        remotes: Changes {
            replace_all: true,
            upsert: vec![
                remote_pod("client", "app=client", [10, 1, 0, 5]),
                remote_pod("other", "app=other", [10, 1, 0, 6]),
                (
                    "node/node-b".into(),
                    RemoteSpec::Node {
                        name: "node-b".into(),
                        ips: vec![Ipv4Addr::new(192, 168, 0, 2)],
                    },
                ),
            ],
            delete: vec![],
        },
        policies: Changes {
            replace_all: true,
            upsert: vec![policy(SHOP_WEB_FROM_CLIENTS)],
            delete: vec![],
        },
        endpoint_labels: vec![],
        endpoint_audit: vec![],
    }
}

fn ingress(e: &TestEngine, to: &str, from: [u8; 4], port: u16) -> Verdict {
    let d = e.record(to).unwrap();
    e.applied
        .decide(d.id, Direction::Ingress, from.into(), 6, port)
        .unwrap()
        .verdict
}

#[tokio::test]
async fn pods_of_other_nodes_are_judged_by_the_identity_the_cluster_gave_them() {
    let mut e = cluster_engine(
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        MemoryStore::default(),
    )
    .await;
    let report = e.cluster_update(first_sync()).unwrap();
    assert!(report.rejected.is_empty() && report.skipped.is_empty());
    attach_web(&mut e, None).await;
    assert_eq!(e.record("shop/web").unwrap().identity, Identity::INIT);
    e.cluster_update(ClusterDelta {
        endpoint_labels: vec![("shop/web".into(), labels("app=web"))],
        ..ClusterDelta::default()
    })
    .unwrap();
    let rec = e.record("shop/web").unwrap();
    assert_eq!(
        rec.identity,
        Identity(70_000),
        "the cluster's number, not one of ours"
    );
    assert!(!rec.pending_labels);
    let client_ip = "10.1.0.5/32".parse().unwrap();
    assert_eq!(e.applied.ipcache[&client_ip].identity, Identity(70_001));
    assert_eq!(
        e.applied.ipcache[&"192.168.0.2/32".parse().unwrap()].identity,
        Identity::REMOTE_NODE
    );
    assert_eq!(ingress(&e, "shop/web", [10, 1, 0, 5], 80), Verdict::Allowed);
    assert_ne!(ingress(&e, "shop/web", [10, 1, 0, 6], 80), Verdict::Allowed);
    assert_ne!(ingress(&e, "shop/web", [10, 1, 0, 5], 22), Verdict::Allowed);
    assert_eq!(e.datapath.state, e.applied);

    // The policy is the cluster's: the node's API cannot change it.
    let err = apply(&mut e, SHOP_WEB_FROM_CLIENTS).unwrap_err();
    assert!(matches!(err, EngineError::ClusterManaged { .. }), "{err}");
    let err = e.policy_delete(Some("shop"), "web").unwrap_err();
    assert!(matches!(err, EngineError::ClusterManaged { .. }), "{err}");
    let err = e
        .namespace_label("shop", &LabelChange::default())
        .unwrap_err();
    assert!(matches!(err, EngineError::ClusterNamespace { .. }), "{err}");
}

#[tokio::test]
async fn labels_the_cluster_has_not_numbered_hold_init_until_it_has() {
    let mut e = synced_cluster_engine().await;
    // A new pod elsewhere whose labels have no number yet, and a local pod relabelled so.
    e.cluster_update(ClusterDelta {
        remotes: Changes {
            upsert: vec![remote_pod("new", "app=client,v=2", [10, 1, 0, 7])],
            ..Changes::default()
        },
        ..ClusterDelta::default()
    })
    .unwrap();
    assert!(
        !e.applied
            .ipcache
            .contains_key(&"10.1.0.7/32".parse().unwrap()),
        "an unnumbered pod is world, not init"
    );
    let mut ids: BTreeMap<Labels, Identity> = first_sync().identities.unwrap();
    ids.insert(shop_identity("app=client,v=2"), Identity(70_003));
    e.cluster_update(ClusterDelta {
        identities: Some(ids),
        ..ClusterDelta::default()
    })
    .unwrap();
    assert_eq!(
        e.applied.ipcache[&"10.1.0.7/32".parse().unwrap()].identity,
        Identity(70_003)
    );
}

#[tokio::test]
async fn a_relist_removes_what_is_gone_and_renumbering_moves_every_holder() {
    let mut e = synced_cluster_engine().await;
    // While the watch was down: `other` and the policy were deleted, and another node won
    // the race for client's labels, so their number changed.
    let mut relist = first_sync();
    relist.remotes.upsert.retain(|(k, _)| k != "pod/shop/other");
    relist.policies.upsert.clear();
    relist.identities = Some(
        [
            (shop_identity("app=web"), Identity(70_000)),
            (shop_identity("app=client"), Identity(80_001)),
        ]
        .into(),
    );
    e.cluster_update(relist).unwrap();
    assert!(!e.model.remotes.contains_key("pod/shop/other"));
    assert!(
        !e.applied
            .ipcache
            .contains_key(&"10.1.0.6/32".parse().unwrap())
    );
    assert!(e.model.policies.is_empty());
    assert_eq!(
        e.applied.ipcache[&"10.1.0.5/32".parse().unwrap()].identity,
        Identity(80_001)
    );
    assert_eq!(e.model.identities.refs(Identity(80_001)), 1);
    assert_eq!(e.model.identities.refs(Identity(70_001)), 0);
}

#[tokio::test]
async fn a_restarted_agent_enforces_the_clusters_state_before_its_watchers_sync() {
    let store = MemoryStore::default();
    let mut e = cluster_engine(
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        store.clone(),
    )
    .await;
    e.cluster_update(first_sync()).unwrap();
    // Labels known at ADD (the agent read the Pod first): the cluster's number at once.
    attach_web(&mut e, Some("app=web")).await;
    assert_eq!(e.record("shop/web").unwrap().identity, Identity(70_000));
    let maps = e.datapath.state.clone();
    let Engine {
        datapath, plumbing, ..
    } = e;
    let restarted = cluster_engine(
        MemoryDatapath {
            state: datapath.state,
            ..MemoryDatapath::default()
        },
        plumbing,
        store,
    )
    .await;
    assert_eq!(
        restarted.datapath.state, maps,
        "nothing rewritten, nothing dropped"
    );
    assert_eq!(
        ingress(&restarted, "shop/web", [10, 1, 0, 5], 80),
        Verdict::Allowed
    );
    assert_eq!(restarted.model.remotes.len(), 3);
}

#[tokio::test]
async fn the_mode_label_of_a_kubernetes_namespace_is_its_mode_and_no_identity_label() {
    let mut e = cluster_engine_with_web().await;
    e.cluster_update(ClusterDelta {
        endpoint_labels: vec![("shop/web".into(), labels("app=web"))],
        ..ClusterDelta::default()
    })
    .unwrap();
    let id = e.record("shop/web").unwrap().identity;
    assert_ne!(ingress(&e, "shop/web", [10, 1, 0, 6], 80), Verdict::Allowed);

    let mut monitored = shop_labels();
    monitored.insert(
        palisade_policies::audit::MODE_LABEL.into(),
        "monitor".into(),
    );
    e.cluster_update(ClusterDelta {
        namespaces: Changes {
            replace_all: false,
            upsert: vec![("shop".into(), monitored)],
            delete: vec![],
        },
        ..ClusterDelta::default()
    })
    .unwrap();
    let rec = e.record("shop/web").unwrap().clone();
    assert_eq!(rec.identity, id, "the mode label never reaches identities");
    assert_eq!(e.namespace_mode("shop"), NamespaceMode::Monitor);
    assert!(
        e.applied.endpoints[&rec.id].audit,
        "monitor: the endpoint is in audit"
    );
    assert_eq!(e.datapath.state, e.applied);
    // The CLI's mode is refused: the label is the mode.
    let err = e
        .set_namespace_mode("shop", NamespaceMode::Protect)
        .unwrap_err();
    assert!(
        matches!(err, EngineError::ClusterNamespaceMode { .. }),
        "{err}"
    );

    // The label removed: protected again.
    e.cluster_update(ClusterDelta {
        namespaces: Changes {
            replace_all: false,
            upsert: vec![("shop".into(), shop_labels())],
            delete: vec![],
        },
        ..ClusterDelta::default()
    })
    .unwrap();
    assert_eq!(e.namespace_mode("shop"), NamespaceMode::Protect);
    assert!(!e.applied.endpoints[&rec.id].audit);
}

#[tokio::test]
async fn a_pods_audit_annotation_puts_its_endpoint_in_audit_and_out() {
    let mut e = cluster_engine_with_web().await;
    let pod = |audit: bool| ClusterDelta {
        endpoint_labels: vec![("shop/web".into(), labels("app=web"))],
        endpoint_audit: vec![("shop/web".into(), audit)],
        ..ClusterDelta::default()
    };
    e.cluster_update(pod(false)).unwrap();
    let rec = e.record("shop/web").unwrap().clone();
    assert!(!e.applied.endpoints[&rec.id].audit);
    assert_ne!(ingress(&e, "shop/web", [10, 1, 0, 6], 80), Verdict::Allowed);
    e.cluster_update(pod(true)).unwrap();
    let rec = e.record("shop/web").unwrap().clone();
    assert!(rec.audit);
    assert!(e.applied.endpoints[&rec.id].audit, "annotated: in audit");
    assert_eq!(e.datapath.state, e.applied);
    e.cluster_update(pod(false)).unwrap();
    assert!(!e.applied.endpoints[&rec.id].audit, "unannotated: enforced");
}

/// A datapath whose map writes wait for the test's word, to catch the engine mid-apply.
struct GatedDatapath {
    inner: MemoryDatapath,
    /// Told when a write starts.
    started: std::sync::mpsc::Sender<()>,
    /// Waited on before each write is let through.
    release: std::sync::mpsc::Receiver<()>,
    gate: bool,
}

impl crate::datapath::Datapath for GatedDatapath {
    fn apply(
        &mut self,
        diff: &palisade_policies::mapstate::MapDiff,
    ) -> Result<(), crate::datapath::ApplyError> {
        if self.gate {
            let _ = self.started.send(());
            let _ = self.release.recv();
        }
        self.inner.apply(diff)
    }
    fn read_state(
        &self,
    ) -> Result<palisade_policies::mapstate::MapState, crate::datapath::DatapathError> {
        self.inner.read_state()
    }
    fn bump_revision(&mut self) -> Result<u32, crate::datapath::DatapathError> {
        self.inner.bump_revision()
    }
    fn attach(&mut self, ifname: &str, ifindex: u32) -> Result<(), crate::datapath::DatapathError> {
        self.inner.attach(ifname, ifindex)
    }
    fn detach(&mut self, ifname: &str, ifindex: u32) -> Result<(), crate::datapath::DatapathError> {
        self.inner.detach(ifname, ifindex)
    }
    fn flush_conntrack(
        &mut self,
        endpoint: EndpointId,
    ) -> Result<usize, crate::datapath::DatapathError> {
        self.inner.flush_conntrack(endpoint)
    }
    fn gc_conntrack(&mut self) -> Result<(usize, usize), crate::datapath::DatapathError> {
        self.inner.gc_conntrack()
    }
    fn prune_links(&mut self, live: &[(String, u32)]) {
        self.inner.prune_links(live);
    }
    fn connections(
        &self,
    ) -> Result<Vec<crate::datapath::TrackedConnection>, crate::datapath::DatapathError> {
        self.inner.connections()
    }
    fn endpoint_health(
        &self,
        endpoint: EndpointId,
        ifname: &str,
        ifindex: u32,
    ) -> Result<crate::datapath::EndpointHealth, crate::datapath::DatapathError> {
        self.inner.endpoint_health(endpoint, ifname, ifindex)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_while_a_large_apply_is_in_progress() {
    let (started_tx, started) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let mut e = Engine::start(
        config(),
        GatedDatapath {
            inner: MemoryDatapath::default(),
            started: started_tx,
            release: release_rx,
            gate: false,
        },
        MemoryPlumbing::default(),
        None,
        Outputs::default(),
    )
    .await
    .unwrap();
    e.endpoint_add(EndpointSpec {
        name: "server".into(),
        namespace: "x".into(),
        labels: labels("app=server"),
        ip: None,
        named_ports: vec![],
    })
    .await
    .unwrap();
    e.datapath.gate = true;
    let status = e.status_watch();
    assert_eq!(status.borrow().policies, 0);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let engine = tokio::spawn(e.run(rx));
    // A policy with 2,000 CIDR peers: its map writes wait until the test lets them through.
    let mut peers = String::new();
    for i in 0..2_000 {
        std::fmt::Write::write_fmt(
            &mut peers,
            format_args!("    - ipBlock: {{cidr: 20.{}.{}.0/24}}\n", i / 256, i % 256),
        )
        .unwrap();
    }
    let big = manifest::parse_manifests(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: big, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - from:\n{peers}    ports: [{{port: 80}}]\n"
    ))
    .unwrap();
    let apply = {
        let tx = tx.clone();
        tokio::spawn(async move { crate::ask(&tx, |r| crate::Command::PolicyApply(big, r)).await })
    };
    // The engine's task is inside the apply, blocked on the map writes.
    tokio::task::spawn_blocking(move || started.recv())
        .await
        .unwrap()
        .expect("the apply reached the datapath");
    // The status still answers (from before the apply), without the engine's task.
    let during = status.borrow().clone();
    assert_eq!((during.endpoints, during.policies), (1, 0));
    assert!(!apply.is_finished());
    release.send(()).unwrap();
    let update = apply.await.unwrap().unwrap();
    assert_eq!(update.policies[0].action, PolicyAction::Created);
    // Afterwards it tells the new state.
    let after = status.borrow().clone();
    assert_eq!(after.policies, 1);
    assert!(after.policy_map_entries > 2_000 && after.maps_in_sync);
    drop(tx);
    engine.await.unwrap();
}

const TO_FQDNS: &str = r"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: to-api
  namespace: demo
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toPorts:
    - ports: [{port: '53', protocol: UDP}]
      rules:
        dns: [{matchName: api.example.test}]
  - toFQDNs: [{matchName: api.example.test}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
";

fn egress_to(e: &TestEngine, from: &str, ip: Ipv4Addr, port: u16) -> Verdict {
    let s = e.record(from).unwrap();
    e.applied
        .decide(s.id, Direction::Egress, ip, 6, port)
        .unwrap()
        .verdict
}

fn learn(
    e: &mut TestEngine,
    client: Ipv4Addr,
    name: &str,
    ip: Ipv4Addr,
    ttl: u32,
) -> crate::LearnReport {
    e.fqdn_learn(&crate::LearnRequest {
        client,
        names: vec![name.into()],
        addresses: vec![ip],
        ttl,
    })
    .unwrap()
}

fn trace_fqdn(e: &TestEngine, name: &str, port: u16) -> crate::fqdn_trace::FqdnTraceResult {
    e.trace_fqdn(&crate::fqdn_trace::FqdnTraceQuery {
        from: "demo/client".into(),
        name: name.into(),
        port,
        protocol: None,
    })
    .unwrap()
}

#[tokio::test]
async fn trace_to_a_name_tells_its_selectors_its_lookups_and_each_learned_address() {
    use crate::fqdn_trace::LookupVerdict;
    let mut e = engine().await;
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TO_FQDNS).unwrap();
    // Selected, answered, but nothing learned yet: denied, and the trace says why.
    let before = trace_fqdn(&e, "API.Example.Test.", 443);
    assert_eq!(before.name, "api.example.test");
    assert!(!before.allowed && before.enforced);
    assert!(before.addresses.is_empty());
    assert_eq!(
        before.selected_by,
        ["demo/to-api egress rule 1 (matchName: api.example.test)"]
    );
    assert_eq!(before.lookup, LookupVerdict::Answered);
    assert_eq!(
        before.lookup_rules,
        ["demo/to-api egress rule 0 (matchName: api.example.test)"]
    );
    assert!(
        before.reason.contains("no address has been learned"),
        "{}",
        before.reason
    );
    // Learned: the address is listed with its lifetime and allowed on 443, not on 80.
    let api = Ipv4Addr::new(192, 0, 2, 10);
    learn(&mut e, client.ip, "api.example.test", api, 7_200);
    let after = trace_fqdn(&e, "api.example.test", 443);
    assert!(after.allowed, "{}", after.reason);
    assert_eq!(after.addresses.len(), 1);
    assert_eq!(after.addresses[0].address, api);
    assert!(after.addresses[0].ttl_remaining > 7_000);
    assert!(
        after.addresses[0]
            .egress
            .reason
            .contains("demo/to-api egress rule 1"),
        "{}",
        after.addresses[0].egress.reason
    );
    let port_80 = trace_fqdn(&e, "api.example.test", 80);
    assert!(!port_80.allowed);
    assert!(
        port_80.reason.contains("1 of the 1 addresses"),
        "{}",
        port_80.reason
    );
    // A name nothing selects, whose lookups the proxy refuses.
    let other = trace_fqdn(&e, "other.test", 443);
    assert!(!other.allowed && other.selected_by.is_empty());
    assert_eq!(other.lookup, LookupVerdict::Refused);
    assert!(
        other.reason.contains("no toFQDNs selector"),
        "{}",
        other.reason
    );
    // Not a name at all: a client error naming it.
    let bad = e
        .trace_fqdn(&crate::fqdn_trace::FqdnTraceQuery {
            from: "demo/client".into(),
            name: "a..b".into(),
            port: 443,
            protocol: None,
        })
        .unwrap_err();
    assert!(
        bad.to_string().contains("\"a..b\" is not a DNS name"),
        "{bad}"
    );
}

#[tokio::test]
async fn a_learned_answer_is_in_the_maps_when_learning_returns() {
    let mut e = engine().await;
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TO_FQDNS).unwrap();
    let api = Ipv4Addr::new(192, 0, 2, 10);
    assert_eq!(egress_to(&e, "client", api, 443), Verdict::DeniedByDefault);
    let report = learn(&mut e, client.ip, "api.example.test", api, 60);
    assert!(report.synced);
    assert_eq!(egress_to(&e, "client", api, 443), Verdict::Allowed);
    assert_eq!(e.datapath.state, e.applied, "written to the datapath");
    // Another address of no answer stays denied; a name no toFQDNs selects changes nothing.
    assert_eq!(
        egress_to(&e, "client", Ipv4Addr::new(192, 0, 2, 11), 443),
        Verdict::DeniedByDefault
    );
    let report = learn(
        &mut e,
        client.ip,
        "other.test",
        Ipv4Addr::new(192, 0, 2, 12),
        60,
    );
    assert!(!report.synced);
    assert_eq!(
        egress_to(&e, "client", Ipv4Addr::new(192, 0, 2, 12), 443),
        Verdict::DeniedByDefault
    );
    // Learned again: nothing to write.
    assert!(!learn(&mut e, client.ip, "api.example.test", api, 60).synced);
    let listed = e.fqdn_list();
    assert!(listed.iter().any(|v| v.name == "api.example.test"
        && v.address == api
        && v.endpoint == "demo/client"
        && v.identity.is_some()));
}

#[tokio::test]
async fn an_answer_the_maps_cannot_take_leaves_the_name_cache_and_maps_as_they_were() {
    let mut e = engine().await;
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TO_FQDNS).unwrap();
    let (a, b) = (Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11));
    learn(&mut e, client.ip, "api.example.test", a, 60);
    let (cache, maps) = (e.model.fqdns.clone(), e.applied.clone());
    e.datapath.fail_after = Some(0);
    let err = e
        .fqdn_learn(&crate::LearnRequest {
            client: client.ip,
            names: vec!["api.example.test".into(), "cdn.example.test".into()],
            addresses: vec![b],
            ttl: 60,
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::RolledBack(_)), "{err}");
    assert_eq!(e.model.fqdns, cache, "the name cache is put back");
    assert_eq!(e.applied, maps);
    assert_eq!(e.datapath.state, maps);
    assert_eq!(egress_to(&e, "client", a, 443), Verdict::Allowed);
    assert_eq!(egress_to(&e, "client", b, 443), Verdict::DeniedByDefault);
    // The next answer is learned as if the failed one had never come.
    e.datapath.fail_after = None;
    assert!(learn(&mut e, client.ip, "api.example.test", b, 60).synced);
    assert_eq!(egress_to(&e, "client", b, 443), Verdict::Allowed);
}

#[tokio::test]
async fn a_learned_address_that_is_only_allowed_skips_the_sweep_for_connections_needing_the_proxy()
{
    let mut e = engine().await;
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TO_FQDNS).unwrap();
    let learn_sweeps = |e: &mut TestEngine, last: u8| {
        e.revalidate = false;
        let api = Ipv4Addr::new(192, 0, 2, last);
        assert!(learn(e, client.ip, "api.example.test", api, 60).synced);
        e.revalidate
    };
    assert!(
        !learn_sweeps(&mut e, 10),
        "only an allowed address was added"
    );
    // With HTTP rules on the toFQDNs rule, a learned address is redirected: open connections
    // to it may now need the proxy.
    apply(
        &mut e,
        &TO_FQDNS.replace(
            "toPorts: [{ports: [{port: '443', protocol: TCP}]}]",
            "toPorts: [{ports: [{port: '443', protocol: TCP}], rules: {http: [{method: GET}]}}]",
        ),
    )
    .unwrap();
    assert!(learn_sweeps(&mut e, 11), "a redirected address was added");
}

#[tokio::test]
async fn a_learned_answer_is_compiled_incrementally_and_the_dns_policy_follows() {
    let (tx, rx) = tokio::sync::watch::channel(std::sync::Arc::new(
        palisade_policies::l7::DnsPolicy::default(),
    ));
    let mut e = Engine::start(
        config(),
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        None,
        Outputs {
            dns: Some(tx),
            ..Outputs::default()
        },
    )
    .await
    .unwrap();
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TO_FQDNS).unwrap();
    let api = Ipv4Addr::new(192, 0, 2, 10);
    assert!(learn(&mut e, client.ip, "api.example.test", api, 60).synced);
    assert_eq!(egress_to(&e, "client", api, 443), Verdict::Allowed);
    // The incremental compiler kept its selector cache: no whole compile reset it.
    assert!(e.compiler.cached_selectors() > 0);
    // The DNS proxy's policy came from the incremental compile.
    let dns = rx.borrow().clone();
    let server = std::net::SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
    assert!(dns.judge(client.ip, server, 17, "api.example.test").allowed);
    assert!(!dns.judge(client.ip, server, 17, "evil.test").allowed);
}

#[tokio::test]
async fn answers_learned_together_take_one_map_write() {
    let mut e = engine().await;
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TO_FQDNS).unwrap();
    let (a, b) = (Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 11));
    let req = |client, ip| crate::LearnRequest {
        client,
        names: vec!["api.example.test".into()],
        addresses: vec![ip],
        ttl: 60,
    };
    let before = e.datapath.applies;
    let results = e.fqdn_learn_all(&[
        req(client.ip, a),
        req(client.ip, b),
        req(Ipv4Addr::new(10, 9, 9, 9), a),
    ]);
    assert_eq!(e.datapath.applies, before + 1, "one write for the batch");
    assert!(results[0].as_ref().unwrap().synced);
    assert!(results[1].as_ref().unwrap().synced);
    assert!(
        matches!(results[2], Err(EngineError::NoSuchEndpoint { .. })),
        "an answer for no endpoint fails alone"
    );
    assert_eq!(egress_to(&e, "client", a, 443), Verdict::Allowed);
    assert_eq!(egress_to(&e, "client", b, 443), Verdict::Allowed);
    assert_eq!(e.datapath.state, e.applied);
}

#[tokio::test]
async fn an_expired_answer_leaves_the_maps_unless_a_connection_holds_it() {
    let mut e = Engine::start(
        EngineConfig {
            fqdn: crate::fqdn::FqdnLimits {
                min_ttl: 0,
                max_per_name: 50,
            },
            ..config()
        },
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        None,
        Outputs::default(),
    )
    .await
    .unwrap();
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TO_FQDNS).unwrap();
    let api = Ipv4Addr::new(192, 0, 2, 10);
    // A TTL of 0: expired at once.
    learn(&mut e, client.ip, "api.example.test", api, 0);
    assert_eq!(egress_to(&e, "client", api, 443), Verdict::Allowed);
    e.datapath.tracked.push(crate::datapath::TrackedConnection {
        endpoint: client.id,
        scope: Direction::Egress,
        protocol: 6,
        source: std::net::SocketAddrV4::new(client.ip, 40000),
        destination: std::net::SocketAddrV4::new(api, 443),
        through_proxy: false,
        from_proxy: false,
        rule: palisade_policies::mapstate::RuleId::NONE,
        open: true,
    });
    assert!(!e.fqdn_expire().unwrap(), "held by the open connection");
    assert_eq!(egress_to(&e, "client", api, 443), Verdict::Allowed);
    assert!(e.fqdn_list()[0].held_by_connections);
    e.datapath.tracked.clear();
    assert!(e.fqdn_expire().unwrap());
    assert_eq!(egress_to(&e, "client", api, 443), Verdict::DeniedByDefault);
    assert!(e.fqdn_list().is_empty());
}

#[tokio::test]
async fn learned_names_survive_a_restart() {
    let store = MemoryStore::default();
    let datapath = MemoryDatapath::default();
    let plumbing = MemoryPlumbing::default();
    let mut e = engine_with(datapath, plumbing, Some(store.clone())).await;
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TO_FQDNS).unwrap();
    let api = Ipv4Addr::new(192, 0, 2, 10);
    learn(&mut e, client.ip, "api.example.test", api, 600);
    let Engine {
        datapath, plumbing, ..
    } = e;
    let e = engine_with(
        MemoryDatapath {
            state: datapath.state,
            ..MemoryDatapath::default()
        },
        plumbing,
        Some(store),
    )
    .await;
    assert_eq!(egress_to(&e, "client", api, 443), Verdict::Allowed);
    assert_eq!(e.fqdn_list().len(), 1);
}

#[tokio::test]
async fn what_an_answer_teaches_is_recorded_before_its_release_or_it_is_refused() {
    let store = MemoryStore::default();
    let mut e = engine_with(
        MemoryDatapath::default(),
        MemoryPlumbing::default(),
        Some(store.clone()),
    )
    .await;
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TO_FQDNS).unwrap();
    let api = Ipv4Addr::new(192, 0, 2, 10);
    assert!(learn(&mut e, client.ip, "api.example.test", api, 600).synced);
    let recorded = store.recorded();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(
        (recorded[0].name.as_str(), recorded[0].address),
        ("api.example.test", api)
    );
    assert_eq!(
        store.kept().unwrap().fqdns,
        recorded,
        "the save that follows has it too"
    );
    // The same answer again in the same second changes nothing: nothing more to record.
    let expires = recorded[0].expires;
    learn(&mut e, client.ip, "api.example.test", api, 600);
    assert!(
        store.recorded().len() == 1 || store.recorded()[1].expires > expires,
        "only a longer lifetime is recorded again"
    );
    // Not recorded: the answer fails (the client gets SERVFAIL), though the maps allow it.
    store.fail_saves(true);
    let other = Ipv4Addr::new(192, 0, 2, 11);
    let err = e
        .fqdn_learn(&crate::LearnRequest {
            client: client.ip,
            names: vec!["api.example.test".into()],
            addresses: vec![other],
            ttl: 600,
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::Persist(_)), "{err}");
    store.fail_saves(false);
}

/// Two names, each selected by a rule of its own (other ports), that answer the same address.
const TWO_NAMES_ONE_ADDRESS: &str = r"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: shared-address
  namespace: demo
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toFQDNs: [{matchName: api.example.test}]
    toPorts: [{ports: [{port: '443', protocol: TCP}]}]
  - toFQDNs: [{matchName: cdn.example.test}]
    toPorts: [{ports: [{port: '80', protocol: TCP}]}]
";

#[tokio::test]
async fn an_address_already_known_for_another_name_is_allowed_by_the_new_names_rule() {
    let mut e = engine().await;
    let client = add(&mut e, "client", "demo", "app=client").await;
    apply(&mut e, TWO_NAMES_ONE_ADDRESS).unwrap();
    let shared = Ipv4Addr::new(192, 0, 2, 50);
    assert!(learn(&mut e, client.ip, "api.example.test", shared, 600).synced);
    assert_eq!(egress_to(&e, "client", shared, 443), Verdict::Allowed);
    assert_eq!(
        egress_to(&e, "client", shared, 80),
        Verdict::DeniedByDefault
    );
    // The same address, answered for the other name: its rule now allows it too.
    assert!(learn(&mut e, client.ip, "cdn.example.test", shared, 600).synced);
    assert_eq!(egress_to(&e, "client", shared, 80), Verdict::Allowed);
    assert_eq!(e.datapath.state, e.applied, "written to the datapath");
    // Known for both names: nothing more to compile.
    assert!(!learn(&mut e, client.ip, "cdn.example.test", shared, 600).synced);
}
