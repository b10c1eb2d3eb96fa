//! `palisade-agent`: wires the edges to the engine and runs until SIGINT/SIGTERM. The
//! datapath stays attached and enforcing when the agent stops; a restarted agent takes over
//! the pinned maps and links.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{ArgAction, Parser};
use ipnetwork::Ipv4Network;
use palisade_policies::compile::{EnforcementMode, Settings};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::api::Command;
use crate::api::server::{ApiState, serve};
use crate::datapath::bpf::{BpfDatapath, DatapathConfig};
use crate::datapath::{Datapath, events::read_events};
use crate::engine::persist::StateDir;
use crate::engine::{Engine, EngineConfig, ipam};
use crate::flows::store::FlowStore;
use crate::flows::{Catalog, Clock, enrich};
use crate::metrics::Telemetry;
use crate::plumbing::{NetlinkPlumbing, Plumbing};
use crate::proxy::{self, listener::ProxyContext, policy::ProxyPolicy};

fn parse_enforcement(s: &str) -> Result<EnforcementMode, String> {
    EnforcementMode::parse(s).ok_or_else(|| format!("{s:?} is not default, always or never"))
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
    #[arg(long)]
    pub local: bool,
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
    /// Flows kept in memory for `palisade observe`.
    #[arg(long, default_value_t = 65_536)]
    pub flow_buffer: usize,
    /// Flow events each endpoint may emit per second (per CPU); 0 = unlimited.
    #[arg(long, default_value_t = 1_000)]
    pub events_per_second: u32,
    /// Conntrack lifetime of established TCP connections.
    #[arg(long, default_value = "6h", value_parser = parse_seconds)]
    pub ct_tcp_timeout: u32,
    /// Port of the transparent L7 proxy in the node namespace (HTTP rules redirect to it).
    #[arg(long, default_value_t = 15_001)]
    pub proxy_port: u16,
    /// Serve Prometheus metrics and /healthz here (e.g. 127.0.0.1:9962); off when absent.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Conntrack lifetime of UDP/ICMP flows and of TCP connections before the handshake ends.
    #[arg(long, default_value = "60s", value_parser = parse_seconds)]
    pub ct_other_timeout: u32,
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

async fn handle<D: Datapath, P: Plumbing>(
    engine: &mut Engine<D, P>,
    cmd: Command,
    flows: &FlowStore,
) {
    // A closed reply channel means the client went away; nothing to do about it.
    match cmd {
        Command::EndpointAdd(req, r) => drop(r.send(engine.endpoint_add(req).await)),
        Command::EndpointLabel(name, change, r) => {
            drop(r.send(engine.endpoint_label(&name, change)))
        }
        Command::EndpointDelete(name, r) => drop(r.send(engine.endpoint_delete(&name).await)),
        Command::EndpointList(r) => drop(r.send(Ok(engine.endpoint_list()))),
        Command::NamespaceLabel(ns, change, r) => drop(r.send(engine.namespace_label(&ns, change))),
        Command::IdentityList(r) => drop(r.send(Ok(engine.identity_list()))),
        Command::PolicyApply(text, r) => drop(r.send(engine.policy_apply(&text))),
        Command::PolicyDelete(ns, name, r) => {
            drop(r.send(engine.policy_delete(ns.as_deref(), &name)))
        }
        Command::PolicyList(r) => drop(r.send(Ok(engine.policy_list()))),
        Command::Trace(req, r) => drop(r.send(engine.trace(&req))),
        Command::Status(r) => drop(r.send(Ok(engine.status(flows.len())))),
        Command::Conntrack(r) => drop(r.send(engine.conntrack())),
    }
}

async fn run_engine<D: Datapath, P: Plumbing>(
    mut engine: Engine<D, P>,
    mut rx: mpsc::Receiver<Command>,
    flows: Arc<FlowStore>,
) {
    let mut gc = tokio::time::interval(Duration::from_secs(30));
    let mut policy_dir = tokio::time::interval(Duration::from_secs(2));
    let mut last_dir_error = String::new();
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => handle(&mut engine, cmd, &flows).await,
                None => break,
            },
            _ = gc.tick() => match engine.gc() {
                Ok((deleted, live)) if deleted > 0 => tracing::debug!(deleted, live, "conntrack gc"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "conntrack gc failed"),
            },
            _ = policy_dir.tick() => match engine.reload_policy_dir() {
                Ok(_) => last_dir_error.clear(),
                Err(e) => {
                    // Say it once per distinct problem, not every two seconds.
                    let msg = e.to_string();
                    if msg != last_dir_error {
                        error!(error = %msg, "policy directory not applied; previous policies stay in force");
                        last_dir_error = msg;
                    }
                }
            },
        }
    }
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if !args.local {
        bail!("only local mode is available in this build: run `palisade-agent --local`");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "palisade-agent must run as root (it loads BPF programs and manages network namespaces)"
        );
    }
    let node_ip: Ipv4Addr = ipam::node_ip(&args.pod_cidr);
    let (datapath, ring) = BpfDatapath::load(
        &args.bpffs,
        DatapathConfig {
            ct_tcp_established_timeout_s: args.ct_tcp_timeout,
            ct_tcp_syn_timeout_s: args.ct_other_timeout,
            ct_other_timeout_s: args.ct_other_timeout,
            events_per_second: args.events_per_second,
            events_burst: args.events_per_second.saturating_mul(2),
            ..DatapathConfig::default()
        },
    )
    .context("cannot load the BPF datapath (is this kernel BPF-capable and are we root?)")?;
    let mut plumbing = NetlinkPlumbing::new().context("netlink")?;
    plumbing
        .setup_node(node_ip)
        .await
        .context("preparing the node namespace")?;
    // Without its listener and routing the proxy cannot take connections; policy with HTTP
    // rules then fails closed (redirected traffic is dropped) instead of the agent failing.
    let proxy_listener = match proxy::listener::bind_transparent(args.proxy_port) {
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
    let (proxy_tx, proxy_rx) = watch::channel(Arc::new(ProxyPolicy::default()));
    let (catalog_tx, catalog_rx) = watch::channel(Arc::new(Catalog::default()));
    let telemetry = Arc::new(Telemetry::default());
    let engine = Engine::start(
        EngineConfig {
            pod_cidr: args.pod_cidr,
            node_ip,
            settings: Settings {
                enforcement: args.enforcement,
                allow_host_ingress: args.allow_host_ingress,
                audit: args.audit,
                proxy_port: proxy_listener.as_ref().map(|_| args.proxy_port),
            },
            policy_dir: args.policy_dir.clone(),
            compile_seconds: Some(telemetry.compile_seconds.clone()),
        },
        datapath,
        plumbing,
        Some(StateDir::new(&args.state_dir)?),
        catalog_tx,
        Some(proxy_tx),
    )
    .await
    .context("starting the engine")?;

    let flows = Arc::new(FlowStore::new(args.flow_buffer));
    let (ev_tx, mut ev_rx) = mpsc::channel(8_192);
    tokio::spawn(read_events(ring, ev_tx));
    let store = Arc::clone(&flows);
    let counted = Arc::clone(&telemetry);
    let events_catalog = catalog_rx.clone();
    tokio::spawn(async move {
        let clock = Clock::now();
        while let Some(ev) = ev_rx.recv().await {
            let catalog = Arc::clone(&events_catalog.borrow());
            // The store numbers it.
            let flow = enrich(&ev, &catalog, &clock, 0);
            counted.count_flow(&flow);
            store.push(clock.wall(ev.timestamp_ns), flow);
        }
    });

    if let Some(listener) = proxy_listener {
        let listener = tokio::net::TcpListener::from_std(listener).context("proxy listener")?;
        let ctx = ProxyContext {
            policy: proxy_rx,
            catalog: catalog_rx.clone(),
            flows: Arc::clone(&flows),
            telemetry: Arc::clone(&telemetry),
            limits: Arc::new(proxy::http::Limits::default()),
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = proxy::listener::Workers::start(cpus).context("proxy worker threads")?;
        info!(port = args.proxy_port, workers = cpus, "L7 proxy listening");
        tokio::spawn(proxy::listener::run(listener, ctx, workers));
    }

    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let engine_task = tokio::spawn(run_engine(engine, cmd_rx, Arc::clone(&flows)));
    let metrics_task = match args.metrics_addr {
        Some(addr) => {
            let (engine_tx, telemetry) = (cmd_tx.clone(), Arc::clone(&telemetry));
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("--metrics-addr {addr}"))?;
            Some(tokio::spawn(async move {
                if let Err(e) =
                    crate::metrics::serve(listener, engine_tx, telemetry, std::future::pending())
                        .await
                {
                    error!(%addr, error = %e, "metrics server stopped");
                }
            }))
        }
        None => None,
    };
    info!(node_ip = %node_ip, pod_cidr = %args.pod_cidr, "palisade agent ready");
    let served = serve(
        &args.api,
        ApiState {
            engine: cmd_tx,
            flows,
        },
        shutdown_signal(),
    )
    .await;
    let _ = std::fs::remove_file(&args.api);
    if let Some(t) = metrics_task {
        t.abort();
    }
    served.with_context(|| format!("serving the API on {}", args.api.display()))?;
    engine_task.await.context("engine task")?;
    Ok(())
}
