//! HTTP routes over the agent's unix socket.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path as UrlPath, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::Command;
use super::types::{EndpointAddRequest, ErrorBody, LabelChange, PolicyApplyRequest, TraceRequest};
use crate::engine::EngineError;
use crate::flows::filter::FlowFilter;
use crate::flows::store::FlowStore;

#[derive(Clone)]
pub struct ApiState {
    pub engine: mpsc::Sender<Command>,
    pub flows: Arc<FlowStore>,
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = if e.is_not_found() {
            StatusCode::NOT_FOUND
        } else if e.is_client_error() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError(status, e.to_string())
    }
}

async fn ask<T>(
    state: &ApiState,
    make: impl FnOnce(super::Reply<T>) -> Command,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    let gone = || {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down".to_string(),
        )
    };
    state.engine.send(make(tx)).await.map_err(|_| gone())?;
    Ok(rx.await.map_err(|_| gone())??)
}

async fn status(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ask(&s, super::Command::Status).await?))
}

async fn endpoint_list(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ask(&s, super::Command::EndpointList).await?))
}

async fn endpoint_add(
    State(s): State<ApiState>,
    Json(req): Json<EndpointAddRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(ask(&s, |r| super::Command::EndpointAdd(req, r)).await?),
    ))
}

async fn endpoint_delete(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    ask(&s, |r| super::Command::EndpointDelete(name, r)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn endpoint_label(
    State(s): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    Json(change): Json<LabelChange>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        ask(&s, |r| super::Command::EndpointLabel(name, change, r)).await?,
    ))
}

async fn namespace_label(
    State(s): State<ApiState>,
    UrlPath(ns): UrlPath<String>,
    Json(change): Json<LabelChange>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        ask(&s, |r| super::Command::NamespaceLabel(ns, change, r)).await?,
    ))
}

async fn conntrack(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ask(&s, super::Command::Conntrack).await?))
}

async fn identity_list(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ask(&s, super::Command::IdentityList).await?))
}

async fn policy_list(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ask(&s, super::Command::PolicyList).await?))
}

async fn policy_apply(
    State(s): State<ApiState>,
    Json(req): Json<PolicyApplyRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        ask(&s, |r| super::Command::PolicyApply(req.manifest, r)).await?,
    ))
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
    Ok(Json(
        ask(&s, |r| super::Command::PolicyDelete(q.namespace, name, r)).await?,
    ))
}

async fn trace(
    State(s): State<ApiState>,
    Json(req): Json<TraceRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(ask(&s, |r| super::Command::Trace(req, r)).await?))
}

/// Body of `POST /v1/flows`.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    #[serde(default)]
    pub filter: FlowFilter,
    /// Newest N stored flows (default: all stored when not following, none when following).
    #[serde(default)]
    pub last: Option<usize>,
    /// Only flows newer than this many seconds.
    #[serde(default)]
    pub since_seconds: Option<u64>,
    #[serde(default)]
    pub follow: bool,
}

/// One flow as a JSON line. A Flow always serializes; an empty line would be skipped.
fn ndjson_line(f: &crate::flows::Flow) -> Result<Bytes, std::io::Error> {
    let mut v = serde_json::to_vec(f).unwrap_or_default();
    v.push(b'\n');
    Ok(Bytes::from(v))
}

/// Streams matching flows as JSON lines: stored ones first, then (with `follow`) live ones.
async fn flows(State(s): State<ApiState>, Json(q): Json<FlowQuery>) -> Result<Response, ApiError> {
    let filter = std::sync::Arc::new(
        q.filter
            .prepare()
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?,
    );
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
    let head = futures::stream::iter(stored.iter().map(|f| ndjson_line(f)).collect::<Vec<_>>());
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
                                return Some((ndjson_line(&f), (rx, filter, last_seq)));
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
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/endpoints", get(endpoint_list).post(endpoint_add))
        .route("/v1/endpoints/{name}", delete(endpoint_delete))
        .route("/v1/endpoints/{name}/labels", post(endpoint_label))
        .route("/v1/namespaces/{ns}/labels", post(namespace_label))
        .route("/v1/identities", get(identity_list))
        .route("/v1/conntrack", get(conntrack))
        .route("/v1/policies", get(policy_list).post(policy_apply))
        .route("/v1/policies/{name}", delete(policy_delete))
        .route("/v1/trace", post(trace))
        .route("/v1/flows", post(flows))
        .with_state(state)
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
