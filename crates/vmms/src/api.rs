//! The REST API: JSON over HTTP/1.1, on the unix socket and optionally on TCP (bearer token
//! required there). `docs/openapi.yaml` describes every route; [`route_table`] is the list the
//! router is built from, and a test checks the two agree in both directions.
//!
//! Requests are untrusted: bodies are limited to [`MAX_BODY`], malformed or unknown JSON fields
//! are refused with 400, and every error is `{"error": "...", "code": "..."}` with a status.
//! Operations that change the inventory run in their own task, so a client that disconnects
//! mid-request cannot leave one half done.

use crate::model::*;
use crate::service::{OpError, Service};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;
/// The protocol name of the console upgrade (`Upgrade: verdigris-console`).
pub const CONSOLE_PROTOCOL: &str = "verdigris-console";
/// The OpenAPI document, served at `/v1/openapi.yaml`.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

type Svc = Arc<Service>;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", m)
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let (status, code) = match &e {
            OpError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad-request"),
            OpError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            OpError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            OpError::Worker(_) => (StatusCode::BAD_GATEWAY, "worker-failed"),
            OpError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            OpError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, e.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": self.message, "code": self.code})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Option<Bytes>, ApiError> {
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("the request body is larger than {} KiB", MAX_BODY >> 10),
            )
        } else {
            ApiError::bad(format!("cannot read the request body: {e}"))
        }
    })?;
    Ok((!bytes.iter().all(u8::is_ascii_whitespace)).then_some(bytes))
}

fn parse_json<T: DeserializeOwned>(b: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(b).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::bad(format!("invalid request: {e}")),
        _ => ApiError::bad(format!("malformed JSON: {e}")),
    })
}

/// A required JSON body.
pub struct JsonBody<T>(pub T);
/// An optional JSON body (empty means `T::default()`).
pub struct OptBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match body_bytes(req, state).await? {
            Some(b) => parse_json(&b).map(JsonBody),
            None => Err(ApiError::bad("the request needs a JSON body")),
        }
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match body_bytes(req, state).await? {
            Some(b) => parse_json(&b).map(OptBody),
            None => Ok(OptBody(T::default())),
        }
    }
}

/// `Query` and `Path` with our error format.
pub struct Q<T>(pub T);
pub struct P<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(t)| Q(t))
            .map_err(|e| ApiError::bad(format!("invalid query: {}", e.body_text())))
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| P(t))
            .map_err(|e| ApiError::bad(format!("invalid path: {}", e.body_text())))
    }
}

/// Runs an operation to completion in its own task: if the client goes away, the handler is
/// dropped but the operation still finishes and is recorded.
async fn detached<T, F>(f: F) -> ApiResult<T>
where
    F: std::future::Future<Output = Result<T, OpError>> + Send + 'static,
    T: Send + 'static,
{
    match tokio::spawn(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the operation failed: {e}"),
        )),
    }
}

/// Every route: (method, path, handler). The router and the OpenAPI check both use it.
fn routes() -> Vec<(&'static str, &'static str, MethodRouter<Svc>)> {
    use MethodFilter as M;
    vec![
        ("GET", "/v1/version", on(M::GET, version)),
        ("GET", "/v1/openapi.yaml", on(M::GET, openapi)),
        ("GET", "/v1/vms", on(M::GET, list_vms)),
        ("POST", "/v1/vms", on(M::POST, create_vm)),
        ("GET", "/v1/vms/{vm}", on(M::GET, get_vm)),
        ("PATCH", "/v1/vms/{vm}", on(M::PATCH, set_vm)),
        ("DELETE", "/v1/vms/{vm}", on(M::DELETE, remove_vm)),
        ("POST", "/v1/vms/{vm}/start", on(M::POST, start_vm)),
        ("POST", "/v1/vms/{vm}/stop", on(M::POST, stop_vm)),
        ("POST", "/v1/vms/{vm}/restart", on(M::POST, restart_vm)),
        ("POST", "/v1/vms/{vm}/pause", on(M::POST, pause_vm)),
        ("POST", "/v1/vms/{vm}/resume", on(M::POST, resume_vm)),
        ("GET", "/v1/vms/{vm}/status", on(M::GET, vm_status)),
        ("GET", "/v1/vms/{vm}/heartbeat", on(M::GET, vm_heartbeat)),
        ("GET", "/v1/vms/{vm}/kvp", on(M::GET, kvp_get)),
        ("PUT", "/v1/vms/{vm}/kvp", on(M::PUT, kvp_set)),
        ("DELETE", "/v1/vms/{vm}/kvp", on(M::DELETE, kvp_delete)),
        ("POST", "/v1/vms/{vm}/disks", on(M::POST, add_disk)),
        (
            "DELETE",
            "/v1/vms/{vm}/disks/{controller}/{lun}",
            on(M::DELETE, remove_disk),
        ),
        ("GET", "/v1/vms/{vm}/console", on(M::GET, console)),
        ("GET", "/v1/events", on(M::GET, list_events)),
        ("GET", "/v1/events/stream", on(M::GET, event_stream)),
    ]
}

/// The (method, path) pairs the router serves.
pub fn route_table() -> Vec<(String, String)> {
    routes()
        .into_iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect()
}

/// The API router (without authentication: see [`with_token`]).
pub fn router(svc: Svc) -> Router {
    let mut by_path: std::collections::BTreeMap<&str, MethodRouter<Svc>> = Default::default();
    for (_, path, mr) in routes() {
        let merged = match by_path.remove(path) {
            Some(prev) => prev.merge(mr),
            None => mr,
        };
        by_path.insert(path, merged);
    }
    let mut r = Router::new();
    for (path, mr) in by_path {
        r = r.route(path, mr);
    }
    r.fallback(no_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(svc)
}

/// Wraps a router so that every request must carry `Authorization: Bearer <token>`.
pub fn with_token(r: Router, token: String) -> Router {
    let token: Arc<[u8]> = token.into_bytes().into();
    r.layer(axum::middleware::from_fn(
        move |req: Request, next: axum::middleware::Next| {
            let token = token.clone();
            async move {
                let given = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
                match given {
                    Some(g) if constant_time_eq(g, &token) => next.run(req).await,
                    Some(_) => ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "wrong bearer token",
                    )
                    .into_response(),
                    None => ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "this endpoint needs 'Authorization: Bearer <token>'",
                    )
                    .into_response(),
                }
            }
        },
    ))
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was
/// right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn no_endpoint(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no-endpoint",
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn version() -> Json<Value> {
    Json(json!({
        "service": "verdigris",
        "version": env!("CARGO_PKG_VERSION"),
        "api": 1,
    }))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI).into_response()
}

async fn list_vms(State(s): State<Svc>) -> ApiResult<Json<Vec<Vm>>> {
    Ok(Json(s.list()?))
}

async fn create_vm(State(s): State<Svc>, JsonBody(req): JsonBody<CreateVm>) -> ApiResult<Response> {
    let vm = detached(async move { s.create(req) }).await?;
    Ok((StatusCode::CREATED, Json(vm)).into_response())
}

async fn get_vm(State(s): State<Svc>, P(vm): P<String>) -> ApiResult<Json<Vm>> {
    Ok(Json(s.get(&vm)?))
}

async fn set_vm(
    State(s): State<Svc>,
    P(vm): P<String>,
    JsonBody(req): JsonBody<SetVm>,
) -> ApiResult<Response> {
    let out = detached(async move { s.set(&vm, req).await }).await?;
    Ok(Json(out).into_response())
}

async fn remove_vm(State(s): State<Svc>, P(vm): P<String>) -> ApiResult<Response> {
    let out = detached(async move { s.remove(&vm).await }).await?;
    Ok(Json(out).into_response())
}

async fn start_vm(
    State(s): State<Svc>,
    P(vm): P<String>,
    OptBody(_): OptBody<Empty>,
) -> ApiResult<Response> {
    let out = detached(async move { s.start(&vm).await }).await?;
    Ok(Json(out).into_response())
}

/// An empty object (bodies of operations without parameters).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

async fn stop_vm(
    State(s): State<Svc>,
    P(vm): P<String>,
    OptBody(req): OptBody<StopVm>,
) -> ApiResult<Response> {
    let out = detached(async move { s.stop(&vm, req).await }).await?;
    Ok(Json(out).into_response())
}

async fn restart_vm(
    State(s): State<Svc>,
    P(vm): P<String>,
    OptBody(req): OptBody<RestartVm>,
) -> ApiResult<Response> {
    let out = detached(async move { s.restart(&vm, req).await }).await?;
    Ok(Json(out).into_response())
}

async fn pause_vm(
    State(s): State<Svc>,
    P(vm): P<String>,
    OptBody(_): OptBody<Empty>,
) -> ApiResult<Response> {
    let out = detached(async move { s.pause(&vm, true).await }).await?;
    Ok(Json(out).into_response())
}

async fn resume_vm(
    State(s): State<Svc>,
    P(vm): P<String>,
    OptBody(_): OptBody<Empty>,
) -> ApiResult<Response> {
    let out = detached(async move { s.pause(&vm, false).await }).await?;
    Ok(Json(out).into_response())
}

async fn vm_status(State(s): State<Svc>, P(vm): P<String>) -> ApiResult<Json<Value>> {
    let (vm, v) = s.worker_request(&vm, json!({"op": "status"})).await?;
    Ok(Json(
        json!({"vm": vm.name, "id": vm.id, "state": vm.state, "worker": v}),
    ))
}

async fn vm_heartbeat(State(s): State<Svc>, P(vm): P<String>) -> ApiResult<Json<Value>> {
    let (vm, v) = s.worker_request(&vm, json!({"op": "heartbeat"})).await?;
    Ok(Json(
        json!({"vm": vm.name, "id": vm.id, "heartbeat": v.get("heartbeat").cloned().unwrap_or(Value::Null)}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KvpQuery {
    pool: u8,
    key: Option<String>,
}

async fn kvp_get(
    State(s): State<Svc>,
    P(vm): P<String>,
    Q(q): Q<KvpQuery>,
) -> ApiResult<Json<Value>> {
    let req = match &q.key {
        Some(k) => json!({"op": "kvp-get", "pool": q.pool, "key": k}),
        None => json!({"op": "kvp-list", "pool": q.pool}),
    };
    let (_, v) = s.worker_request(&vm, req).await?;
    Ok(Json(v))
}

async fn kvp_set(
    State(s): State<Svc>,
    P(vm): P<String>,
    JsonBody(k): JsonBody<KvpSet>,
) -> ApiResult<Json<Value>> {
    let (_, v) = s
        .worker_request(
            &vm,
            json!({"op": "kvp-set", "pool": k.pool, "key": k.key, "value": k.value}),
        )
        .await?;
    Ok(Json(v))
}

async fn kvp_delete(
    State(s): State<Svc>,
    P(vm): P<String>,
    Q(q): Q<KvpQuery>,
) -> ApiResult<Json<Value>> {
    let Some(key) = q.key else {
        return Err(ApiError::bad("missing query parameter 'key'"));
    };
    let (_, v) = s
        .worker_request(&vm, json!({"op": "kvp-delete", "pool": q.pool, "key": key}))
        .await?;
    Ok(Json(v))
}

async fn add_disk(
    State(s): State<Svc>,
    P(vm): P<String>,
    JsonBody(req): JsonBody<AttachDisk>,
) -> ApiResult<Response> {
    let out = detached(async move { s.attach_disk(&vm, req).await }).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn remove_disk(
    State(s): State<Svc>,
    P((vm, controller, lun)): P<(String, u32, u32)>,
) -> ApiResult<Response> {
    let out = detached(async move { s.detach_disk(&vm, controller, lun).await }).await?;
    Ok(Json(out).into_response())
}

/// The serial console: `GET` with `Connection: Upgrade` and `Upgrade: verdigris-console`,
/// answered by 101 and then raw bytes both ways, proxied to the worker's console socket.
async fn console(State(s): State<Svc>, P(vm): P<String>, mut req: Request) -> ApiResult<Response> {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(CONSOLE_PROTOCOL));
    if !wants {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade-required",
            format!("the console needs 'Connection: Upgrade' and 'Upgrade: {CONSOLE_PROTOCOL}'"),
        ));
    }
    let (vm, path) = s.console_path(&vm)?;
    let mut sock = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "worker-failed",
            format!("VM '{}': cannot reach its console: {e}", vm.name),
        )
    })?;
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(up) => {
                let mut up = hyper_util::rt::TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut up, &mut sock).await;
            }
            Err(e) => tracing::debug!("console upgrade failed: {e}"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, CONSOLE_PROTOCOL)
        .body(Body::empty())
        .unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    vm: Option<String>,
    since: Option<i64>,
    limit: Option<u32>,
}

async fn list_events(State(s): State<Svc>, Q(q): Q<EventQuery>) -> ApiResult<Json<Vec<Event>>> {
    Ok(Json(s.events(
        q.vm.as_deref(),
        q.since,
        q.limit.unwrap_or(100),
    )?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    vm: Option<String>,
    since: Option<i64>,
}

/// Server-sent events: every new event as `event: vm` with the event's JSON as data; with
/// `since`, the recorded events after that sequence number first.
async fn event_stream(State(s): State<Svc>, Q(q): Q<StreamQuery>) -> ApiResult<Response> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    let vm_id = match &q.vm {
        Some(k) => Some(s.get(k)?.id),
        None => None,
    };
    // Subscribe before reading the log so nothing falls between the two.
    let rx = s.subscribe();
    let backlog = match q.since {
        Some(since) => s.events(vm_id.as_deref(), Some(since), 10_000)?,
        None => Vec::new(),
    };
    let last = backlog
        .last()
        .map(|e| e.seq)
        .unwrap_or(q.since.unwrap_or(0));
    let to_sse = |e: &Event| -> Result<SseEvent, Infallible> {
        Ok(SseEvent::default()
            .event("vm")
            .id(e.seq.to_string())
            .data(serde_json::to_string(e).unwrap_or_default()))
    };
    let backlog: Vec<_> = backlog.iter().map(to_sse).collect();
    let live =
        futures_util::stream::unfold((rx, vm_id, last), move |(mut rx, vm_id, last)| async move {
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        if e.seq <= last || vm_id.as_ref().is_some_and(|v| *v != e.vm_id) {
                            continue;
                        }
                        let item = to_sse(&e);
                        return Some((item, (rx, vm_id, e.seq)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let item = Ok(SseEvent::default()
                            .event("lagged")
                            .data(format!("{{\"missed\":{n}}}")));
                        return Some((item, (rx, vm_id, last)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
    let stream = futures_util::StreamExt::chain(futures_util::stream::iter(backlog), live);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn routes_are_unique() {
        let t = route_table();
        let set: std::collections::BTreeSet<_> = t.iter().collect();
        assert_eq!(set.len(), t.len());
    }
}
