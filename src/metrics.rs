//! Prometheus metrics: the `metrics` facade everywhere, rendered by
//! `metrics-exporter-prometheus` on `/metrics`.
//!
//! Names: `guestd_sessions{state}`, `guestd_connects_total`, `guestd_connect_failures_total`,
//! `guestd_reconnect_attempts_total`, `guestd_reconnects_total`, `guestd_heartbeat_misses_total`,
//! `guestd_ended_total{reason}`, `guestd_bad_frames_total`, `guestd_stream_errors_total`,
//! `guestd_event_queue_depth`, `guestd_event_queue_full_total`, `guestd_connects_in_flight`, `guestd_connects_in_flight_peak`,
//! `guestd_rest_request_duration_seconds{call}` (histogram), `guestd_rest_retries_total{call}`,
//! `guestd_commands_total{channel,result}`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide recorder once; later calls return the same handle. None if another
/// recorder was installed first (then `/metrics` says so).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("guestd_rest_request_duration_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ],
                )
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// The text exposition.
pub fn render() -> String {
    match HANDLE.get().cloned().flatten() {
        Some(h) => h.render(),
        None => "# metrics recorder not installed\n".into(),
    }
}
