//! The CNI verbs. Standalone (`palisade-cni` first in the chain): ADD takes an address from
//! the configuration's IPAM plugin, makes the veth into `CNI_NETNS` named `CNI_IFNAME`, and
//! registers the container with the agent, which judges the veth before it carries anything;
//! a failing step undoes the ones before it. Chained (after bridge or ptp, with
//! `prevResult`): ADD finds the veth's host side and registers it; the result passes through.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use palisade_api::client::{Client, ClientError};
use palisade_api::types::{
    AttachmentDeleteResult, AttachmentGcRequest, AttachmentGcResult, AttachmentRef,
    AttachmentRequest, AttachmentStatusView, EndpointView, StatusView,
};
use palisade_netlink::{Netlink, NetlinkError, netns};

use crate::config::Config;
use crate::env::{CniEnv, Verb};
use crate::error::CniError;
use crate::ipam;
use crate::result::{CniResult, Interface, IpConfig, Route, mac};

/// The link-local gateway every standalone container routes through (answered by the host
/// side of its veth, as in Calico and Cilium).
const GATEWAY: Ipv4Addr = palisade_netlink::GATEWAY;

/// The veth's host-side name, derived from the attachment, so DEL finds it without state:
/// `pc` and 13 hex digits of an FNV-1a hash (15 characters, the kernel's limit).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("pc{:013x}", h & 0x000f_ffff_ffff_ffff)
}

fn netlink_err(op: &'static str) -> impl FnOnce(NetlinkError) -> CniError {
    move |source| match source {
        NetlinkError::InterfaceTaken { ifname, netns } => CniError::InterfaceExists {
            ifname,
            netns: netns.display().to_string(),
        },
        NetlinkError::HostInterfaceTaken { ifname } => CniError::InterfaceExists {
            ifname,
            netns: "the node".to_string(),
        },
        source => CniError::Netlink { op, source },
    }
}

fn agent_err(e: ClientError) -> CniError {
    match e {
        ClientError::NotRunning(_) | ClientError::Connect { .. } => {
            CniError::AgentDown(e.to_string())
        }
        other => CniError::Agent(other.to_string()),
    }
}

fn netns_of(env: &CniEnv) -> Result<std::path::PathBuf, CniError> {
    let path = env.netns.clone().ok_or(CniError::InvalidEnvironment {
        name: "CNI_NETNS",
        why: "is required and missing".to_string(),
    })?;
    if !netns::is_netns(&path) {
        return Err(CniError::InvalidEnvironment {
            name: "CNI_NETNS",
            why: format!("{} is not a network namespace", path.display()),
        });
    }
    Ok(path)
}

/// What the agent is told about the container besides its network.
struct Identity {
    name: String,
    namespace: String,
    labels: Option<BTreeMap<String, String>>,
}

/// Kubernetes pods are named by `CNI_ARGS`; other containers by `K8S_POD_NAME` (podman puts
/// the container's name there) or their id, with labels from `args.cni.labels` when the
/// configuration has them, else from their runtime, later, by the agent.
fn identity_of(env: &CniEnv, config: &Config) -> Identity {
    let given = config.labels();
    // An id as long as a digest is named by its first 12 characters, as runtimes show it.
    let name = env.args.k8s_pod_name.clone().unwrap_or_else(|| {
        if env.container_id.len() <= 32 {
            env.container_id.clone()
        } else {
            env.container_id.chars().take(12).collect()
        }
    });
    let namespace = env
        .args
        .k8s_pod_namespace
        .clone()
        .or_else(|| given.as_ref().and_then(|(ns, _)| ns.clone()))
        .unwrap_or_else(|| "default".to_string());
    Identity {
        name,
        namespace,
        labels: given.map(|(_, labels)| labels),
    }
}

pub async fn add(env: &CniEnv, config: &Config) -> Result<serde_json::Value, CniError> {
    let netns_path = netns_of(env)?;
    let client = Client::new(&config.api());
    // Nothing is made for a container the agent cannot enforce.
    let _: StatusView = client.get("/v1/status").await.map_err(agent_err)?;
    let who = identity_of(env, config);
    if let Some(prev) = &config.conf.prev_result {
        return add_chained(env, config, &client, &netns_path, who, prev).await;
    }
    let ipam_plugin = config
        .conf
        .ipam
        .as_ref()
        .map(|i| i.plugin.clone())
        .ok_or_else(|| {
            CniError::InvalidConfig(
                "standalone palisade-cni needs an \"ipam\" section (or run it chained after bridge or ptp)"
                    .to_string(),
            )
        })?;
    // Refused before anything is allocated, so that undoing a failure never touches what
    // belongs to another attachment: an attachment the agent has, an interface name taken.
    let attachment_path = format!("/v1/attachments/{}/{}", env.container_id, env.ifname);
    match client.get::<AttachmentStatusView>(&attachment_path).await {
        Ok(_) => {
            return Err(CniError::InvalidConfig(format!(
                "container {} already has an attachment on {}",
                env.container_id, env.ifname
            )));
        }
        Err(e) if e.status() == Some(palisade_api::client::StatusCode::NOT_FOUND) => {}
        Err(e) => return Err(agent_err(e)),
    }
    let mut netlink = Netlink::new().map_err(netlink_err("netlink"))?;
    if netlink
        .interface_in(&netns_path, &env.ifname)
        .await
        .map_err(netlink_err("inspecting the container's namespace"))?
    {
        return Err(CniError::InterfaceExists {
            ifname: env.ifname.clone(),
            netns: netns_path.display().to_string(),
        });
    }
    let host = host_ifname(&env.container_id, &env.ifname);
    if netlink
        .ifindex(&host)
        .await
        .map_err(netlink_err("inspecting the node"))?
        .is_some()
    {
        return Err(CniError::InterfaceExists {
            ifname: host,
            netns: "the node".to_string(),
        });
    }
    let allocated = ipam::add(env, &ipam_plugin, &config.raw)?;
    let undo_ipam = || {
        let _ = ipam::run(env, &ipam_plugin, Verb::Del, &config.raw);
    };
    let Some((ip, _)) = allocated.first_ipv4() else {
        undo_ipam();
        return Err(CniError::Ipam {
            plugin: ipam_plugin,
            why: "allocated no IPv4 address".to_string(),
        });
    };
    let host = host_ifname(&env.container_id, &env.ifname);
    let mut netlink = Netlink::new().map_err(netlink_err("netlink"))?;
    let veth = match netlink.veth_into(&netns_path, &host, &env.ifname, ip).await {
        Ok(v) => v,
        Err(e) => {
            let _ = netlink.delete_link(&host).await;
            undo_ipam();
            return Err(netlink_err("creating the container's veth")(e));
        }
    };
    let registered: Result<EndpointView, CniError> = client
        .post(
            "/v1/attachments",
            &AttachmentRequest {
                network: config.conf.name.clone(),
                container_id: env.container_id.clone(),
                ifname: env.ifname.clone(),
                netns: netns_path.display().to_string(),
                host_ifname: host.clone(),
                ip,
                chained: false,
                name: who.name,
                namespace: who.namespace,
                labels: who.labels,
                named_ports: Vec::new(),
            },
        )
        .await
        .map_err(agent_err);
    if let Err(e) = registered {
        let _ = netlink.delete_link(&host).await;
        undo_ipam();
        return Err(e);
    }
    let result = CniResult {
        interfaces: vec![
            Interface {
                name: host,
                mac: mac(&veth.host_mac),
                sandbox: String::new(),
            },
            Interface {
                name: env.ifname.clone(),
                mac: mac(&veth.container_mac),
                sandbox: netns_path.display().to_string(),
            },
        ],
        ips: vec![IpConfig {
            address: format!("{ip}/32"),
            gateway: Some(GATEWAY.to_string()),
            interface: Some(1),
        }],
        routes: vec![Route {
            dst: "0.0.0.0/0".to_string(),
            gw: Some(GATEWAY.to_string()),
        }],
        dns: config.conf.dns.clone().or(allocated.dns),
    };
    Ok(result.to_json(&config.conf.cni_version))
}

async fn add_chained(
    env: &CniEnv,
    config: &Config,
    client: &Client,
    netns_path: &std::path::Path,
    who: Identity,
    prev: &serde_json::Value,
) -> Result<serde_json::Value, CniError> {
    let previous: CniResult = serde_json::from_value(prev.clone())
        .map_err(|e| CniError::InvalidConfig(format!("prevResult is not a CNI result: {e}")))?;
    let sandbox = netns_path.display().to_string();
    let container_if = previous
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && (i.sandbox.is_empty() || i.sandbox == sandbox));
    let ip = previous
        .ips
        .iter()
        .filter(|c| c.interface.is_none() || c.interface == container_if)
        .find_map(|c| c.address.split('/').next()?.parse::<Ipv4Addr>().ok())
        .ok_or_else(|| {
            CniError::InvalidConfig(format!("prevResult has no IPv4 address for {}", env.ifname))
        })?;
    let mut netlink = Netlink::new().map_err(netlink_err("netlink"))?;
    let (host, _) = netlink
        .host_peer(netns_path, &env.ifname)
        .await
        .map_err(netlink_err("finding the veth's host side"))?
        .ok_or_else(|| {
            CniError::InvalidConfig(format!(
                "{} in {sandbox} is not a veth; palisade-cni chains after plugins that make veth pairs (bridge, ptp)",
                env.ifname
            ))
        })?;
    let _: EndpointView = client
        .post(
            "/v1/attachments",
            &AttachmentRequest {
                network: config.conf.name.clone(),
                container_id: env.container_id.clone(),
                ifname: env.ifname.clone(),
                netns: sandbox,
                host_ifname: host,
                ip,
                chained: true,
                name: who.name,
                namespace: who.namespace,
                labels: who.labels,
                named_ports: Vec::new(),
            },
        )
        .await
        .map_err(agent_err)?;
    // The previous result passes through, in the version asked for.
    let mut out = prev.clone();
    if let serde_json::Value::Object(m) = &mut out {
        m.insert("cniVersion".into(), config.conf.cni_version.clone().into());
    }
    Ok(out)
}

/// DEL is best effort and idempotent: the agent forgets the attachment if it is up (if it is
/// not, it drops the endpoint itself once it sees the namespace gone), the veth goes, and the
/// address goes back to IPAM. Only IPAM failing is an error, as the spec asks.
pub async fn del(env: &CniEnv, config: &Config) -> Result<(), CniError> {
    let client = Client::new(&config.api());
    let path = format!("/v1/attachments/{}/{}", env.container_id, env.ifname);
    match client.delete::<AttachmentDeleteResult>(&path).await {
        Ok(_) => {}
        Err(e) => eprintln_best_effort(&format!(
            "palisade-cni: DEL: the agent did not forget the attachment ({e}); it will when it sees the container gone"
        )),
    }
    if config.conf.prev_result.is_some() && config.conf.ipam.is_none() {
        // Chained: the veth and the address are the previous plugin's.
        return Ok(());
    }
    let host = host_ifname(&env.container_id, &env.ifname);
    if let Ok(mut netlink) = Netlink::new() {
        let _ = netlink.delete_link(&host).await;
    }
    if let Some(ipam) = &config.conf.ipam {
        ipam::run(env, &ipam.plugin, Verb::Del, &config.raw)?;
    }
    Ok(())
}

/// CHECK: the agent has the attachment whole (interface, programs, map entry), the
/// container's interface has its address, and IPAM agrees.
pub async fn check(env: &CniEnv, config: &Config) -> Result<(), CniError> {
    let netns_path = netns_of(env)?;
    let prev: CniResult = config
        .conf
        .prev_result
        .clone()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| CniError::InvalidConfig(format!("prevResult is not a CNI result: {e}")))?
        .ok_or_else(|| CniError::InvalidConfig("CHECK needs prevResult".to_string()))?;
    let client = Client::new(&config.api());
    let path = format!("/v1/attachments/{}/{}", env.container_id, env.ifname);
    let status: AttachmentStatusView = client.get(&path).await.map_err(|e| match e {
        e @ (ClientError::NotRunning(_) | ClientError::Connect { .. }) => {
            CniError::AgentDown(e.to_string())
        }
        e => CniError::Check(format!(
            "the agent has no attachment of container {} on {}: {e}",
            env.container_id, env.ifname
        )),
    })?;
    let host = &status.endpoint.interface;
    for (ok, what) in [
        (
            status.interface_present,
            format!("the host-side interface {host} is gone"),
        ),
        (
            status.programs_attached,
            format!("palisade's programs are not attached to {host}"),
        ),
        (
            status.in_datapath,
            format!("the datapath has no entry for {host}"),
        ),
    ] {
        if !ok {
            return Err(CniError::Check(format!(
                "container {} on {}: {what}",
                env.container_id, env.ifname
            )));
        }
    }
    if let Some((ip, _)) = prev.first_ipv4() {
        let mut netlink = Netlink::new().map_err(netlink_err("netlink"))?;
        let present = netlink
            .container_side_ok(&netns_path, &env.ifname, ip)
            .await
            .map_err(netlink_err("inspecting the container's interface"))?;
        if !present {
            return Err(CniError::Check(format!(
                "{} in {} does not have {ip}",
                env.ifname,
                netns_path.display()
            )));
        }
    }
    if let Some(ipam) = &config.conf.ipam {
        ipam::run(env, &ipam.plugin, Verb::Check, &config.raw)?;
    }
    Ok(())
}

/// STATUS: ready when the agent answers (and IPAM, when it speaks 1.1.0, is ready too).
pub async fn status(env: &CniEnv, config: &Config) -> Result<(), CniError> {
    let client = Client::new(&config.api());
    let _: StatusView = client
        .get("/v1/status")
        .await
        .map_err(|e| CniError::NotAvailable(e.to_string()))?;
    if let Some(ipam) = &config.conf.ipam
        && ipam::speaks_1_1(env, &ipam.plugin)
    {
        ipam::run(env, &ipam.plugin, Verb::Status, &config.raw)
            .map_err(|e| CniError::NotAvailable(e.to_string()))?;
    }
    Ok(())
}

/// GC: the agent removes the attachments the runtime no longer has; IPAM too, when it speaks
/// 1.1.0. Errors are reported after everything was tried.
pub async fn gc(env: &CniEnv, config: &Config) -> Result<(), CniError> {
    let valid =
        config.conf.valid_attachments.clone().ok_or_else(|| {
            CniError::InvalidConfig("GC needs cni.dev/valid-attachments".to_string())
        })?;
    let client = Client::new(&config.api());
    let agent: Result<AttachmentGcResult, CniError> = client
        .post(
            "/v1/attachments/gc",
            &AttachmentGcRequest {
                network: config.conf.name.clone(),
                valid: valid
                    .iter()
                    .map(|v| AttachmentRef {
                        container_id: v.container_id.clone(),
                        ifname: v.ifname.clone(),
                    })
                    .collect(),
            },
        )
        .await
        .map_err(agent_err);
    let ipam_result = match &config.conf.ipam {
        Some(ipam) if ipam::speaks_1_1(env, &ipam.plugin) => {
            ipam::run(env, &ipam.plugin, Verb::Gc, &config.raw).map(|_| ())
        }
        _ => Ok(()),
    };
    agent?;
    ipam_result
}

/// Logs to stderr, which the spec leaves for unstructured output.
fn eprintln_best_effort(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}
