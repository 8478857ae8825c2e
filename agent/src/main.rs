use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use matrix_agent::cli::{self, Cli};
use matrix_agent::error::exit_status;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::from(exit_status(&error))
        }
    }
}

/// Standard error that drops what it cannot write. tracing-subscriber
/// reports a failed write on stderr itself, which panics once stderr is a
/// closed pipe (`matrix-agent backup 2>&1 | head -1`), and a panic would
/// skip the clean-up of a failed backup.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Logs to stderr, one line per event. Under systemd the journal adds the
/// time, so the agent leaves it out there.
fn init_logging() {
    let filter = EnvFilter::try_from_env("MATRIX_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // The SDK's own logs repeat what the agent reports, with raw detail.
        .add_directive("aws_smithy_runtime=warn".parse().expect("valid directive"))
        .add_directive("aws_sdk_s3=warn".parse().expect("valid directive"))
        // Its trace events print the signing parameters, access key id
        // included.
        .add_directive("aws_sigv4=warn".parse().expect("valid directive"))
        .add_directive("hyper=warn".parse().expect("valid directive"))
        .add_directive("tokio_postgres=warn".parse().expect("valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
