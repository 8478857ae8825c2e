//! The fake platform over real sockets, driven by a real HTTP client.
//!
//! The TLS fixtures are a test CA (`ca.pem`) and a server certificate for
//! 127.0.0.1 and localhost that it signed (`server.pem`, `server.key`),
//! valid until 2126. The CA's key was discarded.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use matrix_fake_platform::{
    BucketTarget, FakePlatform, PlatformConfig, ScriptedResponse, TlsIdentity,
};
use serde_json::{json, Value};

const TOKEN: &str = "test-token-1";
const MACHINE: &str = "9f05824c-2d3e-4b8a-9c1d-0e5f6a7b8c9d";
const VERSION: &str = "matrix-os-host-test-1";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn registration_body() -> Value {
    json!({
        "machineId": MACHINE,
        "hetznerServerId": 4242,
        "publicIPv4": "203.0.113.7",
        "imageVersion": VERSION,
    })
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn register(
    platform: &FakePlatform,
    token: &str,
    body: &Value,
) -> reqwest::Result<(u16, Value)> {
    let response = client()
        .post(platform.register_url())
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    let status = response.status().as_u16();
    let body = response.json::<Value>().await?;
    Ok((status, body))
}

/// Returns a port on 127.0.0.1 with nothing listening on it.
fn closed_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn registration_follows_script() {
    let platform = FakePlatform::start(PlatformConfig::new(TOKEN).responses(vec![
        ScriptedResponse::Status(500),
        ScriptedResponse::DropConnection,
        ScriptedResponse::Register,
    ]))
    .await
    .unwrap();

    let (status, body) = register(&platform, TOKEN, &registration_body())
        .await
        .unwrap();
    assert_eq!(status, 500);
    assert_eq!(body["error"], "Internal Server Error");

    let dropped = register(&platform, TOKEN, &registration_body()).await;
    assert!(
        dropped.is_err(),
        "expected a dropped connection: {dropped:?}"
    );

    let (status, body) = register(&platform, TOKEN, &registration_body())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, json!({"registered": true, "status": "running"}));

    let recorded = platform
        .wait_for_registrations(3, Duration::from_secs(5))
        .await
        .unwrap();
    let statuses: Vec<Option<u16>> = recorded.iter().map(|request| request.status).collect();
    assert_eq!(statuses, [Some(500), None, Some(200)]);
    assert_eq!(
        recorded[2].header("Authorization"),
        Some("Bearer test-token-1")
    );
    assert_eq!(recorded[2].body.as_ref(), Some(&registration_body()));
    assert_eq!(recorded[2].sequence, 3);
    assert_eq!(platform.remaining_responses(), 0);
}

#[tokio::test]
async fn wrong_token_keeps_script() {
    let platform = FakePlatform::start(
        PlatformConfig::new(TOKEN).responses(vec![ScriptedResponse::Status(503)]),
    )
    .await
    .unwrap();

    let (status, body) = register(&platform, "other-token", &registration_body())
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid or expired registration token");
    assert_eq!(platform.remaining_responses(), 1);

    let (status, _) = register(&platform, TOKEN, &registration_body())
        .await
        .unwrap();
    assert_eq!(status, 503);
}

#[tokio::test]
async fn invalid_body_is_rejected() {
    let platform = FakePlatform::start(PlatformConfig::new(TOKEN))
        .await
        .unwrap();
    let mut body = registration_body();
    body["publicIPv4"] = json!("not an address");

    let (status, answer) = register(&platform, TOKEN, &body).await.unwrap();
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("publicIPv4"),
        "{answer}"
    );
    assert_eq!(platform.registrations()[0].status, Some(400));
}

#[tokio::test]
async fn unknown_machine_gets_404() {
    let platform = FakePlatform::start(
        PlatformConfig::new(TOKEN).known_machine("00000000-0000-4000-8000-000000000000"),
    )
    .await
    .unwrap();

    let (status, _) = register(&platform, TOKEN, &registration_body())
        .await
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn unreachable_bucket_warns_host() {
    let bucket = BucketTarget {
        endpoint: format!("http://127.0.0.1:{}", closed_port()),
        bucket: "customer".to_string(),
        user_id: "user_test".to_string(),
        access_key_id: "test".to_string(),
        secret_access_key: "test".to_string(),
    };
    let platform = FakePlatform::start(PlatformConfig::new(TOKEN).bucket(bucket))
        .await
        .unwrap();

    let (status, body) = register(&platform, TOKEN, &registration_body())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["registered"], true);
    assert_eq!(body["warnings"], json!(["vps_meta_persistence_failed"]));
    let detail = &platform.registrations()[0].detail;
    assert!(
        detail.contains("matrixos-sync/user_test/system/vps-meta.json"),
        "{detail}"
    );
}

#[tokio::test]
async fn scripted_meta_failure_warns_host() {
    let platform = FakePlatform::start(
        PlatformConfig::new(TOKEN).responses(vec![ScriptedResponse::RegisterWithoutMeta]),
    )
    .await
    .unwrap();

    let (status, body) = register(&platform, TOKEN, &registration_body())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["warnings"], json!(["vps_meta_persistence_failed"]));
}

#[tokio::test]
async fn bundle_served_over_tls() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::write(
        directory.path().join("matrix-host-bundle.tar.gz"),
        b"tarball",
    )
    .unwrap();
    std::fs::write(
        directory.path().join("matrix-host-bundle.tar.gz.sha256"),
        b"abc  matrix-host-bundle.tar.gz\n",
    )
    .unwrap();
    let platform = FakePlatform::start(
        PlatformConfig::new(TOKEN)
            .bundle(VERSION, directory.path())
            .tls(TlsIdentity::new(
                fixture("server.pem"),
                fixture("server.key"),
            )),
    )
    .await
    .unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(fixture("ca.pem")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let url = platform.bundle_url(VERSION);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let tarball = client.get(&url).send().await.unwrap();
    assert_eq!(tarball.status(), 200);
    assert_eq!(tarball.bytes().await.unwrap().as_ref(), b"tarball");

    let checksum = client.get(format!("{url}.sha256")).send().await.unwrap();
    assert_eq!(checksum.status(), 200);
    assert_eq!(
        checksum.text().await.unwrap(),
        "abc  matrix-host-bundle.tar.gz\n"
    );

    let other_version = client
        .get(platform.bundle_url("matrix-os-host-other"))
        .send()
        .await
        .unwrap();
    assert_eq!(other_version.status(), 404);
    assert_eq!(platform.requests().len(), 3);
}

#[tokio::test]
async fn request_log_has_json_lines() {
    let directory = tempfile::tempdir().unwrap();
    let log_path = directory.path().join("requests.jsonl");
    let platform = FakePlatform::start(PlatformConfig::new(TOKEN).request_log(&log_path))
        .await
        .unwrap();

    register(&platform, TOKEN, &registration_body())
        .await
        .unwrap();
    let missing = client()
        .get(format!("{}/nothing-here", platform.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["path"], "/vps/register");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["body"]["machineId"], MACHINE);
    assert_eq!(lines[0]["headers"]["authorization"], "Bearer test-token-1");
    assert_eq!(lines[1]["path"], "/nothing-here");
    assert_eq!(lines[1]["status"], 404);
}

#[tokio::test]
async fn non_loopback_listen_is_rejected() {
    let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let error = FakePlatform::start(PlatformConfig::new(TOKEN).listen(address))
        .await
        .err()
        .expect("0.0.0.0 must be rejected");
    assert!(error.to_string().contains("loopback"), "{error}");
}

#[test]
fn blocking_server_stops_on_shutdown() {
    let platform = FakePlatform::start_blocking(PlatformConfig::new(TOKEN)).unwrap();
    let address = platform.address();
    assert!(std::net::TcpStream::connect(address).is_ok());

    platform.shutdown();
    assert!(std::net::TcpStream::connect(address).is_err());
}
