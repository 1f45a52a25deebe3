//! The simulator's shared state and the test-facing controls on [`Simulator`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use uuid::Uuid;

use super::{Fault, RecordedRequest, Simulator};

/// State shared between the [`Simulator`] handle and the request handlers.
///
/// Small state sits behind a std `Mutex` that is never held across an `.await`; the verify
/// call count and the pause flag live in `watch` channels so that waiters are woken by events
/// rather than polling. Deliberately not `Debug`, so the API keys cannot leak into logs.
pub(super) struct Shared {
    pub(super) api_key: String,
    pub(super) unauthorised_api_key: String,
    state: Mutex<State>,
    /// Number of verify requests received. Only bumped while `state` is locked, together with
    /// the matching [`RecordedRequest`], so the two never disagree.
    verify_calls: watch::Sender<usize>,
    /// `true` while verify requests must wait at the gate.
    paused: watch::Sender<bool>,
    /// Verify requests being handled right now, and the most there ever were at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Counts one verify request as in flight until dropped (answered, or abandoned by the client).
pub(super) struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct State {
    /// Issued and not revoked tokens.
    valid_tokens: HashSet<Uuid>,
    latency: Duration,
    fault: Option<Fault>,
    /// One-shot faults for the next verify requests, used before `fault`.
    next_faults: VecDeque<Fault>,
    recorded: Vec<RecordedRequest>,
    /// Verify calls per `Conneqt-Instant-Access-Token` header value (lossily decoded).
    calls_per_token: HashMap<String, usize>,
}

impl Shared {
    pub(super) fn new() -> Self {
        Shared {
            api_key: format!("sim-authorised-{}", Uuid::new_v4().simple()),
            unauthorised_api_key: format!("sim-unauthorised-{}", Uuid::new_v4().simple()),
            state: Mutex::new(State::default()),
            verify_calls: watch::Sender::new(0),
            paused: watch::Sender::new(false),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    /// Marks a verify request as in flight for as long as the returned guard lives.
    pub(super) fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves the state usable; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn issue_token(&self) -> String {
        let token = Uuid::new_v4();
        self.state().valid_tokens.insert(token);
        token.hyphenated().to_string()
    }

    pub(super) fn is_valid(&self, token: Uuid) -> bool {
        self.state().valid_tokens.contains(&token)
    }

    /// Records a verify request on arrival and bumps the counters.
    pub(super) fn record_verify(&self, request: RecordedRequest, token: Option<String>) {
        let mut state = self.state();
        if let Some(token) = token {
            *state.calls_per_token.entry(token).or_default() += 1;
        }
        state.recorded.push(request);
        self.verify_calls.send_modify(|calls| *calls += 1);
    }

    /// Waits while the simulator is paused.
    pub(super) async fn pass_gate(&self) {
        let mut paused = self.paused.subscribe();
        // The sender lives in `self`, so this cannot fail while we borrow it.
        let _ = paused.wait_for(|paused| !*paused).await;
    }

    pub(super) fn latency(&self) -> Duration {
        self.state().latency
    }

    pub(super) fn fault(&self) -> Option<Fault> {
        let mut state = self.state();
        state
            .next_faults
            .pop_front()
            .or_else(|| state.fault.clone())
    }
}

impl Simulator {
    /// Issues a fresh, valid v4 UUID token (hyphenated, lower case) without any HTTP.
    pub fn issue_token(&self) -> String {
        self.shared.issue_token()
    }

    /// Revokes `token`: later verifies of it answer `410 Gone`. Revoking a token that was never
    /// issued, or a string that is not a UUID, does nothing (such tokens are not valid anyway).
    pub fn revoke(&self, token: &str) {
        if let Ok(token) = Uuid::try_parse(token) {
            self.shared.state().valid_tokens.remove(&token);
        }
    }

    /// The number of verify requests received so far, whatever their outcome. Requests are
    /// counted on arrival, before latency, the pause gate and faults.
    pub fn verify_calls(&self) -> usize {
        *self.shared.verify_calls.borrow()
    }

    /// The number of verify requests received whose `Conneqt-Instant-Access-Token` header value
    /// is exactly `token` (requests without the header are not counted under any token).
    pub fn verify_calls_for(&self, token: &str) -> usize {
        self.shared
            .state()
            .calls_per_token
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    /// Resolves once at least `n` verify requests have been received (immediately if they
    /// already have). Event driven: no polling.
    pub async fn wait_for_verify_calls(&self, n: usize) {
        let mut calls = self.shared.verify_calls.subscribe();
        // The sender lives as long as `self`, which this future borrows, so this cannot fail.
        let _ = calls.wait_for(|calls| *calls >= n).await;
    }

    /// Delays every later verify answer by `latency` (`Duration::ZERO` for none). The delay is
    /// read when a request has passed the pause gate.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.state().latency = latency;
    }

    /// Applies `fault` to every verify request answered from now until [`Self::clear_fault`]
    /// (including requests already waiting at the pause gate or in their latency delay).
    pub fn set_fault(&self, fault: Fault) {
        self.shared.state().fault = Some(fault);
    }

    /// Applies `fault` to the next `n` verify requests only (counted when they look at faults,
    /// after the pause gate and latency), ahead of any fault set with [`Self::set_fault`].
    pub fn fail_next(&self, n: usize, fault: Fault) {
        self.shared
            .state()
            .next_faults
            .extend(std::iter::repeat_n(fault, n));
    }

    /// The most verify requests that were being handled at the same moment so far.
    pub fn max_concurrent_verify_calls(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Removes the current fault and any pending [`Self::fail_next`] faults: later verify
    /// requests are answered normally.
    pub fn clear_fault(&self) {
        let mut state = self.shared.state();
        state.fault = None;
        state.next_faults.clear();
    }

    /// Closes the gate: verify requests are still counted and recorded on arrival, then wait
    /// until [`Self::resume`].
    pub fn pause(&self) {
        self.shared.paused.send_replace(true);
    }

    /// Opens the gate: releases every waiting verify request, and later ones pass straight
    /// through.
    pub fn resume(&self) {
        self.shared.paused.send_replace(false);
    }

    /// Every verify request received so far, in arrival order.
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().recorded.clone()
    }
}
