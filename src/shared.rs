//! The shared verdict tier: verdicts that several replicas keep in one Redis, and the
//! revocations they tell each other about (issue 11). Behind the `redis` cargo feature.
//!
//! This module is the building block only: it stores, leases and announces verdicts. The
//! request path (L1 miss → [`get`](SharedVerdicts::get) → [`lease`](SharedVerdicts::lease) →
//! upstream → [`put`](SharedVerdicts::put)) is sequenced by the caller. Every type of the
//! `redis` crate stays inside this file.
//!
//! # What is in Redis
//!
//! Only keyed hashes, never a token: the caller hands over [`TokenHash`]es computed with
//! [`TokenHasher::from_cluster_key`](crate::token::TokenHasher::from_cluster_key), so every
//! replica holding the cluster key names a token alike, and a dump of Redis cannot be matched
//! against a list of tokens. Keys live under a namespace derived from the cluster key
//! ([`namespace`]), so two environments on one Redis never see each other's verdicts:
//!
//! | key | value | expires |
//! |---|---|---|
//! | `conneqt-guard:{ns}:v:{hex}` | `v` (valid) or `g` (gone) | the verdict's TTL (`cache_ttl` / `gone_ttl`) |
//! | `conneqt-guard:{ns}:l:{hex}` | `1`: one replica is verifying this token | `lease` |
//! | `conneqt-guard:{ns}:t:{hex}`, `conneqt-guard:{ns}:t:*` | `1`: this token (every token) was just invalidated | `lease` |
//!
//! and the channel `conneqt-guard:{ns}:invalidate` carries the 32 hex digits of a hash to
//! evict, or `*` for everything.
//!
//! # How the caller uses it
//!
//! [`SharedTier`] (`tier.rs`) sequences these operations between the guard's cache (L1) and
//! the upstream: an L1 hit never comes here; an L1 miss reads [`get`](SharedVerdicts::get),
//! then takes the [`lease`](SharedVerdicts::lease) (and reads again) to ask the upstream and
//! [`put`](SharedVerdicts::put) the verdict, or [`wait_for`](SharedVerdicts::wait_for)s the
//! lease holder's. `on_notice` evicts from L1 (`Evict`) or clears it (`EvictAll`). A verdict
//! read while a notice arrives is not kept: the cache counts its invalidations and undoes an
//! insert that one raced (`VerdictCache::remember`); [`epoch`](SharedVerdicts::epoch) counts
//! the notices delivered, for `Debug` and the tests.
//!
//! # Failing to local, never open
//!
//! Every Redis round trip has the deadline `timeout` (tens of milliseconds). A failure or a
//! missed deadline opens a circuit: [`is_up`](SharedVerdicts::is_up) turns false, `on_notice`
//! gets [`Notice::EvictAll`] (messages may have been lost meanwhile), and until it closes every
//! operation answers `Err(Unavailable)` at once, with no I/O, so the caller verifies against
//! the upstream as it would without the tier. A background heartbeat (every
//! [`HEARTBEAT`] while up, every [`RECOVERY`] while down) subscribes when needed and PINGs
//! with the same deadline; it closes the circuit once Redis answers and the subscription is
//! confirmed, and `on_notice` gets `EvictAll` again. The tier is also down until that first
//! confirmation. A disconnect seen on the connection (redis-rs's `Disconnection` push) opens
//! the circuit at once. Nothing here lets a request pass: Redis only ever holds verdicts an
//! upstream gave.
//!
//! One endpoint only (a standalone Redis or Valkey, or a managed one behind one address): no
//! Cluster, no Sentinel. `redis://` and `rediss://` (TLS through rustls with the process's
//! default crypto provider, installing ring as that default when the application set none,
//! and the platform's root certificates, `SSL_CERT_FILE` honoured).
//! Commands and pub/sub share one RESP3 connection (redis-rs's `ConnectionManager`, which
//! reconnects and, with automatic resubscription, subscribes again on the new connection).

mod tier;

pub(crate) use tier::{Invalidation, SharedTier};

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::telemetry::{SHARED_TIER_ERRORS, SHARED_TIER_UP};
use crate::token::TokenHash;

/// How often the heartbeat PINGs while the tier is up.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often it tries again while the tier is down.
pub(crate) const RECOVERY: Duration = Duration::from_millis(250);
/// The least time [`SharedVerdicts::check`] gives a first connection (TLS, AUTH) at start-up.
const CHECK_AT_LEAST: Duration = Duration::from_secs(2);
/// How long [`SharedVerdicts::wait_for`] sleeps between polls, at most.
const POLL_AT_MOST: Duration = Duration::from_millis(4);
/// Keys per `SCAN` round trip in [`SharedVerdicts::invalidate_all`].
const SCAN_BATCH: usize = 1000;

/// The namespace of a cluster key: 16 hex digits of a BLAKE3 key derivation, so that two
/// environments (two cluster keys) on one Redis never share a key or a channel.
pub(crate) fn namespace(cluster_key: &[u8]) -> String {
    let derived = blake3::derive_key("conneqt-guard 2026 redis namespace", cluster_key);
    derived[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The cluster key when none is configured: derived from the API key and the base URL, which
/// every replica of one deployment shares (and which differ between environments). The API
/// key is secret, so the result is too.
pub(crate) fn default_cluster_key(api_key: &str, base_url: &str) -> [u8; 32] {
    let mut material = Vec::with_capacity(api_key.len() + base_url.len() + 1);
    material.extend_from_slice(api_key.as_bytes());
    material.push(0);
    material.extend_from_slice(base_url.as_bytes());
    blake3::derive_key("conneqt-guard 2026 default cluster key", &material)
}

/// Checks a `redis_url` without connecting: `redis://` or `rediss://`, a host, at most a
/// database number as path. The problem never quotes the URL (it may hold a password).
pub(crate) fn check_url(raw: &str) -> Result<(), String> {
    parse_url(raw).map(drop)
}

fn parse_url(raw: &str) -> Result<redis::ConnectionInfo, String> {
    let scheme = raw.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some("redis" | "rediss") => {}
        Some("unix" | "redis+unix") => {
            return Err(
                "must be a redis:// or rediss:// URL (Unix sockets are not supported)".into(),
            );
        }
        _ => {
            return Err(
                "must be a redis:// or rediss:// URL (e.g. redis://redis.internal:6379)".into(),
            );
        }
    }
    let info = raw.into_connection_info().map_err(|_| {
        "is not a valid redis:// or rediss:// URL (host, port, database number)".to_owned()
    })?;
    match info.addr() {
        ConnectionAddr::TcpTls { insecure: true, .. } => {
            return Err(
                "must not ask for `#insecure`: the server's certificate is always checked".into(),
            );
        }
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } if !host.is_empty() => {}
        _ => return Err("must name a host (e.g. redis://redis.internal:6379)".into()),
    }
    let redis = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Ok(info.set_redis_settings(redis))
}

/// What the tier needs to know. `url` is secret (it may carry a user and password).
#[derive(Clone)]
pub(crate) struct SharedSettings {
    /// `redis://[user:password@]host[:port][/db]` or `rediss://…`.
    pub(crate) url: String,
    /// From [`namespace`] of the cluster key.
    pub(crate) namespace: String,
    /// The deadline of one Redis round trip.
    pub(crate) timeout: Duration,
    /// How long a [`lease`](SharedVerdicts::lease) lasts.
    pub(crate) lease: Duration,
}

impl fmt::Debug for SharedSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSettings")
            .field("url", &"<redacted>")
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .finish()
    }
}

/// A verdict as the tier stores it. Only verdicts the upstream gave are ever stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SharedVerdict {
    Valid,
    Gone,
}

impl SharedVerdict {
    fn code(self) -> &'static str {
        match self {
            Self::Valid => "v",
            Self::Gone => "g",
        }
    }

    fn from_code(code: &[u8]) -> Option<Self> {
        match code {
            b"v" => Some(Self::Valid),
            b"g" => Some(Self::Gone),
            _ => None,
        }
    }
}

/// What the caller must do to its L1, delivered through `on_notice`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Notice {
    /// Forget this token's verdict (invalidated or found gone by some replica).
    Evict(TokenHash),
    /// Forget every verdict: `invalidate_all` somewhere, or messages may have been lost (a
    /// disconnect, a failed heartbeat, a reconnect).
    EvictAll,
}

/// The tier cannot answer now (down, slow, circuit open): do as without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Unavailable;

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the shared verdict tier (Redis) is unavailable")
    }
}

impl std::error::Error for Unavailable {}

/// What [`SharedVerdicts::check`] found. Messages never quote the URL or the password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SharedProblem {
    /// Redis refused our credentials or their permissions (`WRONGPASS`, `NOAUTH`, `NOPERM`):
    /// a configuration error, worth failing start-up for.
    AuthRefused(String),
    /// Redis could not be reached or did not answer in time: not a start-up failure (the
    /// tier comes up when Redis does).
    Unreachable(String),
}

impl fmt::Display for SharedProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AuthRefused(why) => {
                write!(f, "Redis refused the credentials in redis_url: {why}")
            }
            Self::Unreachable(why) => write!(f, "Redis is unreachable: {why}"),
        }
    }
}

/// Verdicts shared through one Redis. Cheap to clone: clones share one connection, one
/// heartbeat and one circuit. See the [module documentation](self).
#[derive(Clone)]
pub(crate) struct SharedVerdicts {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    timeout: Duration,
    lease: Duration,
    /// `conneqt-guard:{ns}:`
    prefix: String,
    state: Arc<State>,
    /// Made on first use (it needs the tokio runtime), with the heartbeat.
    manager: OnceLock<ConnectionManager>,
    put_script: redis::Script,
}

/// What the connection's push handler shares with the rest (not `Inner`, which owns the
/// connection: that would be a cycle).
struct State {
    channel: String,
    up: AtomicBool,
    subscribed: AtomicBool,
    epoch: AtomicU64,
    on_notice: Arc<dyn Fn(Notice) + Send + Sync>,
    /// Wakes the heartbeat early (a failure, a subscription confirmed).
    wake: Notify,
}

/// `KEYS[1]` the verdict, `KEYS[2]` the lease, `KEYS[3]` and `KEYS[4]` the token's and the
/// namespace's invalidation marks; `ARGV[1]` `v` or `g`, `ARGV[2]` the TTL in ms, `ARGV[3]` the
/// channel, `ARGV[4]` the hash. A valid verdict never replaces a gone one, and is not stored
/// while an invalidation mark stands (it may come from a verification that began before the
/// invalidation: a logout must not be undone by a slow replica); a gone one is announced in
/// the same step. Either way the lease is released. 1 when stored.
const PUT: &str = r"
if ARGV[1] == 'v' and (redis.call('GET', KEYS[1]) == 'g'
    or redis.call('EXISTS', KEYS[3]) == 1 or redis.call('EXISTS', KEYS[4]) == 1) then
  redis.call('DEL', KEYS[2])
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if ARGV[1] == 'g' then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
";

impl SharedVerdicts {
    /// Parses the URL; does no I/O and needs no runtime. The connection, the subscription and
    /// the heartbeat start on first use (or [`check`](Self::check)), on the tokio runtime of
    /// that call. `on_notice` runs on the connection's task: it must be quick and must not
    /// block (evicting from an in-memory table is the intended use).
    pub(crate) fn new(
        settings: SharedSettings,
        on_notice: Arc<dyn Fn(Notice) + Send + Sync>,
    ) -> Result<Self, String> {
        let SharedSettings {
            url,
            namespace,
            timeout,
            lease,
        } = settings;
        let info = parse_url(&url)?;
        if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            ensure_crypto_provider();
        }
        let client = redis::Client::open(info)
            .map_err(|_| "could not be used to set up a Redis client".to_owned())?;
        let prefix = format!("conneqt-guard:{namespace}:");
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                timeout,
                lease,
                state: Arc::new(State {
                    channel: format!("{prefix}invalidate"),
                    up: AtomicBool::new(false),
                    subscribed: AtomicBool::new(false),
                    epoch: AtomicU64::new(0),
                    on_notice,
                    wake: Notify::new(),
                }),
                prefix,
                manager: OnceLock::new(),
                put_script: redis::Script::new(PUT),
            }),
        })
    }

    /// The start-up check: one fresh connection (with the URL's credentials) and a `PING`,
    /// within the larger of `timeout` and 2 s. Also starts the tier and, when Redis answered,
    /// waits (within the same deadline) for the subscription, so the tier is up on return.
    /// Only [`SharedProblem::AuthRefused`] should fail start-up.
    pub(crate) async fn check(&self) -> Result<(), SharedProblem> {
        let deadline = Instant::now() + self.inner.timeout.max(CHECK_AT_LEAST);
        let client = self.inner.client.clone();
        let probe = async move {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<()>(&mut connection).await
        };
        match tokio::time::timeout_at(deadline, probe).await {
            Err(_) => return Err(SharedProblem::Unreachable("no answer in time".into())),
            Ok(Err(error)) => return Err(classify(&error)),
            Ok(Ok(())) => {}
        }
        self.start();
        while !self.is_up() {
            let woken = self.inner.state.wake.notified();
            if self.is_up() {
                break;
            }
            let next = (Instant::now() + Duration::from_millis(10)).min(deadline);
            if tokio::time::timeout_at(next, woken).await.is_err() && Instant::now() >= deadline {
                return Err(SharedProblem::Unreachable(
                    "answered, but the subscription was not confirmed in time".into(),
                ));
            }
        }
        Ok(())
    }

    /// The token's verdict and how long it has left, in one round trip (`GET` and `PTTL`
    /// pipelined); `Ok(None)` when there is none (or it is about to expire).
    pub(crate) async fn get(
        &self,
        key: &TokenHash,
    ) -> Result<Option<(SharedVerdict, Duration)>, Unavailable> {
        let verdict_key = self.inner.key("v", key);
        let (value, ttl) = self
            .run("get", move |mut connection| async move {
                redis::pipe()
                    .get(&verdict_key)
                    .pttl(&verdict_key)
                    .query_async::<(Option<Vec<u8>>, i64)>(&mut connection)
                    .await
            })
            .await?;
        Ok(read_verdict(value.as_deref(), ttl))
    }

    /// Stores the upstream's verdict for `ttl` (atomically: a `Valid` never replaces a `Gone`,
    /// so a slow replica cannot bring a revoked token back), releases the token's lease, and,
    /// for `Gone`, announces it so every replica evicts the token from its L1.
    pub(crate) async fn put(
        &self,
        key: &TokenHash,
        verdict: SharedVerdict,
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        let inner = Arc::clone(&self.inner);
        let (verdict_key, lease_key, hex) =
            (inner.key("v", key), inner.key("l", key), key.to_hex());
        let (mark, mark_all) = (inner.key("t", key), inner.mark_all());
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.run("put", move |mut connection| async move {
            inner
                .put_script
                .key(verdict_key)
                .key(lease_key)
                .key(mark)
                .key(mark_all)
                .arg(verdict.code())
                .arg(ttl_ms)
                .arg(&inner.state.channel)
                .arg(hex)
                .invoke_async::<i64>(&mut connection)
                .await
        })
        .await
        .map(drop)
    }

    /// Takes the token's lease (`SET … NX PX lease`): `true` when this replica should verify
    /// it, `false` when another replica already is (then [`wait_for`](Self::wait_for)).
    pub(crate) async fn lease(&self, key: &TokenHash) -> Result<bool, Unavailable> {
        let lease_key = self.inner.key("l", key);
        let lease_ms = self.inner.lease_ms();
        self.run("lease", move |mut connection| async move {
            redis::cmd("SET")
                .arg(&lease_key)
                .arg("1")
                .arg("NX")
                .arg("PX")
                .arg(lease_ms)
                .query_async::<Option<String>>(&mut connection)
                .await
        })
        .await
        .map(|set| set.is_some())
    }

    /// Gives the lease back without a verdict (the upstream call failed), so waiting replicas
    /// stop waiting and verify themselves.
    pub(crate) async fn release(&self, key: &TokenHash) -> Result<(), Unavailable> {
        let lease_key = self.inner.key("l", key);
        self.run("release", move |mut connection| async move {
            redis::cmd("DEL")
                .arg(&lease_key)
                .query_async::<i64>(&mut connection)
                .await
        })
        .await
        .map(drop)
    }

    /// Waits for the verdict of the replica that holds the lease: polls (verdict, its TTL and
    /// whether the lease still stands, one round trip each) with a backoff from 1 ms up to
    /// 4 ms, so a waiter sees the verdict at most about 4 ms after the winner stored it (at
    /// most 250 round trips a second per waiting replica and token). `Ok(None)` when the lease is gone without a verdict (the winner gave up) or at
    /// `deadline`; then verify yourself. Returns by `deadline` (plus at most one `timeout`).
    pub(crate) async fn wait_for(
        &self,
        key: &TokenHash,
        deadline: Instant,
    ) -> Result<Option<(SharedVerdict, Duration)>, Unavailable> {
        let (verdict_key, lease_key) = (self.inner.key("v", key), self.inner.key("l", key));
        let mut pause = Duration::from_millis(1);
        loop {
            let (verdict_key, lease_key) = (verdict_key.clone(), lease_key.clone());
            let (value, ttl, leased) = self
                .run("wait_for", move |mut connection| async move {
                    redis::pipe()
                        .get(&verdict_key)
                        .pttl(&verdict_key)
                        .exists(&lease_key)
                        .query_async::<(Option<Vec<u8>>, i64, bool)>(&mut connection)
                        .await
                })
                .await?;
            if let Some(found) = read_verdict(value.as_deref(), ttl) {
                return Ok(Some(found));
            }
            let now = Instant::now();
            if !leased || now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep_until((now + pause).min(deadline)).await;
            pause = (pause * 2).min(POLL_AT_MOST);
        }
    }

    /// Forgets the token's verdict in Redis, marks it invalidated for one `lease` (so a valid
    /// verdict from a verification already under way is not stored), and tells every replica
    /// (this one too) to evict it.
    pub(crate) async fn invalidate(&self, key: &TokenHash) -> Result<(), Unavailable> {
        let (verdict_key, mark) = (self.inner.key("v", key), self.inner.key("t", key));
        let lease_ms = self.inner.lease_ms();
        let channel = self.inner.state.channel.clone();
        let hex = key.to_hex();
        self.run("invalidate", move |mut connection| async move {
            redis::pipe()
                .atomic()
                .cmd("SET")
                .arg(&mark)
                .arg(1)
                .arg("PX")
                .arg(lease_ms)
                .ignore()
                .del(&verdict_key)
                .ignore()
                .publish(&channel, hex)
                .ignore()
                .query_async::<()>(&mut connection)
                .await
        })
        .await
    }

    /// Forgets every verdict of the namespace (`SCAN MATCH …:v:*` and `UNLINK`, a batch per
    /// round trip, each within `timeout`), then tells every replica to clear its L1. Rare (an
    /// operator's action), so it takes as many round trips as the namespace needs; a replica
    /// that refills its L1 from a verdict not yet unlinked is cleared by the final message.
    pub(crate) async fn invalidate_all(&self) -> Result<(), Unavailable> {
        // First the mark, so no valid verdict under way is stored behind the scan.
        let mark_all = self.inner.mark_all();
        let lease_ms = self.inner.lease_ms();
        self.run("invalidate_all", move |mut connection| async move {
            redis::cmd("SET")
                .arg(&mark_all)
                .arg(1)
                .arg("PX")
                .arg(lease_ms)
                .query_async::<()>(&mut connection)
                .await
        })
        .await?;
        let pattern = format!("{}v:*", self.inner.prefix);
        let mut cursor = 0u64;
        loop {
            let pattern = pattern.clone();
            let (next, keys) = self
                .run("invalidate_all", move |mut connection| async move {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(SCAN_BATCH)
                        .query_async(&mut connection)
                        .await?;
                    if !keys.is_empty() {
                        redis::cmd("UNLINK")
                            .arg(&keys)
                            .query_async::<()>(&mut connection)
                            .await?;
                    }
                    Ok((next, keys.len()))
                })
                .await?;
            let _ = keys;
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let channel = self.inner.state.channel.clone();
        self.run("invalidate_all", move |mut connection| async move {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg("*")
                .query_async::<()>(&mut connection)
                .await
        })
        .await
    }

    /// Bumped before every notice is delivered: a caller that read the tier while it changed
    /// drops what it read (see the [module documentation](self)).
    pub(crate) fn epoch(&self) -> u64 {
        self.inner.state.epoch.load(Ordering::SeqCst)
    }

    /// Whether the circuit is closed: Redis answered the last operation and heartbeat, and the
    /// subscription is confirmed. While false, every operation fails at once.
    pub(crate) fn is_up(&self) -> bool {
        self.inner.state.up.load(Ordering::SeqCst)
    }

    /// Runs one round trip under the deadline, or fails at once while the circuit is open.
    async fn run<T, F, Fut>(&self, op: &'static str, operation: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let manager = self.start();
        if !self.is_up() {
            return Err(Unavailable);
        }
        match tokio::time::timeout(self.inner.timeout, operation(manager.clone())).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                tracing::warn!(op, kind = ?error.kind(), "shared verdict tier: Redis failed");
                self.inner.state.fail(op);
                Err(Unavailable)
            }
            Err(_) => {
                tracing::warn!(op, "shared verdict tier: Redis did not answer in time");
                self.inner.state.fail(op);
                Err(Unavailable)
            }
        }
    }

    /// The connection, made (with the heartbeat) on first use.
    fn start(&self) -> &ConnectionManager {
        self.inner.manager.get_or_init(|| {
            let state = Arc::clone(&self.inner.state);
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(self.inner.timeout))
                .set_connection_timeout(Some(self.inner.timeout.max(Duration::from_secs(1))))
                // The heartbeat drives reconnection; redis-rs's own retries would only stack
                // up behind it.
                .set_number_of_retries(1)
                .set_max_delay(RECOVERY)
                .set_push_sender(move |push: PushInfo| {
                    state.on_push(&push);
                    Ok::<(), std::convert::Infallible>(())
                })
                .set_automatic_resubscription();
            let manager =
                ConnectionManager::new_lazy_with_config(self.inner.client.clone(), config)
                    .expect("a RESP3 push sender with resubscription is a valid configuration");
            metrics::gauge!(SHARED_TIER_UP).set(0.0);
            tokio::spawn(heartbeat(Arc::downgrade(&self.inner)));
            manager
        })
    }
}

impl fmt::Debug for SharedVerdicts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedVerdicts")
            .field("namespace", &self.inner.prefix)
            .field("up", &self.is_up())
            .field("epoch", &self.epoch())
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn key(&self, kind: &str, hash: &TokenHash) -> String {
        format!("{}{kind}:{}", self.prefix, hash.to_hex())
    }

    /// The namespace's invalidation mark, set by `invalidate_all`.
    fn mark_all(&self) -> String {
        format!("{}t:*", self.prefix)
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// One heartbeat: subscribe if the subscription is not confirmed, then PING; true when
    /// both went through in time.
    async fn probe(&self) -> bool {
        let Some(manager) = self.manager.get() else {
            return false;
        };
        let mut manager = manager.clone();
        if !self.state.subscribed.load(Ordering::SeqCst) {
            let subscribed =
                tokio::time::timeout(self.timeout, manager.subscribe(&self.state.channel)).await;
            match subscribed {
                Ok(Ok(())) => self.state.subscribed.store(true, Ordering::SeqCst),
                _ => return false,
            }
        }
        let ping = redis::cmd("PING");
        let ping = ping.query_async::<()>(&mut manager);
        matches!(tokio::time::timeout(self.timeout, ping).await, Ok(Ok(())))
            && self.state.subscribed.load(Ordering::SeqCst)
    }
}

impl State {
    /// Bumps the epoch, then tells the caller.
    fn notify(&self, notice: Notice) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        (self.on_notice)(notice);
    }

    /// An operation failed: open the circuit (once) and drop every L1 verdict.
    fn fail(&self, op: &'static str) {
        metrics::counter!(SHARED_TIER_ERRORS, "op" => op).increment(1);
        if self.up.swap(false, Ordering::SeqCst) {
            metrics::gauge!(SHARED_TIER_UP).set(0.0);
            tracing::warn!("shared verdict tier down: verifying locally until Redis answers");
            self.notify(Notice::EvictAll);
        }
        self.wake.notify_waiters();
    }

    /// The heartbeat went through: close the circuit (once) and drop every L1 verdict, as
    /// messages sent while it was open were lost.
    fn recover(&self) {
        if !self.up.swap(true, Ordering::SeqCst) {
            metrics::gauge!(SHARED_TIER_UP).set(1.0);
            tracing::info!("shared verdict tier up");
            self.notify(Notice::EvictAll);
        }
        self.wake.notify_waiters();
    }

    /// A push from the connection (runs on its task).
    fn on_push(&self, push: &PushInfo) {
        match push.kind {
            PushKind::Message => {
                let [Value::BulkString(channel), Value::BulkString(payload)] = push.data.as_slice()
                else {
                    return;
                };
                if channel.as_slice() != self.channel.as_bytes() {
                    return;
                }
                match payload.as_slice() {
                    b"*" => self.notify(Notice::EvictAll),
                    hex => match std::str::from_utf8(hex).ok().and_then(TokenHash::from_hex) {
                        Some(hash) => self.notify(Notice::Evict(hash)),
                        None => tracing::debug!("shared verdict tier: ignored a malformed message"),
                    },
                }
            }
            PushKind::Subscribe => {
                if matches!(push.data.first(), Some(Value::BulkString(channel)) if channel.as_slice() == self.channel.as_bytes())
                {
                    self.subscribed.store(true, Ordering::SeqCst);
                    self.wake.notify_waiters();
                }
            }
            PushKind::Disconnection => {
                self.subscribed.store(false, Ordering::SeqCst);
                self.fail("connection");
            }
            _ => {}
        }
    }
}

/// Runs until the last clone of the tier is dropped.
async fn heartbeat(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let up = strong.probe().await;
        if up {
            strong.state.recover();
        } else {
            strong.state.fail("heartbeat");
        }
        let state = Arc::clone(&strong.state);
        drop(strong);
        let woken = state.wake.notified();
        let period = if up { HEARTBEAT } else { RECOVERY };
        // A wake-up while up is a failure or a confirmation: probe at once.
        let _ = tokio::time::timeout(period, woken).await;
    }
}

/// A stored verdict and its remaining TTL; `None` for no key, an unknown value, or a TTL
/// that is missing (-1, never written so) or gone (-2).
fn read_verdict(value: Option<&[u8]>, ttl_ms: i64) -> Option<(SharedVerdict, Duration)> {
    let verdict = SharedVerdict::from_code(value?)?;
    let ttl_ms = u64::try_from(ttl_ms).ok().filter(|&ms| ms > 0)?;
    Some((verdict, Duration::from_millis(ttl_ms)))
}

/// redis-rs 1.8 builds its rustls configuration from the process's default crypto provider
/// (`ClientConfig::builder()`, which panics when there is none and it cannot pick one) and
/// takes no configuration of ours. So for `rediss://`, when the application has installed no
/// default, ring (the provider this crate uses for the upstream) is installed as the default;
/// a default the application installed before is kept. Unlike the upstream's TLS (see
/// `upstream/tls.rs`), this is process-wide, and only happens when `rediss://` is configured.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a default exists either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Sorts a failed start-up check. Never quotes the URL: only the error's code and kind.
fn classify(error: &redis::RedisError) -> SharedProblem {
    let code = error.code().unwrap_or_default().to_owned();
    let refused = matches!(error.kind(), redis::ErrorKind::AuthenticationFailed)
        || matches!(code.as_str(), "NOAUTH" | "WRONGPASS" | "NOPERM")
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
        );
    if refused {
        let what = if code.is_empty() {
            "authentication failed".to_owned()
        } else {
            code
        };
        SharedProblem::AuthRefused(what)
    } else if error.is_timeout() {
        SharedProblem::Unreachable("timed out".into())
    } else if error.is_connection_refusal() {
        SharedProblem::Unreachable("connection refused".into())
    } else if error.is_io_error() {
        // An I/O error's text is the operating system's or rustls's (refused, unknown host,
        // certificate); redis-rs adds no URL to it.
        SharedProblem::Unreachable(error.to_string())
    } else {
        SharedProblem::Unreachable(format!("{:?}", error.kind()))
    }
}

#[cfg(test)]
#[path = "../tests/it/system.rs"]
mod system;
#[cfg(test)]
#[path = "../tests/it/redis_server.rs"]
mod redis_server;

#[cfg(test)]
mod tests;
