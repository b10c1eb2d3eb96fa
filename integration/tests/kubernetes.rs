//! Kubernetes mode end to end: real `--kubernetes` agents in node namespaces, pointed by a
//! kubeconfig at the API stand-in (`integration/src/kube_api`), manifests applied with the
//! real kubectl, pods attached by palisade-cni as kubelet runs it, real traffic between the
//! pods' namespaces.

use std::time::{Duration, Instant};

use palisade_integration::cluster::{Cluster, KubePod};
use palisade_integration::kube_api::PauseMode;
use palisade_integration::traffic::{Server, tcp_connects, tcp_server};
use serde_json::Value;

const WEB_FROM_CLIENTS: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
";

const PALISADE_WEB: &str = "apiVersion: palisade.io/v1
kind: NetworkPolicy
metadata: {name: web-l4, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]
";

fn connects(from: &KubePod, to: &KubePod) -> bool {
    tcp_connects(&from.container.netns, to.ip, 80)
}

/// Waits until `from -> to:80` is (or is not) allowed.
fn until_connects(c: &Cluster, from: &KubePod, to: &KubePod, allowed: bool, why: &str) {
    c.eventually(from.node, why, || connects(from, to) == allowed);
}

fn valid_condition(c: &Cluster, name: &str) -> Option<(String, String)> {
    let o = c.api.get("palisade.io/v1", "NetworkPolicy", "shop", name)?;
    let cond = o
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Valid")?
        .clone();
    Some((
        cond["status"].as_str()?.to_string(),
        cond["message"].as_str().unwrap_or_default().to_string(),
    ))
}

#[test]
fn pods_namespaces_and_every_policy_kind_from_the_api_are_enforced() {
    let c = Cluster::start("k8s-basic", 1, true, &[]);
    c.namespace("shop", &[("team", "blue")]);
    let web = c.pod(0, "shop", "web", &[("app", "web")]);
    let client = c.pod(0, "shop", "client", &[("app", "client")]);
    let other = c.pod(0, "shop", "other", &[("app", "other")]);

    // Identities are the cluster's: one PalisadeIdentity object per label set.
    let ep = c.endpoint(0, &web);
    let id = ep["identity"].as_u64().expect("identity");
    assert!(id >= 256, "{ep}");
    let objects = c.api.list("palisade.io/v1", "PalisadeIdentity");
    let obj = objects
        .iter()
        .find(|o| o["metadata"]["name"].as_str() == Some(id.to_string().as_str()))
        .unwrap_or_else(|| panic!("no PalisadeIdentity {id}: {objects:?}"));
    assert_eq!(obj["spec"]["labels"]["app"], "web");
    assert_eq!(obj["spec"]["labels"]["io.kubernetes.pod.namespace"], "shop");
    c.endpoint(0, &client);
    c.endpoint(0, &other);

    let _srv = tcp_server(&web.container.netns, 80);
    assert!(connects(&other, &web), "no policy selects web yet");

    // networking.k8s.io/v1, with kubectl.
    c.kubectl_stdin(&["create"], WEB_FROM_CLIENTS);
    until_connects(&c, &other, &web, false, "the NetworkPolicy denies other");
    assert!(connects(&client, &web), "clients may reach web");
    c.kubectl_stdin(
        &["replace"],
        &WEB_FROM_CLIENTS.replace("{app: client}", "{}"),
    );
    until_connects(
        &c,
        &other,
        &web,
        true,
        "the changed policy allows every pod",
    );
    c.kubectl_stdin(&["delete"], WEB_FROM_CLIENTS);

    // palisade.io/v1, with its status.
    c.kubectl_stdin(&["create"], PALISADE_WEB);
    until_connects(
        &c,
        &other,
        &web,
        false,
        "the palisade.io policy denies other",
    );
    assert!(connects(&client, &web));
    c.eventually(0, "the policy's Valid condition is True", || {
        valid_condition(&c, "web-l4").is_some_and(|(s, _)| s == "True")
    });

    // A rejected version: status False with the reason, an Event, enforcement unchanged.
    c.kubectl_stdin(
        &["replace"],
        &PALISADE_WEB.replace(
            "- fromEndpoints: [{matchLabels: {app: client}}]",
            "- fromCIDR: [10.0.0.0/33]",
        ),
    );
    c.eventually(0, "the policy's Valid condition is False", || {
        valid_condition(&c, "web-l4")
            .is_some_and(|(s, m)| s == "False" && m.contains("10.0.0.0/33"))
    });
    c.eventually(0, "a PolicyRejected event", || {
        c.api
            .events()
            .iter()
            .any(|e| e["reason"] == "PolicyRejected" && e["involvedObject"]["name"] == "web-l4")
    });
    assert!(connects(&client, &web), "the previous version still holds");
    assert!(!connects(&other, &web), "the previous version still holds");
    let table = c.kubectl(0, &["get", "palisadenetworkpolicies", "-n", "shop"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("VALID") && table.contains("False"),
        "{table}"
    );

    // A pod's labels and a namespace's labels move it between identities.
    let mut relabelled = c.api.get("v1", "Pod", "shop", "other").expect("the pod");
    relabelled["metadata"]["labels"]["app"] = Value::from("client");
    c.api.upsert(&relabelled);
    until_connects(
        &c,
        &other,
        &web,
        true,
        "other, relabelled a client, is allowed",
    );
    c.kubectl_stdin(&["delete"], PALISADE_WEB);
}

#[test]
fn cilium_policies_are_picked_up_when_their_crd_is_installed_later() {
    let c = Cluster::start("k8s-cilium", 1, true, &[]);
    c.namespace("shop", &[]);
    let web = c.pod(0, "shop", "web", &[("app", "web")]);
    let other = c.pod(0, "shop", "other", &[("app", "other")]);
    c.endpoint(0, &web);
    c.endpoint(0, &other);
    let _srv = tcp_server(&web.container.netns, 80);
    c.kubectl_stdin(&["create"], CILIUM_CRD);
    c.kubectl_stdin(
        &["create"],
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n",
    );
    until_connects(
        &c,
        &other,
        &web,
        false,
        "the CiliumNetworkPolicy denies other",
    );
    // The CRD removed: its policies go with it.
    let out = c.kubectl(0, &["delete", "crd", "ciliumnetworkpolicies.cilium.io"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until_connects(&c, &other, &web, true, "without the CRD its policy is gone");
}

/// Cilium's CRD as far as the agent needs it: served, with an open schema.
const CILIUM_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: ciliumnetworkpolicies.cilium.io}
spec:
  group: cilium.io
  scope: Namespaced
  names: {kind: CiliumNetworkPolicy, plural: ciliumnetworkpolicies, singular: ciliumnetworkpolicy, shortNames: [cnp]}
  versions:
  - name: v2
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
";

#[test]
fn a_dropped_watch_and_410_gone_relist_without_a_gap_and_remove_what_went_away() {
    let c = Cluster::start("k8s-relist", 1, true, &[]);
    c.namespace("shop", &[]);
    let web = c.pod(0, "shop", "web", &[("app", "web")]);
    let client = c.pod(0, "shop", "client", &[("app", "client")]);
    let other = c.pod(0, "shop", "other", &[("app", "other")]);
    for p in [&web, &client, &other] {
        c.endpoint(0, p);
    }
    let _srv = tcp_server(&web.container.netns, 80);
    c.kubectl_stdin(&["create"], WEB_FROM_CLIENTS);
    until_connects(&c, &other, &web, false, "the policy is enforced");

    // A watch dropped mid-stream: the agent rewatches; nothing changes.
    assert!(c.api.drop_watches() > 0, "the agent watches");
    c.eventually(0, "the agent watches again", || c.api.open_watches() >= 5);
    assert!(!connects(&other, &web) && connects(&client, &web));

    // History compacted while a second policy is deleted behind the agent's back: its next
    // watch gets 410 Gone, it relists, and removes exactly what is gone.
    c.kubectl_stdin(
        &["create"],
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: spare, namespace: shop}\nspec: {podSelector: {matchLabels: {app: client}}, ingress: [{}]}\n",
    );
    c.eventually(0, "the spare policy is enforced", || {
        policies(&c).contains(&"spare".to_string())
    });
    c.api.pause(PauseMode::Refuse);
    c.api
        .remove("networking.k8s.io/v1", "NetworkPolicy", "shop", "spare")
        .expect("the spare policy");
    c.api.compact();
    let relist_started = Instant::now();
    c.api.resume();
    // Until the relist ends, and after, `web` never loses its policy.
    let mut spare_gone = false;
    while relist_started.elapsed() < Duration::from_secs(20) {
        let p = policies(&c);
        assert!(
            p.contains(&"web".to_string()),
            "the policy web went missing: {p:?}"
        );
        if !p.contains(&"spare".to_string()) {
            spare_gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        spare_gone,
        "the relist did not remove what was deleted:\n{}",
        c.nodes[0].node.agent_log()
    );
    assert!(!connects(&other, &web) && connects(&client, &web));
}

fn policies(c: &Cluster) -> Vec<String> {
    c.nodes[0]
        .node
        .json(&["policy", "list"])
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_restart_while_the_api_changes_resyncs_and_keeps_enforcing() {
    let mut c = Cluster::start("k8s-restart", 1, true, &[]);
    c.namespace("shop", &[]);
    let web = c.pod(0, "shop", "web", &[("app", "web")]);
    let client = c.pod(0, "shop", "client", &[("app", "client")]);
    let other = c.pod(0, "shop", "other", &[("app", "other")]);
    for p in [&web, &client, &other] {
        c.endpoint(0, p);
    }
    let _srv = tcp_server(&web.container.netns, 80);
    c.kubectl_stdin(&["create"], WEB_FROM_CLIENTS);
    until_connects(&c, &other, &web, false, "the policy is enforced");
    c.nodes[0].node.stop_agent();
    // While the agent is down: the datapath keeps enforcing, and the API changes.
    assert!(!connects(&other, &web) && connects(&client, &web));
    c.api.upsert(&serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "other"}}}]}]},
    }));
    // Restarted with the API unreachable: what was enforced stays enforced.
    c.api.pause(PauseMode::Refuse);
    let node = &mut c.nodes[0].node;
    node.start_agent();
    assert!(
        !connects(&other, &web) && connects(&client, &web),
        "enforcement kept while the API is away"
    );
    c.api.resume();
    until_connects(
        &c,
        &other,
        &web,
        true,
        "after the resync, the changed policy",
    );
    assert!(
        !connects(&client, &web),
        "the changed policy allows only other"
    );
    let log = c.nodes[0].node.agent_log();
    assert!(
        log.contains("watch failing") || log.contains("retrying"),
        "the outage is logged:\n{log}"
    );
}

#[test]
fn missing_rbac_is_named_in_one_line_and_enforcement_stays() {
    let c = Cluster::start("k8s-rbac", 1, true, &[]);
    let (web, client, _srv) = web_only_for_friends(&c, "enforced before the fault");
    // The pods watch must be open before it is dropped: one opened after the drop and the
    // compaction would never relist, so it would never meet the fault.
    c.eventually(0, "the agent watches pods", || {
        c.api.open_watches_of("pods") > 0
    });
    let id = c
        .api
        .inject(palisade_integration::kube_api::Fault::forbidden(
            "system:serviceaccount:palisade:palisade",
            "list",
            "",
            "pods",
        ));
    // A change the pods watch does not see, then compaction, before the drop: the pods
    // watch's last resourceVersion is then gone, so its rewatch gets 410 and relists into the
    // fault (without the change, it could resume from the current version and never list).
    c.namespace("rbac-bump", &[]);
    c.api.compact();
    c.api.drop_watches();
    c.eventually(0, "the missing permission is named", || {
        c.nodes[0]
            .node
            .agent_log()
            .lines()
            .any(|l| l.contains("missing RBAC: cannot list pods"))
    });
    assert!(
        !connects(&client, &web),
        "enforcement stays while the pods cannot be listed"
    );
    assert!(
        c.nodes[0]
            .node
            .json(&["endpoint", "list"])
            .as_array()
            .is_some_and(|l| l.len() >= 2),
        "the endpoints stay while the pods cannot be listed"
    );
    c.api.remove_fault(id);
}

#[test]
fn two_nodes_share_identities_and_enforce_across_the_link() {
    let c = Cluster::start("k8s-two", 2, true, &[]);
    c.namespace("shop", &[]);
    let web = c.pod(0, "shop", "web", &[("app", "web")]);
    let client = c.pod(1, "shop", "client", &[("app", "client")]);
    let other = c.pod(1, "shop", "other", &[("app", "other")]);
    let web_a = c.endpoint(0, &web);
    let client_b = c.endpoint(1, &client);
    c.endpoint(1, &other);
    // Same labels, same number on both nodes.
    let twin = c.pod(1, "shop", "web-2", &[("app", "web")]);
    let web_b = c.endpoint(1, &twin);
    assert_eq!(
        web_a["identity"], web_b["identity"],
        "identities equal across nodes"
    );
    // Node a knows b's client by the number b gave it.
    c.eventually(0, "node a has the identity of node b's client", || {
        let ids = c.nodes[0].node.json(&["identity", "list"]);
        ids.as_array()
            .is_some_and(|l| l.iter().any(|i| i["id"] == client_b["identity"]))
    });
    let _srv = tcp_server(&web.container.netns, 80);
    c.eventually(0, "a cross-node connection", || connects(&client, &web));
    assert!(connects(&other, &web), "no policy yet");
    c.kubectl_stdin(&["create"], WEB_FROM_CLIENTS);
    until_connects(
        &c,
        &other,
        &web,
        false,
        "other, on node b, is denied by web's policy on node a",
    );
    assert!(connects(&client, &web), "client, on node b, is allowed");
    // Trace from a pod of node b to one of node a, on node a: its side, and who judges the other.
    let trace = c.nodes[0].node.palisade_ok(&[
        "policy",
        "trace",
        "--from",
        "shop/other",
        "--to",
        "shop/web",
        "--port",
        "80",
    ]);
    assert!(
        trace.starts_with("DENIED shop/other -> shop/web on 80/TCP (this node's side)"),
        "{trace}"
    );
    assert!(trace.contains("judged on node node-b"), "{trace}");
    // Node a's flows name the pods of node b, with the identity the cluster gave them.
    let flows = c.nodes[0]
        .node
        .flows(&["--from-pod", "shop/other", "--verdict", "DROPPED"]);
    let denied = flows
        .iter()
        .find(|f| f["destination"]["name"] == "web")
        .unwrap_or_else(|| panic!("no flow of other's denied connection: {flows:?}"));
    assert_eq!(denied["source"]["namespace"], "shop");
    assert_eq!(denied["source"]["name"], "other");
    assert!(
        denied["source"]["labels"]
            .to_string()
            .contains("k8s:app=other"),
        "{denied}"
    );
}

#[test]
fn namespace_labels_clusterwide_policies_deleted_pods_and_unused_identities() {
    let c = Cluster::start("k8s-ns", 1, true, &["--identity-gc-grace", "1s"]);
    c.namespace("shop", &[]);
    c.namespace("ops", &[("team", "red")]);
    let web = c.pod(0, "shop", "web", &[("app", "web")]);
    let probe = c.pod(0, "ops", "probe", &[("app", "probe")]);
    c.endpoint(0, &web);
    c.endpoint(0, &probe);
    let _srv = tcp_server(&web.container.netns, 80);
    // A clusterwide palisade.io policy: web takes only namespaces labelled team=blue.
    c.kubectl_stdin(
        &["create"],
        "apiVersion: palisade.io/v1\nkind: ClusterwideNetworkPolicy\nmetadata: {name: web-from-blue}\nspec:\n  endpointSelector: {matchLabels: {app: web, io.kubernetes.pod.namespace: shop}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.team: blue}}]\n",
    );
    until_connects(&c, &probe, &web, false, "ops (team=red) is denied");
    // The namespace relabelled: its pods' identities follow, and the policy with them.
    c.namespace("ops", &[("team", "blue")]);
    until_connects(&c, &probe, &web, true, "ops, now team=blue, is allowed");
    c.namespace("ops", &[("team", "red")]);
    until_connects(&c, &probe, &web, false, "ops, red again, is denied");

    // A deleted pod: its endpoint goes, and so, after the grace, does the identity no pod
    // has any more.
    let probe_ep = c.endpoint(0, &probe);
    let id = probe_ep["identity"].as_u64().expect("identity").to_string();
    assert!(
        c.api
            .list("palisade.io/v1", "PalisadeIdentity")
            .iter()
            .any(|o| o["metadata"]["name"] == id.as_str())
    );
    c.delete_pod(&probe);
    c.eventually(0, "the deleted pod's endpoint is gone", || {
        let list = c.nodes[0].node.json(&["endpoint", "list"]);
        !list.to_string().contains("\"probe\"")
    });
    c.eventually(0, "the unused identity is collected", || {
        !c.api
            .list("palisade.io/v1", "PalisadeIdentity")
            .iter()
            .any(|o| o["metadata"]["name"] == id.as_str())
    });
    let web_id = c.endpoint(0, &web)["identity"]
        .as_u64()
        .expect("identity")
        .to_string();
    assert!(
        c.api
            .list("palisade.io/v1", "PalisadeIdentity")
            .iter()
            .any(|o| o["metadata"]["name"] == web_id.as_str()),
        "an identity in use stays"
    );
}

/// Pods `shop/web` (serving TCP 80) and `shop/client`, and a policy that lets only
/// `app=friend` reach web: the client is denied (`why` says so while waiting).
fn web_only_for_friends(c: &Cluster, why: &str) -> (KubePod, KubePod, Server) {
    c.namespace("shop", &[]);
    let web = c.pod(0, "shop", "web", &[("app", "web")]);
    let client = c.pod(0, "shop", "client", &[("app", "client")]);
    c.endpoint(0, &web);
    c.endpoint(0, &client);
    let srv = tcp_server(&web.container.netns, 80);
    c.kubectl_stdin(
        &["create"],
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-from-friends, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: friend}}}]\n",
    );
    until_connects(c, &client, &web, false, why);
    (web, client, srv)
}

#[test]
fn a_namespace_label_sets_its_mode_and_monitor_reports_without_dropping() {
    let c = Cluster::start("k8s-mode", 1, true, &[]);
    let (web, client, _srv) = web_only_for_friends(&c, "protected: the client is denied");
    let identity = c.endpoint(0, &web)["identity"].clone();

    c.namespace("shop", &[("palisade.io/mode", "monitor")]);
    until_connects(&c, &client, &web, true, "monitor: the violation passes");
    let node = &c.nodes[0].node;
    let status = node.json(&["status"]);
    assert_eq!(
        status["audit"]["namespace_modes"]["shop"], "monitor",
        "{status}"
    );
    assert_eq!(
        c.endpoint(0, &web)["identity"],
        identity,
        "the mode label never reaches identities"
    );
    let audited = node.flows(&["--verdict", "AUDIT", "--namespace", "shop"]);
    assert!(
        audited
            .iter()
            .any(|f| f["policy"]["name"] == "shop/web-from-friends"),
        "{audited:?}"
    );
    let refused = node.palisade(&["namespace", "mode", "shop", "protect"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("palisade.io/mode=protect"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    c.namespace("shop", &[]);
    until_connects(
        &c,
        &client,
        &web,
        false,
        "the label removed: protected again",
    );
}

/// Sets (or, with None, removes) a pod's `palisade.io/audit` annotation through the API, as
/// `kubectl annotate` does.
fn annotate_audit(c: &Cluster, pod: &KubePod, value: Option<&str>) {
    let mut o = c
        .api
        .get("v1", "Pod", &pod.namespace, &pod.name)
        .expect("the pod exists");
    let annotations = o["metadata"]
        .as_object_mut()
        .unwrap()
        .entry("annotations")
        .or_insert_with(|| serde_json::json!({}));
    match value {
        Some(v) => annotations["palisade.io/audit"] = Value::String(v.into()),
        None => {
            annotations
                .as_object_mut()
                .unwrap()
                .remove("palisade.io/audit");
        }
    }
    c.api.upsert(&o);
}

#[test]
fn a_pods_audit_annotation_puts_its_endpoint_in_audit_and_a_bad_value_enforces() {
    let c = Cluster::start("k8s-podaudit", 1, true, &[]);
    let (web, client, _srv) = web_only_for_friends(&c, "enforced: the client is denied");
    let identity = c.endpoint(0, &web)["identity"].clone();

    // Annotated on the running pod: its endpoint is in audit, the violation passes as AUDIT.
    annotate_audit(&c, &web, Some("true"));
    until_connects(&c, &client, &web, true, "annotated: the violation passes");
    let ep = c.endpoint(0, &web);
    assert_eq!(ep["audit"], "endpoint", "{ep}");
    assert_eq!(ep["identity"], identity, "an annotation is no label");
    let node = &c.nodes[0].node;
    let audited = node.flows(&["--verdict", "AUDIT", "--namespace", "shop"]);
    assert!(
        audited
            .iter()
            .any(|f| f["policy"]["name"] == "shop/web-from-friends"),
        "{audited:?}"
    );
    assert!(c.endpoint(0, &client)["audit"].is_null(), "only that pod");

    // A value that is neither "true" nor "false": enforced, and said on the pod.
    annotate_audit(&c, &web, Some("yes"));
    until_connects(&c, &client, &web, false, "a malformed value enforces");
    c.eventually(0, "an InvalidAnnotation event on the pod", || {
        c.api.events().iter().any(|e| {
            e["reason"] == "InvalidAnnotation"
                && e["involvedObject"]["kind"] == "Pod"
                && e["involvedObject"]["name"] == "web"
                && e["message"].as_str().is_some_and(|m| m.contains("\"yes\""))
        })
    });
    assert!(
        node.agent_log().contains("palisade.io/audit"),
        "the agent's log names the annotation"
    );

    annotate_audit(&c, &web, Some("true"));
    until_connects(&c, &client, &web, true, "in audit again");
    annotate_audit(&c, &web, None);
    until_connects(&c, &client, &web, false, "the annotation removed: enforced");
    assert!(c.endpoint(0, &web)["audit"].is_null());
}
