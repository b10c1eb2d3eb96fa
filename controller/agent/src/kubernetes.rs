//! Kubernetes mode's edges in the agent: the adapter started against the engine, and the
//! routes to other nodes' pod CIDRs it asks for, made with netlink.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context as _;
use ipnetwork::Ipv4Network;
use palisade_engine::Command;
use palisade_k8s::{Adapter, AdapterConfig};
use palisade_netlink::Netlink;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::run::AgentArgs;

pub async fn start(args: &AgentArgs, engine: mpsc::Sender<Command>) -> anyhow::Result<Adapter> {
    let node_name = args.node_name.clone().context(
        "--kubernetes needs --node-name NAME (or NODE_NAME): the Node this agent runs on",
    )?;
    let cfg = AdapterConfig {
        kubeconfig: args.kubeconfig.clone(),
        node_name,
        namespace: args.k8s_namespace.clone(),
        batch_window: args.batch_window,
        cni_conf_dir: args.cni_conf_dir.clone(),
        cni_ipam_dir: args.cni_ipam_dir.clone(),
        api_socket: args.api.clone(),
        lease_duration: args.lease_duration,
        lease_renew: args.lease_renew,
        identity_gc_grace: args.identity_gc_grace,
    };
    let client = palisade_k8s::adapter::client(&cfg)
        .await
        .context("Kubernetes configuration")?;
    let adapter = palisade_k8s::adapter::start(cfg, client, engine)
        .await
        .context("starting the Kubernetes adapter")?;
    if args.direct_node_routes {
        tokio::spawn(node_routes(adapter.routes.clone()));
    }
    Ok(adapter)
}

/// Keeps a route to every other node's pod CIDR via that node (the nodes share a link, as
/// Cilium's auto-direct-node-routes assumes), and only those: routes of ours to nodes that are
/// gone are removed, including ones an earlier agent left.
async fn node_routes(mut wanted: watch::Receiver<BTreeMap<Ipv4Network, Ipv4Addr>>) {
    let mut netlink = match Netlink::new() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "netlink unavailable: no routes to other nodes' pods");
            return;
        }
    };
    let mut have: BTreeMap<Ipv4Network, Ipv4Addr> = match netlink.routes_to_nodes().await {
        Ok(r) => r.into_iter().collect(),
        Err(e) => {
            warn!(error = %e, "cannot list routes to other nodes");
            BTreeMap::new()
        }
    };
    let mut first = true;
    loop {
        if !first && wanted.changed().await.is_err() {
            return;
        }
        first = false;
        let want = wanted.borrow_and_update().clone();
        // Nothing is removed before the adapter has heard of any node (a restart).
        if want.is_empty() && !have.is_empty() {
            continue;
        }
        for (cidr, via) in &want {
            if have.get(cidr) == Some(via) {
                continue;
            }
            match netlink.route_to_node(*cidr, *via).await {
                Ok(()) => {
                    info!(pod_cidr = %cidr, via = %via, "route to another node's pods");
                    have.insert(*cidr, *via);
                }
                Err(e) => {
                    warn!(pod_cidr = %cidr, via = %via, error = %e, "route to another node's pods not made; retried on the next change");
                }
            }
        }
        let stale: Vec<(Ipv4Network, Ipv4Addr)> = have
            .iter()
            .filter(|(c, v)| want.get(c) != Some(v))
            .map(|(c, v)| (*c, *v))
            .collect();
        for (cidr, via) in stale {
            match netlink.delete_route_to_node(cidr, via).await {
                Ok(()) => {
                    have.remove(&cidr);
                }
                Err(e) => warn!(pod_cidr = %cidr, error = %e, "stale route to a node not removed"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
