//! [`SharedTier`]: the shared verdicts as the guard uses them, between its own cache (L1) and
//! the upstream.
//!
//! An L1 hit never comes here. On an L1 miss (or when a valid verdict is due for
//! refresh-ahead), the guard's one verification for the token, coalesced in this process, runs
//! [`SharedTier::verify`]:
//!
//! 1. one round trip reads the verdict and its remaining TTL from Redis: a verdict there is
//!    the answer, and the L1 entry it fills lives only as long as the one in Redis;
//! 2. otherwise the lease (`SET NX PX`) picks one replica to ask the upstream and store the
//!    verdict (a `410` is announced to every replica in the same step), after reading Redis
//!    once more (a verdict stored between the read and the lease is taken instead); the others
//!    wait for it in Redis until the lease's deadline, then verify themselves without sharing;
//! 3. a refresh takes the same lease, so one replica refreshes each hot token; a replica that
//!    loses it keeps its current verdict;
//! 4. whenever Redis fails or is slow, the verification is the upstream's, as without the tier.
//!
//! Nothing here lets a request pass that the upstream did not once find valid.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{SharedVerdict, SharedVerdicts, Unavailable};
use crate::cache::{Asked, Learned};
use crate::token::TokenHash;
use crate::upstream::UpstreamError;
use crate::verdict::Verdict;

/// What [`SharedTier::invalidate`] forgets.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Invalidation {
    One(TokenHash),
    All,
}

/// The shared verdicts and the lifetimes this replica stores verdicts with.
#[derive(Clone, Debug)]
pub(crate) struct SharedTier {
    pub(crate) verdicts: SharedVerdicts,
    pub(crate) cache_ttl: Duration,
    pub(crate) gone_ttl: Duration,
    /// The age of a valid verdict past which it is due for refresh-ahead.
    pub(crate) refresh_after: Option<Duration>,
    /// How long a replica that lost the lease waits for the winner's verdict.
    pub(crate) lease: Duration,
}

impl SharedTier {
    /// The verdict for `key`: from Redis, or from `upstream` (then shared), as the module
    /// documentation says.
    pub(crate) async fn verify<F>(
        &self,
        key: TokenHash,
        asked: Asked,
        upstream: F,
    ) -> Result<Learned, UpstreamError>
    where
        F: Future<Output = Result<Verdict, UpstreamError>>,
    {
        let local = |upstream: F| async { upstream.await.map(Learned::from) };
        let found = match self.verdicts.get(&key).await {
            Ok(found) => found.map(|found| self.learned(found)),
            Err(Unavailable) => return local(upstream).await,
        };
        if let Some(found) = &found
            && !(asked == Asked::Refresh && self.due(found))
        {
            return Ok(found.clone());
        }
        match self.verdicts.lease(&key).await {
            Ok(true) => {
                // The previous holder's verdict may have landed between the read and the
                // lease (its put releases the lease): read again before asking the upstream,
                // so one replica refreshes each hot token once.
                if let Ok(Some(theirs)) = self.verdicts.get(&key).await {
                    let theirs = self.learned(theirs);
                    if !(asked == Asked::Refresh && self.due(&theirs)) {
                        let _ = self.verdicts.release(&key).await;
                        return Ok(theirs);
                    }
                }
            }
            Ok(false) => {
                if asked == Asked::Refresh
                    && let Some(found) = found
                {
                    // Another replica is refreshing it; its verdict reaches Redis soon.
                    return Ok(found);
                }
                let deadline = Instant::now() + self.lease;
                if let Ok(Some(theirs)) = self.verdicts.wait_for(&key, deadline).await {
                    return Ok(self.learned(theirs));
                }
                // The winner gave up, or took too long: verify here, and share nothing (the
                // lease is not ours).
                return local(upstream).await;
            }
            Err(Unavailable) => return local(upstream).await,
        }
        let result = upstream.await;
        // A failure to store costs the other replicas a verification of their own; the
        // verdict still stands here.
        let _ = match &result {
            Ok(Verdict::Valid) => {
                (self.verdicts)
                    .put(&key, SharedVerdict::Valid, self.cache_ttl)
                    .await
            }
            Ok(Verdict::Gone) => {
                (self.verdicts)
                    .put(&key, SharedVerdict::Gone, self.gone_ttl)
                    .await
            }
            Ok(Verdict::NotAccepted { .. }) | Err(_) => self.verdicts.release(&key).await,
        };
        result.map(Learned::from)
    }

    /// Forgets one token (or every token) on every replica. When Redis cannot be told now,
    /// tries again in the background until it can, or until any valid verdict stored there
    /// has expired (`cache_ttl`): the replicas drop their caches when they lose Redis, but the
    /// entry in Redis would outlive that.
    pub(crate) async fn invalidate(&self, what: Invalidation) {
        if self.send(what).await.is_ok() {
            return;
        }
        tracing::warn!(
            "conneqt-guard: Redis is unavailable; the invalidation holds here now and goes to the other replicas when Redis answers"
        );
        let this = self.clone();
        let until = Instant::now() + self.cache_ttl;
        tokio::spawn(async move {
            while Instant::now() < until {
                tokio::time::sleep(super::RECOVERY).await;
                if this.send(what).await.is_ok() {
                    return;
                }
            }
        });
    }

    async fn send(&self, what: Invalidation) -> Result<(), Unavailable> {
        match what {
            Invalidation::One(key) => self.verdicts.invalidate(&key).await,
            Invalidation::All => self.verdicts.invalidate_all().await,
        }
    }

    /// A verdict read from Redis, as old as its remaining TTL says.
    fn learned(&self, (verdict, left): (SharedVerdict, Duration)) -> Learned {
        let (verdict, ttl) = match verdict {
            SharedVerdict::Valid => (Verdict::Valid, self.cache_ttl),
            SharedVerdict::Gone => (Verdict::Gone, self.gone_ttl),
        };
        Learned {
            verdict,
            age: ttl.saturating_sub(left),
        }
    }

    fn due(&self, learned: &Learned) -> bool {
        learned.verdict == Verdict::Valid
            && self.refresh_after.is_some_and(|after| learned.age >= after)
    }
}
