//! The agent API's routes over its unix socket. Each route translates: wire request in, an
//! engine command (or a read that needs no engine), wire answer out. Untrusted input (manifests,
//! filters) is parsed here, off the engine's task.

mod wire;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::DefaultBodyLimit,
    extract::{Path as UrlPath, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use futures::StreamExt as _;
use palisade_api::filter::FilterError;
use palisade_api::flow::Flow;
use palisade_api::types::{
    AttachmentDeleteResult, AttachmentGcRequest, AttachmentGcResult, AttachmentRequest,
    ConnectionsView, EndpointAddRequest, EndpointAuditRequest, ErrorBody, FlowQuery,
    FqdnTraceRequest, LabelChange, NamespaceModeRequest, PolicyApplyRequest, TraceRequest,
    WhatIfRequest,
};
use palisade_engine::catalog::Catalog;
use palisade_engine::{AskError, Command, EngineError, ErrorClass, Reply, ask};
use palisade_policies::audit::NamespaceMode;
use palisade_policies::manifest;
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::datapath::BpfError;
use crate::datapath::events::Flush;
use crate::flows::store::FlowStore;
use crate::status::StatusSource;

#[derive(Clone)]
pub struct ApiState {
    pub engine: mpsc::Sender<Command>,
    pub flows: Arc<FlowStore>,
    /// Brings the store up to date with the datapath's ring before it is read.
    pub flush: Flush,
    pub status: StatusSource,
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// `local` or `kubernetes`.
    pub mode: &'static str,
    /// Where the labels of attached containers come from.
    pub labels: LabelSource,
    /// The XDP prefilter's deny list (its routes: `crate::prefilter::api`).
    pub prefilter: crate::prefilter::Handle,
}

/// Where the labels of containers palisade-cni attaches come from.
#[derive(Clone)]
pub enum LabelSource {
    /// Their runtime (podman, containerd), asked after ADD.
    Runtimes(crate::runtime::Runtimes),
    /// Their Pod (Kubernetes mode).
    Kubernetes(palisade_k8s::PodDirectory),
}

/// How long ADD waits for a new pod's labels (the Pod object usually arrives first; a pod the
/// agent has not heard of yet holds `init` until it has).
const POD_LABELS_WAIT: Duration = Duration::from_secs(2);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The change is in force but not saved.
    #[error(transparent)]
    NotSaved(AskError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Datapath(#[from] BpfError),
    #[error("unknown namespace mode {0:?}; expected discover, monitor or protect")]
    UnknownMode(String),
    /// A blocking job (a parse or a map dump) did not finish.
    #[error("internal error: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<AskError> for ApiError {
    fn from(e: AskError) -> Self {
        match e {
            AskError::EngineGone => ApiError::ShuttingDown,
            AskError::Engine(e) => ApiError::Engine(e),
            e @ AskError::NotSaved(_) => ApiError::NotSaved(e),
        }
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Engine(e) => match e.class() {
                ErrorClass::Invalid => StatusCode::BAD_REQUEST,
                ErrorClass::NotFound => StatusCode::NOT_FOUND,
                ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Filter(_) | ApiError::UnknownMode(_) => StatusCode::BAD_REQUEST,
            ApiError::Datapath(_) | ApiError::Task(_) | ApiError::NotSaved(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let manifest = match &self {
            ApiError::Engine(e) => e.manifest().cloned(),
            _ => None,
        };
        let body = ErrorBody {
            error: self.to_string(),
            manifest,
        };
        (self.status(), Json(body)).into_response()
    }
}

async fn call<T>(s: &ApiState, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ApiError> {
    Ok(ask(&s.engine, make).await?)
}

async fn status(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    s.flush.wait().await;
    Ok(Json(wire::status(s.status.gather().await?, s.mode)))
}

async fn endpoint_list(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let list = call(&s, Command::EndpointList).await?;
    Ok(Json(
        list.into_iter().map(wire::endpoint).collect::<Vec<_>>(),
    ))
}

async fn endpoint_add(
    State(s): State<ApiState>,
    Json(req): Json<EndpointAddRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let spec = wire::endpoint_spec(req);
    let view = call(&s, |r| Command::EndpointAdd(spec, r)).await?;
    Ok((StatusCode::CREATED, Json(wire::endpoint(view))))
}

async fn endpoint_delete(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    call(&s, |r| Command::EndpointDelete(name, r)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn endpoint_label(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    Json(change): Json<LabelChange>,
) -> Result<impl IntoResponse, ApiError> {
    let change = wire::label_change(change);
    let view = call(&s, |r| Command::EndpointLabel(name, change, r)).await?;
    Ok(Json(wire::endpoint(view)))
}

async fn namespace_label(
    State(s): State<ApiState>,
    UrlPath(ns): UrlPath<String>,
    Json(change): Json<LabelChange>,
) -> Result<impl IntoResponse, ApiError> {
    let change = wire::label_change(change);
    Ok(Json(
        call(&s, |r| Command::NamespaceLabel(ns, change, r)).await?,
    ))
}

async fn namespace_mode(
    State(s): State<ApiState>,
    UrlPath(ns): UrlPath<String>,
    Json(req): Json<NamespaceModeRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let mode = NamespaceMode::parse(&req.mode).ok_or(ApiError::UnknownMode(req.mode))?;
    let change = call(&s, |r| Command::NamespaceMode(ns, mode, r)).await?;
    Ok(Json(wire::mode_change(change)))
}

async fn endpoint_audit(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<EndpointAuditRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let view = call(&s, |r| Command::EndpointAudit(name, req.audit, r)).await?;
    Ok(Json(wire::endpoint(view)))
}

#[derive(Deserialize)]
struct ConnectionsQuery {
    namespace: Option<String>,
    since_seconds: Option<u64>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The connection log, copied on a blocking thread (it may hold many thousand aggregates).
async fn connections(
    State(s): State<ApiState>,
    Query(q): Query<ConnectionsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    s.flush.wait().await;
    let flows = Arc::clone(&s.flows);
    let now = unix_now();
    let since = q.since_seconds.map(|d| now.saturating_sub(d));
    let log = tokio::task::spawn_blocking(move || {
        flows.connections(q.namespace.as_deref(), since, SystemTime::now())
    })
    .await?;
    Ok(Json(ConnectionsView {
        log,
        now,
        retention_seconds: s.flows.log_limits().retention_secs,
    }))
}

/// Parses the proposed manifest off the engine's task, builds the queries from the connection
/// log, and has the engine judge them twice (it applies nothing).
async fn what_if(
    State(s): State<ApiState>,
    Json(req): Json<WhatIfRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let parsed = tokio::task::spawn_blocking(move || manifest::parse_manifests(&req.manifest))
        .await?
        .map_err(EngineError::from)?;
    s.flush.wait().await;
    let flows = Arc::clone(&s.flows);
    let since = req.since_seconds.map(|d| unix_now().saturating_sub(d));
    let queries = tokio::task::spawn_blocking(move || {
        crate::flows::learn::replay_queries(&flows.connections(None, since, SystemTime::now()))
    })
    .await?;
    let asked: Vec<_> = queries.iter().map(|(q, _)| q.clone()).collect();
    let judged = call(&s, |r| Command::WhatIf(parsed, asked, r)).await?;
    Ok(Json(crate::flows::learn::what_if_result(&queries, &judged)))
}

/// Read from the map directly, on a blocking thread: a large table never stalls the engine.
async fn conntrack(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let maps = Arc::clone(&s.status.maps);
    let entries = tokio::task::spawn_blocking(move || maps.conntrack()).await??;
    let catalog = Arc::clone(&s.catalog.borrow());
    Ok(Json(wire::conntrack(entries, &catalog)))
}

async fn identity_list(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let list = call(&s, Command::IdentityList).await?;
    Ok(Json(
        list.into_iter().map(wire::identity).collect::<Vec<_>>(),
    ))
}

async fn fqdn_list(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let list = call(&s, Command::FqdnList).await?;
    Ok(Json(list.into_iter().map(wire::fqdn).collect::<Vec<_>>()))
}

async fn policy_list(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let list = call(&s, Command::PolicyList).await?;
    Ok(Json(list.into_iter().map(wire::policy).collect::<Vec<_>>()))
}

/// The manifest is parsed and validated on a blocking thread, so the engine (and every other
/// request) is never held up by a large or hostile one.
async fn policy_apply(
    State(s): State<ApiState>,
    Json(req): Json<PolicyApplyRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let parsed = tokio::task::spawn_blocking(move || manifest::parse_manifests(&req.manifest))
        .await?
        .map_err(EngineError::from)?;
    let update = call(&s, |r| Command::PolicyApply(parsed, r)).await?;
    Ok(Json(wire::apply_result(update)))
}

#[derive(Deserialize)]
struct PolicyDeleteQuery {
    namespace: Option<String>,
}

async fn policy_delete(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<PolicyDeleteQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let update = call(&s, |r| Command::PolicyDelete(q.namespace, name, r)).await?;
    Ok(Json(wire::delete_result(update)))
}

async fn attachment_add(
    State(s): State<ApiState>,
    Json(mut req): Json<AttachmentRequest>,
) -> Result<impl IntoResponse, ApiError> {
    if let (LabelSource::Kubernetes(pods), None) = (&s.labels, &req.labels) {
        // The pod's own labels and named ports, so it has its identity from its first packet.
        let key = format!("{}/{}", req.namespace, req.name);
        if let Some(pod) = pods.labels_for(&key, POD_LABELS_WAIT).await {
            req.labels = Some(pod.labels);
            req.named_ports = pod.named_ports;
        }
    }
    let (container_id, pending) = (req.container_id.clone(), req.labels.is_none());
    let spec = wire::attachment_spec(req);
    let view = call(&s, |r| Command::AttachmentAdd(spec, r)).await?;
    let key = format!("{}/{}", view.namespace, view.name);
    match &s.labels {
        // Its labels reach it once known (and again if they change).
        LabelSource::Kubernetes(pods) => pods.attached(&key),
        LabelSource::Runtimes(runtimes) if pending => {
            // Runtimes tell a container's labels only once it is created (podman holds the
            // container while its network is set up): ask, off this request.
            tokio::spawn(crate::runtime::resolve_labels(
                runtimes.clone(),
                s.engine.downgrade(),
                key,
                container_id,
            ));
        }
        LabelSource::Runtimes(_) => {}
    }
    Ok((StatusCode::CREATED, Json(wire::endpoint(view))))
}

async fn attachment_check(
    State(s): State<ApiState>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let status = call(&s, |r| Command::AttachmentCheck(container_id, ifname, r)).await?;
    Ok(Json(wire::attachment_status(status)))
}

async fn attachment_delete(
    State(s): State<ApiState>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    let deleted = call(&s, |r| Command::AttachmentDelete(container_id, ifname, r)).await?;
    Ok(Json(AttachmentDeleteResult { deleted }))
}

async fn attachment_gc(
    State(s): State<ApiState>,
    Json(req): Json<AttachmentGcRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let valid = req
        .valid
        .into_iter()
        .map(|a| (a.container_id, a.ifname))
        .collect();
    let removed = call(&s, |r| Command::AttachmentGc(req.network, valid, r)).await?;
    Ok(Json(AttachmentGcResult { removed }))
}

async fn trace(
    State(s): State<ApiState>,
    Json(req): Json<TraceRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let query = wire::trace_query(req);
    let result = call(&s, |r| Command::Trace(query, r)).await?;
    Ok(Json(wire::trace(result)))
}

async fn trace_fqdn(
    State(s): State<ApiState>,
    Json(req): Json<FqdnTraceRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let query = wire::fqdn_trace_query(req);
    let result = call(&s, |r| Command::TraceFqdn(query, r)).await?;
    Ok(Json(wire::fqdn_trace(result)))
}

/// One flow as a JSON line. A Flow always serializes; an empty line would be skipped.
fn ndjson_line(f: &Flow) -> Bytes {
    let mut v = serde_json::to_vec(f).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Streams matching flows as JSON lines: stored ones first, then (with `follow`) live ones.
async fn flows(State(s): State<ApiState>, Json(q): Json<FlowQuery>) -> Result<Response, ApiError> {
    let filter = Arc::new(q.filter.prepare()?);
    s.flush.wait().await;
    // Subscribe before the snapshot so no flow falls in between; dedupe by sequence number.
    let live = q.follow.then(|| s.flows.subscribe());
    let since = q
        .since_seconds
        .map(|secs| SystemTime::now() - Duration::from_secs(secs));
    let last = match (q.last, q.follow) {
        (Some(n), _) => Some(n),
        (None, true) => Some(0),
        (None, false) => None,
    };
    let stored = s.flows.snapshot(last, since, |f| filter.matches(f));
    let last_seq = stored.last().map(|f| f.seq);
    let head = futures::stream::iter(
        stored
            .iter()
            .map(|f| Ok::<_, std::io::Error>(ndjson_line(f)))
            .collect::<Vec<_>>(),
    );
    let body = match live {
        None => Body::from_stream(head),
        Some(rx) => {
            let tail = futures::stream::unfold(
                (rx, filter, last_seq),
                move |(mut rx, filter, last_seq)| async move {
                    loop {
                        match rx.recv().await {
                            Ok(f) => {
                                if last_seq.is_some_and(|l| f.seq <= l) || !filter.matches(&f) {
                                    continue;
                                }
                                return Some((Ok(ndjson_line(&f)), (rx, filter, last_seq)));
                            }
                            // A slow follower misses flows rather than stalling the agent; say so.
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                let note = format!("{{\"lost_flows\":{n}}}\n");
                                return Some((Ok(Bytes::from(note)), (rx, filter, last_seq)));
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                        }
                    }
                },
            );
            Body::from_stream(head.chain(tail))
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

pub fn router(state: ApiState) -> Router {
    let prefilter = crate::prefilter::api::routes(std::sync::Arc::clone(&state.prefilter));
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/endpoints", get(endpoint_list).post(endpoint_add))
        .route("/v1/endpoints/{name}", delete(endpoint_delete))
        .route("/v1/endpoints/{name}/labels", post(endpoint_label))
        .route("/v1/endpoints/{name}/audit", post(endpoint_audit))
        .route("/v1/namespaces/{ns}/labels", post(namespace_label))
        .route("/v1/namespaces/{ns}/mode", post(namespace_mode))
        .route("/v1/connections", get(connections))
        .route("/v1/policies/what-if", post(what_if))
        .route("/v1/identities", get(identity_list))
        .route("/v1/fqdns", get(fqdn_list))
        .route("/v1/conntrack", get(conntrack))
        .route("/v1/policies", get(policy_list).post(policy_apply))
        .route("/v1/policies/{name}", delete(policy_delete))
        .route("/v1/trace", post(trace))
        .route("/v1/trace/fqdn", post(trace_fqdn))
        .route("/v1/attachments", post(attachment_add))
        .route("/v1/attachments/gc", post(attachment_gc))
        .route(
            "/v1/attachments/{container_id}/{ifname}",
            get(attachment_check).delete(attachment_delete),
        )
        .route("/v1/flows", post(flows))
        // Room for the largest manifest the parser accepts, JSON-escaped; what is bigger is
        // refused before it is read.
        .layer(DefaultBodyLimit::max(
            2 * manifest::limits::MAX_MANIFEST_BYTES,
        ))
        .with_state(state)
        .merge(prefilter)
}

/// Binds the socket (replacing a stale one), root-only, and serves until `shutdown` resolves.
pub async fn serve(
    socket: &Path,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another agent is already serving {}", socket.display()),
        ));
    }
    match std::fs::remove_file(socket) {
        Ok(()) => warn!(socket = %socket.display(), "removed a stale API socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(socket)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %socket.display(), "API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
