//! `palisade-agent`: wires the edges to the engine and runs until SIGINT/SIGTERM. The
//! datapath stays attached and enforcing when the agent stops; a restarted agent takes over
//! the pinned maps and links.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{ArgAction, Parser};
use ipnetwork::Ipv4Network;
use palisade_engine::catalog::Catalog;
use palisade_engine::revalidate::EngineEvent;
use palisade_engine::store::StateStore;
use palisade_engine::{Engine, EngineConfig, Outputs, ipam};
use palisade_policies::audit::NamespaceMode;
use palisade_policies::compile::{EnforcementMode, Settings};
use palisade_policies::l7::{DnsPolicy, ProxyPolicy};
use palisade_policies::learn::{ConnectionLog, LogLimits};
use palisade_proxy::listener::{self as proxy_listener, ProxyContext};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::datapath::events::{Flush, RingItem, read_events};
use crate::datapath::{BpfDatapath, DatapathConfig};
use crate::flows::learn::LogFile;
use crate::flows::proxy::ProxyFlows;
use crate::flows::store::FlowStore;
use crate::flows::{Clock, enrich};
use crate::metrics::Telemetry;
use crate::plumbing::NetlinkPlumbing;
use crate::policy_dir::PolicyDir;
use crate::server::{ApiState, LabelSource, serve};
use crate::state_file::{FileStore, StateDir};
use crate::status::StatusSource;

fn parse_enforcement(s: &str) -> Result<EnforcementMode, String> {
    EnforcementMode::parse(s).ok_or_else(|| format!("{s:?} is not default, always or never"))
}

fn parse_seconds_or_zero(s: &str) -> Result<u32, String> {
    if s == "0" {
        return Ok(0);
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    u32::try_from(d.as_secs()).map_err(|_| format!("{s:?} is too long"))
}

fn parse_seconds(s: &str) -> Result<u32, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    u32::try_from(d.as_secs().max(1)).map_err(|_| format!("{s:?} is too long"))
}

/// Palisade agent: identity-aware network policy for workloads on this node.
#[derive(Debug, Parser)]
#[command(name = "palisade-agent", version)]
pub struct AgentArgs {
    /// Local mode: workloads and policies come from this agent's API and --policy-dir.
    #[arg(long, conflicts_with = "kubernetes")]
    pub local: bool,
    /// Kubernetes mode: pods, namespaces, nodes and policies come from the API server;
    /// palisade-cni attaches this node's pods.
    #[arg(long)]
    pub kubernetes: bool,
    /// Kubernetes mode: the kubeconfig (default: in-cluster, else ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the Node this agent runs on.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubernetes mode: the agent's namespace (its status Lease).
    #[arg(long, env = "POD_NAMESPACE", default_value = "palisade")]
    pub k8s_namespace: String,
    /// Kubernetes mode: where the agent writes this node's CNI network once the Node says
    /// its pod CIDR.
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// Kubernetes mode: host-local's address directory in that network.
    #[arg(long, default_value = "/var/lib/palisade/cni-ipam")]
    pub cni_ipam_dir: PathBuf,
    /// Kubernetes mode: route other nodes' pod CIDRs via those nodes (nodes on one link).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub direct_node_routes: bool,
    /// Kubernetes mode: API events closer together than this are one change.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub batch_window: std::time::Duration,
    /// Kubernetes mode: the status Lease's duration.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: std::time::Duration,
    /// Kubernetes mode: how often the Lease holder renews it.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_renew: std::time::Duration,
    /// Kubernetes mode: how long an identity no pod uses is kept before it is collected.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub identity_gc_grace: std::time::Duration,
    /// Unix socket of the agent API.
    #[arg(long, default_value = "/run/palisade/agent.sock")]
    pub api: PathBuf,
    /// Where identities, endpoints and policies are kept across restarts.
    #[arg(long, default_value = "/var/lib/palisade")]
    pub state_dir: PathBuf,
    /// bpffs directory for pinned maps and links (mounted if it is not bpffs yet).
    #[arg(long, default_value = "/sys/fs/bpf/palisade")]
    pub bpffs: PathBuf,
    /// Directory of policy manifests (*.yaml), applied at start and whenever they change.
    #[arg(long)]
    pub policy_dir: Option<PathBuf>,
    /// Address pool for endpoints; its first address is the node's.
    #[arg(long, default_value = "10.200.0.0/16")]
    pub pod_cidr: Ipv4Network,
    /// Policy enforcement mode: default, always or never.
    #[arg(long, default_value = "default", value_parser = parse_enforcement)]
    pub enforcement: EnforcementMode,
    /// Report what policy would drop, but forward it (verdict AUDIT).
    #[arg(long)]
    pub audit: bool,
    /// Let the node itself reach every endpoint (health checks), as Cilium does by default.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub allow_host_ingress: bool,
    /// Deliver between this node's endpoints through the node's routing and netfilter, as
    /// without Palisade, instead of straight into the destination's namespace from BPF
    /// (after both the sender's egress and the destination's ingress verdict); for
    /// comparison and debugging.
    #[arg(long)]
    pub no_fast_path: bool,
    /// Count every packet and byte of each connection in its conntrack entry (shown by
    /// `palisade conntrack list`): a map write per packet. Off, entries keep their first
    /// packet's counts.
    #[arg(long)]
    pub conntrack_accounting: bool,
    /// Flows kept in memory for `palisade observe`.
    #[arg(long, default_value_t = 65_536)]
    pub flow_buffer: usize,
    /// How long the aggregate of connections (`policy suggest`, `what-if`, `map`) remembers
    /// one not seen again; it is kept in the state directory across restarts.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub learn_retention: std::time::Duration,
    /// Flow events each endpoint may emit per second (per CPU); 0 = unlimited.
    #[arg(long, default_value_t = 1_000)]
    pub events_per_second: u32,
    /// Conntrack lifetime of established TCP connections.
    #[arg(long, default_value = "6h", value_parser = parse_seconds)]
    pub ct_tcp_timeout: u32,
    /// Port of the transparent L7 proxy in the node namespace (HTTP rules redirect to it).
    #[arg(long, default_value_t = 15_001)]
    pub proxy_port: u16,
    /// Port (UDP and TCP) of the transparent DNS proxy in the node namespace (DNS rules
    /// redirect to it).
    #[arg(long, default_value_t = 15_053)]
    pub dns_proxy_port: u16,
    /// The shortest time an address a DNS answer taught stays allowed, whatever its TTL
    /// (Cilium's tofqdns-min-ttl).
    #[arg(long, default_value = "1h", value_parser = parse_seconds_or_zero)]
    pub fqdn_min_ttl: u32,
    /// Addresses each endpoint keeps per DNS name; an answer beyond it evicts the oldest
    /// (counted in palisade_fqdn_evicted_addresses).
    #[arg(long, default_value_t = 50)]
    pub fqdn_max_ips_per_name: usize,
    /// Threads of the L7 proxy, each owning the connections dealt to it (default: one per CPU).
    #[arg(long)]
    pub proxy_workers: Option<usize>,
    /// Serve Prometheus metrics and /healthz here (e.g. 127.0.0.1:9962); off when absent.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// containerd's socket, where the labels of containers `ctr run --cni` attached are read.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub containerd_socket: PathBuf,
    /// Conntrack lifetime of UDP/ICMP flows and of TCP connections before the handshake ends.
    #[arg(long, default_value = "60s", value_parser = parse_seconds)]
    pub ct_other_timeout: u32,
    /// A host-facing interface for the XDP prefilter (repeatable): packets from a CIDR in the
    /// deny list are dropped there before any other processing. Native XDP where the driver
    /// has it, generic otherwise. Never an endpoint's interface.
    #[arg(long = "prefilter-device", value_name = "IFNAME")]
    pub prefilter_devices: Vec<String>,
    /// The prefilter's deny list, read at start: one CIDR a line, `#` comments. Entries added
    /// with `palisade prefilter add` are kept beside it (in the state directory).
    #[arg(long, value_name = "FILE")]
    pub prefilter_file: Option<PathBuf>,
}

/// How often the connection log is saved when it changed.
const LOG_SAVE_EVERY: std::time::Duration = std::time::Duration::from_mins(1);

/// Saves the connection log if it changed, on a blocking thread.
async fn save_log(flows: &Arc<FlowStore>, file: &LogFile) {
    let (flows, file) = (Arc::clone(flows), file.clone());
    let saved = tokio::task::spawn_blocking(move || {
        flows
            .log_if_changed(std::time::SystemTime::now())
            .map(|log| file.save(&log))
    })
    .await;
    match saved {
        Ok(Some(Err(e))) => warn!(error = %e, "the connection log was not saved"),
        Err(e) => warn!(error = %e, "saving the connection log failed"),
        Ok(_) => {}
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent still stops when killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("shutting down; the datapath keeps enforcing");
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if !args.local && !args.kubernetes {
        bail!(
            "say which mode: `palisade-agent --local` (workloads and policies from this agent's API) or `palisade-agent --kubernetes --node-name NAME`"
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "palisade-agent must run as root (it loads BPF programs and manages network namespaces)"
        );
    }
    // A device that is not there fails the start before anything is changed.
    for dev in &args.prefilter_devices {
        crate::prefilter::bpf::Loaded::host_device(dev).context("--prefilter-device")?;
    }
    let node_ip: Ipv4Addr = ipam::node_ip(&args.pod_cidr);
    let (mut datapath, maps, ring) = BpfDatapath::load(
        &args.bpffs,
        DatapathConfig {
            ct_tcp_established_timeout_s: args.ct_tcp_timeout,
            ct_tcp_syn_timeout_s: args.ct_other_timeout,
            ct_other_timeout_s: args.ct_other_timeout,
            events_per_second: args.events_per_second,
            events_burst: args.events_per_second.saturating_mul(2),
            fast_path: !args.no_fast_path,
            conntrack_accounting: args.conntrack_accounting,
            ..DatapathConfig::default()
        },
    )
    .context("cannot load the BPF datapath (is this kernel BPF-capable and are we root?)")?;
    let maps = Arc::new(maps);
    let mut plumbing = NetlinkPlumbing::new().context("netlink")?;
    plumbing
        .setup_node(node_ip)
        .await
        .context("preparing the node namespace")?;
    // Without its listener and routing the proxy cannot take connections; policy with HTTP
    // rules then fails closed (redirected traffic is dropped) instead of the agent failing.
    let proxy_socket = match proxy_listener::bind_transparent(args.proxy_port) {
        Ok(l) => match plumbing.setup_proxy_routing().await {
            Ok(()) => Some(l),
            Err(e) => {
                error!(error = %e, "L7 proxy routing not set up; HTTP rules will drop their traffic");
                None
            }
        },
        Err(e) => {
            error!(port = args.proxy_port, error = %e, "L7 proxy listener not bound; HTTP rules will drop their traffic");
            None
        }
    };
    // The DNS proxy likewise: without its sockets, DNS rules fail closed.
    let dns_sockets = match (
        palisade_dns::server::bind_udp(args.dns_proxy_port),
        palisade_dns::server::bind_tcp(args.dns_proxy_port),
    ) {
        (Ok(u), Ok(t)) if proxy_socket.is_some() => Some((u, t)),
        (Err(e), _) | (_, Err(e)) => {
            error!(port = args.dns_proxy_port, error = %e, "DNS proxy sockets not bound; DNS rules will drop their traffic");
            None
        }
        _ => None,
    };
    if let Some(http) = &proxy_socket {
        use std::os::fd::AsFd as _;
        let mut listeners = vec![(args.proxy_port, http.as_fd())];
        if let Some((_, tcp)) = &dns_sockets {
            listeners.push((args.dns_proxy_port, tcp.as_fd()));
        }
        if let Err(e) = datapath.steer_time_wait_syns(&listeners) {
            warn!(error = %e, "a client reusing a port the proxy holds in TIME_WAIT will connect only on its SYN retransmission");
        }
    }
    let (proxy_tx, proxy_rx) = watch::channel(Arc::new(ProxyPolicy::default()));
    let (dns_tx, dns_rx) = watch::channel(Arc::new(DnsPolicy::default()));
    let (catalog_tx, catalog_rx) = watch::channel(Arc::new(Catalog::default()));
    let telemetry = Arc::new(Telemetry::default());
    let (engine_events_tx, mut engine_events) = mpsc::unbounded_channel();

    // The policy directory is read before the start, so the first sync includes it; the
    // watcher then reads it again and keeps the engine up to date.
    let policy_dir = args.policy_dir.as_deref().map(PolicyDir::new);
    let file_policies = match policy_dir.as_ref().map(PolicyDir::read_if_changed) {
        Some(Ok(Some((_, loaded)))) => loaded,
        Some(Err(e)) => {
            warn!(error = %e, "policy directory not loaded");
            Vec::new()
        }
        Some(Ok(None)) | None => Vec::new(),
    };
    let (store, store_flusher) =
        FileStore::start(StateDir::new(&args.state_dir)?).context("state writer thread")?;
    let mut engine = Engine::start(
        EngineConfig {
            pod_cidr: args.pod_cidr,
            node_ip,
            settings: Settings {
                enforcement: args.enforcement,
                allow_host_ingress: args.allow_host_ingress,
                audit: args.audit,
                proxy_port: proxy_socket.as_ref().map(|_| args.proxy_port),
                dns_proxy_port: dns_sockets.as_ref().map(|_| args.dns_proxy_port),
            },
            cluster_identities: args.kubernetes,
            file_policies,
            fqdn: palisade_engine::fqdn::FqdnLimits {
                min_ttl: args.fqdn_min_ttl,
                max_per_name: args.fqdn_max_ips_per_name,
            },
        },
        datapath,
        plumbing,
        Some(Box::new(store) as Box<dyn StateStore>),
        Outputs {
            catalog: Some(catalog_tx),
            proxy: Some(proxy_tx),
            dns: Some(dns_tx),
            metrics: Some(Arc::clone(&telemetry) as Arc<dyn palisade_engine::EngineMetrics>),
            events: Some(engine_events_tx),
            status: None,
        },
    )
    .await
    .context("starting the engine")?;

    // After the engine has restored the endpoints, so that none of their interfaces can be
    // taken for a host-facing one.
    let prefilter = crate::prefilter::Prefilter::start(
        &crate::prefilter::PrefilterConfig {
            devices: args.prefilter_devices.clone(),
            file: args.prefilter_file.clone(),
        },
        &args.bpffs,
        &args.state_dir,
    )
    .context("starting the XDP prefilter")?;
    let prefilter = Arc::new(std::sync::Mutex::new(prefilter));

    let log_file = LogFile::in_dir(&args.state_dir);
    let limits = LogLimits {
        retention_secs: args.learn_retention.as_secs(),
        ..LogLimits::default()
    };
    let log = match log_file.load() {
        Ok(Some(snapshot)) => ConnectionLog::restore(snapshot, limits),
        Ok(None) => ConnectionLog::new(limits),
        Err(e) => {
            warn!(error = %e, "the connection log is unreadable; starting a new one");
            ConnectionLog::new(limits)
        }
    };
    let (kept, kept_http, _) = log.len();
    info!(
        connections = kept,
        http = kept_http,
        dns = log.dns_len(),
        memory_bound_bytes = limits.memory_bound(),
        "connection log ready"
    );
    let flows = Arc::new(FlowStore::with_log(args.flow_buffer, log));
    // Namespaces in discover mode learn; elsewhere an AUDIT flow is a violation.
    let (discover_flows, mut discover_catalog) = (Arc::clone(&flows), catalog_rx.clone());
    tokio::spawn(async move {
        loop {
            let discovering = discover_catalog
                .borrow_and_update()
                .namespace_modes
                .iter()
                .filter(|(_, m)| **m == NamespaceMode::Discover)
                .map(|(ns, _)| ns.clone())
                .collect();
            discover_flows.set_discovering(discovering);
            if discover_catalog.changed().await.is_err() {
                return;
            }
        }
    });
    // The log is saved every minute it changed, and when the agent stops.
    let (saved_flows, saver_file) = (Arc::clone(&flows), log_file.clone());
    let saver = tokio::spawn(async move {
        let mut every = tokio::time::interval(LOG_SAVE_EVERY);
        every.tick().await;
        loop {
            every.tick().await;
            save_log(&saved_flows, &saver_file).await;
        }
    });
    let (ev_tx, mut ev_rx) = mpsc::channel(8_192);
    let (mut flush, flushes) = Flush::new();
    tokio::spawn(read_events(ring, ev_tx, flushes));
    let store = Arc::clone(&flows);
    let counted = Arc::clone(&telemetry);
    let events_catalog = catalog_rx.clone();
    tokio::spawn(async move {
        let clock = Clock::now();
        while let Some(item) = ev_rx.recv().await {
            let ev = match item {
                RingItem::Event(ev) => ev,
                RingItem::Flushed(done) => {
                    let _ = done.send(());
                    continue;
                }
            };
            let catalog = Arc::clone(&events_catalog.borrow());
            // The store numbers it.
            let flow = enrich(&ev, &catalog, &clock, 0);
            counted.count_event(&ev);
            store.push(clock.wall(ev.timestamp_ns), flow);
        }
    });

    // Connections the engine ended become flows too.
    let (store, ended_catalog) = (Arc::clone(&flows), catalog_rx.clone());
    tokio::spawn(async move {
        while let Some(ev) = engine_events.recv().await {
            let EngineEvent::ConnectionEnded(ended) = ev;
            let catalog = Arc::clone(&ended_catalog.borrow());
            let now = std::time::SystemTime::now();
            store.push(now, crate::flows::ended_connection(&ended, &catalog, now));
        }
    });

    if let Some(socket) = proxy_socket {
        let listener = tokio::net::TcpListener::from_std(socket).context("proxy listener")?;
        let (observer, recorder) = ProxyFlows::new(
            proxy_rx.clone(),
            catalog_rx.clone(),
            Arc::clone(&flows),
            Arc::clone(&telemetry),
            flush.source(),
        );
        tokio::spawn(recorder.run());
        let ctx = ProxyContext {
            policy: proxy_rx,
            observer,
            limits: Arc::new(palisade_proxy::http::Limits::default()),
        };
        let workers = args.proxy_workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        });
        let workers_started =
            proxy_listener::Workers::start(workers).context("proxy worker threads")?;
        info!(port = args.proxy_port, workers, "L7 proxy listening");
        tokio::spawn(proxy_listener::run(listener, ctx, workers_started));
    }

    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let engine_status = engine.status_watch();
    let engine_task = tokio::spawn(engine.run(cmd_rx));
    if let Some((udp, tcp)) = dns_sockets {
        let ctx = palisade_dns::server::DnsContext {
            policy: dns_rx.clone(),
            learner: crate::flows::dns::EngineLearner {
                engine: cmd_tx.clone(),
            },
            observer: crate::flows::dns::DnsFlows {
                policy: dns_rx,
                catalog: catalog_rx.clone(),
                flows: Arc::clone(&flows),
                telemetry: Arc::clone(&telemetry),
            },
            limits: Arc::new(palisade_dns::server::Limits::default()),
        };
        let udp = tokio::net::UdpSocket::from_std(udp).context("DNS proxy socket")?;
        let tcp = tokio::net::TcpListener::from_std(tcp).context("DNS proxy listener")?;
        info!(
            port = args.dns_proxy_port,
            "DNS proxy listening (UDP and TCP)"
        );
        tokio::spawn(palisade_dns::server::run_udp(udp, ctx.clone()));
        tokio::spawn(palisade_dns::server::run_tcp(tcp, ctx));
    }
    if let Some(dir) = policy_dir {
        tokio::spawn(crate::policy_dir::watch(dir, cmd_tx.clone()));
    }
    let status = StatusSource {
        engine: engine_status,
        maps,
        flows: Arc::clone(&flows),
        prefilter: Arc::clone(&prefilter),
    };
    let flows_for_exit = Arc::clone(&flows);
    let metrics_task = match args.metrics_addr {
        Some(addr) => {
            let (status, telemetry, flush) =
                (status.clone(), Arc::clone(&telemetry), flush.clone());
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("--metrics-addr {addr}"))?;
            Some(tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(
                    listener,
                    status,
                    telemetry,
                    flush,
                    std::future::pending(),
                )
                .await
                {
                    error!(%addr, error = %e, "metrics server stopped");
                }
            }))
        }
        None => None,
    };
    let adapter = if args.kubernetes {
        Some(crate::kubernetes::start(&args, cmd_tx.clone()).await?)
    } else {
        None
    };
    let labels = match &adapter {
        Some(a) => LabelSource::Kubernetes(a.directory.clone()),
        None => LabelSource::Runtimes(crate::runtime::Runtimes {
            containerd_socket: args.containerd_socket.clone(),
        }),
    };
    let mode = if args.kubernetes {
        "kubernetes"
    } else {
        "local"
    };
    info!(node_ip = %node_ip, pod_cidr = %args.pod_cidr, mode, "palisade agent ready");
    let served = serve(
        &args.api,
        ApiState {
            engine: cmd_tx,
            flows,
            flush,
            status,
            catalog: catalog_rx,
            mode,
            labels,
            prefilter,
        },
        shutdown_signal(),
    )
    .await;
    // The adapter holds the engine; it stops first so the engine can.
    if let Some(a) = adapter {
        a.task.abort();
    }
    let _ = std::fs::remove_file(&args.api);
    if let Some(t) = metrics_task {
        t.abort();
    }
    saver.abort();
    save_log(&flows_for_exit, &log_file).await;
    served.with_context(|| format!("serving the API on {}", args.api.display()))?;
    engine_task.await.context("engine task")?;
    // What the engine handed the store last is on disk before the agent exits.
    tokio::task::spawn_blocking(move || store_flusher.flush_and_stop())
        .await
        .context("state writer")?;
    Ok(())
}
