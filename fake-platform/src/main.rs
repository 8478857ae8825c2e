//! `matrix-fake-platform`: runs the fake platform until SIGTERM or SIGINT,
//! for the end-to-end test of a host's first boot.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use matrix_fake_platform::{
    BucketTarget, FakePlatform, PlatformConfig, ScriptedResponse, TlsIdentity,
};
use tokio::signal::unix::{signal, SignalKind};

/// Serves the host bundle and POST /vps/register on a loopback address,
/// records every request, and writes vps-meta.json into the customer's
/// bucket after each successful registration.
///
/// Example, as the end-to-end test runs it:
///
///   matrix-fake-platform --token t0k3n --port-file port \
///     --request-log requests.jsonl \
///     --bundle-dir dist --image-version matrix-os-host-e2e \
///     --tls-cert server.pem --tls-key server.key \
///     --s3-endpoint http://127.0.0.1:9000 --bucket customer \
///     --user-id user_e2e --responses 500,drop,ok
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Address to listen on; must be a loopback address. Port 0 picks a
    /// free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Write the bound port to this file once listening (written to a
    /// temporary file and renamed, so a reader never sees it half-written).
    #[arg(long)]
    port_file: Option<PathBuf>,

    /// The registration token that POST /vps/register accepts as
    /// `Authorization: Bearer <token>`.
    #[arg(long, env = "FAKE_PLATFORM_TOKEN", hide_env_values = true)]
    token: String,

    /// Append every request, with headers, body and the response status, to
    /// this file as JSON lines. The file is created or truncated.
    #[arg(long)]
    request_log: Option<PathBuf>,

    /// Directory holding matrix-host-bundle.tar.gz and its .sha256.
    #[arg(long, requires = "image_version")]
    bundle_dir: Option<PathBuf>,

    /// Image version under which the bundle is served:
    /// /system-bundles/<version>/matrix-host-bundle.tar.gz.
    #[arg(long, requires = "bundle_dir")]
    image_version: Option<String>,

    /// Responses to authorized, valid registrations, in order, separated by
    /// commas: ok (200, writes vps-meta.json), ok-no-meta (200 with the
    /// vps_meta_persistence_failed warning), drop (close the connection) or
    /// an HTTP status such as 500.
    #[arg(long, value_delimiter = ',')]
    responses: Vec<ScriptedResponse>,

    /// Response sent once the --responses are used up.
    #[arg(long, default_value = "ok")]
    fallback: ScriptedResponse,

    /// Answer 404 to registrations for any machine id but this one.
    #[arg(long)]
    machine_id: Option<String>,

    /// PEM certificate chain; serve HTTPS instead of HTTP.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Endpoint URL of the customer's bucket (path-style). Without it no
    /// vps-meta.json is written.
    #[arg(long, requires_all = ["bucket", "user_id"])]
    s3_endpoint: Option<String>,

    /// The customer's bucket.
    #[arg(long)]
    bucket: Option<String>,

    /// The customer's id: the key prefix is matrixos-sync/<user id>/.
    #[arg(long)]
    user_id: Option<String>,

    /// Access key id for the bucket.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", default_value = "test")]
    access_key_id: String,

    /// Secret access key for the bucket.
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true,
        default_value = "test"
    )]
    secret_access_key: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("matrix-fake-platform: cannot start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("matrix-fake-platform: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = PlatformConfig::new(args.token)
        .listen(args.listen)
        .responses(args.responses)
        .fallback(args.fallback);
    if let (Some(directory), Some(version)) = (args.bundle_dir, args.image_version) {
        config = config.bundle(version, directory);
    }
    if let (Some(certificate), Some(key)) = (args.tls_cert, args.tls_key) {
        config = config.tls(TlsIdentity::new(certificate, key));
    }
    if let (Some(endpoint), Some(bucket), Some(user_id)) =
        (args.s3_endpoint, args.bucket, args.user_id)
    {
        config = config.bucket(BucketTarget {
            endpoint,
            bucket,
            user_id,
            access_key_id: args.access_key_id,
            secret_access_key: args.secret_access_key,
        });
    }
    if let Some(machine_id) = args.machine_id {
        config = config.known_machine(machine_id);
    }
    if let Some(path) = args.request_log {
        config = config.request_log(path);
    }

    // Signal handlers are installed before the port file is written, so a
    // caller that stops the server as soon as the file exists gets a clean
    // exit.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    let platform = FakePlatform::start(config).await?;
    if let Some(path) = &args.port_file {
        let partial = path.with_extension("partial");
        std::fs::write(&partial, format!("{}\n", platform.port()))
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("cannot write the port file {}", path.display()))?;
    }
    tracing::info!("listening on {}", platform.base_url());

    tokio::select! {
        _ = terminate.recv() => tracing::info!("stopping on SIGTERM"),
        _ = interrupt.recv() => tracing::info!("stopping on SIGINT"),
    }
    platform.shutdown();
    Ok(())
}
