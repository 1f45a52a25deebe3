//! The README's behaviour tables ("Behaviour: HTTP requests", "Behaviour: gRPC requests"),
//! written once as [`CASES`] and run through every transport by [`run_table`]: the layer in
//! axum (`http.rs`) and tonic (`grpc.rs`), the sidecar's `proxy` and `forward-auth` modes
//! (`sidecar/tests/it/`, which includes this file by path).
//!
//! Each case gets a fresh simulator and a fresh transport, sends the same request twice (to
//! show what is cached; over HTTP first as a `POST` with a small body, then as a `GET`) and
//! checks what the client got, how often the upstream was asked and whether the guarded
//! service ran. After an upstream failure it also clears the fault and
//! sends a third time, to show that nothing bad was cached. The expected values come from the
//! README's tables, not from the code.

use std::future::Future;
use std::time::Duration;

use conneqt_guard_simulator::{Fault, Simulator};
use http::{HeaderMap, HeaderValue};
use tonic::Code;

/// The upstream timeout every transport's guard must be configured with: short, so the
/// timeout cases are quick.
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(300);
/// The path prefix every HTTP transport's guard must skip (`skip_path_prefix`); a skipped
/// request is sent to `/public/messages`, every other one to `/messages`.
pub(crate) const SKIP_PREFIX: &str = "/public";
/// What gRPC transports skip instead: the health service's `Watch` (`Check` is guarded).
pub(crate) const GRPC_SKIP_PREFIX: &str = "/grpc.health.v1.Health/Watch";

/// The challenge the README gives for a `401`.
const CHALLENGE: &str = "Conneqt-Instant-Access-Token realm=\"conneqt\"";
const TOKEN_HEADER: &str = "conneqt-instant-access-token";
const TYPE_PREFIX: &str = "tag:conneqt-guard,2026:";
const TOO_LONG: &[u8] = &[b'a'; 300];

/// What the token header carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Token {
    /// No token header.
    Missing,
    /// The header once, with exactly these bytes.
    Literal(&'static [u8]),
    /// A token the simulator issued, once.
    Valid,
    /// A token the simulator issued and then revoked.
    Revoked,
    /// A well-formed UUID the simulator never issued (it answers `410` for it too).
    NeverIssued,
    /// A token the simulator issued, in two token headers.
    ValidTwice,
}

/// How a case is arranged.
#[derive(Debug, Clone)]
pub(crate) enum Arrange {
    /// A request to a skipped path, without a token.
    SkippedPath,
    /// A healthy upstream, and this token.
    Token(Token),
    /// A valid token, and the simulator answering every verify with this fault
    /// (`Fault::Status(401)`/`403` is what it answers a key it does not accept).
    Upstream(Fault),
    /// A valid token, and the simulator answering after far more than [`UPSTREAM_TIMEOUT`].
    SlowUpstream,
    /// A valid token, and the guard pointed at a port nothing listens on.
    RefusedUpstream,
}

/// What the client gets.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Answer {
    /// The service's own answer: HTTP `200` from it, gRPC `OK`.
    Passes,
    /// The guard's rejection: an HTTP status with a problem+json `type` (the part after
    /// `tag:conneqt-guard,2026:`), or this gRPC status.
    Rejected {
        status: u16,
        problem: &'static str,
        grpc: Code,
    },
}

/// Whether the guarded service ran, and if so whether it was handed a `VerifiedToken`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    RunsVerified,
    RunsUnverified,
    DoesNotRun,
}

/// One row of the table.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) arrange: Arrange,
    pub(crate) answer: Answer,
    /// Verify calls after sending the request twice; `None` where nothing listens to count
    /// them (a refused connection).
    pub(crate) upstream_calls: Option<usize>,
    pub(crate) service: Service,
}

const fn rejected(status: u16, problem: &'static str, grpc: Code) -> Answer {
    Answer::Rejected {
        status,
        problem,
        grpc,
    }
}

const MISSING: Answer = rejected(401, "missing-token", Code::Unauthenticated);
const MALFORMED: Answer = rejected(400, "malformed-token", Code::Unauthenticated);
const GONE: Answer = rejected(410, "token-gone", Code::Unauthenticated);
const NOT_ACCEPTED: Answer = rejected(401, "token-not-accepted", Code::Unauthenticated);
const MISCONFIGURED: Answer = rejected(500, "verification-misconfigured", Code::Internal);
const UNAVAILABLE: Answer = rejected(503, "upstream-unavailable", Code::Unavailable);

const fn malformed(name: &'static str, token: Token) -> Case {
    Case {
        name,
        arrange: Arrange::Token(token),
        answer: MALFORMED,
        upstream_calls: Some(0),
        service: Service::DoesNotRun,
    }
}

/// An upstream failure: `503` (gRPC `UNAVAILABLE`), never cached, so asked on every request;
/// `calls_per_request` is 2 where the README's `upstream_retry` row promises one retry
/// (connection errors, `502`/`503`/`504`), else 1.
const fn unavailable(name: &'static str, arrange: Arrange, calls_per_request: usize) -> Case {
    Case {
        name,
        arrange,
        answer: UNAVAILABLE,
        upstream_calls: Some(2 * calls_per_request),
        service: Service::DoesNotRun,
    }
}

/// The README's behaviour tables, one row per situation (and one per listed variant of it).
pub(crate) const CASES: &[Case] = &[
    Case {
        name: "a skip rule matches",
        arrange: Arrange::SkippedPath,
        answer: Answer::Passes,
        upstream_calls: Some(0),
        service: Service::RunsUnverified,
    },
    Case {
        name: "no token header",
        arrange: Arrange::Token(Token::Missing),
        answer: MISSING,
        upstream_calls: Some(0),
        service: Service::DoesNotRun,
    },
    malformed("empty token", Token::Literal(b"")),
    malformed("not a UUID", Token::Literal(b"not-a-uuid")),
    malformed(
        "a UUID one digit short",
        Token::Literal(b"ea4f820e-f352-4515-af73-630220045ef"),
    ),
    malformed(
        "a UUID without hyphens",
        Token::Literal(b"ea4f820ef3524515af73630220045ef0"),
    ),
    malformed("over 256 characters", Token::Literal(TOO_LONG)),
    malformed(
        "a control character",
        Token::Literal(b"ea4f820e-f352\t4515-af73-630220045ef0"),
    ),
    malformed(
        "a non-ASCII character",
        Token::Literal(b"ea4f820e-f352-4515-af73-630220045\xe9f0"),
    ),
    malformed("two token headers", Token::ValidTwice),
    Case {
        name: "upstream 200",
        arrange: Arrange::Token(Token::Valid),
        answer: Answer::Passes,
        upstream_calls: Some(1),
        service: Service::RunsVerified,
    },
    Case {
        name: "upstream 410 (revoked)",
        arrange: Arrange::Token(Token::Revoked),
        answer: GONE,
        upstream_calls: Some(1),
        service: Service::DoesNotRun,
    },
    Case {
        name: "upstream 410 (never issued)",
        arrange: Arrange::Token(Token::NeverIssued),
        answer: GONE,
        upstream_calls: Some(1),
        service: Service::DoesNotRun,
    },
    Case {
        name: "upstream 400",
        arrange: Arrange::Upstream(Fault::Status(400)),
        answer: NOT_ACCEPTED,
        upstream_calls: Some(2),
        service: Service::DoesNotRun,
    },
    Case {
        name: "upstream 401 (our ApiKey is wrong)",
        arrange: Arrange::Upstream(Fault::Status(401)),
        answer: MISCONFIGURED,
        upstream_calls: Some(2),
        service: Service::DoesNotRun,
    },
    Case {
        name: "upstream 403 (our ApiKey is not authorised)",
        arrange: Arrange::Upstream(Fault::Status(403)),
        answer: MISCONFIGURED,
        upstream_calls: Some(2),
        service: Service::DoesNotRun,
    },
    unavailable("upstream 500", Arrange::Upstream(Fault::Status(500)), 1),
    unavailable("upstream 502", Arrange::Upstream(Fault::Status(502)), 2),
    unavailable("upstream 503", Arrange::Upstream(Fault::Status(503)), 2),
    unavailable("upstream 504", Arrange::Upstream(Fault::Status(504)), 2),
    unavailable(
        "upstream 204 (another status)",
        Arrange::Upstream(Fault::Status(204)),
        1,
    ),
    unavailable(
        "upstream 302 (3xx, not followed)",
        Arrange::Upstream(Fault::Status(302)),
        1,
    ),
    unavailable(
        "upstream 418 (another status)",
        Arrange::Upstream(Fault::Status(418)),
        1,
    ),
    unavailable(
        "upstream never answers (timeout)",
        Arrange::Upstream(Fault::Hang),
        1,
    ),
    unavailable(
        "upstream answers after the timeout",
        Arrange::SlowUpstream,
        1,
    ),
    unavailable(
        "upstream drops the connection",
        Arrange::Upstream(Fault::DropConnection),
        2,
    ),
    unavailable(
        "upstream answers not HTTP",
        Arrange::Upstream(Fault::Garbage),
        2,
    ),
    Case {
        name: "upstream refuses the connection",
        arrange: Arrange::RefusedUpstream,
        answer: UNAVAILABLE,
        upstream_calls: None,
        service: Service::DoesNotRun,
    },
];

/// The request a transport must send.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// To the skipped path ([`SKIP_PREFIX`], gRPC: [`GRPC_SKIP_PREFIX`]) rather than the
    /// guarded one.
    pub(crate) skipped: bool,
    /// The token header's values, in order (none: no header; two: the header twice).
    pub(crate) tokens: Vec<HeaderValue>,
    /// HTTP: sent as a `POST` with this small body, else as a `GET` without one.
    pub(crate) body: Option<&'static str>,
    /// One HTTP client for the whole table (building one is slow), for [`Self::send_http`].
    client: reqwest::Client,
}

impl Request {
    /// The HTTP path: `/public/messages` when skipped, else `/messages`.
    pub(crate) fn path(&self) -> String {
        if self.skipped {
            format!("{SKIP_PREFIX}/messages")
        } else {
            "/messages".to_owned()
        }
    }

    /// The token headers as a header map.
    pub(crate) fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for token in &self.tokens {
            headers.append(TOKEN_HEADER, token.clone());
        }
        headers
    }

    /// `POST` (with [`Self::body`]) or `GET {base}{path}` with the token headers, through one
    /// `reqwest` client (so the requests of a case share a kept-alive connection).
    pub(crate) async fn send_http(&self, base: &str) -> HttpAnswer {
        let url = format!("{base}{}", self.path());
        let request = match self.body {
            Some(body) => self.client.post(url).body(body),
            None => self.client.get(url),
        };
        let response = request
            .headers(self.headers())
            .send()
            .await
            .expect("the transport answers");
        HttpAnswer::read(response).await
    }
}

/// An HTTP answer, read in full.
#[derive(Debug)]
pub(crate) struct HttpAnswer {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

impl HttpAnswer {
    pub(crate) async fn read(response: reqwest::Response) -> HttpAnswer {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.expect("the answer's body is read");
        HttpAnswer {
            status,
            headers,
            body,
        }
    }
}

/// What a transport's client got.
#[derive(Debug)]
pub(crate) enum Outcome {
    Http(HttpAnswer),
    /// `Ok` for any successful call.
    Grpc(Result<(), tonic::Status>),
}

/// How often the guarded service ran so far, and (where the transport can see it) how many
/// of those runs were handed a `VerifiedToken`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Runs {
    pub(crate) total: usize,
    pub(crate) verified: Option<usize>,
}

/// A way of putting the guard in front of a service and sending it requests.
pub(crate) trait Transport {
    fn send(&self, request: &Request) -> impl Future<Output = Outcome>;
    fn service_runs(&self) -> Runs;
}

/// A `base_url` whose port refuses connections: bound, learnt, closed.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    format!("http://{}", listener.local_addr().expect("local address"))
}

/// Runs every case of [`CASES`] through the transport `make` builds. `make(simulator,
/// base_url)` must start a guard with `base_url` (usually the simulator's), the simulator's
/// API key, [`UPSTREAM_TIMEOUT`] and the skip rule [`SKIP_PREFIX`] (gRPC:
/// [`GRPC_SKIP_PREFIX`]), otherwise defaults.
pub(crate) async fn run_table<T: Transport>(
    transport: &str,
    make: impl AsyncFn(&Simulator, &str) -> T,
) {
    let client = crate::support::client();
    for case in CASES {
        run_case(transport, case, &make, &client).await;
    }
}

async fn run_case<T: Transport>(
    transport: &str,
    case: &Case,
    make: &impl AsyncFn(&Simulator, &str) -> T,
    client: &reqwest::Client,
) {
    let ctx = format!("{transport}, case {:?}", case.name);
    let sim = Simulator::start().await.expect("simulator starts");
    let base_url = match case.arrange {
        Arrange::RefusedUpstream => closed_port_url(),
        _ => sim.base_url(),
    };
    let t = make(&sim, &base_url).await;

    let mut request = Request {
        skipped: false,
        tokens: Vec::new(),
        body: None,
        client: client.clone(),
    };
    let issued = |sim: &Simulator| HeaderValue::try_from(sim.issue_token()).unwrap();
    match &case.arrange {
        Arrange::SkippedPath => request.skipped = true,
        Arrange::Token(token) => match token {
            Token::Missing => {}
            Token::Literal(bytes) => request.tokens.push(HeaderValue::from_bytes(bytes).unwrap()),
            Token::Valid => request.tokens.push(issued(&sim)),
            Token::Revoked => {
                let token = sim.issue_token();
                sim.revoke(&token);
                request.tokens.push(HeaderValue::try_from(token).unwrap());
            }
            Token::NeverIssued => request.tokens.push(HeaderValue::from_static(
                "123e4567-e89b-12d3-a456-426614174000",
            )),
            Token::ValidTwice => {
                let token = issued(&sim);
                request.tokens.extend([token.clone(), token]);
            }
        },
        Arrange::Upstream(fault) => {
            request.tokens.push(issued(&sim));
            sim.set_fault(fault.clone());
        }
        Arrange::SlowUpstream => {
            request.tokens.push(issued(&sim));
            sim.set_latency(UPSTREAM_TIMEOUT * 20);
        }
        Arrange::RefusedUpstream => request.tokens.push(issued(&sim)),
    }

    let mut instances = Vec::new();
    // The first request has a body (HTTP), the second none: a rejection must not leave the
    // unread body in the way of the next request on the connection.
    for (attempt, body) in [("first", Some("hello")), ("second", None)] {
        let ctx = format!("{ctx}, {attempt} request");
        request.body = body;
        let outcome = t.send(&request).await;
        if let Some(instance) = check(&ctx, &request, case.answer, outcome) {
            instances.push(instance);
        }
    }
    if let [first, second] = instances.as_slice() {
        assert_ne!(first, second, "{ctx}: a fresh problem instance per answer");
    }
    if let Some(calls) = case.upstream_calls {
        assert_eq!(sim.verify_calls(), calls, "{ctx}: upstream calls");
    }
    let runs = t.service_runs();
    let (total, verified) = match case.service {
        Service::RunsVerified => (2, 2),
        Service::RunsUnverified => (2, 0),
        Service::DoesNotRun => (0, 0),
    };
    assert_eq!(runs.total, total, "{ctx}: service runs");
    if let Some(seen) = runs.verified {
        assert_eq!(seen, verified, "{ctx}: runs with a VerifiedToken");
    }

    // Nothing was cached from a failure: once the upstream is well, the same token passes.
    if matches!(case.arrange, Arrange::Upstream(_) | Arrange::SlowUpstream) {
        sim.clear_fault();
        sim.set_latency(Duration::ZERO);
        let ctx = format!("{ctx}, after the upstream recovered");
        check(&ctx, &request, Answer::Passes, t.send(&request).await);
        if let Some(calls) = case.upstream_calls {
            assert_eq!(sim.verify_calls(), calls + 1, "{ctx}: upstream calls");
        }
        let runs = t.service_runs();
        assert_eq!(runs.total, 1, "{ctx}: service runs");
        if let Some(seen) = runs.verified {
            assert_eq!(seen, 1, "{ctx}: runs with a VerifiedToken");
        }
    }
}

/// Checks one outcome against `expected`; returns a rejection's problem `instance`.
fn check(ctx: &str, request: &Request, expected: Answer, outcome: Outcome) -> Option<String> {
    match (expected, outcome) {
        (Answer::Passes, Outcome::Grpc(result)) => {
            if let Err(status) = result {
                panic!("{ctx}: expected OK, got {status:?}");
            }
            None
        }
        (Answer::Rejected { grpc, .. }, Outcome::Grpc(result)) => {
            match result {
                Ok(()) => panic!("{ctx}: expected {grpc:?}, got OK"),
                Err(status) => assert_eq!(status.code(), grpc, "{ctx}: {status:?}"),
            }
            None
        }
        (Answer::Passes, Outcome::Http(answer)) => {
            assert_eq!(answer.status, 200, "{ctx}: {answer:?}");
            None
        }
        (
            Answer::Rejected {
                status, problem, ..
            },
            Outcome::Http(answer),
        ) => Some(check_problem(ctx, request, status, problem, &answer)),
    }
}

/// Checks an HTTP rejection: status, RFC 9457 body and type, and the headers the README
/// promises with it. Returns the `instance`.
fn check_problem(
    ctx: &str,
    request: &Request,
    status: u16,
    problem: &str,
    answer: &HttpAnswer,
) -> String {
    let header = |name: &str| answer.headers.get(name).map(|v| v.to_str().unwrap());
    assert_eq!(answer.status, status, "{ctx}: {answer:?}");
    assert_eq!(
        header("content-type"),
        Some("application/problem+json"),
        "{ctx}"
    );
    assert_eq!(header("cache-control"), Some("no-store"), "{ctx}");
    let challenge = (status == 401).then_some(CHALLENGE);
    assert_eq!(header("www-authenticate"), challenge, "{ctx}");
    if status == 503 {
        assert_eq!(header("retry-after"), Some("1"), "{ctx}");
    }
    let body: serde_json::Value = serde_json::from_str(&answer.body)
        .unwrap_or_else(|err| panic!("{ctx}: the problem body is not JSON ({err}): {answer:?}"));
    assert_eq!(
        body["type"],
        format!("{TYPE_PREFIX}{problem}"),
        "{ctx}: {body}"
    );
    assert_eq!(body["status"], status, "{ctx}: {body}");
    for member in ["title", "detail", "instance"] {
        assert!(body[member].is_string(), "{ctx}: no {member} in {body}");
    }
    let instance = body["instance"].as_str().unwrap();
    assert!(instance.starts_with("urn:uuid:"), "{ctx}: {body}");
    if problem == "malformed-token" {
        assert_eq!(
            body["invalidParameters"][0]["name"], "Conneqt-Instant-Access-Token",
            "{ctx}: {body}"
        );
    } else {
        assert!(body.get("invalidParameters").is_none(), "{ctx}: {body}");
    }
    for token in &request.tokens {
        let token = String::from_utf8_lossy(token.as_bytes());
        if token.len() >= 8 {
            assert!(!answer.body.contains(&*token), "{ctx}: the token is echoed");
        }
    }
    instance.to_owned()
}
