//! The report in Prometheus text exposition format (version 0.0.4).

use std::fmt::Write as _;

use crate::state::{RegistrationState, RestoreOutcome};
use crate::status::HostReport;

/// Renders the metrics; timestamps are Unix seconds, absent values are
/// left out rather than reported as zero.
pub fn render(report: &HostReport) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |value: f64| vec![(String::new(), value)];
    let flag = |value: bool| if value { 1.0 } else { 0.0 };

    gauge(
        "matrix_agent_build_info",
        "Agent version and host image version; the value is always 1.",
        "gauge",
        &[(
            format!(
                "{{version=\"{}\",image_version=\"{}\"}}",
                escape(report.agent_version),
                escape(report.image_version.as_deref().unwrap_or("unknown"))
            ),
            1.0,
        )],
    );

    let success = report.backup.last_success.as_ref();
    let success_samples = |value: Option<f64>| value.map(one).unwrap_or_default();
    gauge(
        "matrix_backup_last_success_timestamp_seconds",
        "When the last successful backup finished.",
        "gauge",
        &success_samples(success.map(|s| s.finished_at.timestamp() as f64)),
    );
    gauge(
        "matrix_backup_last_size_bytes",
        "Size of the last successful snapshot.",
        "gauge",
        &success_samples(success.map(|s| s.size as f64)),
    );
    gauge(
        "matrix_backup_last_duration_seconds",
        "How long the last successful backup took.",
        "gauge",
        &success_samples(success.map(|s| s.duration_seconds)),
    );
    gauge(
        "matrix_backup_failures_total",
        "Backups that failed since the host was installed.",
        "counter",
        &one(report.backup.failures_total as f64),
    );
    gauge(
        "matrix_backup_consecutive_failures",
        "Backups that failed since the last success.",
        "gauge",
        &one(report.backup.consecutive_failures as f64),
    );

    gauge(
        "matrix_restore_gate_open",
        "1 when the restore marker exists and the gateway may start.",
        "gauge",
        &one(flag(report.gate.open)),
    );
    let outcome = report.restore.as_ref().map(|record| &record.outcome);
    gauge(
        "matrix_restore_state",
        "The last restore's outcome; the matching state is 1.",
        "gauge",
        &[
            ("restored", Some(&RestoreOutcome::Restored)),
            ("fresh_host", Some(&RestoreOutcome::FreshHost)),
            ("failed", Some(&RestoreOutcome::Failed)),
            ("none", None),
        ]
        .map(|(label, state)| (format!("{{state=\"{label}\"}}"), flag(outcome == state))),
    );

    let registration = report.registration.as_ref().map(|record| &record.state);
    gauge(
        "matrix_registration_state",
        "Registration with the platform; the matching state is 1.",
        "gauge",
        &[
            ("registered", Some(&RegistrationState::Registered)),
            ("pending", Some(&RegistrationState::Pending)),
            ("rejected", Some(&RegistrationState::Rejected)),
            ("none", None),
        ]
        .map(|(label, state)| {
            (
                format!("{{state=\"{label}\"}}"),
                flag(registration == state),
            )
        }),
    );

    gauge(
        "matrix_heartbeat_last_success_timestamp_seconds",
        "When the last heartbeat reached the bucket.",
        "gauge",
        &success_samples(
            report
                .heartbeat
                .last_success_at
                .map(|at| at.timestamp() as f64),
        ),
    );
    gauge(
        "matrix_heartbeat_failures_total",
        "Heartbeats that failed.",
        "counter",
        &one(report.heartbeat.failures_total as f64),
    );
    gauge(
        "matrix_host_superseded",
        "1 when a newer machine owns the bucket and this host stopped writing.",
        "gauge",
        &one(flag(report.heartbeat.superseded_by.is_some())),
    );
    gauge(
        "matrix_host_healthy",
        "1 when /healthz answers 200.",
        "gauge",
        &one(flag(report.health.healthy)),
    );
    out
}

/// Escapes a label value: backslash, double quote and line feed.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
