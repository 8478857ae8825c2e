//! Progress of long transfers: a bar on a terminal, otherwise a log line
//! at a steady cadence with size, rate and elapsed time.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::size::{format_bytes, format_duration};

const LOG_INTERVAL: Duration = Duration::from_secs(15);

/// Counts bytes moved by one transfer and reports them.
pub struct Progress {
    label: &'static str,
    bytes: Arc<AtomicU64>,
    started: Instant,
    bar: Option<ProgressBar>,
    reporter: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Starts reporting; `total` is the expected size when it is known.
    pub fn start(label: &'static str, total: Option<u64>) -> Progress {
        let bytes = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}",
                    )
                    .expect("the template is valid"),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template(
                        "{msg} {spinner} {bytes} {binary_bytes_per_sec} {elapsed}",
                    )
                    .expect("the template is valid"),
                ),
            };
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.set_message(label);
            bar.enable_steady_tick(Duration::from_millis(200));
            return Progress {
                label,
                bytes,
                started,
                bar: Some(bar),
                reporter: None,
            };
        }
        let counter = bytes.clone();
        let reporter = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(LOG_INTERVAL);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let moved = counter.load(Ordering::Relaxed);
                let elapsed = started.elapsed();
                let done = match total {
                    Some(total) if total > 0 => {
                        format!(" of {} ({}%)", format_bytes(total), moved * 100 / total)
                    }
                    _ => String::new(),
                };
                tracing::info!(
                    "{label}: {}{done} at {}/s, {} elapsed",
                    format_bytes(moved),
                    format_bytes(rate(moved, elapsed)),
                    format_duration(elapsed)
                );
            }
        });
        Progress {
            label,
            bytes,
            started,
            bar: None,
            reporter: Some(reporter),
        }
    }

    pub fn advance(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    /// Returns a line for the final log: size, rate and duration.
    pub fn summary(&self) -> String {
        let moved = self.bytes.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        format!(
            "{} in {} ({}/s)",
            format_bytes(moved),
            format_duration(elapsed),
            format_bytes(rate(moved, elapsed))
        )
    }

    pub fn label(&self) -> &'static str {
        self.label
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(reporter) = self.reporter.take() {
            reporter.abort();
        }
    }
}

fn rate(bytes: u64, elapsed: Duration) -> u64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 {
        (bytes as f64 / seconds) as u64
    } else {
        0
    }
}
