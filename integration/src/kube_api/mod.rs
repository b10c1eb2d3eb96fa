//! A Kubernetes API server stand-in that speaks the real wire protocol over plain HTTP, so
//! the real agent (kube-rs, through a kubeconfig) and the real `kubectl` can be pointed at it
//! where no kube-apiserver can run.
//!
//! What it serves: discovery (`/api`, `/apis`, per-group and per-version documents, and
//! aggregated discovery `apidiscovery.k8s.io/v2`), `/version`; get, list (label and field
//! selectors, `limit`/`continue` over a consistent snapshot, `resourceVersion` +
//! `resourceVersionMatch`), watch (from a resourceVersion out of a bounded history, `410
//! Gone` as an ERROR event past it, bookmarks, streaming lists with `sendInitialEvents`,
//! selectors applied to every event), create (`generateName`), update with optimistic
//! concurrency, patch (JSON, merge, strategic merge, server-side apply approximated as a
//! merge), delete and deletecollection; the `status` subresource; Table and
//! PartialObjectMetadata responses; CRDs that make their resources served. Objects of one
//! global, increasing resourceVersion, with uid, creationTimestamp and generation.
//!
//! How it differs from kube-apiserver, where a client could tell:
//! - plain HTTP, no authentication or authorization (a bearer token is accepted and
//!   ignored); RBAC denials only when injected with [`Fault::forbidden`];
//! - protobuf request bodies are decoded only for the kinds kubectl's typed `create`
//!   subcommands send (Namespace, ConfigMap, ServiceAccount, Service, RBAC objects) and
//!   DeleteOptions; other protobuf bodies get `415`, and answers are always JSON (which every
//!   client accepts: they ask for protobuf or JSON);
//! - `/openapi/v3` lists paths and parameters but no schemas (kubectl's default
//!   `--validate=strict` works, as it leaves validation to the server; `kubectl explain`
//!   shows no fields), and there is no `/openapi/v2`;
//! - server-side apply merges the applied configuration (maps merged, lists replaced) with no
//!   field ownership: no apply conflicts, and fields dropped from a later apply stay; no
//!   `managedFields` anywhere;
//! - no controllers: no garbage collection of owned objects, no default ServiceAccounts, no
//!   scheduling, no Event expiry; a graceful Pod delete on a node is finished at once (as by
//!   an instant kubelet), a namespace or CRD delete removes its contents at once;
//! - subresources other than `status` (`scale`, `log`, `exec`, `eviction`, `binding`, ...)
//!   are not served;
//! - CRD schemas: defaults, pruning and type/enum/bounds/pattern checks only (no `format`,
//!   `oneOf`/`anyOf`/`allOf`/`not` or CEL); conversion between served versions is `None`;
//! - admission: Namespace lifecycle only; built-in objects are checked by decoding into their
//!   k8s-openapi types (unknown fields, wrong types) and for names, labels, annotations, Pod
//!   containers, Pod spec immutability and CRD names and versions, not by all of
//!   kube-apiserver's validation;
//! - status writes change only `.status`, for built-ins too (a real Pod status write may
//!   also change labels and annotations);
//! - Table columns follow kube-apiserver's printers for the resources served, with a
//!   simpler Pod STATUS (deletion, reason, first waiting/terminated reason, phase).
//!
//! Test controls (on [`ApiServer`]): objects written and removed directly, open watches
//! dropped, history compacted, the server paused (refusing or hanging) and resumed on the
//! same addresses, faults injected per verb and resource (errors, latency, dropped
//! connections), requests counted, Events read. It can listen on the host's loopback and
//! inside any number of network namespaces, all serving the same objects.
//!
//! ```no_run
//! use palisade_integration::kube_api::{ApiServer, Fault, PauseMode};
//! use serde_json::json;
//!
//! let api = ApiServer::start(); // on the host's 127.0.0.1
//! let addr = api.listen_in_netns("t1-node"); // and inside a node namespace
//! ApiServer::write_kubeconfig(addr, "/tmp/kubeconfig".as_ref()).unwrap();
//! // ... start `palisade-agent --kubernetes --kubeconfig /tmp/kubeconfig` in t1-node ...
//! api.upsert(&json!({"apiVersion": "v1", "kind": "Pod",
//!     "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
//!     "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx"}]},
//!     "status": {"phase": "Running", "podIP": "10.0.1.5"}}));
//! api.drop_watches(); // every watch ends mid-stream; clients re-watch
//! api.compact(); // and a re-watch from before now gets 410 Gone
//! let id = api.inject(Fault::forbidden("system:serviceaccount:palisade:palisade", "list", "", "pods"));
//! api.remove_fault(id);
//! api.pause(PauseMode::Refuse);
//! api.resume();
//! assert!(api.requests().of("watch", "pods") > 0);
//! let mut kubectl = api.kubectl(addr, Some("t1-node"));
//! kubectl.args(["get", "pods", "-o", "wide"]);
//! ```

//! Test controls (on [`ApiServer`]): objects written and removed directly, open watches
//! dropped, history compacted, the server paused (refusing or hanging) and resumed on the
//! same addresses, faults injected per verb and resource, requests counted, Events read.
//! It can listen on the host's loopback and inside any number of network namespaces, all
//! serving the same objects.

mod control;
mod discovery;
mod jsonpath;
mod openapi;
mod ops;
mod patch;
mod protobuf;
mod resources;
mod schema;
mod selectors;
mod server;
pub mod status;
mod store;
mod strategy;
mod table;
mod util;
mod validation;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

pub use control::{Fault, FaultId, RequestCounts, RequestKey};
pub use status::ApiError;

use server::Shared;
use store::Store;

/// How the server behaves where tests want a say.
#[derive(Clone, Debug)]
pub struct Config {
    /// Changes kept for watches and consistent lists from an older resourceVersion; older
    /// ones get `410 Gone`.
    pub history: usize,
    /// How often a watch that allows bookmarks gets one (the real server: about a minute).
    pub bookmark_interval: Duration,
    /// A watch's lifetime when the client gives no `timeoutSeconds`.
    pub default_watch_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            history: 10_000,
            bookmark_interval: Duration::from_mins(1),
            default_watch_timeout: Duration::from_mins(30),
        }
    }
}

/// How a paused server looks to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseMode {
    /// Listeners closed and every connection dropped: connections are refused until
    /// [`ApiServer::resume`] listens again on the same addresses.
    Refuse,
    /// Connections are accepted but nothing is answered, and open watches deliver nothing,
    /// until [`ApiServer::resume`]; then everything held is served.
    Hang,
}

#[derive(Clone, Debug)]
struct Listener {
    netns: Option<String>,
    addr: SocketAddr,
}

static SERVERS: AtomicU32 = AtomicU32::new(0);

/// The stand-in: a store of objects served on one or more listeners until dropped.
pub struct ApiServer {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    listeners: Mutex<Vec<Listener>>,
    /// The accept loops running now.
    accepting: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    dir: PathBuf,
}

/// The namespaces a fresh cluster has (with the `default/kubernetes` Service, the objects a
/// new server starts with).
const INITIAL_NAMESPACES: &[&str] = &["default", "kube-node-lease", "kube-public", "kube-system"];

fn bind_in(netns: Option<&str>, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let owned = netns.map(str::to_string);
    let bind = move || {
        let l = std::net::TcpListener::bind(addr).or_else(|e| {
            // A fresh namespace's loopback is down, so 127.0.0.1 is not there yet: bring `lo`
            // up (anything running in the namespace needs it) and try again.
            match (e.kind(), owned.as_deref()) {
                (std::io::ErrorKind::AddrNotAvailable, Some(ns)) if addr.ip().is_loopback() => {
                    let up = Command::new("ip")
                        .args(["-n", ns, "link", "set", "lo", "up"])
                        .status()?;
                    if !up.success() {
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("{e} (and `ip -n {ns} link set lo up` failed)"),
                        ));
                    }
                    std::net::TcpListener::bind(addr)
                }
                _ => Err(e),
            }
        })?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    match netns {
        None => bind(),
        Some(ns) => {
            let ns = ns.to_string();
            // A socket keeps the namespace it was made in: bind on a thread that entered it.
            std::thread::spawn(move || {
                let f = File::open(format!("/run/netns/{ns}"))?;
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                bind()
            })
            .join()
            .map_err(|_| std::io::Error::other("the binding thread panicked"))?
        }
    }
}

impl ApiServer {
    /// A server with the default configuration, listening on the host's 127.0.0.1.
    pub fn start() -> ApiServer {
        let s = ApiServer::with_config(Config::default());
        s.listen();
        s
    }

    /// A server with no listener yet; add some with [`ApiServer::listen`],
    /// [`ApiServer::listen_in_netns`] or [`ApiServer::listen_at`].
    pub fn with_config(config: Config) -> ApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-api-standin")
            .enable_all()
            .build()
            .expect("a tokio runtime for the API stand-in");
        let n = SERVERS.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("palisade-kube-api-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the stand-in's temp dir");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(config.history)),
            controls: Mutex::new(control::Controls::default()),
            config,
            pause: watch::channel(None).0,
            epoch: watch::channel(0).0,
            connections: std::sync::atomic::AtomicUsize::new(0),
        });
        let s = ApiServer {
            shared,
            runtime: Some(runtime),
            listeners: Mutex::new(Vec::new()),
            accepting: Mutex::new(Vec::new()),
            dir,
        };
        for ns in INITIAL_NAMESPACES {
            s.upsert(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        }
        // The Service kube-apiserver keeps for itself (it routes nowhere here).
        s.upsert(&json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
            "status": {"loadBalancer": {}},
        }));
        s
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("running until dropped")
    }

    fn serve(&self, l: std::net::TcpListener) {
        let shared = Arc::clone(&self.shared);
        let rt = self.runtime();
        let _guard = rt.enter();
        let listener = tokio::net::TcpListener::from_std(l).expect("a tokio listener");
        let task = rt.spawn(server::accept_loop(shared, listener));
        self.accepting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
    }

    /// Stops every accept loop and returns once their listening sockets are closed.
    fn stop_accepting(&self) {
        let tasks: Vec<_> = self
            .accepting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for t in &tasks {
            t.abort();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !tasks.iter().all(tokio::task::JoinHandle::is_finished) {
            assert!(
                std::time::Instant::now() < deadline,
                "the stand-in's listeners did not close"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Listens at `addr` (port 0: any free port) in the given network namespace (`None`: the
    /// test's own); returns the address bound.
    pub fn listen_at(&self, netns: Option<&str>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let l = bind_in(netns, addr)?;
        let bound = l.local_addr()?;
        self.serve(l);
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Listener {
                netns: netns.map(str::to_string),
                addr: bound,
            });
        Ok(bound)
    }

    /// Listens on a free port of the host's 127.0.0.1.
    pub fn listen(&self) -> SocketAddr {
        self.listen_at(None, SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .expect("listening on 127.0.0.1")
    }

    /// Listens on a free port of 127.0.0.1 inside `/run/netns/NETNS` (bringing its `lo` up
    /// if it is down), for an agent running in that namespace.
    pub fn listen_in_netns(&self, netns: &str) -> SocketAddr {
        self.listen_at(Some(netns), SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .unwrap_or_else(|e| panic!("listening on 127.0.0.1 in {netns}: {e}"))
    }

    /// The first listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)[0]
            .addr
    }

    /// The URL of a listener, as a kubeconfig's `server`.
    pub fn url(addr: SocketAddr) -> String {
        format!("http://{addr}")
    }

    /// A kubeconfig for the listener at `addr`: no TLS, and a bearer token the server ignores
    /// (clients send it, as they would to a real cluster). Namespace `default`.
    pub fn kubeconfig(addr: SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\ncurrent-context: standin\nusers:\n- name: standin\n  user:\n    token: standin-token-ignored\npreferences: {{}}\n",
            Self::url(addr)
        )
    }

    /// Writes [`ApiServer::kubeconfig`] for `addr` to `path`.
    pub fn write_kubeconfig(addr: SocketAddr, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, Self::kubeconfig(addr))
    }

    /// A kubeconfig file for `addr` in the server's temp dir.
    pub fn kubeconfig_path(&self, addr: SocketAddr) -> PathBuf {
        let p = self.dir.join(format!("kubeconfig-{}", addr.port()));
        Self::write_kubeconfig(addr, &p).expect("writing a kubeconfig");
        p
    }

    /// `kubectl --kubeconfig K --cache-dir D` for the listener at `addr`, run inside `netns`
    /// (through `nsenter --net`) when given. The cache dir is the server's own, so a
    /// discovery cache of another run on the same port can never be used.
    pub fn kubectl(&self, addr: SocketAddr, netns: Option<&str>) -> Command {
        let kubeconfig = self.kubeconfig_path(addr);
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}"))
                    .arg("--")
                    .arg("kubectl");
                c
            }
            None => Command::new("kubectl"),
        };
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .env("HOME", &self.dir);
        cmd
    }

    /// A kube-rs client for the listener at `addr`, built from its kubeconfig as the agent
    /// builds one.
    pub async fn client(&self, addr: SocketAddr) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(self.kubeconfig_path(addr))
            .expect("the kubeconfig parses");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("a kube config");
        kube::Client::try_from(config).expect("a kube client")
    }

    fn def_of(&self, api_version: &str, kind: &str) -> Result<resources::ResourceDef, ApiError> {
        self.shared
            .store()
            .registry()
            .find_kind(api_version, kind)
            .cloned()
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "no kind {kind:?} is registered for version {api_version:?}"
                ))
            })
    }

    fn to_value(obj: &impl Serialize) -> Value {
        serde_json::to_value(obj).expect("the object serializes")
    }

    /// Writes an object directly, bypassing HTTP, decoding, defaulting and the status rules:
    /// what a test does when it plays kubelet, scheduler or a controller (a Pod with its
    /// `status.podIP`, a Node with its addresses). Creates or replaces; watchers see ADDED or
    /// MODIFIED. Takes anything serializable (a k8s-openapi type, `json!`). Returns the
    /// stored object.
    pub fn upsert(&self, obj: &impl Serialize) -> Value {
        let v = Self::to_value(obj);
        let (av, kind) = (
            v["apiVersion"].as_str().unwrap_or(""),
            v["kind"].as_str().unwrap_or(""),
        );
        let def = self
            .def_of(av, kind)
            .unwrap_or_else(|e| panic!("upsert: {e}"));
        ops::upsert_raw(&mut self.shared.store(), &def, v).unwrap_or_else(|e| panic!("upsert: {e}"))
    }

    /// Creates an object as a POST would (decoding, defaults, validation, status reset), with
    /// the request's namespace taken from the object.
    pub fn create(&self, obj: &impl Serialize) -> Result<Value, ApiError> {
        let v = Self::to_value(obj);
        let (av, kind) = (
            v["apiVersion"].as_str().unwrap_or(""),
            v["kind"].as_str().unwrap_or(""),
        );
        let def = self.def_of(av, kind)?;
        let ns = util::meta_str(&v, "namespace").to_string();
        let ns = if def.namespaced && ns.is_empty() {
            "default".to_string()
        } else {
            ns
        };
        let (decoded, _) = strategy::decode(&def, v, strategy::FieldValidation::Warn)?;
        ops::create(&mut self.shared.store(), &def, &ns, decoded, false)
    }

    /// An object, if it exists (`namespace` empty for cluster-scoped kinds).
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let def = self.def_of(api_version, kind).ok()?;
        ops::get(&self.shared.store(), &def, namespace, name).ok()
    }

    /// Every object of a kind, in the real server's list order.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let Ok(def) = self.def_of(api_version, kind) else {
            return Vec::new();
        };
        ops::objects(&self.shared.store(), &def.storage)
            .values()
            .map(|o| def.view_form(o))
            .collect()
    }

    /// Removes an object at once, bypassing finalizers and grace periods (its namespace's or
    /// CRD's contents with it); watchers see DELETED. Returns its last state.
    pub fn remove(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let def = self.def_of(api_version, kind).ok()?;
        ops::remove_raw(&mut self.shared.store(), &def, namespace, name).ok()
    }

    /// Every core/v1 Event stored (events.k8s.io/v1 Events are the same objects, shown here in
    /// core form: `involvedObject`, `message`, `reportingComponent`).
    pub fn events(&self) -> Vec<Value> {
        self.list("v1", "Event")
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Drops every open watch mid-stream: its connection is closed without a final event or
    /// chunk, as a network failure would. Returns how many there were.
    pub fn drop_watches(&self) -> usize {
        self.shared.store().abort_watches()
    }

    /// How many watches are open now.
    pub fn open_watches(&self) -> usize {
        self.shared.store().watch_count()
    }

    /// How many watches on one resource, by its plural name (`pods`), are open now.
    pub fn open_watches_of(&self, plural: &str) -> usize {
        self.shared.store().watch_count_of(plural)
    }

    /// Compacts the history: a watch from any resourceVersion before now gets `410 Gone`
    /// (an ERROR event with reason Expired), and so does a continue token or an exact list
    /// from before now. Open watches go on.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Pauses the server (see [`PauseMode`]); with `Refuse`, returns once nothing listens and
    /// every connection is closed.
    pub fn pause(&self, mode: PauseMode) {
        self.shared.pause.send_replace(Some(mode));
        if mode == PauseMode::Refuse {
            self.stop_accepting();
            self.shared.epoch.send_modify(|e| *e += 1);
            self.shared.store().abort_watches();
            // Return once every connection is closed, so that clients see the outage (and
            // do not reuse a connection the server is still closing).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while self.shared.connections.load(Ordering::SeqCst) > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the stand-in's connections did not close"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Serves again, on the same addresses (listening anew after `Refuse`).
    pub fn resume(&self) {
        let was = self.shared.pause.send_replace(None);
        if was == Some(PauseMode::Refuse) {
            let listeners = self
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            for l in listeners {
                let sock = bind_in(l.netns.as_deref(), l.addr)
                    .unwrap_or_else(|e| panic!("listening again on {}: {e}", l.addr));
                self.serve(sock);
            }
        }
    }

    /// Makes matching requests fail (see [`Fault`]) until removed.
    pub fn inject(&self, fault: Fault) -> FaultId {
        self.shared.controls().inject(fault)
    }

    pub fn remove_fault(&self, id: FaultId) {
        self.shared.controls().remove(id);
    }

    pub fn clear_faults(&self) {
        self.shared.controls().clear();
    }

    /// The requests counted so far.
    pub fn requests(&self) -> RequestCounts {
        self.shared.controls().counts()
    }

    pub fn reset_requests(&self) {
        self.shared.controls().reset_counts();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.epoch.send_modify(|e| *e += 1);
        self.shared.store().abort_watches();
        if let Some(rt) = self.runtime.take() {
            // Never blocks, so dropping the server inside an async test is fine.
            rt.shutdown_background();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
