//! Step 2: remember verdicts, and make sure one token costs at most one upstream call at a time.
//!
//! Two bounded moka caches, both keyed on the token's keyed hash: one for valid tokens (lives
//! `cache_ttl`) and one for gone tokens (lives `gone_ttl`). Keeping them apart means a flood of
//! revoked tokens can only evict other revoked tokens, never the valid ones in use. Errors and
//! "not accepted" answers are never stored.
//!
//! This module does not know how a token is verified: it is handed the verify future.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moka::future::Cache;

use crate::token::TokenHash;
use crate::verdict::Verdict;

/// The verification task ended without an answer (it panicked, or the runtime is shutting
/// down). Treated like any other upstream failure: fail closed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VerificationAborted;

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

/// A valid verdict, with what refresh-ahead needs to know about it.
#[derive(Debug)]
struct ValidEntry {
    verified_at: Instant,
    /// Set by the one request that starts a refresh; cleared if the refresh fails.
    refreshing: AtomicBool,
}

impl ValidEntry {
    fn now() -> Arc<Self> {
        Arc::new(Self {
            verified_at: Instant::now(),
            refreshing: AtomicBool::new(false),
        })
    }
}

#[derive(Clone)]
pub(crate) struct VerdictCache {
    valid: Cache<TokenHash, Arc<ValidEntry>, PassThrough>,
    gone: Cache<TokenHash, (), PassThrough>,
    /// Valid verdicts younger than `refresh_after`, only when refresh-ahead is on: what the
    /// synchronous fast path checks, so a hit on a verdict not yet due for refresh costs one
    /// `contains_key`.
    fresh: Option<Cache<TokenHash, (), PassThrough>>,
    /// Valid verdicts kept `cache_ttl + stale_grace`, only when stale-if-error is on.
    last_good: Option<Cache<TokenHash, (), PassThrough>>,
    refresh_after: Option<Duration>,
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

/// What a lookup found.
enum Found {
    Valid(Arc<ValidEntry>),
    Gone,
}

/// Why the coalesced verification did not produce a valid entry. All waiters on one token
/// share this value, so it carries both non-valid verdicts and failures.
enum NotValid<E> {
    Verdict(Verdict),
    Failed(E),
}

impl VerdictCache {
    pub(crate) fn new(settings: CacheSettings) -> Self {
        Self {
            valid: Cache::builder()
                .name("conneqt-guard-valid")
                .max_capacity(settings.valid_capacity)
                .time_to_live(settings.cache_ttl)
                .build_with_hasher(PassThrough),
            gone: Cache::builder()
                .name("conneqt-guard-gone")
                .max_capacity(settings.gone_capacity)
                .time_to_live(settings.gone_ttl)
                .build_with_hasher(PassThrough),
            fresh: settings.refresh_after.map(|after| {
                Cache::builder()
                    .name("conneqt-guard-fresh")
                    .max_capacity(settings.valid_capacity)
                    .time_to_live(after)
                    .build_with_hasher(PassThrough)
            }),
            last_good: settings.stale_grace.map(|grace| {
                Cache::builder()
                    .name("conneqt-guard-last-good")
                    .max_capacity(settings.valid_capacity)
                    .time_to_live(settings.cache_ttl + grace)
                    .build_with_hasher(PassThrough)
            }),
            refresh_after: settings.refresh_after,
        }
    }

    async fn find(&self, key: &TokenHash) -> Option<Found> {
        if let Some(entry) = self.valid.get(key).await {
            Some(Found::Valid(entry))
        } else if self.gone.get(key).await.is_some() {
            Some(Found::Gone)
        } else {
            None
        }
    }

    /// Turns what was found into a verdict, starting a background refresh (with the verify
    /// future `make_verify` makes) when a valid verdict is old enough and nobody else is
    /// refreshing it.
    fn on_hit<M, F, E>(
        &self,
        key: TokenHash,
        found: Found,
        make_verify: M,
    ) -> (Verdict, CacheResult)
    where
        M: FnOnce() -> F,
        F: Future<Output = Result<Verdict, E>> + Send + 'static,
        E: Send + 'static,
    {
        let entry = match found {
            Found::Gone => return (Verdict::Gone, CacheResult::Hit),
            Found::Valid(entry) => entry,
        };
        let due = self
            .refresh_after
            .is_some_and(|after| entry.verified_at.elapsed() >= after);
        if !due || entry.refreshing.swap(true, Ordering::AcqRel) {
            return (Verdict::Valid, CacheResult::Hit);
        }
        let verify = make_verify();
        let cache = self.clone();
        tokio::spawn(async move {
            match verify.await {
                Ok(Verdict::Valid) => cache.remember_valid(key).await,
                Ok(Verdict::Gone) => {
                    cache.forget(&key).await;
                    cache.gone.insert(key, ()).await;
                }
                // Keep serving the current verdict until it expires; a later use retries.
                _ => entry.refreshing.store(false, Ordering::Release),
            }
        });
        (Verdict::Valid, CacheResult::HitRefreshing)
    }

    async fn remember_valid(&self, key: TokenHash) {
        self.valid.insert(key, ValidEntry::now()).await;
        self.remember_fresh(key).await;
    }

    /// The companions of a valid entry: the fresh marker and the stale-if-error copy.
    async fn remember_fresh(&self, key: TokenHash) {
        if let Some(fresh) = &self.fresh {
            fresh.insert(key, ()).await;
        }
        if let Some(last_good) = &self.last_good {
            last_good.insert(key, ()).await;
        }
    }

    /// The verdict for `key` when it is cached and needs nothing else done: a valid verdict
    /// not yet due for refresh, or a gone verdict. Synchronous and cheap (`contains_key`
    /// lookups), so a cache hit needs no future of its own. `None` means "ask
    /// [`Self::get_or_verify`]": not cached, or valid and due for a refresh.
    ///
    /// `contains_key` does not count as a read for moka's eviction policy, so under capacity
    /// pressure valid tokens are evicted in about the order they were verified; refreshes
    /// re-insert tokens in use.
    pub(crate) fn lookup_now(&self, key: &TokenHash) -> Option<(Verdict, CacheResult)> {
        let fresh = match &self.fresh {
            Some(fresh) => fresh.contains_key(key),
            None => self.valid.contains_key(key),
        };
        if fresh {
            Some((Verdict::Valid, CacheResult::Hit))
        } else if self.gone.contains_key(key) {
            Some((Verdict::Gone, CacheResult::Hit))
        } else {
            None
        }
    }

    /// The cached verdict for `key`, or else the one `verify` produces.
    ///
    /// Concurrent misses for one key run `verify` once; the others wait for its answer (moka's
    /// `try_get_with`, always called from here with the same error type, which is what makes
    /// it coalesce). The verification runs in its own task, so a caller that gives up (its
    /// client hung up) neither cancels nor restarts the call that others wait on.
    pub(crate) async fn get_or_verify<M, F, E>(
        &self,
        key: TokenHash,
        make_verify: M,
    ) -> (Result<Verdict, E>, CacheResult)
    where
        M: FnOnce() -> F,
        F: Future<Output = Result<Verdict, E>> + Send + 'static,
        E: Clone + From<VerificationAborted> + Send + Sync + 'static,
    {
        if let Some(found) = self.find(&key).await {
            let (verdict, how) = self.on_hit(key, found, make_verify);
            return (Ok(verdict), how);
        }
        let verify = make_verify();
        let cache = self.clone();
        let task = tokio::spawn(async move {
            let companions = cache.clone();
            cache
                .valid
                .try_get_with(key, async move {
                    match verify.await {
                        Ok(Verdict::Valid) => {
                            companions.remember_fresh(key).await;
                            Ok(ValidEntry::now())
                        }
                        Ok(Verdict::Gone) => {
                            companions.gone.insert(key, ()).await;
                            Err(NotValid::Verdict(Verdict::Gone))
                        }
                        Ok(other) => Err(NotValid::Verdict(other)),
                        Err(error) => Err(NotValid::Failed(error)),
                    }
                })
                .await
        });
        let result = match task.await {
            Ok(Ok(_entry)) => Ok(Verdict::Valid),
            Ok(Err(shared)) => match &*shared {
                NotValid::Verdict(verdict) => Ok(verdict.clone()),
                NotValid::Failed(error) => Err(error.clone()),
            },
            Err(_join_error) => Err(E::from(VerificationAborted)),
        };
        (result, CacheResult::Miss)
    }

    /// Whether a valid verdict for `key` is within its stale grace (stale-if-error is on and
    /// the token was valid less than `cache_ttl + stale_grace` ago).
    pub(crate) fn has_last_good(&self, key: &TokenHash) -> bool {
        self.last_good
            .as_ref()
            .is_some_and(|last_good| last_good.contains_key(key))
    }

    async fn forget(&self, key: &TokenHash) {
        self.valid.invalidate(key).await;
        if let Some(fresh) = &self.fresh {
            fresh.invalidate(key).await;
        }
        if let Some(last_good) = &self.last_good {
            last_good.invalidate(key).await;
        }
    }

    /// Forgets everything known about `key`.
    pub(crate) async fn invalidate(&self, key: &TokenHash) {
        self.forget(key).await;
        self.gone.invalidate(key).await;
    }

    /// Forgets everything.
    pub(crate) fn invalidate_all(&self) {
        self.valid.invalidate_all();
        self.gone.invalidate_all();
        if let Some(fresh) = &self.fresh {
            fresh.invalidate_all();
        }
        if let Some(last_good) = &self.last_good {
            last_good.invalidate_all();
        }
    }
}

impl std::fmt::Debug for VerdictCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerdictCache")
            .field("valid_entries", &self.valid.entry_count())
            .field("gone_entries", &self.gone.entry_count())
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
                answer
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
                .get_or_verify(key(token), || counted(answer.clone()))
                .await;
            assert_eq!((first, how), (answer.clone(), CacheResult::Miss), "{token}");
            let (_, how) = cache.get_or_verify(key(token), || counted(answer)).await;
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
            .get_or_verify(key("boom"), || async { panic!("verify exploded") })
            .await;
        assert_eq!(result, Err::<Verdict, _>(TestError::Aborted));
    }

    #[tokio::test]
    async fn lookup_now_sees_what_lookup_sees() {
        let cache = cache();
        assert_eq!(now(&cache, "v"), None);
        let _ = cache
            .get_or_verify(key("v"), || async { Ok::<_, TestError>(Verdict::Valid) })
            .await;
        let _ = cache
            .get_or_verify(key("g"), || async { Ok::<_, TestError>(Verdict::Gone) })
            .await;
        assert_eq!(now(&cache, "v"), Some(Verdict::Valid));
        assert_eq!(now(&cache, "g"), Some(Verdict::Gone));
        assert_eq!(now(&cache, "other"), None);
    }

    #[tokio::test]
    async fn invalidate_forgets_a_token() {
        let cache = cache();
        let _ = cache
            .get_or_verify(key("t"), || async { Ok::<_, TestError>(Verdict::Valid) })
            .await;
        assert_eq!(now(&cache, "t"), Some(Verdict::Valid));
        cache.invalidate(&key("t")).await;
        assert_eq!(now(&cache, "t"), None);
    }
}
