//! Step 2: remember verdicts, and make sure one token costs at most one upstream call at a time.
//!
//! Every verdict is one small entry keyed on the token's 128-bit keyed hash
//! ([`TokenHash`]; the token itself is never stored here): the hash and the time the verdict
//! was had, nothing else. Valid verdicts live in one bounded table (`cache_capacity`) and gone
//! verdicts in another (`gone_capacity`), so a flood of revoked tokens can only evict other
//! revoked tokens, never the valid ones in use. Errors and "not accepted" answers are never
//! stored. Expiry is per entry and lazy: a lookup compares the entry's age with `cache_ttl`
//! (valid), `gone_ttl` (gone), the refresh-ahead age and, for stale-if-error, `cache_ttl` plus
//! the grace, so one entry serves all of them (there are no parallel marker caches); an entry
//! found past its last use is dropped there and then, and a full table reuses the slot of one
//! not used lately (CLOCK). Each table is split into mutex-guarded shards, so a hit takes one
//! uncontended lock, one hash-table probe and a clock read, and allocates nothing.
//!
//! Concurrent misses (and refreshes) for one token share one verification: the first
//! registers it in the in-flight map and spawns it, later ones wait for its answer.
//!
//! Why not moka (which this module used before): per cached valid verdict moka's entry, its
//! deque nodes and its timer bookkeeping came to about 400 bytes of heap, and its `get` is an
//! `async fn` that records each read for its eviction policy; this table takes about 60 to 80
//! bytes per verdict and a fraction of the instructions per hit.
//!
//! This module does not know how a token is verified: it is handed the verify future.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::token::TokenHash;
use crate::verdict::Verdict;

/// The verification task ended without an answer (it panicked, or the runtime is shutting
/// down). Treated like any other upstream failure: fail closed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VerificationAborted;

/// Why the cache asks for a verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Asked {
    /// Nothing usable is cached.
    Miss,
    /// The valid verdict in use is due for refresh-ahead.
    Refresh,
}

/// What a verification learned: the verdict, and how old it already was when had (zero from
/// the upstream; from a shared tier, its age there), so the entry expires when the verdict
/// it came from does.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Learned {
    pub(crate) verdict: Verdict,
    pub(crate) age: Duration,
}

impl From<Verdict> for Learned {
    fn from(verdict: Verdict) -> Self {
        Self {
            verdict,
            age: Duration::ZERO,
        }
    }
}

/// How a verdict was had, for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheResult {
    /// A fresh cached verdict.
    Hit,
    /// A fresh cached valid verdict, old enough that a background refresh was started.
    HitRefreshing,
    /// Not cached: the upstream was asked (or this request waited for another's asking).
    Miss,
    /// The upstream was unavailable and an expired valid verdict within the stale grace was
    /// used instead.
    Stale,
}

impl CacheResult {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::HitRefreshing => "refresh",
            Self::Miss => "miss",
            Self::Stale => "stale",
        }
    }
}

/// The cache's settings, checked by the builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheSettings {
    pub(crate) cache_ttl: Duration,
    pub(crate) valid_capacity: u64,
    pub(crate) gone_ttl: Duration,
    pub(crate) gone_capacity: u64,
    /// Age of a valid verdict past which a use of it starts a background refresh.
    pub(crate) refresh_after: Option<Duration>,
    /// How long past `cache_ttl` a valid verdict may stand in for an unavailable upstream.
    pub(crate) stale_grace: Option<Duration>,
}

#[derive(Clone)]
pub(crate) struct VerdictCache {
    inner: Arc<Inner>,
}

struct Inner {
    /// When each verdict was had, as nanoseconds since `epoch`.
    valid: Table,
    gone: Table,
    /// Verifications under way, by key: a `watch::Receiver` of the answer, type-erased as the
    /// error type is the caller's.
    in_flight: Mutex<HashMap<TokenHash, Arc<dyn Any + Send + Sync>, PassThrough>>,
    /// Bumped by every invalidation, before it removes anything: a verification that started
    /// before one does not leave its verdict behind (see [`VerdictCache::remember`]).
    invalidations: AtomicU64,
    epoch: Instant,
    /// The ages below, in nanoseconds.
    cache_ttl: u64,
    gone_ttl: u64,
    refresh_after: Option<u64>,
    /// How long a valid entry is kept: `cache_ttl`, plus the stale grace when that is on.
    keep_valid: u64,
    stale_if_error: bool,
}

/// The oldest a learned verdict can be stamped: longer than any TTL the settings allow (7 days).
const BACKDATE: u64 = 8 * 24 * 60 * 60 * 1_000_000_000;

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Keys are [`TokenHash`]es, already uniformly random, so the maps use their first 64 bits as
/// the hash instead of hashing them again (saves a SipHash per lookup on the hot path).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PassThrough;

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;

    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    /// Only for keys other than `TokenHash`, which never reach these maps; still a correct
    /// (if weak) hash.
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here panics while holding a lock, but a poisoned table is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A bounded map from key to time stamp, in shards.
struct Table {
    shards: Box<[Mutex<Shard>]>,
    /// `shards.len() - 1` (a power of two, less one).
    mask: u64,
}

/// One shard: the entries in a vector the clock hand sweeps, and an index into it.
struct Shard {
    index: HashMap<TokenHash, u32, PassThrough>,
    slots: Vec<Slot>,
    hand: usize,
    capacity: usize,
}

/// One entry: the key and its stamp, whose lowest bit is CLOCK's "used since the hand last
/// passed" bit (so stamps have a resolution of 2 ns).
struct Slot {
    key: TokenHash,
    stamp: u64,
}

const USED: u64 = 1;

impl Table {
    fn new(capacity: u64) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX).max(1);
        // Enough shards to spread contention, each holding at least 256 entries, so the
        // capacity is split evenly and the total is exactly `capacity`.
        let mut count = 1;
        while count < 64 && count * 2 * 256 <= capacity {
            count *= 2;
        }
        let per_shard = capacity / count;
        let extra = capacity % count;
        let shards = (0..count)
            .map(|i| {
                let capacity = (per_shard + usize::from(i < extra)).min(u32::MAX as usize);
                Mutex::new(Shard {
                    index: HashMap::with_hasher(PassThrough),
                    slots: Vec::new(),
                    hand: 0,
                    capacity,
                })
            })
            .collect();
        Self {
            shards,
            mask: count as u64 - 1,
        }
    }

    fn shard(&self, key: &TokenHash) -> MutexGuard<'_, Shard> {
        // `as usize` keeps the low bits, all the mask needs.
        lock(&self.shards[(key.shard_bits() & self.mask) as usize])
    }

    /// The stamp of `key`, marking it used, unless it is older than `keep` at `now` (then it
    /// is dropped).
    fn get(&self, key: &TokenHash, now: u64, keep: u64) -> Option<u64> {
        let mut shard = self.shard(key);
        let slot = *shard.index.get(key)? as usize;
        let stamp = shard.slots[slot].stamp & !USED;
        if now.saturating_sub(stamp) >= keep {
            shard.remove_slot(slot);
            return None;
        }
        shard.slots[slot].stamp |= USED;
        Some(stamp)
    }

    fn insert(&self, key: TokenHash, stamp: u64) {
        let stamp = stamp & !USED;
        let mut shard = self.shard(&key);
        if let Some(&slot) = shard.index.get(&key) {
            shard.slots[slot as usize].stamp = stamp;
            return;
        }
        if shard.slots.len() < shard.capacity {
            let slot = shard.slots.len() as u32;
            shard.slots.push(Slot { key, stamp });
            shard.index.insert(key, slot);
            return;
        }
        // Full: the first entry the hand finds unused since it last passed makes room.
        let Shard {
            index, slots, hand, ..
        } = &mut *shard;
        loop {
            if *hand >= slots.len() {
                *hand = 0;
            }
            let entry = &mut slots[*hand];
            if entry.stamp & USED == 0 {
                index.remove(&entry.key);
                index.insert(key, *hand as u32);
                *entry = Slot { key, stamp };
                *hand += 1;
                return;
            }
            entry.stamp &= !USED;
            *hand += 1;
        }
    }

    fn remove(&self, key: &TokenHash) {
        let mut shard = self.shard(key);
        if let Some(&slot) = shard.index.get(key) {
            shard.remove_slot(slot as usize);
        }
    }

    fn clear(&self) {
        for shard in &self.shards {
            let mut shard = lock(shard);
            shard.index = HashMap::with_hasher(PassThrough);
            shard.slots = Vec::new();
            shard.hand = 0;
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).slots.len())
            .sum()
    }
}

impl Shard {
    fn remove_slot(&mut self, slot: usize) {
        let removed = self.slots.swap_remove(slot);
        self.index.remove(&removed.key);
        if let Some(moved) = self.slots.get(slot) {
            self.index.insert(moved.key, slot as u32);
        }
    }
}

/// What a lookup found.
enum Found {
    /// Valid, verified this many nanoseconds ago.
    Valid(u64),
    Gone,
}

/// The answer of one shared verification, as its waiters see it.
type Answer<E> = watch::Receiver<Option<Result<Verdict, E>>>;

/// What [`VerdictCache::start`] did.
enum Start<E> {
    /// Started a verification, or joined the one under way: its answer.
    Answer(Answer<E>),
    /// One is under way and was not joined (`only_start`, or another error type).
    Busy,
    /// The verdict was remembered meanwhile (by a verification that just ended).
    Cached(Found),
}

/// Takes a finished (or panicked) verification out of the in-flight map.
struct Deregister {
    cache: VerdictCache,
    key: TokenHash,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        lock(&self.cache.inner.in_flight).remove(&self.key);
    }
}

impl VerdictCache {
    pub(crate) fn new(settings: CacheSettings) -> Self {
        let cache_ttl = nanos(settings.cache_ttl);
        let grace = settings.stale_grace.map(nanos);
        Self {
            inner: Arc::new(Inner {
                valid: Table::new(settings.valid_capacity),
                gone: Table::new(settings.gone_capacity),
                in_flight: Mutex::new(HashMap::with_hasher(PassThrough)),
                invalidations: AtomicU64::new(0),
                epoch: Instant::now(),
                cache_ttl,
                gone_ttl: nanos(settings.gone_ttl),
                refresh_after: settings.refresh_after.map(nanos),
                keep_valid: cache_ttl.saturating_add(grace.unwrap_or(0)),
                stale_if_error: grace.is_some(),
            }),
        }
    }

    /// Nanoseconds since `epoch`, plus [`BACKDATE`] so that a verdict learned old can be
    /// stamped before the cache existed.
    fn now(&self) -> u64 {
        nanos(self.inner.epoch.elapsed()) + BACKDATE
    }

    /// A verdict not yet expired: valid (with its age) or gone.
    fn find(&self, key: &TokenHash, now: u64) -> Option<Found> {
        let inner = &*self.inner;
        if let Some(stamp) = inner.valid.get(key, now, inner.keep_valid) {
            let age = now.saturating_sub(stamp);
            // Past `cache_ttl`, a valid entry is only kept for stale-if-error.
            return (age < inner.cache_ttl).then_some(Found::Valid(age));
        }
        inner
            .gone
            .get(key, now, inner.gone_ttl)
            .map(|_| Found::Gone)
    }

    /// Stores what a verification that started at invalidation count `started` concluded:
    /// valid and gone verdicts replace whatever was known, stamped as old as they were when
    /// learned; other answers and failures leave it alone (so a failed refresh keeps serving
    /// the current verdict until it expires).
    ///
    /// An invalidation since `started` (a logout, or a revocation another replica
    /// published) may have removed the key before this insert: then the insert is undone.
    /// Invalidations bump the count before removing, so either their removal comes after
    /// this insert, or this check sees the bump.
    fn remember<E>(&self, key: TokenHash, result: &Result<Learned, E>, started: u64) {
        let inner = &*self.inner;
        let Ok(learned) = result else { return };
        let stamp = self.now() - nanos(learned.age).min(BACKDATE);
        let table = match learned.verdict {
            Verdict::Valid => {
                inner.gone.remove(&key);
                &inner.valid
            }
            Verdict::Gone => {
                inner.valid.remove(&key);
                &inner.gone
            }
            Verdict::NotAccepted { .. } => return,
        };
        table.insert(key, stamp);
        if inner.invalidations.load(Ordering::SeqCst) != started {
            table.remove(&key);
        }
    }

    /// The verdict for `key` when it is cached and needs nothing else done: a valid verdict
    /// not yet due for refresh, or a gone verdict. Synchronous and cheap (one shard lock and
    /// probe per table asked, no allocation), so a cache hit needs no future of its own.
    /// `None` means "ask [`Self::get_or_verify`]": not cached, or valid and due for a refresh.
    pub(crate) fn lookup_now(&self, key: &TokenHash) -> Option<(Verdict, CacheResult)> {
        match self.find(key, self.now())? {
            Found::Valid(age) if self.inner.refresh_after.is_some_and(|after| age >= after) => None,
            Found::Valid(_) => Some((Verdict::Valid, CacheResult::Hit)),
            Found::Gone => Some((Verdict::Gone, CacheResult::Hit)),
        }
    }

    /// Starts the verification `make_verify` makes for `key` in its own task, registered in
    /// the in-flight map, unless one is already under way: then, unless `only_start`, its
    /// answer is joined.
    fn start<M, F, E>(&self, key: TokenHash, make_verify: M, only_start: bool) -> Start<E>
    where
        M: FnOnce(Asked) -> F,
        F: Future<Output = Result<Learned, E>> + Send + 'static,
        E: Send + Sync + 'static,
    {
        let mut in_flight = lock(&self.inner.in_flight);
        if let Some(running) = in_flight.get(&key) {
            return match running.downcast_ref::<Answer<E>>() {
                Some(answer) if !only_start => Start::Answer(answer.clone()),
                _ => Start::Busy,
            };
        }
        if !only_start {
            // A verification that ended between the caller's lookup and this lock has
            // remembered its verdict by now (it does so before leaving the map).
            if let Some(found) = self.find(&key, self.now()) {
                return Start::Cached(found);
            }
        }
        let (sender, answer) = watch::channel(None);
        in_flight.insert(key, Arc::new(answer.clone()));
        drop(in_flight);
        let started = self.inner.invalidations.load(Ordering::SeqCst);
        let verify = make_verify(if only_start {
            Asked::Refresh
        } else {
            Asked::Miss
        });
        let deregister = Deregister {
            cache: self.clone(),
            key,
        };
        tokio::spawn(async move {
            // On a panic, `deregister` still runs and `sender` is dropped unsent: the
            // waiters see the verification aborted, and the next request starts afresh.
            let result = verify.await;
            deregister.cache.remember(key, &result, started);
            drop(deregister);
            let _ = sender.send(Some(result.map(|learned| learned.verdict)));
        });
        Start::Answer(answer)
    }

    /// The cached verdict for `key`, or else the one `verify` produces.
    ///
    /// Concurrent misses for one key run `verify` once; the others wait for its answer. The
    /// verification runs in its own task, so a caller that gives up (its client hung up)
    /// neither cancels nor restarts the call that others wait on. A valid verdict due for
    /// refresh is served at once while one request starts the refresh in the background.
    pub(crate) async fn get_or_verify<M, F, E>(
        &self,
        key: TokenHash,
        make_verify: M,
    ) -> (Result<Verdict, E>, CacheResult)
    where
        M: FnOnce(Asked) -> F,
        F: Future<Output = Result<Learned, E>> + Send + 'static,
        E: Clone + From<VerificationAborted> + Send + Sync + 'static,
    {
        match self.find(&key, self.now()) {
            Some(Found::Gone) => return (Ok(Verdict::Gone), CacheResult::Hit),
            Some(Found::Valid(age)) => {
                let due = self.inner.refresh_after.is_some_and(|after| age >= after);
                let how = if due && matches!(self.start(key, make_verify, true), Start::Answer(_)) {
                    CacheResult::HitRefreshing
                } else {
                    CacheResult::Hit
                };
                return (Ok(Verdict::Valid), how);
            }
            None => {}
        }
        match self.start(key, make_verify, false) {
            Start::Answer(answer) => (Self::wait(answer).await, CacheResult::Miss),
            Start::Cached(Found::Valid(_)) => (Ok(Verdict::Valid), CacheResult::Hit),
            Start::Cached(Found::Gone) => (Ok(Verdict::Gone), CacheResult::Hit),
            // Under way with another error type (never in practice: one cache, one caller).
            Start::Busy => (Err(E::from(VerificationAborted)), CacheResult::Miss),
        }
    }

    async fn wait<E: Clone + From<VerificationAborted>>(
        mut answer: Answer<E>,
    ) -> Result<Verdict, E> {
        match answer.wait_for(Option::is_some).await {
            Ok(result) => result
                .clone()
                .unwrap_or_else(|| Err(E::from(VerificationAborted))),
            Err(_closed) => Err(E::from(VerificationAborted)),
        }
    }

    /// Whether a valid verdict for `key` is within its stale grace (stale-if-error is on and
    /// the token was valid less than `cache_ttl + stale_grace` ago).
    pub(crate) fn has_last_good(&self, key: &TokenHash) -> bool {
        let inner = &*self.inner;
        inner.stale_if_error && inner.valid.get(key, self.now(), inner.keep_valid).is_some()
    }

    /// Forgets everything known about `key`, and what verifications under way would learn.
    pub(crate) fn invalidate(&self, key: &TokenHash) {
        self.inner.invalidations.fetch_add(1, Ordering::SeqCst);
        self.inner.valid.remove(key);
        self.inner.gone.remove(key);
    }

    /// Forgets everything, and what verifications under way would learn.
    pub(crate) fn invalidate_all(&self) {
        self.inner.invalidations.fetch_add(1, Ordering::SeqCst);
        self.inner.valid.clear();
        self.inner.gone.clear();
    }
}

impl std::fmt::Debug for VerdictCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerdictCache")
            .field("valid_entries", &self.inner.valid.len())
            .field("gone_entries", &self.inner.gone.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenHasher;
    use std::sync::atomic::AtomicUsize;

    #[derive(Clone, Debug, PartialEq)]
    enum TestError {
        Down,
        Aborted,
    }
    impl From<VerificationAborted> for TestError {
        fn from(_: VerificationAborted) -> Self {
            TestError::Aborted
        }
    }

    fn cache() -> VerdictCache {
        VerdictCache::new(CacheSettings {
            cache_ttl: Duration::from_secs(60),
            valid_capacity: 100,
            gone_ttl: Duration::from_secs(60),
            gone_capacity: 100,
            refresh_after: None,
            stale_grace: None,
        })
    }

    /// The verdict `lookup_now` finds.
    fn now(cache: &VerdictCache, token: &str) -> Option<Verdict> {
        cache.lookup_now(&key(token)).map(|(verdict, _)| verdict)
    }

    fn key(token: &str) -> TokenHash {
        TokenHasher::for_process().unwrap().hash(token.as_bytes())
    }

    #[tokio::test]
    async fn valid_and_gone_verdicts_are_remembered_errors_and_not_accepted_are_not() {
        let cache = cache();
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = |answer: Result<Verdict, TestError>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                answer.map(Learned::from)
            }
        };
        for (token, answer, remembered) in [
            ("valid", Ok(Verdict::Valid), true),
            ("gone", Ok(Verdict::Gone), true),
            (
                "refused",
                Ok(Verdict::NotAccepted { reasons: vec![] }),
                false,
            ),
            ("error", Err(TestError::Down), false),
        ] {
            calls.store(0, Ordering::SeqCst);
            let (first, how) = cache
                .get_or_verify(key(token), |_| counted(answer.clone()))
                .await;
            assert_eq!((first, how), (answer.clone(), CacheResult::Miss), "{token}");
            let (_, how) = cache.get_or_verify(key(token), |_| counted(answer)).await;
            let expected = if remembered {
                CacheResult::Hit
            } else {
                CacheResult::Miss
            };
            assert_eq!(how, expected, "{token}");
            assert_eq!(
                calls.load(Ordering::SeqCst),
                if remembered { 1 } else { 2 },
                "{token}"
            );
        }
    }

    #[tokio::test]
    async fn a_panicking_verification_fails_closed() {
        let cache = cache();
        let (result, _) = cache
            .get_or_verify(key("boom"), |_| async { panic!("verify exploded") })
            .await;
        assert_eq!(result, Err::<Verdict, _>(TestError::Aborted));
    }

    #[tokio::test]
    async fn lookup_now_sees_what_lookup_sees() {
        let cache = cache();
        assert_eq!(now(&cache, "v"), None);
        let _ = cache
            .get_or_verify(key("v"), |_| async {
                Ok::<_, TestError>(Verdict::Valid.into())
            })
            .await;
        let _ = cache
            .get_or_verify(key("g"), |_| async {
                Ok::<_, TestError>(Verdict::Gone.into())
            })
            .await;
        assert_eq!(now(&cache, "v"), Some(Verdict::Valid));
        assert_eq!(now(&cache, "g"), Some(Verdict::Gone));
        assert_eq!(now(&cache, "other"), None);
    }

    #[tokio::test]
    async fn invalidate_forgets_a_token() {
        let cache = cache();
        let _ = cache
            .get_or_verify(key("t"), |_| async {
                Ok::<_, TestError>(Verdict::Valid.into())
            })
            .await;
        assert_eq!(now(&cache, "t"), Some(Verdict::Valid));
        cache.invalidate(&key("t"));
        assert_eq!(now(&cache, "t"), None);
    }

    #[tokio::test]
    async fn an_invalidation_during_a_verification_leaves_no_verdict_behind() {
        let cache = cache();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (entered, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let lookup = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .get_or_verify(key("raced"), |_| async move {
                        let _ = entered.send(());
                        let _ = released.await;
                        Ok::<_, TestError>(Verdict::Valid.into())
                    })
                    .await
            })
        };
        entered_rx.await.unwrap();
        // The verification had the verdict before the invalidation (e.g. from the shared
        // tier), and lands after it.
        cache.invalidate(&key("raced"));
        release.send(()).unwrap();
        let (result, _) = lookup.await.unwrap();
        assert_eq!(
            result,
            Ok(Verdict::Valid),
            "this request still gets its answer"
        );
        assert_eq!(now(&cache, "raced"), None, "but the cache does not keep it");

        // With no invalidation in between, it is kept.
        let _ = cache
            .get_or_verify(key("raced"), |_| async {
                Ok::<_, TestError>(Verdict::Valid.into())
            })
            .await;
        assert_eq!(now(&cache, "raced"), Some(Verdict::Valid));
    }

    #[tokio::test]
    async fn a_verdict_learned_old_expires_when_its_source_does() {
        let cache = cache();
        // 60 s TTL; learned 59.9 s old: expired a tenth of a second from now.
        let old = Learned {
            verdict: Verdict::Valid,
            age: Duration::from_millis(59_900),
        };
        let _ = cache
            .get_or_verify(key("old"), |_| async move { Ok::<_, TestError>(old) })
            .await;
        assert_eq!(now(&cache, "old"), Some(Verdict::Valid));
        // The entry's age is the clock's: wait until the source's TTL has run out.
        let expired = Instant::now() + Duration::from_millis(100);
        while now(&cache, "old").is_some() {
            assert!(
                Instant::now() < expired + Duration::from_secs(5),
                "never expired"
            );
            tokio::task::yield_now().await;
        }
        assert!(
            Instant::now() >= expired - Duration::from_millis(1),
            "expired too soon"
        );
    }
}
