//! A real `redis-server` (Debian's `redis-server` package) on a free 127.0.0.1 port, for the
//! shared verdict tier's tests: started by the test, killed on drop. Self-contained (std,
//! tokio and redis only) so that both the library's unit tests (`src/shared.rs`) and the
//! integration tests can include it with `#[path]`; the including module must also have the
//! skip rule `system.rs` (`tests/it/system.rs`) as its sibling `system`.
//!
//! When `redis-server` is not installed, [`RedisServer::start`] prints one line saying what to
//! install and returns `None` (the test then returns early), unless
//! `CONNEQT_REQUIRE_SYSTEM_TESTS=1` (CI), where it panics.

#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server gets to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// A `redis-server` of our own. Killed (and reaped) on drop.
pub struct RedisServer {
    program: PathBuf,
    port: u16,
    password: Option<String>,
    /// More arguments for `redis-server` (e.g. TLS).
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A fresh server with no password, or `None` (skipped) when `redis-server` is missing.
    pub fn start() -> Option<Self> {
        Self::launch(None, &[])
    }

    /// A fresh server that also speaks TLS on a port of its own (returned), with this
    /// certificate and key (PEM files); clients are not asked for certificates.
    pub fn start_with_tls(cert: &std::path::Path, key: &std::path::Path) -> Option<(Self, u16)> {
        let tls_port = free_port();
        let extra = vec![
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".to_owned(),
            cert.display().to_string(),
            "--tls-key-file".to_owned(),
            key.display().to_string(),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        Some((Self::launch(None, &extra)?, tls_port))
    }

    /// A fresh server that requires `password` (`requirepass`).
    pub fn start_with_password(password: &str) -> Option<Self> {
        Self::launch(Some(password), &[])
    }

    fn launch(password: Option<&str>, extra: &[String]) -> Option<Self> {
        let program = super::system::program("redis-server", "redis-server")?;
        let mut last_problem = String::new();
        // A port picked free can be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self {
                program: program.clone(),
                port,
                password: password.map(str::to_owned),
                extra: extra.to_vec(),
                child: None,
            };
            match server.spawn_and_wait() {
                Ok(()) => return Some(server),
                Err(problem) => last_problem = problem,
            }
        }
        panic!("redis-server did not start: {last_problem}");
    }

    /// `redis://[:password@]127.0.0.1:port`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The server's URL with another password, for testing refusals.
    pub fn url_with_password(&self, password: &str) -> String {
        format!("redis://:{password}@127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL and waits until it is gone (its port refuses).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server and starts a fresh, empty one on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let started = Instant::now();
        // The port is ours again as soon as the old process is reaped; a bounded retry covers
        // a slow release.
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(problem) if started.elapsed() > READY_WITHIN => {
                    panic!(
                        "redis-server did not restart on port {}: {problem}",
                        self.port
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// `CLIENT KILL TYPE pubsub`: drops every subscribed connection; returns how many.
    pub fn kill_pubsub_clients(&self) -> i64 {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut self.connection())
            .expect("CLIENT KILL")
    }

    /// `CLIENT PAUSE ms ALL`: the server answers nobody (else) for `duration`.
    pub fn pause(&self, duration: Duration) {
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(duration.as_millis() as u64)
            .arg("ALL")
            .query::<()>(&mut self.connection())
            .expect("CLIENT PAUSE");
    }

    /// Every key and its value (strings; other types as their `DUMP`), by `SCAN`.
    pub fn keys_and_values(&self) -> Vec<(String, Vec<u8>)> {
        let mut connection = self.connection();
        let keys: Vec<String> = redis::cmd("SCAN")
            .cursor_arg(0)
            .clone()
            .iter::<String>(&mut connection)
            .expect("SCAN")
            .map(|key| key.expect("a key"))
            .collect();
        keys.into_iter()
            .map(|key| {
                let value: Option<Vec<u8>> = redis::cmd("DUMP")
                    .arg(&key)
                    .query(&mut connection)
                    .expect("DUMP");
                (key, value.unwrap_or_default())
            })
            .collect()
    }

    /// A plain synchronous connection with the right password.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("our own URL")
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("a connection to our redis-server")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut command = Command::new(&self.program);
        command.args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]);
        command.args(["--port", &self.port.to_string()]);
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        command.args(&self.extra);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("could not run redis-server: {error}"))?;
        let started = Instant::now();
        let client = redis::Client::open(self.url()).expect("our own URL");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited at once ({status})"));
            }
            let ping = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut connection| redis::cmd("PING").query::<String>(&mut connection));
            match ping {
                Ok(_) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(error) if started.elapsed() > READY_WITHIN => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("not ready within {READY_WITHIN:?}: {error}"));
                }
                // Bounded retry until it listens (connection refused until then).
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}
