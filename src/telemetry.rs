//! What the guard tells operators: metrics through the [`metrics`] facade (any recorder, e.g.
//! a Prometheus exporter, picks them up) and the names they are published under.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `conneqt_guard_requests_total` | counter | `outcome`: `forwarded`, `skipped`, or a [`RejectionReason`](crate::RejectionReason) name |
//! | `conneqt_guard_cache_total` | counter | `result`: `hit`, `miss`, `refresh` (a hit that started a background refresh), `stale` |
//! | `conneqt_guard_upstream_calls_total` | counter | `status`: `200`, `400`, `401`, `403`, `410`, `500`, `502`, `503`, `504`, `other_status`, `timeout`, `transport_error` |
//! | `conneqt_guard_upstream_latency_seconds` | histogram | `status`, as above |
//! | `conneqt_guard_upstream_in_flight` | gauge | |
//! | `conneqt_guard_circuit_state` | gauge | 0 closed, 1 open, 2 half-open |
//! | `conneqt_guard_shared_tier_up` | gauge | 1 verdicts shared through Redis, 0 local only (feature `redis`, when configured) |
//! | `conneqt_guard_shared_tier_errors_total` | counter | `op`: `get`, `put`, `lease`, `release`, `wait_for`, `invalidate`, `invalidate_all`, `heartbeat`, `connection` |

use std::sync::Once;
use std::time::Duration;

use http::StatusCode;

use crate::RejectionReason;
use crate::cache::CacheResult;
use crate::upstream::breaker::CircuitState;

pub(crate) const REQUESTS: &str = "conneqt_guard_requests_total";
pub(crate) const CACHE: &str = "conneqt_guard_cache_total";
pub(crate) const UPSTREAM_CALLS: &str = "conneqt_guard_upstream_calls_total";
pub(crate) const UPSTREAM_LATENCY: &str = "conneqt_guard_upstream_latency_seconds";
pub(crate) const UPSTREAM_IN_FLIGHT: &str = "conneqt_guard_upstream_in_flight";
pub(crate) const CIRCUIT_STATE: &str = "conneqt_guard_circuit_state";
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) const SHARED_TIER_UP: &str = "conneqt_guard_shared_tier_up";
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) const SHARED_TIER_ERRORS: &str = "conneqt_guard_shared_tier_errors_total";

/// Gives each metric its description and unit, once per process (when a layer is built).
pub(crate) fn describe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        metrics::describe_counter!(REQUESTS, "Requests seen by conneqt-guard, by outcome");
        metrics::describe_counter!(CACHE, "Verdict cache lookups, by result");
        metrics::describe_counter!(
            UPSTREAM_CALLS,
            "HTTP calls to Conneqt's verify endpoint, by status"
        );
        metrics::describe_histogram!(
            UPSTREAM_LATENCY,
            metrics::Unit::Seconds,
            "Duration of HTTP calls to Conneqt's verify endpoint"
        );
        metrics::describe_gauge!(UPSTREAM_IN_FLIGHT, "Verify calls in flight");
        metrics::describe_gauge!(
            CIRCUIT_STATE,
            "Upstream circuit breaker: 0 closed, 1 open, 2 half-open"
        );
        metrics::describe_gauge!(
            SHARED_TIER_UP,
            "Shared verdict tier: 1 verdicts shared through Redis, 0 local only"
        );
        metrics::describe_counter!(
            SHARED_TIER_ERRORS,
            "Shared verdict tier: failed or timed-out Redis operations, by operation"
        );
    });
}

// The metric names and label values below are literals on purpose: with literals the
// `metrics` macros build their keys at compile time, which keeps a cache hit cheap (about 5 ns
// per counter instead of about 35 ns with a key built at run time).

/// What happened to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Forwarded,
    Skipped,
    Rejected(RejectionReason),
}

pub(crate) fn request(outcome: Outcome) {
    let counter = match outcome {
        Outcome::Skipped => {
            metrics::counter!("conneqt_guard_requests_total", "outcome" => "skipped")
        }
        Outcome::Forwarded => {
            metrics::counter!("conneqt_guard_requests_total", "outcome" => "forwarded")
        }
        Outcome::Rejected(reason) => match reason {
            RejectionReason::MissingToken => {
                metrics::counter!("conneqt_guard_requests_total", "outcome" => "missing_token")
            }
            RejectionReason::MalformedToken => {
                metrics::counter!("conneqt_guard_requests_total", "outcome" => "malformed_token")
            }
            RejectionReason::TokenNotAccepted => {
                metrics::counter!("conneqt_guard_requests_total", "outcome" => "token_not_accepted")
            }
            RejectionReason::TokenGone => {
                metrics::counter!("conneqt_guard_requests_total", "outcome" => "token_gone")
            }
            RejectionReason::UpstreamUnavailable => {
                metrics::counter!("conneqt_guard_requests_total", "outcome" => "upstream_unavailable")
            }
            RejectionReason::UpstreamRejectedApiKey => metrics::counter!(
                "conneqt_guard_requests_total",
                "outcome" => "upstream_rejected_api_key"
            ),
        },
    };
    counter.increment(1);
}

pub(crate) fn cache(result: CacheResult) {
    let counter = match result {
        CacheResult::Hit => metrics::counter!("conneqt_guard_cache_total", "result" => "hit"),
        CacheResult::HitRefreshing => {
            metrics::counter!("conneqt_guard_cache_total", "result" => "refresh")
        }
        CacheResult::Miss => metrics::counter!("conneqt_guard_cache_total", "result" => "miss"),
        CacheResult::Stale => metrics::counter!("conneqt_guard_cache_total", "result" => "stale"),
    };
    counter.increment(1);
}

/// How one upstream call ended, as a bounded set of label values.
#[derive(Clone, Copy, Debug)]
pub(crate) enum CallEnd {
    Status(StatusCode),
    Timeout,
    Transport,
}

impl CallEnd {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Status(status) => match status.as_u16() {
                200 => "200",
                400 => "400",
                401 => "401",
                403 => "403",
                410 => "410",
                500 => "500",
                502 => "502",
                503 => "503",
                504 => "504",
                _ => "other_status",
            },
            Self::Timeout => "timeout",
            Self::Transport => "transport_error",
        }
    }
}

pub(crate) fn upstream_call(end: CallEnd, elapsed: Duration) {
    let status = end.label();
    metrics::counter!(UPSTREAM_CALLS, "status" => status).increment(1);
    metrics::histogram!(UPSTREAM_LATENCY, "status" => status).record(elapsed.as_secs_f64());
}

/// Counts one verify call as in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(());

impl InFlight {
    pub(crate) fn enter() -> Self {
        metrics::gauge!(UPSTREAM_IN_FLIGHT).increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(UPSTREAM_IN_FLIGHT).decrement(1.0);
    }
}

pub(crate) fn circuit(state: CircuitState) {
    let value = match state {
        CircuitState::Closed => 0.0,
        CircuitState::Open => 1.0,
        CircuitState::HalfOpen => 2.0,
    };
    metrics::gauge!(CIRCUIT_STATE).set(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_a_small_fixed_set() {
        let labels: std::collections::HashSet<_> = (100..1000)
            .filter_map(|code| StatusCode::from_u16(code).ok())
            .map(|status| CallEnd::Status(status).label())
            .collect();
        assert_eq!(labels.len(), 10);
        assert_eq!(CallEnd::Status(StatusCode::GONE).label(), "410");
        assert_eq!(
            CallEnd::Status(StatusCode::IM_A_TEAPOT).label(),
            "other_status"
        );
    }
}
