//! Prometheus metrics: the `metrics` facade everywhere, rendered by
//! `metrics-exporter-prometheus` on `/metrics`.
//!
//! [`CATALOGUE`] is the one list of every metric guestd exports: its type, its `# HELP` text and
//! the label values it is registered with at zero when the recorder is installed, so a counter
//! such as `guestd_ended_total{reason="no_activity"}` reads 0 from the first scrape instead of
//! appearing with its first event (a `rate()` or `increase()` over a series that springs into
//! being at 1 misses that first event). A test checks that every name the code records is in the
//! catalogue and that the dashboard and alert rules in `config/` name only catalogued metrics.
//!
//! Beside them: `guestd_build_info{version,git_revision}` (always 1) and the process set of
//! Prometheus's Go client (`process_resident_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_cpu_seconds_total`, `process_start_time_seconds`,
//! `process_threads`, `process_virtual_memory_bytes`) from the `metrics-process` crate, read at
//! each scrape.

use crate::events::EndReason;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Mutex, OnceLock};

/// How a metric is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets of observations.
    Histogram,
}

/// One exported metric.
#[derive(Debug)]
pub struct Metric {
    /// The name, `guestd_...`.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Label sets registered at zero at start (empty: one series without labels; a histogram
    /// or a gauge set from a live value is not pre-registered).
    pub labels: fn() -> Vec<Vec<(&'static str, &'static str)>>,
}

fn none() -> Vec<Vec<(&'static str, &'static str)>> {
    vec![vec![]]
}

fn nothing() -> Vec<Vec<(&'static str, &'static str)>> {
    vec![]
}

fn session_states() -> Vec<Vec<(&'static str, &'static str)>> {
    let guest_chat = ["connecting", "connected", "reconnecting"]
        .map(|s| vec![("backend", "guest_chat"), ("state", s)]);
    let web_messaging = ["connecting", "configuring", "connected", "reconnecting"]
        .map(|s| vec![("backend", "web_messaging"), ("state", s)]);
    guest_chat.into_iter().chain(web_messaging).collect()
}

fn end_reasons() -> Vec<Vec<(&'static str, &'static str)>> {
    EndReason::ALL
        .iter()
        .map(|r| vec![("reason", r.as_str())])
        .collect()
}

fn confirmations() -> Vec<Vec<(&'static str, &'static str)>> {
    EndReason::ALL
        .iter()
        .flat_map(|r| {
            ["agree", "disagree", "unknown", "failed"]
                .map(|res| vec![("reason", r.as_str()), ("result", res)])
        })
        .collect()
}

fn commands() -> Vec<Vec<(&'static str, &'static str)>> {
    let mut out: Vec<_> = ["stdin", "http"]
        .iter()
        .flat_map(|c| ["ok", "error"].map(|r| vec![("channel", *c), ("result", r)]))
        .collect();
    out.push(vec![("channel", "nats"), ("result", "received")]);
    out.push(vec![("channel", "nats"), ("result", "unauthorized")]);
    out
}

fn rest_calls() -> Vec<Vec<(&'static str, &'static str)>> {
    ["create", "list_members", "list_messages", "send_message"]
        .map(|c| vec![("call", c)])
        .into()
}

fn http_refusals() -> Vec<Vec<(&'static str, &'static str)>> {
    [
        "too_many_connections",
        "body_too_large",
        "body_timeout",
        "unauthorized",
        "forbidden_origin",
        "forbidden_host",
        "not_json",
    ]
    .map(|c| vec![("code", c)])
    .into()
}

fn forgeries() -> Vec<Vec<(&'static str, &'static str)>> {
    [
        "announcement",
        "entry",
        "replayed_entry",
        "reply",
        "forward",
        "slot",
    ]
    .map(|w| vec![("what", w)])
    .into()
}

fn whose() -> Vec<Vec<(&'static str, &'static str)>> {
    ["own", "other"].map(|w| vec![("whose", w)]).to_vec()
}

fn conflicts() -> Vec<Vec<(&'static str, &'static str)>> {
    ["replayed", "forged", "vanished"]
        .map(|k| vec![("kind", k)])
        .into()
}

use Kind::{Counter, Gauge, Histogram};

/// Every metric guestd records, in the order `/metrics` documents them.
pub const CATALOGUE: &[Metric] = &[
    Metric {
        name: "guestd_sessions",
        kind: Gauge,
        help: "Sessions this node holds, by backend (guest_chat, web_messaging) and state.",
        labels: session_states,
    },
    Metric {
        name: "guestd_ended_total",
        kind: Counter,
        help: "Chats ended, by end reason (exactly one per chat; see docs/events.md).",
        labels: end_reasons,
    },
    Metric {
        name: "guestd_connects_total",
        kind: Counter,
        help: "Websocket connects that succeeded (first connects and reconnects).",
        labels: none,
    },
    Metric {
        name: "guestd_connect_failures_total",
        kind: Counter,
        help: "Websocket connects that failed (refused, timed out, TLS or upgrade errors).",
        labels: none,
    },
    Metric {
        name: "guestd_connect_duration_seconds",
        kind: Histogram,
        help: "Time from starting a websocket connect to its outcome, by backend.",
        labels: nothing,
    },
    Metric {
        name: "guestd_connects_in_flight",
        kind: Gauge,
        help: "Websocket connects under way now (bounded by [stream] max_concurrent_connects).",
        labels: none,
    },
    Metric {
        name: "guestd_connects_in_flight_limit",
        kind: Gauge,
        help: "The most websocket connects allowed under way at once ([stream] max_concurrent_connects).",
        labels: nothing,
    },
    Metric {
        name: "guestd_heap_trims_total",
        kind: Counter,
        help: "Times a burst's freed memory was given back to the system ([memory] trim_after).",
        labels: none,
    },
    Metric {
        name: "guestd_heap_returned_bytes_total",
        kind: Counter,
        help: "Resident bytes those trims gave back to the system (approximate: RSS before less RSS after).",
        labels: none,
    },
    Metric {
        name: "guestd_heap_trim_seconds",
        kind: Histogram,
        help: "How long each trim took (it holds each allocator arena's lock while it walks it).",
        labels: nothing,
    },
    Metric {
        name: "guestd_connects_in_flight_peak",
        kind: Gauge,
        help: "The most websocket connects under way at once since start.",
        labels: none,
    },
    Metric {
        name: "guestd_reconnect_attempts_total",
        kind: Counter,
        help: "Reconnect attempts inside the grace window.",
        labels: none,
    },
    Metric {
        name: "guestd_reconnects_total",
        kind: Counter,
        help: "Reconnects that succeeded inside the grace window.",
        labels: none,
    },
    Metric {
        name: "guestd_heartbeat_misses_total",
        kind: Counter,
        help: "Heartbeats that did not arrive in time (each one drops and reconnects the socket).",
        labels: none,
    },
    Metric {
        name: "guestd_bad_frames_total",
        kind: Counter,
        help: "Frames from the chat server that could not be decoded (logged and skipped).",
        labels: none,
    },
    Metric {
        name: "guestd_stream_errors_total",
        kind: Counter,
        help: "Websocket stream errors (a drop the session reconnects from).",
        labels: none,
    },
    Metric {
        name: "guestd_rate_limited_total",
        kind: Counter,
        help: "Requests the platform refused with 429 (Web Messaging).",
        labels: none,
    },
    Metric {
        name: "guestd_rest_request_duration_seconds",
        kind: Histogram,
        help: "Guest chat REST call latency, by call.",
        labels: nothing,
    },
    Metric {
        name: "guestd_rest_retries_total",
        kind: Counter,
        help: "Guest chat REST calls retried (429, 5xx, transport errors), by call.",
        labels: rest_calls,
    },
    Metric {
        name: "guestd_commands_total",
        kind: Counter,
        help: "Commands received, by channel (stdin, http, nats) and result.",
        labels: commands,
    },
    Metric {
        name: "guestd_http_refused_total",
        kind: Counter,
        help: "HTTP API requests refused before any command ran, by code.",
        labels: http_refusals,
    },
    Metric {
        name: "guestd_event_queue_depth",
        kind: Gauge,
        help: "Events waiting to be written to stdout.",
        labels: none,
    },
    Metric {
        name: "guestd_event_queue_full_total",
        kind: Counter,
        help: "Times the event queue was full and a session waited for the writer.",
        labels: none,
    },
    Metric {
        name: "guestd_event_sink_up",
        kind: Gauge,
        help: "1 while events are written to stdout, 0 while writing fails.",
        labels: none,
    },
    Metric {
        name: "guestd_event_write_failures_total",
        kind: Counter,
        help: "Failed writes of events to stdout (the journal keeps them).",
        labels: none,
    },
    Metric {
        name: "guestd_journal_up",
        kind: Gauge,
        help: "1 while the session journal is written, 0 while it fails (chats are then not kept across a restart).",
        labels: nothing,
    },
    Metric {
        name: "guestd_journal_rewrites_total",
        kind: Counter,
        help: "Journal compactions.",
        labels: none,
    },
    Metric {
        name: "guestd_sessions_relinquished_total",
        kind: Counter,
        help: "Sessions handed back without an end (shutdown that keeps chats, lost cluster ownership).",
        labels: none,
    },
    Metric {
        name: "guestd_platform_tokens_total",
        kind: Counter,
        help: "OAuth tokens fetched for the Platform API.",
        labels: none,
    },
    Metric {
        name: "guestd_end_confirmations_total",
        kind: Counter,
        help: "Ends checked with the Platform API, by guestd's reason and result (agree, disagree, unknown, failed).",
        labels: confirmations,
    },
    Metric {
        name: "guestd_cluster_fenced_total",
        kind: Counter,
        help: "Times this node stopped acting because its lease could have run out.",
        labels: none,
    },
    Metric {
        name: "guestd_cluster_chats_taken_total",
        kind: Counter,
        help: "Chats this node took over from a node whose lease ran out.",
        labels: none,
    },
    Metric {
        name: "guestd_cluster_forward_retries_total",
        kind: Counter,
        help: "Commands forwarded to the owning node that were retried.",
        labels: none,
    },
    Metric {
        name: "guestd_cluster_forged_total",
        kind: Counter,
        help: "NATS messages refused as forged or replayed, by what they claimed to be.",
        labels: forgeries,
    },
    Metric {
        name: "guestd_cluster_entry_conflicts_total",
        kind: Counter,
        help: "Session entries in the cluster bucket refused as conflicting, by kind.",
        labels: conflicts,
    },
    Metric {
        name: "guestd_cluster_entries_seen_total",
        kind: Counter,
        help: "Session entries this node's watches handed it, by whose chat they are (own, other): other stays 0 in steady state.",
        labels: whose,
    },
    Metric {
        name: "guestd_cluster_slots_watched",
        kind: Gauge,
        help: "Slots this node holds and watches (its home slots and any taken from dead nodes).",
        labels: none,
    },
    Metric {
        name: "guestd_cluster_slots_taken_total",
        kind: Counter,
        help: "Slots this node took from a node whose lease ran out.",
        labels: none,
    },
    Metric {
        name: "guestd_cluster_slot_conflicts_total",
        kind: Counter,
        help: "Slots this node holds that something else removed (written again).",
        labels: none,
    },
    Metric {
        name: "guestd_stream_publish_failures_total",
        kind: Counter,
        help: "Events that could not be published to the JetStream event stream (retried).",
        labels: none,
    },
    Metric {
        name: "guestd_build_info",
        kind: Gauge,
        help: "Always 1; the labels name the version and git revision of this binary.",
        labels: nothing,
    },
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static PROCESS: OnceLock<Mutex<metrics_process::Collector>> = OnceLock::new();

/// The metric named `name`, if catalogued.
pub fn find(name: &str) -> Option<&'static Metric> {
    CATALOGUE.iter().find(|m| m.name == name)
}

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
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("guestd_heap_trim_seconds".into()),
                    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25],
                )
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("guestd_connect_duration_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe_and_zero();
            let process = metrics_process::Collector::default();
            process.describe();
            let _ = PROCESS.set(Mutex::new(process));
            Some(handle)
        })
        .clone()
}

/// `# HELP` for every catalogued metric, and every counter and gauge series at zero.
fn describe_and_zero() {
    for m in CATALOGUE {
        match m.kind {
            Counter => metrics::describe_counter!(m.name, m.help),
            Gauge => metrics::describe_gauge!(m.name, m.help),
            Histogram => metrics::describe_histogram!(m.name, m.help),
        }
        for labels in (m.labels)() {
            let labels: Vec<metrics::Label> = labels
                .into_iter()
                .map(|(k, v)| metrics::Label::new(k, v))
                .collect();
            match m.kind {
                Counter => metrics::counter!(m.name, labels).increment(0),
                Gauge => metrics::gauge!(m.name, labels).increment(0.0),
                Histogram => {}
            }
        }
    }
    let (version, revision) = crate::build_info();
    metrics::gauge!("guestd_build_info", "version" => version, "git_revision" => revision).set(1.0);
}

/// The text exposition (the process metrics read now).
pub fn render() -> String {
    match HANDLE.get().cloned().flatten() {
        Some(h) => {
            if let Some(p) = PROCESS.get()
                && let Ok(p) = p.lock()
            {
                p.collect();
            }
            h.render()
        }
        None => "# metrics recorder not installed\n".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names in `text`: `guestd_...` (a histogram's `_bucket`, `_count` and `_sum`
    /// series named by the histogram) and `process_...`.
    fn names_in(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for prefix in ["guestd_", "process_"] {
            for (i, _) in text.match_indices(prefix) {
                // Part of a longer word or of a path (`/run/secrets/guestd_token`): not a name.
                if i > 0
                    && text[..i]
                        .ends_with(|c: char| c.is_ascii_alphanumeric() || "_/.-".contains(c))
                {
                    continue;
                }
                let name: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                out.push(name);
            }
        }
        out
    }

    const PROCESS: &[&str] = &[
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_threads",
        "process_virtual_memory_bytes",
        "process_virtual_memory_max_bytes",
    ];

    fn known(name: &str) -> bool {
        if PROCESS.contains(&name) || find(name).is_some() {
            return true;
        }
        ["_bucket", "_count", "_sum"].iter().any(|s| {
            name.strip_suffix(s)
                .and_then(find)
                .is_some_and(|m| m.kind == Kind::Histogram)
        })
    }

    /// The dashboard, the alert rules (and their tests) and the metrics table in
    /// docs/operations.md name only metrics guestd exports, and the table names them all.
    #[test]
    fn dashboard_alerts_and_docs_name_only_exported_metrics() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let read = |p: &str| std::fs::read_to_string(root.join(p)).expect(p);
        let dashboard = read("config/grafana/guestd-dashboard.json");
        let parsed: serde_json::Value =
            serde_json::from_str(&dashboard).expect("dashboard is JSON");
        let exprs: Vec<&str> = parsed["panels"]
            .as_array()
            .expect("panels")
            .iter()
            .flat_map(|p| p["targets"].as_array().into_iter().flatten())
            .filter_map(|t| t["expr"].as_str())
            .collect();
        assert!(exprs.len() >= 15, "{exprs:?}");
        for (file, text) in [
            ("config/grafana/guestd-dashboard.json", exprs.join("\n")),
            (
                "config/prometheus/guestd-alerts.yml",
                read("config/prometheus/guestd-alerts.yml"),
            ),
            (
                "config/prometheus/guestd-alerts.test.yml",
                read("config/prometheus/guestd-alerts.test.yml"),
            ),
            ("docs/operations.md", read("docs/operations.md")),
        ] {
            let names = names_in(&text);
            assert!(!names.is_empty(), "{file} names no metric");
            for name in names {
                assert!(
                    known(&name),
                    "{file} names {name}, which guestd does not export"
                );
            }
        }
        let docs = read("docs/operations.md");
        for m in CATALOGUE {
            assert!(
                docs.contains(&format!("`{}", m.name)),
                "docs/operations.md does not list {}",
                m.name
            );
        }
        // The panels the operator looks for first.
        for must in [
            "guestd_sessions",
            "guestd_ended_total",
            "guestd_reconnects_total",
            "guestd_heartbeat_misses_total",
            "guestd_rest_request_duration_seconds_bucket",
            "guestd_connect_duration_seconds_bucket",
            "guestd_cluster_chats_taken_total",
        ] {
            assert!(
                exprs.iter().any(|e| e.contains(must)),
                "no panel shows {must}"
            );
        }
    }

    /// Every `"guestd_..."` metric name the sources record is catalogued, and the catalogue names
    /// nothing the sources never record.
    #[test]
    fn the_catalogue_names_every_metric_the_code_records() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut recorded = std::collections::BTreeSet::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("src is readable") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") || path.ends_with("metrics.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("source is readable");
                for (i, _) in text.match_indices("metrics::") {
                    let rest = &text[i..];
                    let Some(open) = rest.find("!(") else {
                        continue;
                    };
                    let args = rest[open + 2..].trim_start();
                    if let Some(name) = args.strip_prefix('"').and_then(|a| a.split('"').next()) {
                        recorded.insert(name.to_string());
                    }
                }
            }
        }
        assert!(recorded.len() > 20, "found only {recorded:?}");
        for name in &recorded {
            assert!(
                find(name).is_some(),
                "{name} is recorded but not in CATALOGUE"
            );
        }
        for m in CATALOGUE {
            assert!(
                m.name == "guestd_build_info" || recorded.contains(m.name),
                "{} is catalogued but nothing records it",
                m.name
            );
        }
    }
}
