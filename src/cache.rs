//! Step 2: remember verdicts, and make sure one token costs at most one upstream call at a time.
//!
//! Two bounded moka caches, both keyed on the token's keyed hash: one for valid tokens (lives
//! `cache_ttl`) and one for gone tokens (lives `gone_ttl`). Keeping them apart means a flood of
//! revoked tokens can only evict other revoked tokens, never the valid ones in use. Errors and
//! "not accepted" answers are never stored.
//!
//! This module does not know how a token is verified: it is handed the verify future.

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use moka::future::Cache;

use crate::token::TokenHash;
use crate::verdict::Verdict;

/// The verification task ended without an answer (it panicked, or the runtime is shutting
/// down). Treated like any other upstream failure: fail closed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VerificationAborted;

/// How a lookup was answered, for logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CacheResult {
    Hit,
    Miss,
}

#[derive(Clone)]
pub(crate) struct VerdictCache {
    valid: Cache<TokenHash, ()>,
    gone: Cache<TokenHash, ()>,
}

/// Why the coalesced verification did not produce a valid entry. All waiters on one token
/// share this value, so it carries both non-valid verdicts and failures.
enum NotValid<E> {
    Verdict(Verdict),
    Failed(E),
}

impl VerdictCache {
    pub(crate) fn new(
        cache_ttl: Duration,
        valid_capacity: u64,
        gone_ttl: Duration,
        gone_capacity: u64,
    ) -> Self {
        Self {
            valid: Cache::builder()
                .name("conneqt-guard-valid")
                .max_capacity(valid_capacity)
                .time_to_live(cache_ttl)
                .build(),
            gone: Cache::builder()
                .name("conneqt-guard-gone")
                .max_capacity(gone_capacity)
                .time_to_live(gone_ttl)
                .build(),
        }
    }

    /// The cached verdict for `key`, if any.
    pub(crate) async fn lookup(&self, key: &TokenHash) -> Option<Verdict> {
        if self.valid.get(key).await.is_some() {
            Some(Verdict::Valid)
        } else if self.gone.get(key).await.is_some() {
            Some(Verdict::Gone)
        } else {
            None
        }
    }

    /// The cached verdict for `key` if it can be had without waiting, which is almost always:
    /// moka's `get` only waits when it must take its turn at housekeeping. `None` means "not
    /// known right now"; the caller then takes the asynchronous path, [`Self::get_or_verify`].
    ///
    /// This lets a cache hit skip boxing a future and spawning nothing at all.
    pub(crate) fn lookup_now(&self, key: &TokenHash) -> Option<Verdict> {
        let lookup = std::pin::pin!(self.lookup(key));
        let mut cx = Context::from_waker(Waker::noop());
        match lookup.poll(&mut cx) {
            Poll::Ready(verdict) => verdict,
            // Dropping the pending lookup is fine: a read has no effects to undo.
            Poll::Pending => None,
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
        if let Some(verdict) = self.lookup(&key).await {
            return (Ok(verdict), CacheResult::Hit);
        }
        let verify = make_verify();
        let valid = self.valid.clone();
        let gone = self.gone.clone();
        let task = tokio::spawn(async move {
            valid
                .try_get_with(key, async move {
                    match verify.await {
                        Ok(Verdict::Valid) => Ok(()),
                        Ok(Verdict::Gone) => {
                            gone.insert(key, ()).await;
                            Err(NotValid::Verdict(Verdict::Gone))
                        }
                        Ok(other) => Err(NotValid::Verdict(other)),
                        Err(error) => Err(NotValid::Failed(error)),
                    }
                })
                .await
        });
        let result = match task.await {
            Ok(Ok(())) => Ok(Verdict::Valid),
            Ok(Err(shared)) => match &*shared {
                NotValid::Verdict(verdict) => Ok(verdict.clone()),
                NotValid::Failed(error) => Err(error.clone()),
            },
            Err(_join_error) => Err(E::from(VerificationAborted)),
        };
        (result, CacheResult::Miss)
    }

    /// Forgets everything known about `key`.
    pub(crate) async fn invalidate(&self, key: &TokenHash) {
        self.valid.invalidate(key).await;
        self.gone.invalidate(key).await;
    }

    /// Forgets everything.
    pub(crate) fn invalidate_all(&self) {
        self.valid.invalidate_all();
        self.gone.invalidate_all();
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
        VerdictCache::new(Duration::from_secs(60), 100, Duration::from_secs(60), 100)
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
        assert_eq!(cache.lookup_now(&key("v")), None);
        let _ = cache
            .get_or_verify(key("v"), || async { Ok::<_, TestError>(Verdict::Valid) })
            .await;
        let _ = cache
            .get_or_verify(key("g"), || async { Ok::<_, TestError>(Verdict::Gone) })
            .await;
        assert_eq!(cache.lookup_now(&key("v")), Some(Verdict::Valid));
        assert_eq!(cache.lookup_now(&key("g")), Some(Verdict::Gone));
        assert_eq!(cache.lookup_now(&key("other")), None);
    }

    #[tokio::test]
    async fn invalidate_forgets_a_token() {
        let cache = cache();
        let _ = cache
            .get_or_verify(key("t"), || async { Ok::<_, TestError>(Verdict::Valid) })
            .await;
        assert_eq!(cache.lookup(&key("t")).await, Some(Verdict::Valid));
        cache.invalidate(&key("t")).await;
        assert_eq!(cache.lookup(&key("t")).await, None);
    }
}
