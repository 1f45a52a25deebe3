//! `conneqt-guard forward-auth`, the binary cargo built: answered directly, and behind a real
//! nginx running the shipped `examples/forward-auth/nginx.conf` (`auth_request`), checking what
//! a client of nginx sees. nginx must be installed (`.ci/run` installs Debian's `nginx-light`).

mod support;
#[path = "support/sidecar.rs"]
mod sidecar;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use conneqt_guard::simulator::{Fault, Simulator};
use sidecar::{Backend, Sidecar};
use support::{TOKEN_HEADER, client, problem};
use tokio::process::{Child, Command};

async fn start_guard(sim: &Simulator) -> Sidecar {
    let base_url = sim.base_url();
    Sidecar::start(&[
        "forward-auth",
        "--base-url",
        &base_url,
        "--api-key",
        sim.api_key(),
    ])
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

/// nginx from the machine, on 127.0.0.1, with its own prefix in a temporary folder; stopped
/// and cleaned up on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nginx_binary() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "nginx is not installed, and this test runs the shipped nginx config: \
             `apt-get install -y nginx-light` (.ci/run does this)"
        )
    })
}

async fn free_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

impl Nginx {
    /// Runs `examples/forward-auth/nginx.conf` with its addresses replaced by ours.
    async fn start(guard: SocketAddr, backend: SocketAddr) -> Nginx {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let binary = nginx_binary();
        let dir = std::env::temp_dir().join(format!(
            "conneqt-guard-nginx-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let addr = free_port().await;
        let shipped = include_str!("../examples/forward-auth/nginx.conf");
        for placeholder in ["127.0.0.1:8000", "127.0.0.1:8081", "127.0.0.1:3000"] {
            assert!(
                shipped.contains(placeholder),
                "{placeholder} not in nginx.conf"
            );
        }
        let site = shipped
            .replace("127.0.0.1:8000", &addr.to_string())
            .replace("127.0.0.1:8081", &guard.to_string())
            .replace("127.0.0.1:3000", &backend.to_string());
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
        let child = Command::new(&binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", binary.display()));
        let mut nginx = Nginx { child, dir, addr };
        nginx.wait_until_accepting().await;
        nginx
    }

    /// Retries connecting until nginx accepts (it prints nothing when ready), failing at once
    /// with its error log if it exits.
    async fn wait_until_accepting(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nginx exited ({status}):\n{}", self.error_log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx did not accept within 30 s:\n{}",
                self.error_log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

#[tokio::test]
async fn behind_nginx_auth_request_clients_see_the_guards_statuses() {
    let sim = Simulator::start().await.unwrap();
    let backend = Backend::start().await;
    let mut guard = start_guard(&sim).await;
    let nginx = Nginx::start(guard.addr, backend.addr).await;
    let get = |path: &str, token: Option<&str>| {
        let mut request = client().get(nginx.url(path));
        if let Some(token) = token {
            request = request.header(TOKEN_HEADER, token);
        }
        request.send()
    };

    // Valid: the backend is reached, and sees the fingerprint nginx copied from the guard.
    let token = sim.issue_token();
    let response = get("/headers", Some(&token)).await.unwrap();
    assert_eq!(response.status(), 200, "{}", nginx.error_log());
    let seen: serde_json::Value = response.json().await.unwrap();
    let fingerprint = seen["x-conneqt-token-fingerprint"][0].as_str().unwrap();
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
        let response = get("/", token).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{kind}");
        if status == 401 {
            assert!(response.headers().contains_key("www-authenticate"));
        }
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
    let response = get("/", Some(&token)).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(backend.calls(), 1);
}
