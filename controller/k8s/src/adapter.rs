//! The adapter's loop: watch events into the view, what changed into the engine in batches,
//! identities numbered before they are needed, and what the rest of the node derives from the
//! cluster (the pod directory, routes to other nodes' pods, this node's CNI configuration,
//! the leader's status snapshot) published after every batch.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use ipnetwork::Ipv4Network;
use kube::Client;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::DynamicObject;
use palisade_engine::{Command, ask};
use palisade_policies::identity::Identity;
use palisade_policies::labels::Labels;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::directory::{LocalPod, PodDirectory};
use crate::error::K8sError;
use crate::identities;
use crate::status::{self, ObjectStatus, StatusConfig, StatusSnapshot};
use crate::translate::PolicyObjectKind;
use crate::view::ClusterView;
use crate::watchers::{self, Input};

#[derive(Clone, Debug)]
pub struct AdapterConfig {
    /// None: in-cluster configuration (a pod's service account), else the usual kubeconfig.
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    /// The agent's own namespace (its Lease).
    pub namespace: String,
    /// Events closer together than this are one batch (one compile).
    pub batch_window: Duration,
    /// Where this node's CNI configuration is written once its pod CIDR is known.
    pub cni_conf_dir: Option<PathBuf>,
    /// host-local's address directory in that configuration.
    pub cni_ipam_dir: PathBuf,
    /// The agent's API socket, for that configuration.
    pub api_socket: PathBuf,
    pub lease_duration: Duration,
    pub lease_renew: Duration,
    pub identity_gc_grace: Duration,
}

/// What the adapter gives the rest of the agent.
pub struct Adapter {
    pub directory: PodDirectory,
    /// Routes to other nodes' pod CIDRs: CIDR -> the node's address.
    pub routes: watch::Receiver<BTreeMap<Ipv4Network, Ipv4Addr>>,
    pub task: JoinHandle<()>,
}

/// The client for `cfg`: a kubeconfig when one is named, else in-cluster, else the default
/// kubeconfig.
pub async fn client(cfg: &AdapterConfig) -> Result<Client, K8sError> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| K8sError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| K8sError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => match kube::Config::incluster() {
            Ok(c) => c,
            Err(incluster) => kube::Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .map_err(|kubeconfig| K8sError::NoConfig {
                    incluster: incluster.to_string(),
                    kubeconfig: kubeconfig.to_string(),
                })?,
        },
    };
    Client::try_from(config).map_err(K8sError::Client)
}

/// Starts the adapter: watchers, the loop, the status writer.
pub async fn start(
    cfg: AdapterConfig,
    client: Client,
    engine: mpsc::Sender<Command>,
) -> Result<Adapter, K8sError> {
    let known = ask(&engine, Command::ClusterKnown)
        .await
        .map_err(|_| K8sError::EngineGone)?;
    let (directory, attached) = PodDirectory::new();
    let (routes_tx, routes) = watch::channel(BTreeMap::new());
    let (status_tx, status_rx) = watch::channel(Arc::new(StatusSnapshot::default()));
    tokio::spawn(status::run(
        client.clone(),
        StatusConfig {
            namespace: cfg.namespace.clone(),
            lease_name: "palisade-status".into(),
            holder: cfg.node_name.clone(),
            lease_duration: cfg.lease_duration,
            renew_every: cfg.lease_renew,
            identity_gc_grace: cfg.identity_gc_grace,
        },
        status_rx,
    ));
    let view = ClusterView::new(cfg.node_name.clone(), known);
    let task = tokio::spawn(
        Loop {
            cfg,
            client,
            engine,
            view,
            directory: directory.clone(),
            routes: routes_tx,
            status: status_tx,
            policy_watchers: BTreeMap::new(),
            written_conf: None,
            allocation_failing: false,
            reported_audit: BTreeSet::new(),
        }
        .run(attached),
    );
    Ok(Adapter {
        directory,
        routes,
        task,
    })
}

struct Loop {
    cfg: AdapterConfig,
    client: Client,
    engine: mpsc::Sender<Command>,
    view: ClusterView,
    directory: PodDirectory,
    routes: watch::Sender<BTreeMap<Ipv4Network, Ipv4Addr>>,
    status: watch::Sender<Arc<StatusSnapshot>>,
    policy_watchers: BTreeMap<PolicyObjectKind, JoinHandle<()>>,
    written_conf: Option<Ipv4Network>,
    allocation_failing: bool,
    /// (pod, value) of malformed `palisade.io/audit` annotations already reported.
    reported_audit: BTreeSet<(String, String)>,
}

/// Inputs queued for the loop; enough for a relist of thousands of objects to flow.
const QUEUE: usize = 4096;
/// Identity objects created at once.
const ALLOCATE_AT_ONCE: usize = 16;

impl Loop {
    async fn run(mut self, mut attached: mpsc::UnboundedReceiver<String>) {
        let (tx, mut rx) = mpsc::channel::<Input>(QUEUE);
        let mut watchers = vec![
            watchers::namespaces(&self.client, tx.clone()),
            watchers::pods(&self.client, tx.clone()),
            watchers::nodes(&self.client, tx.clone()),
            watchers::identities(&self.client, tx.clone()),
            watchers::policy_kinds(&self.client, tx.clone()),
        ];
        self.policy_watchers.insert(
            PolicyObjectKind::Kubernetes,
            watchers::policies(&self.client, PolicyObjectKind::Kubernetes, tx.clone()),
        );
        info!(node = %self.cfg.node_name, "watching the Kubernetes API");
        let mut was_synced = false;
        loop {
            // Wait for something, then take whatever else arrives within the batch window.
            tokio::select! {
                input = rx.recv() => match input {
                    Some(i) => self.take(i, &tx),
                    None => break,
                },
                key = attached.recv() => match key {
                    Some(k) => self.view.touch_pod(&k),
                    None => break,
                },
            }
            let deadline = tokio::time::Instant::now() + self.cfg.batch_window;
            loop {
                tokio::select! {
                    input = rx.recv() => match input {
                        Some(i) => self.take(i, &tx),
                        None => break,
                    },
                    Some(k) = attached.recv() => self.view.touch_pod(&k),
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            if !self.view.is_dirty() {
                continue;
            }
            self.number_workloads().await;
            if self.flush().await.is_err() {
                break;
            }
            if self.view.synced() && !was_synced {
                was_synced = true;
                info!("in sync with the Kubernetes API");
            }
        }
        for w in watchers
            .drain(..)
            .chain(std::mem::take(&mut self.policy_watchers).into_values())
        {
            w.abort();
        }
    }

    fn take(&mut self, input: Input, tx: &mpsc::Sender<Input>) {
        match input {
            Input::Namespaces(c) => self.view.namespaces(c),
            Input::Pods(c) => self.view.pods(c),
            Input::Nodes(c) => self.view.nodes(c),
            Input::Identities(c) => self.view.identities(c),
            Input::Policies(kind, c) => {
                // A stale event of a watcher stopped with its CRD.
                if self.view.active_kinds().contains(&kind) {
                    self.view.policies(kind, c);
                }
            }
            Input::PolicyKinds(kinds) => {
                for kind in PolicyObjectKind::ALL {
                    let wanted = kind == PolicyObjectKind::Kubernetes || kinds.contains(&kind);
                    match (wanted, self.policy_watchers.contains_key(&kind)) {
                        (true, false) => {
                            info!(
                                kind = kind.kind(),
                                api_version = kind.api_version(),
                                "watching a policy kind whose CRD is installed"
                            );
                            self.policy_watchers
                                .insert(kind, watchers::policies(&self.client, kind, tx.clone()));
                        }
                        (false, true) => {
                            info!(
                                kind = kind.kind(),
                                api_version = kind.api_version(),
                                "its CRD is gone: its policies are removed"
                            );
                            if let Some(w) = self.policy_watchers.remove(&kind) {
                                w.abort();
                            }
                        }
                        _ => {}
                    }
                }
                self.view.policy_kinds(kinds);
            }
        }
    }

    /// Gives every pod's labels a cluster number before the engine needs it.
    async fn number_workloads(&mut self) {
        let missing: Vec<Labels> = self
            .view
            .workload_label_sets()
            .into_iter()
            .filter_map(|(l, id)| id.is_none().then_some(l))
            .collect();
        if missing.is_empty() {
            return;
        }
        let api = Api::<DynamicObject>::all_with(self.client.clone(), &identities::api_resource());
        let known = self.view_identities();
        let results: Vec<(Labels, Result<Identity, K8sError>)> = futures::stream::iter(missing)
            .map(|labels| {
                let (api, known) = (&api, &known);
                async move {
                    let r = identities::allocate(api, &labels, known).await;
                    (labels, r)
                }
            })
            .buffer_unordered(ALLOCATE_AT_ONCE)
            .collect()
            .await;
        let mut failed = 0;
        for (labels, r) in results {
            match r {
                Ok(id) => self.view.identity_allocated(id, labels),
                Err(e) => {
                    if !self.allocation_failing {
                        warn!(error = %e, "identity not allocated; its workloads hold init until it is");
                    }
                    failed += 1;
                }
            }
        }
        self.allocation_failing = failed > 0;
    }

    fn view_identities(&self) -> BTreeMap<Identity, Labels> {
        self.view.identity_objects().into_iter().collect()
    }

    async fn flush(&mut self) -> Result<(), ()> {
        let delta = self.view.take_delta();
        if !delta.is_empty() {
            let started = tokio::time::Instant::now();
            match ask(&self.engine, |r| Command::ClusterUpdate(delta, r)).await {
                Ok(report) => {
                    debug!(
                        map_operations = report.map_operations,
                        took_ms = started.elapsed().as_millis(),
                        "cluster changes enforced"
                    );
                    for (policy, why) in report.rejected {
                        self.view.policy_rejected(&policy, why);
                    }
                }
                Err(palisade_engine::AskError::EngineGone) => return Err(()),
                Err(e) => {
                    warn!(error = %e, "cluster changes not applied; enforcement is unchanged and they are retried with the next change");
                }
            }
        }
        self.publish();
        Ok(())
    }

    /// Reports each of this node's pods whose `palisade.io/audit` annotation is neither
    /// `"true"` nor `"false"` (its endpoint stays enforced): once per value, in the log and as
    /// a Warning Event on the pod.
    fn report_bad_audit_annotations(&mut self) {
        let bad: Vec<(String, String, String, String)> = self
            .view
            .local_pods()
            .into_iter()
            .filter_map(|(key, p, _)| {
                let value = p.audit.as_ref().err()?;
                Some((key, p.namespace.clone(), p.name.clone(), value.clone()))
            })
            .collect();
        let keys: BTreeSet<String> = bad.iter().map(|(k, ..)| k.clone()).collect();
        self.reported_audit.retain(|(k, _)| keys.contains(k));
        for (key, namespace, name, value) in bad {
            if !self.reported_audit.insert((key.clone(), value.clone())) {
                continue;
            }
            let why = format!(
                "annotation {}: {value:?} is neither \"true\" nor \"false\"; the pod's endpoint stays enforced",
                palisade_policies::audit::AUDIT_ANNOTATION
            );
            warn!(pod = %key, value = %value, "{why}");
            let client = self.client.clone();
            let node = self.cfg.node_name.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    status::record_pod_event(&client, &node, &namespace, &name, &why).await
                {
                    warn!(pod = %key, error = %e, "annotation event not recorded");
                }
            });
        }
    }

    /// What the rest of the agent derives from the view, after each batch.
    fn publish(&mut self) {
        self.report_bad_audit_annotations();
        let pods: BTreeMap<String, LocalPod> = self
            .view
            .local_pods()
            .into_iter()
            .filter(|(_, _, numbered)| *numbered)
            .map(|(k, p, _)| {
                (
                    k,
                    LocalPod {
                        labels: p.labels.clone(),
                        named_ports: p.named_ports.clone(),
                    },
                )
            })
            .collect();
        self.directory.publish(pods);

        let routes: BTreeMap<Ipv4Network, Ipv4Addr> = self
            .view
            .nodes_iter()
            .filter(|n| n.name != self.view.node())
            .filter_map(|n| Some((n.pod_cidr?, n.internal_ip?)))
            .collect();
        self.routes.send_if_modified(|r| {
            let changed = *r != routes;
            if changed {
                *r = routes;
            }
            changed
        });

        if let Some(dir) = &self.cfg.cni_conf_dir
            && let Some(cidr) = self
                .view
                .node_info(self.view.node())
                .and_then(|n| n.pod_cidr)
            && self.written_conf != Some(cidr)
        {
            match crate::cni_conf::write(dir, cidr, &self.cfg.api_socket, &self.cfg.cni_ipam_dir) {
                Ok(path) => {
                    info!(path = %path.display(), pod_cidr = %cidr, "CNI configuration written");
                    self.written_conf = Some(cidr);
                }
                Err(e) => warn!(dir = %dir.display(), error = %e, "CNI configuration not written"),
            }
        }

        let unused: BTreeSet<Identity> = self.view.unused_identities().into_iter().collect();
        let all = self.view.identity_objects();
        let snapshot = StatusSnapshot {
            objects: self
                .view
                .validity()
                .into_iter()
                .map(|(o, v)| ObjectStatus {
                    kind: o.kind,
                    namespace: o.namespace.clone(),
                    name: o.name.clone(),
                    uid: o.uid.clone(),
                    generation: o.generation,
                    validity: v,
                    current: o.valid_condition.clone(),
                })
                .collect(),
            unused_identities: all
                .into_iter()
                .filter(|(id, _)| unused.contains(id))
                .collect(),
            synced: self.view.synced(),
        };
        self.status.send_if_modified(|s| {
            let changed = **s != snapshot;
            if changed {
                *s = Arc::new(snapshot);
            }
            changed
        });
    }
}
