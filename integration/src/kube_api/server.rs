//! The HTTP side: routing of API paths, content negotiation (JSON, Table,
//! PartialObjectMetadata, aggregated discovery), request bodies, chunked watch streams, and
//! the test controls that act per request (pause, injected faults, request counts).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::control::{Controls, Injected, RequestKey};
use super::discovery;
use super::openapi;
use super::ops::{self, DeleteOptions, ListOptions, ListWait, PatchType, WatchOptions, WatchStart};
use super::protobuf;
use super::resources::ResourceDef;
use super::status::ApiError;
use super::store::{EventType, Store, WatchItem};
use super::strategy::{self, FieldValidation, Target};
use super::table::{self, Include};
use super::util;
use super::{Config, PauseMode};

/// State shared by every connection and the test controls.
pub struct Shared {
    pub store: Mutex<Store>,
    pub controls: Mutex<Controls>,
    pub config: Config,
    /// `None` while serving; the mode while paused.
    pub pause: watch::Sender<Option<PauseMode>>,
    /// Bumped to close every listener and connection (pause with `Refuse`, shutdown).
    pub epoch: watch::Sender<u64>,
    /// Connections open now (their sockets not yet closed).
    pub connections: AtomicUsize,
}

/// Counts a connection as open until dropped (also when its task is cancelled).
struct Open<'a>(&'a AtomicUsize);

impl<'a> Open<'a> {
    fn new(n: &'a AtomicUsize) -> Open<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        Open(n)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn controls(&self) -> MutexGuard<'_, Controls> {
        self.controls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn wait_unpaused(&self) {
        let mut rx = self.pause.subscribe();
        while rx.borrow_and_update().is_some() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A response body: whole, or a stream of chunks (watches).
pub enum ResBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Result<Bytes, io::Error>>),
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ResBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ResBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResBody::Full(None) => SizeHint::with_exact(0),
            ResBody::Stream(_) => SizeHint::default(),
        }
    }
}

type Resp = Response<ResBody>;

fn respond(code: u16, content_type: &str, body: Vec<u8>, warnings: &[String]) -> Resp {
    let mut r = Response::new(ResBody::Full(Some(Bytes::from(body))));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    for w in warnings {
        let text = format!("299 - {}", serde_json::to_string(w).unwrap_or_default());
        if let Ok(v) = HeaderValue::from_str(&text) {
            r.headers_mut().append("warning", v);
        }
    }
    r
}

fn json_resp(code: u16, v: &Value) -> Resp {
    respond(code, "application/json", v.to_string().into_bytes(), &[])
}

fn error_resp(e: &ApiError) -> Resp {
    json_resp(e.code, &e.to_status())
}

/// What the client accepts, in the forms this server produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Json,
    Table,
    Meta,
}

struct MediaType {
    essence: String,
    params: BTreeMap<String, String>,
}

fn media_types(header: &str) -> Vec<MediaType> {
    header
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let mut parts = item.split(';');
            let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let params = parts
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            MediaType { essence, params }
        })
        .collect()
}

const OFFERED: &[&str] = &[
    "application/json",
    "application/json;as=Table;v=v1;g=meta.k8s.io",
    "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io",
    "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
];

fn negotiate(accept: &str) -> Result<Output, ApiError> {
    let types = media_types(accept);
    if types.is_empty() {
        return Ok(Output::Json);
    }
    for t in &types {
        let json_like = matches!(
            t.essence.as_str(),
            "application/json" | "*/*" | "application/*"
        );
        if !json_like {
            continue;
        }
        let g = t.params.get("g").map(String::as_str);
        let v = t.params.get("v").map(String::as_str);
        match t.params.get("as").map(String::as_str) {
            None => return Ok(Output::Json),
            Some("Table") if g == Some("meta.k8s.io") && matches!(v, Some("v1" | "v1beta1")) => {
                return Ok(Output::Table);
            }
            Some("PartialObjectMetadata" | "PartialObjectMetadataList")
                if g == Some("meta.k8s.io") && matches!(v, Some("v1" | "v1beta1")) =>
            {
                return Ok(Output::Meta);
            }
            Some(_) => {}
        }
    }
    Err(ApiError::not_acceptable(OFFERED))
}

/// The aggregated-discovery version asked for, if any (`v2`, `v2beta1`).
fn aggregated_discovery(accept: &str) -> Option<&'static str> {
    for t in media_types(accept) {
        if t.essence != "application/json" {
            continue;
        }
        if t.params.get("as").map(String::as_str) == Some("APIGroupDiscoveryList")
            && t.params.get("g").map(String::as_str) == Some("apidiscovery.k8s.io")
        {
            match t.params.get("v").map(String::as_str) {
                Some("v2") => return Some("v2"),
                Some("v2beta1") => return Some("v2beta1"),
                _ => {}
            }
        } else if !t.params.contains_key("as") {
            return None;
        }
    }
    None
}

/// One request to a resource path, as kube-apiserver's `RequestInfo` names it.
#[derive(Clone, Debug)]
pub struct RequestInfo {
    pub verb: &'static str,
    pub group: String,
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

enum Route {
    Root,
    Version,
    Health,
    CoreVersions,
    Groups,
    Group(String),
    ResourceList(String, String),
    OpenApiRoot,
    OpenApiDoc(String, String),
    Resource(RequestInfo),
    NotFound,
}

fn route(store: &Store, method: &Method, path: &str, query: &BTreeMap<String, String>) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match segs.as_slice() {
        [] => return Route::Root,
        ["version"] => return Route::Version,
        ["healthz" | "livez" | "readyz", ..] => return Route::Health,
        ["openapi", "v3"] => return Route::OpenApiRoot,
        ["openapi", "v3", "api", v] => return Route::OpenApiDoc(String::new(), (*v).to_string()),
        ["openapi", "v3", "apis", g, v] => {
            return Route::OpenApiDoc((*g).to_string(), (*v).to_string());
        }
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["apis", g] => return Route::Group((*g).to_string()),
        ["api", v] => return Route::ResourceList(String::new(), (*v).to_string()),
        ["apis", g, v] => return Route::ResourceList((*g).to_string(), (*v).to_string()),
        ["api", v, rest @ ..] => (String::new(), (*v).to_string(), rest),
        ["apis", g, v, rest @ ..] => ((*g).to_string(), (*v).to_string(), rest),
        _ => return Route::NotFound,
    };
    let (legacy_watch, rest) = match rest {
        ["watch", more @ ..] => (true, more),
        _ => (false, rest),
    };
    let reg = store.registry();
    let namespaced_res = |r: &str| reg.find(&group, &version, r).is_some_and(|d| d.namespaced);
    let (namespace, parts): (String, &[&str]) = match rest {
        ["namespaces", ns, res, more @ ..] if namespaced_res(res) => {
            let mut v: Vec<&str> = vec![res];
            v.extend_from_slice(more);
            return finish_route(
                method,
                query,
                group,
                version,
                (*ns).to_string(),
                &v,
                legacy_watch,
            );
        }
        other => (String::new(), other),
    };
    finish_route(
        method,
        query,
        group,
        version,
        namespace,
        parts,
        legacy_watch,
    )
}

fn finish_route(
    method: &Method,
    query: &BTreeMap<String, String>,
    group: String,
    version: String,
    namespace: String,
    parts: &[&str],
    legacy_watch: bool,
) -> Route {
    let (resource, name, subresource) = match parts {
        [r] => (*r, "", ""),
        [r, n] => (*r, *n, ""),
        [r, n, s] => (*r, *n, *s),
        _ => return Route::NotFound,
    };
    let watch = legacy_watch
        || query
            .get("watch")
            .is_some_and(|w| w == "1" || w.eq_ignore_ascii_case("true"));
    let verb = match (method, name.is_empty()) {
        (&Method::GET, true) if watch => "watch",
        (&Method::GET, true) => "list",
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "deletecollection",
        (&Method::DELETE, false) => "delete",
        _ => "unknown",
    };
    Route::Resource(RequestInfo {
        verb,
        group,
        version,
        resource: resource.to_string(),
        subresource: subresource.to_string(),
        namespace,
        name: name.to_string(),
    })
}

/// Serves one accepted connection until it ends or the epoch moves on.
pub async fn serve_connection(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    local: SocketAddr,
) {
    // Declared first, dropped last: after the connection and its socket.
    let _open = Open::new(&shared.connections);
    let mut epoch = shared.epoch.subscribe();
    let svc_shared = Arc::clone(&shared);
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = Arc::clone(&svc_shared);
        async move { Ok::<_, Infallible>(handle(shared, req, local).await) }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = conn => {}
        _ = epoch.changed() => {}
    }
}

/// Accepts connections on one listener until the epoch moves on.
pub async fn accept_loop(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let mut epoch = shared.epoch.subscribe();
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
    loop {
        tokio::select! {
            r = listener.accept() => {
                if let Ok((stream, _)) = r {
                    tokio::spawn(serve_connection(Arc::clone(&shared), stream, local));
                }
            }
            _ = epoch.changed() => return,
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>, local: SocketAddr) -> Resp {
    shared.wait_unpaused().await;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = util::parse_query(req.uri().query().unwrap_or(""))
        .into_iter()
        .collect();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let accept = header("accept");
    let content_type = header("content-type");
    let r = {
        let store = shared.store();
        route(&store, &method, &path, &query)
    };
    let info = match r {
        Route::Resource(info) => info,
        other => {
            shared.controls().count_path(&path);
            if method != Method::GET {
                return error_resp(&ApiError::method_not_allowed());
            }
            return non_resource(&shared, other, &accept, local);
        }
    };
    shared.controls().count(RequestKey::of(&info));
    let injected = shared.controls().fault_for(&info);
    match injected {
        Some(Injected::Fail(e)) => return error_resp(&e),
        Some(Injected::Delay(d)) => tokio::time::sleep(d).await,
        Some(Injected::Drop) => {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.try_send(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection dropped by an injected fault",
            )));
            let mut r = Response::new(ResBody::Stream(rx));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return r;
        }
        None => {}
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error_resp(&ApiError::bad_request(format!(
                "reading the request body: {e}"
            )));
        }
    };
    match resource_request(&shared, &info, &query, &accept, &content_type, &body).await {
        Ok(r) => r,
        Err(e) => error_resp(&e),
    }
}

fn non_resource(shared: &Shared, r: Route, accept: &str, local: SocketAddr) -> Resp {
    let store = shared.store();
    let reg = store.registry();
    let not_found = || error_resp(&ApiError::no_such_resource());
    match r {
        Route::Root => json_resp(
            200,
            &json!({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/openapi/v3", "/readyz", "/version"]}),
        ),
        Route::Version => json_resp(200, &discovery::version()),
        Route::Health => respond(200, "text/plain; charset=utf-8", b"ok".to_vec(), &[]),
        Route::CoreVersions | Route::Groups => {
            let core = matches!(r, Route::CoreVersions);
            if let Some(v) = aggregated_discovery(accept) {
                let ct = format!(
                    "application/json;g=apidiscovery.k8s.io;v={v};as=APIGroupDiscoveryList"
                );
                return respond(
                    200,
                    &ct,
                    discovery::aggregated(reg, core, v).to_string().into_bytes(),
                    &[],
                );
            }
            if core {
                json_resp(200, &discovery::core_versions(&local.to_string()))
            } else {
                json_resp(200, &discovery::group_list(reg))
            }
        }
        Route::Group(g) => discovery::group(reg, &g).map_or_else(not_found, |v| json_resp(200, &v)),
        Route::ResourceList(g, v) => {
            if g.is_empty() && v != "v1" {
                return not_found();
            }
            discovery::resource_list(reg, &g, &v).map_or_else(not_found, |v| json_resp(200, &v))
        }
        Route::OpenApiRoot => json_resp(200, &openapi::root(reg)),
        Route::OpenApiDoc(g, v) => {
            openapi::document(reg, &g, &v).map_or_else(not_found, |d| json_resp(200, &d))
        }
        Route::NotFound | Route::Resource(_) => not_found(),
    }
}

fn decode_body(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    match essence {
        "" | "application/json" | "*/*" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}"))),
        "application/yaml" | "application/apply-patch+yaml" => {
            serde_norway::from_slice::<Value>(body)
                .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))
        }
        "application/vnd.kubernetes.protobuf" => protobuf::decode(body).map_err(|e| match e {
            protobuf::ProtoError::Unsupported { api_version, kind } => {
                let mut err = ApiError::unsupported_media_type(ACCEPTED_BODIES);
err.message = format!("{} (this API stand-in decodes protobuf only for Namespace, ConfigMap, ServiceAccount, Service, RBAC objects and DeleteOptions, not {kind} of {api_version})", err.message);
                err
            }
            protobuf::ProtoError::Malformed(m) => ApiError::bad_request(format!(
                "the object provided is unrecognized: {m}"
            )),
        }),
        _ => Err(ApiError::unsupported_media_type(ACCEPTED_BODIES)),
    }
}

const ACCEPTED_BODIES: &[&str] = &[
    "application/json",
    "application/yaml",
    "application/vnd.kubernetes.protobuf",
];

fn dry_run(query: &BTreeMap<String, String>) -> Result<bool, ApiError> {
    match query.get("dryRun").map(String::as_str) {
        None | Some("") => Ok(false),
        Some("All") => Ok(true),
        Some(other) => Err(ApiError::bad_request(format!(
            "dryRun: Unsupported value: {other:?}: supported values: \"All\""
        ))),
    }
}

fn shape(def: &ResourceDef, obj: Value, output: Output, include: Include) -> (Value, &'static str) {
    match output {
        Output::Json => (obj, "application/json"),
        Output::Meta => (
            table::partial_metadata(&obj),
            "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io",
        ),
        Output::Table => (
            table::table(
                def,
                std::slice::from_ref(&obj),
                include,
                true,
                &json!({"resourceVersion": util::meta_str(&obj, "resourceVersion")}),
            ),
            "application/json;as=Table;v=v1;g=meta.k8s.io",
        ),
    }
}

async fn resource_request(
    shared: &Arc<Shared>,
    info: &RequestInfo,
    query: &BTreeMap<String, String>,
    accept: &str,
    content_type: &str,
    body: &[u8],
) -> Result<Resp, ApiError> {
    let def = {
        let store = shared.store();
        store
            .registry()
            .find(&info.group, &info.version, &info.resource)
            .cloned()
            .ok_or_else(ApiError::no_such_resource)?
    };
    let target = match info.subresource.as_str() {
        "" => Target::Main,
        "status" if def.status => Target::Status,
        _ => return Err(ApiError::no_such_resource()),
    };
    let needs_ns = def.namespaced && !matches!(info.verb, "list" | "watch" | "deletecollection");
    if needs_ns && info.namespace.is_empty() {
        return Err(ApiError::no_such_resource());
    }
    if !def.namespaced && !info.namespace.is_empty() {
        return Err(ApiError::no_such_resource());
    }
    let include = Include::parse(query.get("includeObject").map(String::as_str))
        .map_err(ApiError::bad_request)?;
    let fv = FieldValidation::parse(query.get("fieldValidation").map(String::as_str))?;
    let q = |k: &str| query.get(k).cloned();
    match info.verb {
        "get" => {
            let output = negotiate(accept)?;
            let obj = ops::get(&shared.store(), &def, &info.namespace, &info.name)?;
            let (v, ct) = shape(&def, obj, output, include);
            Ok(respond(200, ct, v.to_string().into_bytes(), &[]))
        }
        "list" => {
            let output = negotiate(accept)?;
            let f = ops::filter(
                &def,
                Some(&info.namespace),
                &q("labelSelector").unwrap_or_default(),
                &q("fieldSelector").unwrap_or_default(),
            )?;
            if q("sendInitialEvents").is_some() {
                return Err(ApiError::invalid(
                    "ListOptions",
                    "meta.k8s.io",
                    "",
                    &[super::status::FieldError::forbidden(
                        "sendInitialEvents",
                        "sendInitialEvents is forbidden for list",
                    )],
                ));
            }
            let opts = ListOptions {
                limit: match q("limit") {
                    Some(l) if !l.is_empty() => Some(l.parse().map_err(|_| {
                        ApiError::bad_request(format!("limit: invalid value {l:?}"))
                    })?),
                    _ => None,
                },
                continue_token: q("continue"),
                resource_version: q("resourceVersion"),
                resource_version_match: q("resourceVersionMatch"),
            };
            let listed = list_waiting(shared, &f, &opts).await?;
            let (v, ct) = match output {
                Output::Json => (
                    json!({"kind": format!("{}List", def.kind), "apiVersion": def.api_version(), "metadata": listed.metadata, "items": listed.items}),
                    "application/json",
                ),
                Output::Meta => (
                    json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": listed.metadata,
                        "items": listed.items.iter().map(table::partial_metadata).collect::<Vec<_>>()}),
                    "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
                ),
                Output::Table => (
                    table::table(&def, &listed.items, include, true, &listed.metadata),
                    "application/json;as=Table;v=v1;g=meta.k8s.io",
                ),
            };
            Ok(respond(200, ct, v.to_string().into_bytes(), &[]))
        }
        "watch" => {
            let output = negotiate(accept)?;
            let mut fields = q("fieldSelector").unwrap_or_default();
            if !info.name.is_empty() {
                let pin = format!("metadata.name={}", info.name);
                fields = if fields.is_empty() {
                    pin
                } else {
                    format!("{fields},{pin}")
                };
            }
            let f = ops::filter(
                &def,
                Some(&info.namespace),
                &q("labelSelector").unwrap_or_default(),
                &fields,
            )?;
            let timeout = match q("timeoutSeconds") {
                Some(t) if !t.is_empty() => Duration::from_secs(t.parse().map_err(|_| {
                    ApiError::bad_request(format!("timeoutSeconds: invalid value {t:?}"))
                })?),
                _ => shared.config.default_watch_timeout,
            };
            let opts = WatchOptions {
                resource_version: q("resourceVersion"),
                resource_version_match: q("resourceVersionMatch"),
                send_initial_events: q("sendInitialEvents").map(|s| s == "true" || s == "1"),
                allow_bookmarks: q("allowWatchBookmarks").is_some_and(|s| s == "true" || s == "1"),
            };
            serve_watch(shared, def, f, &opts, output, include, timeout).await
        }
        "create" => {
            if !info.name.is_empty() || target != Target::Main {
                return Err(ApiError::method_not_allowed());
            }
            let output = negotiate(accept)?;
            let (obj, warnings) = strategy::decode(&def, decode_body(content_type, body)?, fv)?;
            let created = ops::create(
                &mut shared.store(),
                &def,
                &info.namespace,
                obj,
                dry_run(query)?,
            )?;
            let (v, ct) = shape(&def, created, output, include);
            Ok(respond(201, ct, v.to_string().into_bytes(), &warnings))
        }
        "update" => {
            let output = negotiate(accept)?;
            let (obj, warnings) = strategy::decode(&def, decode_body(content_type, body)?, fv)?;
            let (stored, created) = ops::update(
                &mut shared.store(),
                &def,
                &info.namespace,
                &info.name,
                obj,
                target,
                dry_run(query)?,
            )?;
            let (v, ct) = shape(&def, stored, output, include);
            Ok(respond(
                if created { 201 } else { 200 },
                ct,
                v.to_string().into_bytes(),
                &warnings,
            ))
        }
        "patch" => {
            let output = negotiate(accept)?;
            let kind = PatchType::from_content_type(content_type).ok_or_else(|| {
                ApiError::unsupported_media_type(&[
                    "application/json-patch+json",
                    "application/merge-patch+json",
                    "application/apply-patch+yaml",
                    "application/strategic-merge-patch+json",
                ])
            })?;
            if kind == PatchType::Apply && q("fieldManager").is_none_or(|m| m.is_empty()) {
                return Err(ApiError::invalid(
                    "PatchOptions",
                    "meta.k8s.io",
                    "",
                    &[super::status::FieldError::required(
                        "fieldManager",
                        "is required for apply patch",
                    )],
                ));
            }
            let patch_body = if kind == PatchType::Apply {
                decode_body("application/apply-patch+yaml", body)?
            } else {
                serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?
            };
            let (stored, created, warnings) = ops::patch(
                &mut shared.store(),
                &def,
                &info.namespace,
                &info.name,
                kind,
                &patch_body,
                target,
                fv,
                dry_run(query)?,
            )?;
            let (v, ct) = shape(&def, stored, output, include);
            Ok(respond(
                if created { 201 } else { 200 },
                ct,
                v.to_string().into_bytes(),
                &warnings,
            ))
        }
        "delete" | "deletecollection" => {
            if target != Target::Main {
                return Err(ApiError::method_not_allowed());
            }
            let opts_body = if body.is_empty() {
                json!({})
            } else {
                decode_body(content_type, body)?
            };
            let mut opts = DeleteOptions::from_body(&opts_body);
            opts.dry_run |= dry_run(query)?;
            if let Some(g) = q("gracePeriodSeconds") {
                opts.grace_period_seconds = g.parse().ok();
            }
            let out = if info.verb == "delete" {
                ops::delete(
                    &mut shared.store(),
                    &def,
                    &info.namespace,
                    &info.name,
                    &opts,
                )?
            } else {
                let f = ops::filter(
                    &def,
                    Some(&info.namespace),
                    &q("labelSelector").unwrap_or_default(),
                    &q("fieldSelector").unwrap_or_default(),
                )?;
                ops::delete_collection(&mut shared.store(), &f, &opts)?
            };
            Ok(json_resp(200, &out))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// A list whose resourceVersion is ahead of the store waits for it (up to 3 s, as the real
/// server's watch cache does) before answering `504` with `Too large resource version`.
async fn list_waiting(
    shared: &Shared,
    f: &super::store::Filter,
    opts: &ListOptions,
) -> Result<ops::Listed, ApiError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = ops::list(&shared.store(), f, opts);
        match r {
            Ok(l) => return Ok(l),
            Err(ListWait::Error(e)) => return Err(e),
            Err(ListWait::Ahead { asked, current }) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(ApiError::too_large_resource_version(asked, current));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

async fn serve_watch(
    shared: &Arc<Shared>,
    def: ResourceDef,
    f: super::store::Filter,
    opts: &WatchOptions,
    output: Output,
    include: Include,
    timeout: Duration,
) -> Result<Resp, ApiError> {
    let content_type = match output {
        Output::Json => "application/json",
        Output::Meta => "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io",
        Output::Table => "application/json;as=Table;v=v1;g=meta.k8s.io",
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let (tx, rx) = mpsc::unbounded_channel();
    let id = loop {
        let started = ops::start_watch(&mut shared.store(), f.clone(), opts, tx.clone());
        match started {
            Ok(id) => break id,
            Err(WatchStart::Error(e)) => return Err(e),
            Err(WatchStart::Expired(e)) => {
                // 200, one ERROR event, end: how the real server answers a watch from a
                // compacted resourceVersion.
                return Ok(respond(
                    200,
                    content_type,
                    event_line("ERROR", &e.to_status()).to_vec(),
                    &[],
                ));
            }
            Err(WatchStart::Ahead { asked, current }) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(ApiError::too_large_resource_version(asked, current));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    drop(tx);
    let (btx, brx) = mpsc::channel(64);
    let task = WatchTask {
        shared: Arc::clone(shared),
        id,
        def,
        output,
        include,
        bookmarks: opts.allow_bookmarks,
    };
    tokio::spawn(task.run(rx, btx, timeout));
    let mut r = Response::new(ResBody::Stream(brx));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(r)
}

struct WatchTask {
    shared: Arc<Shared>,
    id: u64,
    def: ResourceDef,
    output: Output,
    include: Include,
    bookmarks: bool,
}

impl WatchTask {
    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = match self.output {
            Output::Meta => {
                json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta})
            }
            _ => {
                json!({"kind": self.def.kind, "apiVersion": self.def.api_version(), "metadata": meta})
            }
        };
        event_line("BOOKMARK", &obj)
    }

    fn event(&self, kind: EventType, stored: &Value, first_table: &mut bool) -> Bytes {
        let obj = self.def.view_form(stored);
        let shaped = match self.output {
            Output::Json => obj,
            Output::Meta => table::partial_metadata(&obj),
            Output::Table => {
                let with_columns = std::mem::replace(first_table, false);
                let rv = util::meta_str(&obj, "resourceVersion").to_string();
                table::table(
                    &self.def,
                    &[obj],
                    self.include,
                    with_columns,
                    &json!({"resourceVersion": rv}),
                )
            }
        };
        event_line(kind.as_str(), &shaped)
    }

    async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<WatchItem>,
        btx: mpsc::Sender<Result<Bytes, io::Error>>,
        timeout: Duration,
    ) {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let period = self.shared.config.bookmark_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut first_table = true;
        loop {
            let item = tokio::select! {
                () = &mut deadline => break,
                _ = tick.tick(), if self.bookmarks => {
                    self.shared.store().bookmark(self.id);
                    continue;
                }
                () = btx.closed() => break,
                item = rx.recv() => item,
            };
            self.shared.wait_unpaused().await;
            let line = match item {
                None | Some(WatchItem::End) => break,
                Some(WatchItem::Abort) => {
                    let _ = btx
                        .send(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "watch dropped by the test",
                        )))
                        .await;
                    break;
                }
                Some(WatchItem::Event(kind, obj)) => self.event(kind, &obj, &mut first_table),
                Some(WatchItem::Bookmark(rv)) if self.bookmarks => self.bookmark(rv, false),
                Some(WatchItem::Bookmark(_)) => continue,
                Some(WatchItem::InitialEventsEnd(rv)) => self.bookmark(rv, true),
            };
            if btx.send(Ok(line)).await.is_err() {
                break;
            }
        }
        self.shared.store().unregister(self.id);
    }
}
