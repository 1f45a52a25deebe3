//! `conneqt-guard forward-auth`, the binary cargo built: answered directly, and behind a real
//! nginx (`examples/forward-auth/nginx.conf`, `auth_request`) and a real Caddy
//! (`examples/forward-auth/Caddyfile`, `forward_auth`) running the shipped configs, checking what
//! a client of the proxy sees. Without nginx or Caddy on the machine those tests skip with a
//! line saying what to install (`.ci/run` installs both and sets `CONNEQT_REQUIRE_SYSTEM_TESTS=1`,
//! which turns a skip into a failure).

use crate::system;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::sidecar::{Backend, Sidecar};
use crate::support::{TOKEN_HEADER, client, problem, raw_get_status};
use conneqt_guard_simulator::{Fault, Simulator};
use tokio::process::{Child, Command};

const CHALLENGE: &str = "Conneqt-Instant-Access-Token realm=\"conneqt\"";
const FINGERPRINT: &str = "x-conneqt-token-fingerprint";

async fn start_guard(sim: &Simulator) -> Sidecar {
    start_guard_with(sim, &[]).await
}

/// `conneqt-guard forward-auth` verifying against `sim`, with `extra` flags.
async fn start_guard_with(sim: &Simulator, extra: &[&str]) -> Sidecar {
    let base_url = sim.base_url();
    let mut args = vec![
        "forward-auth",
        "--base-url",
        &base_url,
        "--api-key",
        sim.api_key(),
    ];
    args.extend_from_slice(extra);
    Sidecar::start(&args).await
}

/// The guard with `/healthz` (and `/headers`, the backend's echo route) skipped.
async fn start_skipping_guard(sim: &Simulator) -> Sidecar {
    start_guard_with(
        sim,
        &[
            "--skip-path-prefix",
            "/healthz",
            "--skip-path-prefix",
            "/headers",
        ],
    )
    .await
}

#[tokio::test]
async fn a_verified_token_gets_an_empty_200_with_its_fingerprint() {
    let sim = Simulator::start().await.unwrap();
    let guard = start_guard(&sim).await;
    let token = sim.issue_token();
    let response = client()
        .get(guard.url("/any/path?x=1"))
        .header(TOKEN_HEADER, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let fingerprint = response.headers()["x-conneqt-token-fingerprint"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(fingerprint.len(), 8, "{fingerprint}");
    assert!(fingerprint.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(!response.headers().contains_key("x-conneqt-guard-status"));
    assert_eq!(response.bytes().await.unwrap().len(), 0);
    assert_eq!(sim.verify_calls(), 1);
}

#[tokio::test]
async fn rejections_carry_the_intended_status_in_a_header_too() {
    let sim = Simulator::start().await.unwrap();
    let guard = start_guard(&sim).await;
    let revoked = sim.issue_token();
    sim.revoke(&revoked);
    let rows: [(Option<&str>, u16, &str, usize); 3] = [
        (None, 401, "missing_token", 0),
        (Some("junk"), 400, "malformed_token", 0),
        (Some(&revoked), 410, "token_gone", 1),
    ];
    for (token, status, reason, upstream_calls) in rows {
        let mut request = client().get(guard.url("/"));
        if let Some(token) = token {
            request = request.header(TOKEN_HEADER, token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.headers()["x-conneqt-guard-status"],
            status.to_string().as_str()
        );
        assert_eq!(response.headers()["x-conneqt-guard-reason"], reason);
        problem(response, status).await;
        assert_eq!(sim.verify_calls(), upstream_calls, "{reason}");
    }
}

#[tokio::test]
async fn a_grpc_sub_request_is_refused_with_a_real_status_not_a_grpc_200() {
    let sim = Simulator::start().await.unwrap();
    let guard = start_guard(&sim).await;
    // A trailers-only gRPC rejection is HTTP 200, which a proxy would read as "allow".
    let response = client()
        .post(guard.url("/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("grpc-status").is_none());
    problem(response, 401).await;
    assert_eq!(sim.verify_calls(), 0);
}

#[tokio::test]
async fn the_original_request_is_read_from_x_forwarded_uri_and_method() {
    let sim = Simulator::start().await.unwrap();
    let guard = start_skipping_guard(&sim).await;
    let ask = |path: &str, headers: &[(&str, &str)]| {
        let mut request = client().get(guard.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send()
    };

    // The original path is skipped, whatever the sub-request's own path.
    let response = ask("/_conneqt_guard", &[("x-forwarded-uri", "/healthz")])
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!response.headers().contains_key(FINGERPRINT));
    assert!(!response.headers().contains_key("x-conneqt-guard-status"));
    let response = ask(
        "/_conneqt_guard",
        &[
            ("x-forwarded-method", "POST"),
            ("x-forwarded-uri", "/healthz/live?verbose=1"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    // ... and the original path is verified even when the sub-request's would be skipped.
    let response = ask("/healthz", &[("x-forwarded-uri", "/messages")])
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-conneqt-guard-reason"],
        "missing_token"
    );
    problem(response, 401).await;
    // Without the headers (Envoy) the sub-request is the original request.
    assert_eq!(ask("/healthz", &[]).await.unwrap().status(), 200);
    let response = ask("/messages", &[]).await.unwrap();
    problem(response, 401).await;
    assert_eq!(sim.verify_calls(), 0);

    // A verified token, checked for the original path.
    let token = sim.issue_token();
    let response = ask(
        "/_conneqt_guard",
        &[
            (TOKEN_HEADER, &token),
            ("x-forwarded-uri", "/messages?page=2"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[FINGERPRINT].len(), 8);
    assert_eq!(sim.verify_calls(), 1);
}

#[tokio::test]
async fn unusable_x_forwarded_headers_get_400_without_asking_the_upstream() {
    let sim = Simulator::start().await.unwrap();
    let guard = start_skipping_guard(&sim).await;
    let token = sim.issue_token();
    let cases: [&[(&str, &str)]; 7] = [
        &[("x-forwarded-uri", "healthz")],
        &[("x-forwarded-uri", "http://example.org/healthz")],
        &[("x-forwarded-uri", "/healthz#top")],
        &[
            ("x-forwarded-uri", "/healthz"),
            ("x-forwarded-uri", "/healthz"),
        ],
        &[
            ("x-forwarded-method", "GE T"),
            ("x-forwarded-uri", "/healthz"),
        ],
        &[("x-forwarded-method", "GET"), ("x-forwarded-method", "GET")],
        // An alias of the token header, which the proxy would pass on to the backend next to
        // the verified one.
        &[(
            "conneqt_instant_access_token",
            "123e4567-e89b-12d3-a456-426614174000",
        )],
    ];
    for headers in cases {
        // With a valid token too: nothing is verified for a request the guard cannot name.
        for token in [None, Some(token.as_str())] {
            let mut request = client().get(guard.url("/healthz"));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if let Some(token) = token {
                request = request.header(TOKEN_HEADER, token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.headers()["x-conneqt-guard-status"], "400");
            assert_eq!(
                response.headers()["x-conneqt-guard-reason"],
                "malformed_request"
            );
            assert_eq!(response.headers()["cache-control"], "no-store");
            let body = problem(response, 400).await;
            assert_eq!(
                body["type"], "tag:conneqt-guard,2026:malformed-request",
                "{headers:?}"
            );
        }
    }
    assert_eq!(sim.verify_calls(), 0);
}

/// These pass once the skip rules refuse ambiguous paths (`src/skip.rs`): a path that a
/// backend might resolve to something outside the skipped prefix is verified, not skipped.
#[tokio::test]
async fn ambiguous_original_paths_are_verified_not_skipped() {
    let sim = Simulator::start().await.unwrap();
    let guard = start_skipping_guard(&sim).await;
    for target in ["/healthz/..%2fsecret", "/healthz/..;/secret"] {
        let response = client()
            .get(guard.url("/_conneqt_guard"))
            .header("x-forwarded-uri", target)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{target} was skipped");
        problem(response, 401).await;
    }
    assert_eq!(sim.verify_calls(), 0);
}

/// A proxy from the machine (nginx or Caddy) on 127.0.0.1, with all its files in a temporary
/// folder; stopped and cleaned up on drop.
struct SystemProxy {
    name: &'static str,
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    log: PathBuf,
}

impl Drop for SystemProxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn free_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A fresh temporary folder for one proxy.
fn temp_dir(name: &str) -> PathBuf {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "conneqt-guard-{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `shipped` with each `(placeholder, value)` replaced, checking every placeholder is there.
fn fill_in(file: &str, shipped: &str, replacements: &[(&str, String)]) -> String {
    let mut text = shipped.to_owned();
    for (placeholder, value) in replacements {
        assert!(text.contains(placeholder), "{placeholder} not in {file}");
        text = text.replace(placeholder, value);
    }
    text
}

impl SystemProxy {
    /// nginx running `examples/forward-auth/nginx.conf` with its addresses replaced by ours.
    async fn nginx(binary: &Path, guard: SocketAddr, backend: SocketAddr) -> SystemProxy {
        let addr = free_port().await;
        let site = fill_in(
            "nginx.conf",
            include_str!("../../examples/forward-auth/nginx.conf"),
            &[
                ("127.0.0.1:8000", addr.to_string()),
                ("127.0.0.1:8081", guard.to_string()),
                ("127.0.0.1:3000", backend.to_string()),
            ],
        );
        let dir = temp_dir("nginx");
        std::fs::write(dir.join("site.conf"), site).unwrap();
        let d = dir.display();
        let main = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/site.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let log = dir.join("error.log");
        let mut command = Command::new(binary);
        command
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        SystemProxy::spawn("nginx", command, dir, addr, log).await
    }

    /// Caddy running `examples/forward-auth/Caddyfile` with its addresses replaced by ours, its
    /// home, data and config folders in the temporary folder, and no admin endpoint.
    async fn caddy(binary: &Path, guard: SocketAddr, backend: SocketAddr) -> SystemProxy {
        let addr = free_port().await;
        let caddyfile = fill_in(
            "Caddyfile",
            include_str!("../../examples/forward-auth/Caddyfile"),
            &[
                // No admin endpoint (it would listen on 2019, shared by all tests).
                ("\tadmin off\n", "\tadmin off\n".to_owned()),
                ("\n:8000 {\n", format!("\n:{} {{\n", addr.port())),
                (
                    "forward_auth 127.0.0.1:8081 {",
                    format!("forward_auth {guard} {{"),
                ),
                (
                    "reverse_proxy 127.0.0.1:3000\n",
                    format!("reverse_proxy {backend}\n"),
                ),
            ],
        );
        let dir = temp_dir("caddy");
        let config = dir.join("Caddyfile");
        std::fs::write(&config, caddyfile).unwrap();
        let log = dir.join("caddy.log");
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--adapter")
            .arg("caddyfile")
            .env("HOME", &dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        SystemProxy::spawn("caddy", command, dir, addr, log).await
    }

    async fn spawn(
        name: &'static str,
        mut command: Command,
        dir: PathBuf,
        addr: SocketAddr,
        log: PathBuf,
    ) -> SystemProxy {
        let child = command
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("cannot run {name}: {error}")
            });
        let mut proxy = SystemProxy {
            name,
            child,
            dir,
            addr,
            log,
        };
        proxy.wait_until_accepting().await;
        proxy
    }

    /// Retries connecting until the proxy accepts (neither says when it is ready), failing at
    /// once with its log if it exits.
    async fn wait_until_accepting(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}):\n{}", self.name, self.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not accept within 30 s:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path` through the proxy, with the token if given and `headers`.
    async fn get(
        &self,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = client().get(self.url(path));
        if let Some(token) = token {
            request = request.header(TOKEN_HEADER, token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request
            .send()
            .await
            .unwrap_or_else(|error| panic!("{} answers: {error}\n{}", self.name, self.log()))
    }
}

/// The one `WWW-Authenticate` of a 401.
fn assert_one_challenge(response: &reqwest::Response) {
    let challenges: Vec<_> = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .collect();
    assert_eq!(challenges, [CHALLENGE], "WWW-Authenticate");
}

#[tokio::test]
async fn behind_nginx_auth_request_clients_see_the_guards_statuses() {
    let Some(binary) = system::program("nginx", "nginx-light") else {
        return;
    };
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let mut guard = start_guard(&sim).await;
    let nginx = SystemProxy::nginx(&binary, guard.addr, backend.addr).await;

    // Valid: the backend is reached, and sees the fingerprint nginx copied from the guard.
    let token = sim.issue_token();
    let response = nginx.get("/headers", Some(&token), &[]).await;
    assert_eq!(response.status(), 200, "{}", nginx.log());
    let seen: serde_json::Value = response.json().await.unwrap();
    let fingerprint = seen[FINGERPRINT][0].as_str().unwrap();
    assert_eq!(fingerprint.len(), 8, "{seen}");
    assert_eq!(backend.calls(), 1);
    assert_eq!(sim.verify_calls(), 1);

    let revoked = sim.issue_token();
    sim.revoke(&revoked);
    let unverifiable = sim.issue_token();
    // (token, status the client sees, problem type, upstream calls after this row)
    let rows: [(Option<&str>, u16, &str, usize); 4] = [
        (None, 401, "missing-token", 1),
        (Some("not-a-uuid"), 400, "malformed-token", 1),
        (Some(&revoked), 410, "token-gone", 2),
        (Some(&unverifiable), 503, "upstream-unavailable", 3),
    ];
    for (token, status, kind, upstream_calls) in rows {
        if status == 503 {
            sim.set_fault(Fault::Status(500));
        }
        let response = nginx.get("/", token, &[]).await;
        assert_eq!(response.status().as_u16(), status, "{kind}");
        if status == 401 {
            assert_one_challenge(&response);
        } else {
            assert!(!response.headers().contains_key("www-authenticate"));
        }
        if status == 503 {
            assert_eq!(response.headers()["retry-after"], "1");
        }
        assert_eq!(response.headers()["cache-control"], "no-store", "{kind}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{kind}"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["type"], format!("tag:conneqt-guard,2026:{kind}"));
        assert_eq!(body["status"], status);
        assert_eq!(backend.calls(), 1, "backend called for {kind}");
        assert_eq!(sim.verify_calls(), upstream_calls, "for {kind}");
    }

    // The guard gone altogether: nginx fails closed with 503.
    sim.clear_fault();
    guard.terminate();
    assert!(guard.exit_status().await.success());
    let response = nginx.get("/", Some(&token), &[]).await;
    assert_eq!(response.status(), 503);
    assert_eq!(backend.calls(), 1);
    assert_eq!(sim.verify_calls(), 3);
}

#[tokio::test]
async fn behind_nginx_skip_rules_apply_to_the_original_path() {
    let Some(binary) = system::program("nginx", "nginx-light") else {
        return;
    };
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let guard = start_skipping_guard(&sim).await;
    let nginx = SystemProxy::nginx(&binary, guard.addr, backend.addr).await;
    skip_rules_apply_to_the_original_path(&nginx, &sim, &backend).await;
}

#[tokio::test]
async fn behind_caddy_forward_auth_clients_see_the_guards_statuses() {
    let Some(binary) = system::program("caddy", "caddy") else {
        return;
    };
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let mut guard = start_guard(&sim).await;
    let caddy = SystemProxy::caddy(&binary, guard.addr, backend.addr).await;

    // Valid: the backend is reached, and sees the fingerprint Caddy copied from the guard (and
    // not the one the client sent).
    let token = sim.issue_token();
    let response = caddy
        .get("/headers", Some(&token), &[(FINGERPRINT, "forged00")])
        .await;
    assert_eq!(response.status(), 200, "{}", caddy.log());
    let seen: serde_json::Value = response.json().await.unwrap();
    let fingerprints = seen[FINGERPRINT].as_array().unwrap();
    assert_eq!(fingerprints.len(), 1, "{seen}");
    let fingerprint = fingerprints[0].as_str().unwrap();
    assert_eq!(fingerprint.len(), 8, "{seen}");
    assert_ne!(fingerprint, "forged00");
    assert_eq!(backend.calls(), 1);
    assert_eq!(sim.verify_calls(), 1);

    let revoked = sim.issue_token();
    sim.revoke(&revoked);
    let unverifiable = sim.issue_token();
    // (token, status the client sees, problem type, upstream calls after this row); Caddy passes
    // the guard's own answer through, body and headers included.
    let rows: [(Option<&str>, u16, &str, usize); 4] = [
        (None, 401, "missing-token", 1),
        (Some("not-a-uuid"), 400, "malformed-token", 1),
        (Some(&revoked), 410, "token-gone", 2),
        (Some(&unverifiable), 503, "upstream-unavailable", 3),
    ];
    for (token, status, kind, upstream_calls) in rows {
        if status == 503 {
            sim.set_fault(Fault::Status(500));
        }
        let response = caddy.get("/headers", token, &[]).await;
        if status == 401 {
            assert_one_challenge(&response);
        } else {
            assert!(!response.headers().contains_key("www-authenticate"));
        }
        if status == 503 {
            assert_eq!(response.headers()["retry-after"], "1");
        }
        assert_eq!(response.headers()["cache-control"], "no-store", "{kind}");
        assert_eq!(
            response.headers()["x-conneqt-guard-status"],
            status.to_string().as_str()
        );
        let body = problem(response, status).await;
        assert_eq!(body["type"], format!("tag:conneqt-guard,2026:{kind}"));
        assert_eq!(backend.calls(), 1, "backend called for {kind}");
        assert_eq!(sim.verify_calls(), upstream_calls, "for {kind}");
    }

    // The guard gone altogether: Caddy fails closed with 502.
    sim.clear_fault();
    guard.terminate();
    assert!(guard.exit_status().await.success());
    let response = caddy.get("/", Some(&token), &[]).await;
    assert_eq!(response.status(), 502);
    assert_eq!(backend.calls(), 1);
    assert_eq!(sim.verify_calls(), 3);
}

#[tokio::test]
async fn behind_caddy_skip_rules_apply_to_the_original_path() {
    let Some(binary) = system::program("caddy", "caddy") else {
        return;
    };
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let guard = start_skipping_guard(&sim).await;
    let caddy = SystemProxy::caddy(&binary, guard.addr, backend.addr).await;
    skip_rules_apply_to_the_original_path(&caddy, &sim, &backend).await;
}

/// Behind `proxy`, with the guard skipping `/healthz` and `/headers`: what is skipped, what is
/// not, and what a client cannot make the guard believe.
async fn skip_rules_apply_to_the_original_path(
    proxy: &SystemProxy,
    sim: &Simulator,
    backend: &Backend,
) {
    // Skipped paths reach the backend with no token and no upstream call.
    for (path, calls) in [("/healthz", 1), ("/healthz/live?verbose=1", 2)] {
        let response = proxy.get(path, None, &[]).await;
        assert_eq!(response.status(), 200, "{path}: {}", proxy.log());
        assert_eq!(response.text().await.unwrap(), "hello from the backend");
        assert_eq!(backend.calls(), calls, "{path}");
    }
    // A skipped request carries no fingerprint, and the client cannot supply one.
    let response = proxy
        .get("/headers", None, &[(FINGERPRINT, "forged00")])
        .await;
    assert_eq!(response.status(), 200);
    let seen: serde_json::Value = response.json().await.unwrap();
    assert!(
        seen.get(FINGERPRINT).is_none(),
        "{}: a fingerprint reached the backend on a skipped request: {seen}",
        proxy.name
    );
    assert_eq!(backend.calls(), 3);

    // Not skipped: another path, and a client naming a skipped path in the headers the guard
    // reads (the proxy replaces them with the real request's).
    let response = proxy
        .get(
            "/messages",
            None,
            &[
                ("x-forwarded-uri", "/healthz"),
                ("x-forwarded-method", "GET"),
            ],
        )
        .await;
    assert_eq!(response.status(), 401, "{}", proxy.name);
    assert_one_challenge(&response);
    assert_eq!(backend.calls(), 3, "backend reached for /messages");

    // Ambiguous paths under the skipped prefix are verified (sent byte for byte). These two
    // need the skip rules' hardening in src/skip.rs.
    for target in ["/healthz/..%2fsecret", "/healthz/..;/secret"] {
        let status = raw_get_status(proxy.addr, target).await;
        assert_eq!(status, 401, "{}: {target} was not verified", proxy.name);
        assert_eq!(
            backend.calls(),
            3,
            "{}: backend reached for {target}",
            proxy.name
        );
    }

    // A target the guard cannot use as it came (a `"` in the query, which nginx and Caddy pass on
    // as sent): 400 malformed-request, not a guess.
    let response = raw_get(proxy.addr, "/healthz?q=\"x\"").await;
    assert!(
        response.starts_with("HTTP/1.1 400 "),
        "{}: {response}",
        proxy.name
    );
    assert!(
        response.contains("tag:conneqt-guard,2026:malformed-request"),
        "{}: {response}",
        proxy.name
    );
    assert_eq!(backend.calls(), 3, "{}: backend reached", proxy.name);
    assert_eq!(sim.verify_calls(), 0);
}

/// The response to `GET target` sent byte for byte over HTTP/1.1, as text.
async fn raw_get(addr: SocketAddr, target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .expect("the proxy answers and closes")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// The README's behaviour table ([`crate::behaviour::CASES`]) through `conneqt-guard
/// forward-auth`, asked directly as a proxy's sub-request would (no `X-Forwarded-*`
/// headers, so it checks the sub-request's own method and path). There is no service behind
/// it: a proxy forwards the original request exactly when the answer is 2xx, so "the service
/// runs" is counted as a 2xx answer, and "with a `VerifiedToken`" as a 2xx carrying
/// `X-Conneqt-Token-Fingerprint` (a skipped request gets its `200` without one). The shipped
/// nginx and Caddy configs are checked against real proxies by the tests above.
mod behaviour {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::FINGERPRINT;
    use crate::behaviour::{Outcome, Request, Runs, SKIP_PREFIX, Transport, UPSTREAM_TIMEOUT};
    use crate::sidecar::Sidecar;

    struct ForwardAuth {
        guard: Sidecar,
        allowed: AtomicUsize,
        fingerprinted: AtomicUsize,
    }

    impl Transport for ForwardAuth {
        async fn send(&self, request: &Request) -> Outcome {
            let answer = request.send_http(&self.guard.url("")).await;
            if (200..300).contains(&answer.status) {
                self.allowed.fetch_add(1, Ordering::SeqCst);
                if answer.headers.contains_key(FINGERPRINT) {
                    self.fingerprinted.fetch_add(1, Ordering::SeqCst);
                }
            }
            Outcome::Http(answer)
        }

        fn service_runs(&self) -> Runs {
            Runs {
                total: self.allowed.load(Ordering::SeqCst),
                verified: Some(self.fingerprinted.load(Ordering::SeqCst)),
            }
        }
    }

    #[tokio::test]
    async fn the_table_over_forward_auth() {
        crate::behaviour::run_table("sidecar forward-auth", async |sim, base_url| {
            let timeout = format!("{}ms", UPSTREAM_TIMEOUT.as_millis());
            let guard = Sidecar::start(&[
                "forward-auth",
                "--base-url",
                base_url,
                "--api-key",
                sim.api_key(),
                "--upstream-timeout",
                &timeout,
                "--skip-path-prefix",
                SKIP_PREFIX,
            ])
            .await;
            ForwardAuth {
                guard,
                allowed: AtomicUsize::new(0),
                fingerprinted: AtomicUsize::new(0),
            }
        })
        .await;
    }
}
