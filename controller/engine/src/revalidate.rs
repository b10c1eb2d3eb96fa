//! After a policy change, the connections the new policy sends through the L7 proxy. The
//! datapath stops them on their next packet (`PROXY_REQUIRED`), but an idle keep-alive client
//! would only find out when it next writes, and then wait on retransmissions; so the engine
//! ends them at once: both ends' sockets are aborted, each side sees a reset, and the client's
//! next connection goes through the proxy.

use std::collections::BTreeMap;

use palisade_policies::endpoint::EndpointId;
use palisade_policies::identity::Identity;
use palisade_policies::mapstate::{RuleId, Verdict};
use palisade_policies::model::Direction;
use tracing::{info, warn};

use crate::datapath::{Datapath, TrackedConnection};
use crate::engine::Engine;
use crate::plumbing::{Plumbing, SocketPair};

const TCP: u8 = 6;

/// A connection the engine ended because policy now requires the L7 proxy for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndedConnection {
    pub connection: TrackedConnection,
    /// Who is at each end, as the maps say now.
    pub source_identity: Identity,
    pub destination_identity: Identity,
    /// The rule that now redirects it.
    pub rule: RuleId,
}

/// What the engine did that the rest of the agent reports (as flows).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    ConnectionEnded(EndedConnection),
}

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    /// Which tracked connections the maps as they are now send through the proxy although
    /// they do not go through it, with the rule that redirects them.
    pub(crate) fn needing_proxy(
        &self,
        tracked: &[TrackedConnection],
    ) -> Vec<(TrackedConnection, RuleId)> {
        tracked
            .iter()
            .filter(|c| c.protocol == TCP && !c.through_proxy && !c.from_proxy)
            .filter_map(|c| {
                let (src, dst, port) = (*c.source.ip(), *c.destination.ip(), c.destination.port());
                let peer = match c.scope {
                    Direction::Egress => dst,
                    Direction::Ingress => src,
                };
                let own = self.applied.decide(c.endpoint, c.scope, peer, TCP, port)?;
                // A connection the new policy denies is the datapath's to drop.
                if matches!(
                    own.verdict,
                    Verdict::DeniedByRule | Verdict::DeniedByDefault
                ) {
                    return None;
                }
                let (_, rule) = self
                    .applied
                    .proxy_port_needed(c.endpoint, c.scope, src, dst, port)?;
                Some((*c, rule))
            })
            .collect()
    }

    /// Ends the connections a policy change sent through the proxy (see the module doc). Best
    /// effort: what cannot be ended here is still stopped by the datapath on its next packet.
    pub(crate) async fn end_connections_needing_proxy(&mut self) {
        if !std::mem::take(&mut self.revalidate) {
            return;
        }
        let tracked = match self.datapath.connections() {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "cannot list connections after a policy change; the datapath stops those that now need the proxy on their next packet");
                return;
            }
        };
        let doomed = self.needing_proxy(&tracked);
        if doomed.is_empty() {
            return;
        }
        let mut by_endpoint: BTreeMap<EndpointId, Vec<SocketPair>> = BTreeMap::new();
        for (c, _) in &doomed {
            let (local, remote) = match c.scope {
                Direction::Egress => (c.source, c.destination),
                Direction::Ingress => (c.destination, c.source),
            };
            by_endpoint
                .entry(c.endpoint)
                .or_default()
                .push(SocketPair { local, remote });
        }
        for (endpoint, sockets) in by_endpoint {
            let Some((name, netns)) = self
                .model
                .endpoints
                .values()
                .find(|r| r.id == endpoint)
                .map(|r| (r.qualified_name(), r.netns()))
            else {
                continue;
            };
            match self.plumbing.end_connections(&netns, &sockets).await {
                Ok(n) => {
                    info!(endpoint = %name, connections = n, "ended connections that policy now sends through the L7 proxy");
                }
                Err(e) => {
                    warn!(endpoint = %name, error = %e, "cannot end connections that now need the L7 proxy; the datapath stops them on their next packet");
                }
            }
        }
        if let Some(tx) = &self.outputs_events() {
            for (connection, rule) in doomed {
                let _ = tx.send(EngineEvent::ConnectionEnded(EndedConnection {
                    connection,
                    source_identity: self
                        .applied
                        .ipcache_lookup(*connection.source.ip())
                        .identity,
                    destination_identity: self
                        .applied
                        .ipcache_lookup(*connection.destination.ip())
                        .identity,
                    rule,
                }));
            }
        }
    }
}
