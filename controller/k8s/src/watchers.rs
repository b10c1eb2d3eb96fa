//! One task per watched resource: kube-runtime's watcher (list, then watch from the list's
//! resourceVersion, bookmarks, `410 Gone` -> relist, reconnects with backoff), its events
//! translated to plain data and sent to the adapter's loop. Parsing policy objects happens
//! here, off that loop.

use std::collections::BTreeSet;
use std::fmt::Debug;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use palisade_policies::identity::Identity;
use palisade_policies::labels::Labels;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::describe;
use crate::identities;
use crate::translate::{
    NodeInfo, PodInfo, PolicyObjectKind, namespace_labels, node_info, parse_policy_object, pod_info,
};
use crate::view::{Change, PolicyObject, object_key, pod_key};

/// What the watchers tell the adapter's loop.
#[derive(Debug)]
pub enum Input {
    Namespaces(Change<(String, Labels)>),
    Pods(Change<PodInfo>),
    Nodes(Change<NodeInfo>),
    Identities(Change<(Identity, Labels)>),
    Policies(PolicyObjectKind, Change<PolicyObject>),
    /// The policy kinds whose CRD is installed and established.
    PolicyKinds(BTreeSet<PolicyObjectKind>),
}

/// Runs a watcher on `api`, sending each translated event wrapped by `wrap`. A failing watch
/// is logged once (with what to do about it), retried with backoff, and its recovery said.
fn spawn<K, T>(
    api: Api<K>,
    config: watcher::Config,
    resource: String,
    translate: impl Fn(&K) -> Option<T> + Send + 'static,
    key: impl Fn(&K) -> String + Send + 'static,
    wrap: impl Fn(Change<T>) -> Input + Send + 'static,
    tx: mpsc::Sender<Input>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = Box::pin(watcher::watcher(api, config).default_backoff());
        let mut failing = false;
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(e) => e,
                Err(e) => {
                    if !failing {
                        warn!(resource = %resource, error = %watch_error(&resource, &e), "watch failing; retrying with backoff (enforcement already in place stays)");
                    }
                    failing = true;
                    continue;
                }
            };
            if failing {
                info!(resource = %resource, "watch recovered");
                failing = false;
            }
            let change = match event {
                Event::Init => Change::Init,
                Event::InitDone => Change::InitDone,
                Event::InitApply(o) => match translate(&o) {
                    Some(t) => Change::InitApply(t),
                    None => continue,
                },
                Event::Apply(o) => match translate(&o) {
                    Some(t) => Change::Apply(t),
                    None => continue,
                },
                Event::Delete(o) => Change::Delete(key(&o)),
            };
            if tx.send(wrap(change)).await.is_err() {
                return;
            }
        }
    })
}

fn watch_error(resource: &str, e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(e) => describe("list", resource, e),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            describe("watch", resource, e)
        }
        watcher::Error::WatchError(s) => format!("watching {resource}: {} ({})", s.message, s.code),
        watcher::Error::NoResourceVersion => {
            format!("{resource}: the server sent no resourceVersion")
        }
    }
}

/// List (from the API server's cache: `resourceVersion=0`, as Cilium lists, which spares
/// etcd when thousands of nodes relist), then watch with bookmarks.
fn config() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

pub fn namespaces(client: &Client, tx: mpsc::Sender<Input>) -> JoinHandle<()> {
    spawn(
        Api::<Namespace>::all(client.clone()),
        config(),
        "namespaces".into(),
        namespace_labels,
        ResourceExt::name_any,
        Input::Namespaces,
        tx,
    )
}

/// Every pod of the cluster: this node's for their labels, the others for the ipcache.
pub fn pods(client: &Client, tx: mpsc::Sender<Input>) -> JoinHandle<()> {
    spawn(
        Api::<Pod>::all(client.clone()),
        config(),
        "pods".into(),
        pod_info,
        |p: &Pod| pod_key(&p.namespace().unwrap_or_default(), &p.name_any()),
        Input::Pods,
        tx,
    )
}

pub fn nodes(client: &Client, tx: mpsc::Sender<Input>) -> JoinHandle<()> {
    spawn(
        Api::<Node>::all(client.clone()),
        config(),
        "nodes".into(),
        node_info,
        ResourceExt::name_any,
        Input::Nodes,
        tx,
    )
}

pub fn identities(client: &Client, tx: mpsc::Sender<Input>) -> JoinHandle<()> {
    let ar = identities::api_resource();
    spawn(
        Api::<DynamicObject>::all_with(client.clone(), &ar),
        config(),
        format!("{}.{}", identities::PLURAL, identities::GROUP),
        identities::from_object,
        ResourceExt::name_any,
        Input::Identities,
        tx,
    )
}

fn policy_object(kind: PolicyObjectKind, value: &Value) -> Option<PolicyObject> {
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_string();
    let namespace = meta
        .get("namespace")
        .and_then(Value::as_str)
        .map(str::to_string);
    let valid_condition = value
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|c| c.iter().find(|c| c["type"] == "Valid"))
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (
                s("status"),
                s("reason"),
                s("message"),
                c["observedGeneration"].as_i64().unwrap_or_default(),
            )
        });
    Some(PolicyObject {
        kind,
        name,
        namespace,
        uid: meta
            .get("uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        generation: meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or_default(),
        parsed: parse_policy_object(kind, value).map_err(|e| e.to_string()),
        valid_condition,
    })
}

/// The API resource of a CRD-served policy kind.
pub fn policy_api_resource(kind: PolicyObjectKind) -> ApiResource {
    let (group, version) = kind
        .api_version()
        .split_once('/')
        .unwrap_or(("", kind.api_version()));
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind.kind()),
        kind.plural(),
    )
}

pub fn policies(
    client: &Client,
    kind: PolicyObjectKind,
    tx: mpsc::Sender<Input>,
) -> JoinHandle<()> {
    let key = move |ns: Option<String>, name: String| object_key(kind, ns.as_deref(), &name);
    if kind == PolicyObjectKind::Kubernetes {
        return spawn(
            Api::<NetworkPolicy>::all(client.clone()),
            config(),
            "networkpolicies.networking.k8s.io".into(),
            move |p: &NetworkPolicy| {
                serde_json::to_value(p)
                    .ok()
                    .and_then(|v| policy_object(kind, &v))
            },
            move |p: &NetworkPolicy| key(p.namespace(), p.name_any()),
            move |c| Input::Policies(kind, c),
            tx,
        );
    }
    let ar = policy_api_resource(kind);
    spawn(
        Api::<DynamicObject>::all_with(client.clone(), &ar),
        config(),
        kind.crd_name().unwrap_or_default(),
        move |o: &DynamicObject| {
            serde_json::to_value(o)
                .ok()
                .and_then(|v| policy_object(kind, &v))
        },
        move |o: &DynamicObject| key(o.namespace(), o.name_any()),
        move |c| Input::Policies(kind, c),
        tx,
    )
}

/// Which policy kinds are served: the CRDs' names, watched, so a CRD installed later (Cilium's)
/// is picked up and one removed takes its policies with it.
pub fn policy_kinds(client: &Client, tx: mpsc::Sender<Input>) -> JoinHandle<()> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    tokio::spawn(async move {
        let resource = "customresourcedefinitions.apiextensions.k8s.io";
        let mut stream = Box::pin(watcher::watcher(api, config()).default_backoff());
        let mut present: BTreeSet<String> = BTreeSet::new();
        let mut listing: Option<BTreeSet<String>> = None;
        let mut synced = false;
        let mut failing = false;
        let mut sent: Option<BTreeSet<PolicyObjectKind>> = None;
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(e) => e,
                Err(e) => {
                    if !failing {
                        warn!(resource, error = %watch_error(resource, &e), "watch failing; retrying with backoff");
                    }
                    failing = true;
                    continue;
                }
            };
            failing = false;
            let established = |c: &CustomResourceDefinition| {
                c.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_none_or(|cs| {
                        // A CRD the server has not finished serving yet is not there; one
                        // without conditions (a server that sets none) is.
                        cs.iter()
                            .find(|c| c.type_ == "Established")
                            .is_none_or(|c| c.status == "True")
                    })
            };
            match event {
                Event::Init => listing = Some(BTreeSet::new()),
                Event::InitApply(c) => {
                    if established(&c)
                        && let Some(l) = listing.as_mut()
                    {
                        l.insert(c.name_any());
                    }
                }
                Event::InitDone => {
                    present = listing.take().unwrap_or_default();
                    synced = true;
                }
                Event::Apply(c) => {
                    if established(&c) {
                        present.insert(c.name_any());
                    } else {
                        present.remove(&c.name_any());
                    }
                }
                Event::Delete(c) => {
                    present.remove(&c.name_any());
                }
            }
            if !synced {
                continue;
            }
            let active: BTreeSet<PolicyObjectKind> = PolicyObjectKind::ALL
                .into_iter()
                .filter(|k| k.crd_name().is_some_and(|n| present.contains(&n)))
                .collect();
            if sent.as_ref() != Some(&active) {
                sent = Some(active.clone());
                if tx.send(Input::PolicyKinds(active)).await.is_err() {
                    return;
                }
            }
        }
    })
}
