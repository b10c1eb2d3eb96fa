//! The prefilter's API routes (shapes in `palisade_api::prefilter`). Map writes and reads run
//! on a blocking thread, never on the runtime's.

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use palisade_api::prefilter::{PrefilterChange, PrefilterView};
use palisade_api::types::ErrorBody;

use super::list::{ListError, parse_cidr};
use super::{Handle, PrefilterError};

/// A failed prefilter request, as the API answers it.
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error(transparent)]
    Prefilter(#[from] PrefilterError),
    #[error("internal error: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the prefilter is unavailable (a request panicked while holding it)")]
    Poisoned,
}

impl IntoResponse for RouteError {
    fn into_response(self) -> Response {
        let status = match &self {
            RouteError::Prefilter(PrefilterError::List(e)) => match e {
                ListError::NotListed { .. } => StatusCode::NOT_FOUND,
                ListError::Full { .. } | ListError::FromFile { .. } => StatusCode::CONFLICT,
                _ => StatusCode::BAD_REQUEST,
            },
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = ErrorBody {
            error: self.to_string(),
            manifest: None,
        };
        (status, Json(body)).into_response()
    }
}

async fn with<T: Send + 'static>(
    handle: Handle,
    f: impl FnOnce(&mut super::Prefilter) -> Result<T, PrefilterError> + Send + 'static,
) -> Result<T, RouteError> {
    tokio::task::spawn_blocking(move || {
        let mut p = handle.lock().map_err(|_| RouteError::Poisoned)?;
        Ok(f(&mut p)?)
    })
    .await?
}

fn parse_all(change: &PrefilterChange) -> Result<Vec<ipnetwork::Ipv4Network>, RouteError> {
    if change.cidrs.is_empty() {
        return Err(PrefilterError::List(ListError::Empty).into());
    }
    change
        .cidrs
        .iter()
        .map(|c| parse_cidr(c).map_err(|e| PrefilterError::List(e).into()))
        .collect()
}

async fn list(State(h): State<Handle>) -> Result<Json<PrefilterView>, RouteError> {
    Ok(Json(with(h, |p| p.view()).await?))
}

async fn add(
    State(h): State<Handle>,
    Json(change): Json<PrefilterChange>,
) -> Result<Json<PrefilterView>, RouteError> {
    let nets = parse_all(&change)?;
    Ok(Json(
        with(h, move |p| {
            p.add(&nets)?;
            p.view()
        })
        .await?,
    ))
}

async fn delete(
    State(h): State<Handle>,
    Json(change): Json<PrefilterChange>,
) -> Result<Json<PrefilterView>, RouteError> {
    let nets = parse_all(&change)?;
    Ok(Json(
        with(h, move |p| {
            p.delete(&nets)?;
            p.view()
        })
        .await?,
    ))
}

/// `GET /v1/prefilter`, `POST /v1/prefilter` (add), `POST /v1/prefilter/delete`.
pub fn routes(handle: Handle) -> Router {
    Router::new()
        .route("/v1/prefilter", get(list).post(add))
        .route("/v1/prefilter/delete", post(delete))
        .with_state(handle)
}

/// The view for metrics, read on a blocking thread; `None` when it cannot be read.
pub async fn view(handle: Handle) -> Option<PrefilterView> {
    with(handle, |p| p.view()).await.ok()
}
