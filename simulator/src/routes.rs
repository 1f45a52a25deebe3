//! The simulator's HTTP routes: verify, token issue and test connection.

use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::{any, get, post};
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::controls::Shared;
use super::{Fault, RecordedRequest};

pub(super) const VERIFY_PATH: &str = "/api/v1/messages/instant/access/token/verify";
pub(super) const ISSUE_PATH: &str = "/api/v1/messages/instant/access/token";
pub(super) const TEST_PATH: &str = "/api/v1/test";

/// The vendor's validation-error problem type, verbatim (including the missing colon).
pub(super) const VALIDATION_ERROR_TYPE: &str =
    "https//qxlva.com/im1toolbar/documentation/api/v1/validation-error";
const VALIDATION_ERROR_TITLE: &str = "Request Validation Error";

const API_KEY: HeaderName = HeaderName::from_static("apikey");
const ACCESS_TOKEN: HeaderName = HeaderName::from_static("conneqt-instant-access-token");

const PROBLEM_JSON: &str = "application/problem+json";
const JSON_UTF8: &str = "application/json; charset=utf-8";

/// Largest verify request body the simulator reads and records; anything larger is recorded
/// as empty.
const MAX_RECORDED_BODY: usize = 1024 * 1024;

/// What a verify handler asks its connection task to do.
#[derive(Debug, Clone, Copy)]
pub(super) enum ConnAction {
    /// Close the socket without a response.
    Drop,
    /// Write non-HTTP bytes, then close the socket.
    Garbage,
}

/// Per-connection kill switch, put into the extensions of every request on the connection
/// (see `serve_connection` in the parent module).
#[derive(Debug, Clone)]
pub(super) struct ConnControl(Arc<Mutex<Option<oneshot::Sender<ConnAction>>>>);

impl ConnControl {
    pub(super) fn new(sender: oneshot::Sender<ConnAction>) -> Self {
        ConnControl(Arc::new(Mutex::new(Some(sender))))
    }

    /// Asks the connection task to act; `false` if it can no longer be asked.
    fn trigger(&self, action: ConnAction) -> bool {
        let sender = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        sender.is_some_and(|sender| sender.send(action).is_ok())
    }
}

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(VERIFY_PATH, any(verify))
        .route(ISSUE_PATH, post(issue_token))
        .route(TEST_PATH, get(test_connection))
        .fallback(not_found)
        .with_state(shared)
}

async fn verify(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_RECORDED_BODY)
        .await
        .unwrap_or_else(|err| {
            tracing::debug!(%err, "conneqt simulator: verify body not recorded");
            Bytes::new()
        });
    let token_key = parts
        .headers
        .get(&ACCESS_TOKEN)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    shared.record_verify(
        RecordedRequest {
            method: parts.method.clone(),
            path,
            headers: parts.headers.clone(),
            body,
        },
        token_key,
    );

    let _in_flight = shared.enter();
    shared.pass_gate().await;
    let latency = shared.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(fault) = shared.fault() {
        return apply_fault(fault, parts.extensions.get::<ConnControl>().cloned()).await;
    }

    if parts.method != Method::GET {
        return method_not_allowed("GET");
    }
    let checked =
        authorise(&shared, &parts.headers).and_then(|()| require_json_content_type(&parts.headers));
    if let Err(rejection) = checked {
        return rejection.into_response();
    }
    let token = parts
        .headers
        .get(&ACCESS_TOKEN)
        .map(|value| value.to_str().map(str::trim));
    let token = match token {
        None | Some(Ok("")) => {
            return validation_error("AccessToken", "Access token must be provided");
        }
        Some(Ok(token)) => parse_hyphenated_uuid(token),
        Some(Err(_)) => None,
    };
    let Some(token) = token else {
        return validation_error("AccessToken", "Access token is not in a valid format");
    };
    if shared.is_valid(token) {
        empty(StatusCode::OK)
    } else {
        empty(StatusCode::GONE)
    }
}

async fn issue_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let checked = authorise(&shared, &headers).and_then(|()| require_json_content_type(&headers));
    if let Err(rejection) = checked {
        return rejection.into_response();
    }
    let body: Option<Value> = serde_json::from_slice(&body).ok();
    let code = body.as_ref().and_then(Value::as_object).and_then(|object| {
        object
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("accessCode"))
            .map(|(_, value)| value)
    });
    match code {
        None | Some(Value::Null) => {
            return validation_error("AccessCode", "Access code must be provided");
        }
        Some(Value::String(code)) if code.is_empty() => {
            return validation_error("AccessCode", "Access code must be provided");
        }
        Some(Value::String(code)) if is_access_code(code) => {}
        Some(_) => {
            return validation_error(
                "AccessCode",
                "Access code must be 8 characters, each A-Z or 0-9",
            );
        }
    }
    let body = json!({ "token": shared.issue_token() }).to_string();
    with_body(StatusCode::OK, JSON_UTF8, body)
}

async fn test_connection(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match authorise(&shared, &headers) {
        Ok(()) => empty(StatusCode::OK),
        Err(rejection) => rejection.into_response(),
    }
}

async fn not_found() -> Response {
    empty(StatusCode::NOT_FOUND)
}

async fn apply_fault(fault: Fault, control: Option<ConnControl>) -> Response {
    let action = match fault {
        Fault::Status(code) => return fault_status(code),
        Fault::Hang => std::future::pending().await,
        Fault::DropConnection => ConnAction::Drop,
        Fault::Garbage => ConnAction::Garbage,
    };
    if control.is_some_and(|control| control.trigger(action)) {
        // The connection task stops serving this connection; this answer is never sent.
        std::future::pending().await
    } else {
        tracing::error!(
            ?action,
            "conneqt simulator: no connection control for a fault"
        );
        problem(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

fn fault_status(code: u16) -> Response {
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|status| !status.is_informational())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_client_error() || status.is_server_error() {
        problem(status)
    } else {
        empty(status)
    }
}

/// Why a request is turned away before its own checks; small, so `Result<(), Rejection>` stays
/// cheap to return.
#[derive(Debug, Clone, Copy)]
enum Rejection {
    /// `401`: missing or unknown `ApiKey`.
    Unauthorized,
    /// `403`: known `ApiKey`, not authorised.
    Forbidden,
    /// `400`: a validation error on one parameter.
    Invalid {
        name: &'static str,
        reason: &'static str,
    },
}

impl Rejection {
    fn into_response(self) -> Response {
        match self {
            Rejection::Unauthorized => problem(StatusCode::UNAUTHORIZED),
            Rejection::Forbidden => problem(StatusCode::FORBIDDEN),
            Rejection::Invalid { name, reason } => validation_error(name, reason),
        }
    }
}

/// `Ok` when `ApiKey` authenticates and is authorised.
fn authorise(shared: &Shared, headers: &HeaderMap) -> Result<(), Rejection> {
    match headers.get(&API_KEY).map(HeaderValue::as_bytes) {
        Some(key) if key == shared.api_key.as_bytes() => Ok(()),
        Some(key) if key == shared.unauthorised_api_key.as_bytes() => Err(Rejection::Forbidden),
        _ => Err(Rejection::Unauthorized),
    }
}

/// `Ok` when `Content-Type` starts with `application/json` (ASCII case-insensitively).
fn require_json_content_type(headers: &HeaderMap) -> Result<(), Rejection> {
    let is_json = headers.get(CONTENT_TYPE).is_some_and(|value| {
        value
            .as_bytes()
            .get(..b"application/json".len())
            .is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"application/json"))
    });
    if is_json {
        Ok(())
    } else {
        Err(Rejection::Invalid {
            name: "Content-Type",
            reason: "Content-Type must be application/json",
        })
    }
}

fn parse_hyphenated_uuid(token: &str) -> Option<Uuid> {
    // 36 characters is exactly the hyphenated form; `try_parse` checks the hyphen positions
    // and hex digits.
    (token.len() == 36)
        .then(|| Uuid::try_parse(token).ok())
        .flatten()
}

fn is_access_code(code: &str) -> bool {
    code.len() == 8
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

fn instance() -> String {
    format!("urn:uuid:{}", Uuid::new_v4())
}

/// A `400` problem in the vendor's validation-error shape.
fn validation_error(name: &str, reason: &str) -> Response {
    let body = json!({
        "type": VALIDATION_ERROR_TYPE,
        "title": VALIDATION_ERROR_TITLE,
        "status": StatusCode::BAD_REQUEST.as_u16(),
        "instance": instance(),
        "invalidParameters": [{ "name": name, "reason": reason }],
    });
    with_body(StatusCode::BAD_REQUEST, PROBLEM_JSON, body.to_string())
}

/// A problem without extra semantics: `about:blank` with the canonical reason phrase as title.
fn problem(status: StatusCode) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "instance": instance(),
    });
    with_body(status, PROBLEM_JSON, body.to_string())
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut answer = empty(StatusCode::METHOD_NOT_ALLOWED);
    answer
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    answer
}

fn empty(status: StatusCode) -> Response {
    let mut answer = Response::new(Body::empty());
    *answer.status_mut() = status;
    answer
}

fn with_body(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut answer = Response::new(Body::from(body));
    *answer.status_mut() = status;
    answer
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    answer
}
