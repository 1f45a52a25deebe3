//! The metrics the guard publishes, read through `metrics-util`'s debugging recorder. Each test
//! installs its recorder for its own thread, and `tokio::test`'s runtime runs the app, the
//! simulator and the guard's tasks on that one thread.

use std::time::Duration;

use crate::support::start_with;
use conneqt_guard_simulator::Fault;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

type Value = (String, Vec<(String, String)>, DebugValue);

/// What the recorder held at one moment. Taking a snapshot resets the recorder's counters, so
/// each test takes one, then asks it questions.
struct Metrics {
    values: Vec<Value>,
}

impl Metrics {
    fn take(snapshotter: &Snapshotter) -> Self {
        let values = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let key = key.key();
                let labels = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                (key.name().to_owned(), labels, value)
            })
            .collect();
        Self { values }
    }

    fn find(&self, name: &str, label: Option<(&str, &str)>) -> Option<&DebugValue> {
        self.values.iter().find_map(|(n, labels, value)| {
            let label_ok =
                label.is_none_or(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v));
            (n == name && label_ok).then_some(value)
        })
    }

    fn counter(&self, name: &str, label: (&str, &str)) -> u64 {
        match self.find(name, Some(label)) {
            Some(DebugValue::Counter(value)) => *value,
            None => 0,
            Some(other) => panic!("{name} is not a counter: {other:?}"),
        }
    }

    fn gauge(&self, name: &str) -> f64 {
        match self.find(name, None) {
            Some(DebugValue::Gauge(value)) => value.into_inner(),
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    fn histogram_samples(&self, name: &str) -> usize {
        self.values
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, value)| match value {
                DebugValue::Histogram(samples) => samples.len(),
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .sum()
    }
}

#[tokio::test]
async fn requests_cache_results_and_upstream_calls_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let h = start_with(|b| b).await;
    let valid = h.simulator.issue_token();
    let revoked = h.simulator.issue_token();
    h.simulator.revoke(&revoked);
    assert_eq!(h.get(Some(&valid)).await.status(), 200);
    assert_eq!(h.get(Some(&valid)).await.status(), 200);
    assert_eq!(h.get(Some(&revoked)).await.status(), 410);
    assert_eq!(h.get(None).await.status(), 401);
    assert_eq!(h.get(Some("not-a-uuid")).await.status(), 400);

    let metrics = Metrics::take(&snapshotter);
    let requests = "conneqt_guard_requests_total";
    assert_eq!(metrics.counter(requests, ("outcome", "forwarded")), 2);
    assert_eq!(metrics.counter(requests, ("outcome", "token_gone")), 1);
    assert_eq!(metrics.counter(requests, ("outcome", "missing_token")), 1);
    assert_eq!(metrics.counter(requests, ("outcome", "malformed_token")), 1);
    let cache = "conneqt_guard_cache_total";
    assert_eq!(metrics.counter(cache, ("result", "miss")), 2);
    assert_eq!(metrics.counter(cache, ("result", "hit")), 1);
    let calls = "conneqt_guard_upstream_calls_total";
    assert_eq!(metrics.counter(calls, ("status", "200")), 1);
    assert_eq!(metrics.counter(calls, ("status", "410")), 1);
    assert_eq!(
        h.upstream_calls(),
        2,
        "the metrics agree with the simulator"
    );
    assert_eq!(
        metrics.histogram_samples("conneqt_guard_upstream_latency_seconds"),
        2
    );
    assert_eq!(metrics.gauge("conneqt_guard_upstream_in_flight"), 0.0);
    assert_eq!(metrics.gauge("conneqt_guard_circuit_state"), 0.0);
}

#[tokio::test]
async fn failures_timeouts_the_open_circuit_and_stale_use_are_visible() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let h = start_with(|b| {
        b.circuit_breaker_threshold(2)
            .upstream_retry(false)
            .upstream_timeout(Duration::from_millis(200))
    })
    .await;
    h.simulator.set_fault(Fault::Status(500));
    assert_eq!(h.get(Some(&h.simulator.issue_token())).await.status(), 503);
    h.simulator.set_fault(Fault::Hang);
    assert_eq!(h.get(Some(&h.simulator.issue_token())).await.status(), 503);
    assert_eq!(h.get(Some(&h.simulator.issue_token())).await.status(), 503);

    let metrics = Metrics::take(&snapshotter);
    let calls = "conneqt_guard_upstream_calls_total";
    assert_eq!(metrics.counter(calls, ("status", "500")), 1);
    assert_eq!(metrics.counter(calls, ("status", "timeout")), 1);
    assert_eq!(metrics.gauge("conneqt_guard_circuit_state"), 1.0, "open");
    assert_eq!(
        metrics.counter(
            "conneqt_guard_requests_total",
            ("outcome", "upstream_unavailable")
        ),
        3
    );
    assert_eq!(h.upstream_calls(), 2, "the third request failed fast");
    assert_eq!(metrics.gauge("conneqt_guard_upstream_in_flight"), 0.0);
}

#[tokio::test]
async fn a_stale_verdict_and_a_refresh_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let h = start_with(|b| {
        b.cache_ttl(Duration::from_millis(300))
            .refresh_ahead_share(0.5)
            .stale_if_error(Duration::from_secs(30))
            .upstream_retry(false)
    })
    .await;
    let token = h.simulator.issue_token();
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    // Past half the TTL: the next use starts a refresh.
    tokio::time::sleep(Duration::from_millis(180)).await;
    h.simulator.set_fault(Fault::Status(500));
    assert_eq!(h.get(Some(&token)).await.status(), 200);
    h.simulator.wait_for_verify_calls(2).await;
    // Past the TTL, with the upstream failing: the stale verdict is used.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.get(Some(&token)).await.status(), 200);

    let metrics = Metrics::take(&snapshotter);
    let cache = "conneqt_guard_cache_total";
    assert_eq!(metrics.counter(cache, ("result", "refresh")), 1);
    assert_eq!(metrics.counter(cache, ("result", "stale")), 1);
}
