//! A circuit breaker for the upstream: after `threshold` consecutive failures, calls fail fast
//! for `cool_down`; then one probe is let through (half-open), and its result closes or
//! re-opens the circuit.
//!
//! Time is passed in, so the state machine is tested without waiting.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct CircuitBreaker {
    threshold: u32,
    cool_down: Duration,
    state: Mutex<State>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight since `since`. If it never reports (it cannot normally get lost:
    /// verifications run in their own task under a deadline), another probe is allowed after
    /// a cool-down.
    HalfOpen {
        since: Instant,
    },
}

/// Permission to call the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The circuit is closed.
    Normal,
    /// The circuit was open and this call is the one probe.
    Probe,
}

/// How the circuit is, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitBreaker {
    pub(crate) fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold,
            cool_down,
            state: Mutex::new(State::Closed {
                consecutive_failures: 0,
            }),
        }
    }

    /// May a call go to the upstream now? `Err` carries how long until it might.
    pub(crate) fn admit(&self, now: Instant) -> Result<Admission, Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match *state {
            State::Closed { .. } => Ok(Admission::Normal),
            State::Open { until } if now < until => Err(until - now),
            State::HalfOpen { since } if now < since + self.cool_down => {
                Err(since + self.cool_down - now)
            }
            State::Open { .. } | State::HalfOpen { .. } => {
                *state = State::HalfOpen { since: now };
                Ok(Admission::Probe)
            }
        }
    }

    /// Reports how an admitted call went. `healthy` means the upstream answered as documented
    /// (any verdict, or a verdict about our key); failures are timeouts, transport errors,
    /// 5xx and undocumented statuses.
    pub(crate) fn record(&self, admission: Admission, healthy: bool, now: Instant) -> CircuitState {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let next = match (*state, admission, healthy) {
            (_, _, true) => State::Closed {
                consecutive_failures: 0,
            },
            (
                State::Closed {
                    consecutive_failures,
                },
                Admission::Normal,
                false,
            ) => {
                let failures = consecutive_failures.saturating_add(1);
                if failures >= self.threshold {
                    State::Open {
                        until: now + self.cool_down,
                    }
                } else {
                    State::Closed {
                        consecutive_failures: failures,
                    }
                }
            }
            (_, Admission::Probe, false) => State::Open {
                until: now + self.cool_down,
            },
            // A call admitted while closed failed after the circuit opened: nothing to add.
            (current, Admission::Normal, false) => current,
        };
        *state = next;
        match next {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(5);

    #[test]
    fn opens_after_threshold_consecutive_failures_and_a_success_resets_the_count() {
        let breaker = CircuitBreaker::new(3, COOL);
        let t = Instant::now();
        for _ in 0..2 {
            assert_eq!(breaker.admit(t), Ok(Admission::Normal));
            breaker.record(Admission::Normal, false, t);
        }
        breaker.record(Admission::Normal, true, t);
        for _ in 0..2 {
            breaker.record(Admission::Normal, false, t);
        }
        assert_eq!(
            breaker.admit(t),
            Ok(Admission::Normal),
            "the success reset the count"
        );
        assert_eq!(
            breaker.record(Admission::Normal, false, t),
            CircuitState::Open
        );
        assert_eq!(
            breaker.admit(t + Duration::from_secs(1)),
            Err(Duration::from_secs(4))
        );
    }

    #[test]
    fn after_the_cool_down_one_probe_passes_and_its_success_closes_the_circuit() {
        let breaker = CircuitBreaker::new(1, COOL);
        let t = Instant::now();
        breaker.record(Admission::Normal, false, t);
        let later = t + COOL;
        assert_eq!(breaker.admit(later), Ok(Admission::Probe));
        assert!(breaker.admit(later).is_err(), "only one probe at a time");
        assert_eq!(
            breaker.record(Admission::Probe, true, later),
            CircuitState::Closed
        );
        assert_eq!(breaker.admit(later), Ok(Admission::Normal));
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cool_down() {
        let breaker = CircuitBreaker::new(1, COOL);
        let t = Instant::now();
        breaker.record(Admission::Normal, false, t);
        let probe_time = t + COOL;
        assert_eq!(breaker.admit(probe_time), Ok(Admission::Probe));
        assert_eq!(
            breaker.record(Admission::Probe, false, probe_time),
            CircuitState::Open
        );
        assert_eq!(
            breaker.admit(probe_time + Duration::from_secs(1)),
            Err(Duration::from_secs(4))
        );
        assert_eq!(breaker.admit(probe_time + COOL), Ok(Admission::Probe));
    }

    #[test]
    fn a_lost_probe_does_not_keep_the_circuit_half_open_forever() {
        let breaker = CircuitBreaker::new(1, COOL);
        let t = Instant::now();
        breaker.record(Admission::Normal, false, t);
        assert_eq!(breaker.admit(t + COOL), Ok(Admission::Probe));
        // The probe never reports back.
        assert_eq!(breaker.admit(t + COOL + COOL), Ok(Admission::Probe));
    }
}
