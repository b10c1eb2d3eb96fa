//! The engine's task: commands in, one at a time, each answered on its own reply channel;
//! conntrack housekeeping in between. Whatever parses untrusted input does it before sending.

use std::collections::BTreeSet;
use std::time::Duration;

use palisade_policies::audit::NamespaceMode;
use palisade_policies::labels::Labels;
use palisade_policies::model::Policy;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::attachments::AttachmentStatus;
use crate::cluster::{ClusterKnown, ClusterReport};
use crate::datapath::Datapath;
use crate::engine::Engine;
use crate::error::EngineError;
use crate::fqdn_learning::{FqdnView, LearnReport, LearnRequest};
use crate::fqdn_trace::{FqdnTraceQuery, FqdnTraceResult};
use crate::model::{AttachmentSpec, ClusterDelta, EndpointSpec, FilePolicies, LabelChange};
use crate::modes::ModeChange;
use crate::plumbing::Plumbing;
use crate::policies::PolicyUpdate;
use crate::store::{PersistError, SaveTicket};
use crate::views::{EndpointView, EngineStatus, IdentityView, PolicyView, TraceQuery, TraceResult};
use crate::whatif::{ReplayQuery, Replayed};

/// A command's answer: its result and, for a change, the save of the state it left, which the
/// caller (not the engine's task) waits on.
#[derive(Debug)]
pub struct Outcome<T> {
    pub result: Result<T, EngineError>,
    pub saved: Option<SaveTicket>,
}

pub type Reply<T> = oneshot::Sender<Outcome<T>>;

fn answer<T>(reply: Reply<T>, result: Result<T, EngineError>) {
    // A closed reply channel means the caller went away; a change still stands.
    drop(reply.send(Outcome {
        result,
        saved: None,
    }));
}

/// Requests the engine task serves, one at a time.
#[derive(Debug)]
pub enum Command {
    EndpointAdd(EndpointSpec, Reply<EndpointView>),
    EndpointLabel(String, LabelChange, Reply<EndpointView>),
    EndpointDelete(String, Reply<()>),
    EndpointList(Reply<Vec<EndpointView>>),
    NamespaceLabel(String, LabelChange, Reply<Labels>),
    IdentityList(Reply<Vec<IdentityView>>),
    /// The policies of one manifest, parsed and validated by the sender.
    PolicyApply(Vec<Policy>, Reply<PolicyUpdate>),
    /// Namespace (None: clusterwide) and name.
    PolicyDelete(Option<String>, String, Reply<PolicyUpdate>),
    PolicyList(Reply<Vec<PolicyView>>),
    /// Everything the policy directory holds now, replacing what it held.
    ReplaceFilePolicies(Vec<FilePolicies>, Reply<usize>),
    Trace(TraceQuery, Reply<TraceResult>),
    TraceFqdn(FqdnTraceQuery, Reply<FqdnTraceResult>),
    Status(Reply<EngineStatus>),
    /// A container the CNI plugin attached.
    AttachmentAdd(AttachmentSpec, Reply<EndpointView>),
    /// Container id and interface; answers whether there was one.
    AttachmentDelete(String, String, Reply<bool>),
    AttachmentCheck(String, String, Reply<AttachmentStatus>),
    /// The attachments still valid; answers the endpoints removed.
    /// The network, and its valid (container id, interface) pairs.
    AttachmentGc(String, BTreeSet<(String, String)>, Reply<Vec<String>>),
    /// Endpoint key, namespace and labels, once the runtime told them.
    EndpointResolve(String, String, Labels, Reply<EndpointView>),
    /// A namespace's mode (discover, monitor, protect).
    NamespaceMode(String, NamespaceMode, Reply<ModeChange>),
    /// An endpoint in audit on its own, or not.
    EndpointAudit(String, bool, Reply<EndpointView>),
    /// Proposed policies (parsed by the sender) and the recorded flows to judge against
    /// them; answers each query judged before and after, None when its endpoint is gone.
    WhatIf(Vec<Policy>, Vec<ReplayQuery>, Reply<Vec<Option<Replayed>>>),
    /// Kubernetes mode: a batch of what the cluster changed.
    ClusterUpdate(ClusterDelta, Reply<ClusterReport>),
    /// Kubernetes mode: what the engine holds of the cluster.
    ClusterKnown(Reply<ClusterKnown>),
    /// A DNS answer the DNS proxy holds until the maps allow its addresses. Answered without
    /// a save ticket: the answer must not wait for the disk (the name is saved soon after).
    FqdnLearn(LearnRequest, Reply<LearnReport>),
    /// The learned names.
    FqdnList(Reply<Vec<FqdnView>>),
}

/// How often learned DNS names are checked for expiry.
const FQDN_EXPIRY_EVERY: Duration = Duration::from_secs(1);

/// At most this many DNS answers queued together are learned in one sync.
const LEARN_BATCH: usize = 256;

/// How often expired conntrack entries are swept.
const CONNTRACK_GC_EVERY: Duration = Duration::from_secs(30);

impl<D: Datapath, P: Plumbing> Engine<D, P> {
    /// Serves one command. A closed reply channel means the caller went away; the change
    /// (if any) still stands.
    pub async fn handle(&mut self, cmd: Command) {
        // Each change settles (connections a new policy sends through the proxy are ended)
        // before its caller is answered.
        match cmd {
            Command::EndpointAdd(spec, r) => {
                let result = self.endpoint_add(spec).await;
                self.settle(r, result).await;
            }
            Command::EndpointLabel(name, change, r) => {
                let result = self.endpoint_label(&name, &change);
                self.settle(r, result).await;
            }
            Command::EndpointDelete(name, r) => {
                let result = self.endpoint_delete(&name).await;
                self.settle(r, result).await;
            }
            Command::EndpointList(r) => answer(r, Ok(self.endpoint_list())),
            Command::NamespaceLabel(ns, change, r) => {
                let result = self.namespace_label(&ns, &change);
                self.settle(r, result).await;
            }
            Command::IdentityList(r) => answer(r, Ok(self.identity_list())),
            Command::PolicyApply(policies, r) => {
                let result = self.policy_apply(policies);
                self.settle(r, result).await;
            }
            Command::PolicyDelete(ns, name, r) => {
                let result = self.policy_delete(ns.as_deref(), &name);
                self.settle(r, result).await;
            }
            Command::PolicyList(r) => answer(r, Ok(self.policy_list())),
            Command::ReplaceFilePolicies(loaded, r) => {
                let result = self.replace_file_policies(loaded);
                self.settle(r, result).await;
            }
            Command::Trace(q, r) => answer(r, self.trace(&q)),
            Command::TraceFqdn(q, r) => answer(r, self.trace_fqdn(&q)),
            Command::AttachmentAdd(spec, r) => {
                let result = self.attachment_add(spec).await;
                self.settle(r, result).await;
            }
            Command::AttachmentDelete(container, ifname, r) => {
                let result = self.attachment_delete(&container, &ifname).await;
                self.settle(r, result).await;
            }
            Command::AttachmentCheck(container, ifname, r) => {
                answer(r, self.attachment_check(&container, &ifname));
            }
            Command::AttachmentGc(network, valid, r) => {
                let result = self.attachment_gc(&network, &valid).await;
                self.settle(r, result).await;
            }
            Command::EndpointResolve(key, namespace, labels, r) => {
                let result = self.endpoint_resolve(&key, &namespace, labels);
                self.settle(r, result).await;
            }
            Command::ClusterUpdate(delta, r) => {
                let result = self.cluster_update(delta);
                self.settle(r, result).await;
            }
            Command::ClusterKnown(r) => answer(r, Ok(self.cluster_known())),
            Command::Status(r) => answer(r, Ok(self.status())),
            Command::FqdnLearn(req, r) => self.learn_answers(vec![(req, r)]),
            Command::FqdnList(r) => answer(r, Ok(self.fqdn_list())),
            Command::NamespaceMode(ns, mode, r) => {
                let result = self.set_namespace_mode(&ns, mode);
                self.settle(r, result).await;
            }
            Command::EndpointAudit(name, audit, r) => {
                let result = self.set_endpoint_audit(&name, audit);
                self.settle(r, result).await;
            }
            Command::WhatIf(proposed, queries, r) => answer(r, self.what_if(proposed, &queries)),
        }
        self.publish_status();
    }

    /// Learns a batch of answers in one sync and answers each.
    fn learn_answers(&mut self, batch: Vec<(LearnRequest, Reply<LearnReport>)>) {
        let (reqs, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let results = self.fqdn_learn_all(&reqs);
        // Nobody waits on a learned name's save (see `Command::FqdnLearn`).
        self.saved = None;
        // The maps allow the answers' addresses now: release them.
        for (reply, result) in replies.into_iter().zip(results) {
            answer(reply, result);
        }
        // The (best-effort) sweep for connections the change sends through the proxy reads
        // the whole conntrack table, which costs tens of milliseconds once it holds many
        // flows: it is left to the next tick (at most a second) or the next change, not done
        // between two batches of held answers. The datapath stops such connections on their
        // next packet meanwhile (`Proxy redirection required`), as it would anyway.
    }

    async fn settle<T>(&mut self, reply: Reply<T>, result: Result<T, EngineError>) {
        self.end_connections_needing_proxy().await;
        let saved = self.saved.take();
        // A closed reply channel means the caller went away; the change still stands.
        drop(reply.send(Outcome { result, saved }));
    }

    /// Runs until every sender of `rx` is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut gc = tokio::time::interval(CONNTRACK_GC_EVERY);
        let mut fqdn_tick = tokio::time::interval(FQDN_EXPIRY_EVERY);
        fqdn_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = fqdn_tick.tick() => {
                    match self.fqdn_expire() {
                        Ok(true) => {
                            self.end_connections_needing_proxy().await;
                            debug!("expired DNS names left the maps");
                        }
                        Ok(false) => {}
                        Err(e) => warn!(error = %e, "expiring DNS names failed; they stay allowed until the next try"),
                    }
                    self.saved = None;
                    self.fqdn_flush();
                    // Connections learned answers sent through the proxy (see `learn_answers`).
                    self.end_connections_needing_proxy().await;
                },
                cmd = rx.recv() => match cmd {
                    // Answers queued behind this one are learned with it, in one sync.
                    Some(Command::FqdnLearn(req, r)) => {
                        let mut batch = vec![(req, r)];
                        let mut next = None;
                        while batch.len() < LEARN_BATCH {
                            match rx.try_recv() {
                                Ok(Command::FqdnLearn(req, r)) => batch.push((req, r)),
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.learn_answers(batch);
                        self.publish_status();
                        if let Some(cmd) = next {
                            self.handle(cmd).await;
                        }
                    }
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = gc.tick() => {
                    match self.gc() {
                        Ok((deleted, live)) if deleted > 0 => debug!(deleted, live, "conntrack gc"),
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "conntrack gc failed"),
                    }
                    // The maps are read back now and then, so the published status notices
                    // maps changed behind the engine's back.
                    self.verify_maps();
                    self.publish_status();
                }
            }
        }
    }
}

/// Why a command got no result.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The engine task has stopped: the agent is shutting down.
    #[error("the agent is shutting down")]
    EngineGone,
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The change is in force, but the state directory does not have it.
    #[error(
        "the change is in force, but it could not be saved, so a restarted agent would not have it: {0}"
    )]
    NotSaved(#[source] PersistError),
}

/// Sends `make(reply)` to the engine task and waits for its answer.
pub async fn ask<T>(
    engine: &mpsc::Sender<Command>,
    make: impl FnOnce(Reply<T>) -> Command,
) -> Result<T, AskError> {
    let (tx, rx) = oneshot::channel();
    engine
        .send(make(tx))
        .await
        .map_err(|_| AskError::EngineGone)?;
    let outcome = rx.await.map_err(|_| AskError::EngineGone)?;
    let value = outcome.result?;
    if let Some(saved) = outcome.saved {
        saved.wait().await.map_err(AskError::NotSaved)?;
    }
    Ok(value)
}
