//! `matrix-agent heartbeat`, the long-running service: registration with
//! the platform, the heartbeat that keeps `lastSyncAt` fresh, whose
//! metadata it is, and what the service reports to systemd.
//!
//! Each test runs the real binary against moto, a real PostgreSQL and the
//! fake platform on 127.0.0.1, with a heartbeat every second, and stops it
//! with SIGTERM as `systemctl stop` does.

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use matrix_agent_tests::agent::Agent;
use matrix_agent_tests::bucket::{LATEST, SNAPSHOTS, VPS_META};
use matrix_agent_tests::fault_proxy::{Fault, Operation, Rule};
use matrix_agent_tests::fixtures;
use matrix_agent_tests::heartbeat_service::{
    assert_no_token_in_files, assert_no_token_in_run, configure_heartbeat, poll_until,
    HeartbeatService, FIXTURE_IPV4, FIXTURE_IPV6, FIXTURE_SERVER_ID, IMAGE_VERSION,
    REGISTRATION_TOKEN,
};
use matrix_agent_tests::host::{Host, ObjectStore, USER_ID};
use matrix_agent_tests::notify_socket::{Notification, NotifySocket};
use matrix_agent_tests::platform::start_platform;
use matrix_agent_tests::prometheus_text::{Exposition, MetricType};
use matrix_fake_platform::{FakePlatform, PlatformConfig, RecordedRequest, ScriptedResponse};
use serde_json::{json, Value};

const HOST_STATUS: &str = "system/host-status.json";

/// A snapshot that the replaced machine left.
const OLD_SNAPSHOT: &str = "system/db/snapshots/2020-01-01T0000Z.dump";

/// Heartbeats a test lets pass before it concludes that something did not
/// happen: a registration retry comes within a second of the one before,
/// and each heartbeat is a second after the last.
const QUIET_TICKS: usize = 3;

/// How long registration and the first heartbeats may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// The fields of `vps-meta.json`, version 1, when the host has IPv6.
const META_FIELDS: [&str; 10] = [
    "version",
    "userId",
    "machineId",
    "hetznerServerId",
    "imageVersion",
    "status",
    "provisionedAt",
    "lastSyncAt",
    "publicIPv4",
    "publicIPv6",
];

/// Creates a host whose restore found an empty bucket, so its gate is open.
fn fresh_host(store: &ObjectStore) -> Host {
    let host = Host::new(store);
    let run = host.restore();
    run.assert_exit_code(0);
    assert!(host.has_regular_marker(), "no marker after\n{run}");
    host
}

fn heartbeat_agent(host: &Host, platform: &FakePlatform) -> Agent {
    let mut agent = host.agent();
    configure_heartbeat(&mut agent, &platform.register_url());
    agent
}

/// Reads one of the agent's state files, or `None` when it is absent.
fn state_file(host: &Host, name: &str) -> Option<Value> {
    let bytes = fs::read(host.state_dir().join(name)).ok()?;
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|error| panic!("the state file {name} is not JSON: {error}"));
    Some(value)
}

fn registration_state(host: &Host) -> Option<String> {
    let record = state_file(host, "registration.json")?;
    record["state"].as_str().map(str::to_owned)
}

fn wait_for_registration_state(host: &Host, service: &HeartbeatService, expected: &str) {
    let reached = poll_until(SETTLE_TIMEOUT, || {
        (registration_state(host).as_deref() == Some(expected)).then_some(())
    });
    assert!(
        reached.is_some(),
        "registration.json did not reach state {expected:?}: {:?}\n{}",
        state_file(host, "registration.json"),
        service.output()
    );
}

fn meta_document(store: &ObjectStore) -> Option<Value> {
    let body = store.bucket.get(VPS_META)?;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|error| panic!("vps-meta.json is not JSON: {error}"));
    Some(value)
}

/// Waits until `vps-meta.json` names `machine_id` and returns it.
fn wait_for_meta_naming(
    store: &ObjectStore,
    machine_id: &str,
    service: &HeartbeatService,
) -> Value {
    poll_until(SETTLE_TIMEOUT, || {
        meta_document(store).filter(|meta| meta["machineId"] == machine_id)
    })
    .unwrap_or_else(|| {
        panic!(
            "vps-meta.json never named machine {machine_id}: {:?}\n{}",
            meta_document(store),
            service.output()
        )
    })
}

/// Returns when the last heartbeat reached the bucket, from the agent's
/// `heartbeat.json`.
fn last_heartbeat(host: &Host) -> Option<DateTime<Utc>> {
    let record = state_file(host, "heartbeat.json")?;
    let text = record["last_success_at"].as_str()?;
    let at = DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|error| panic!("last_success_at {text:?} is not RFC 3339: {error}"));
    Some(at.with_timezone(&Utc))
}

/// Waits until the service has sent `count` heartbeats after the last one
/// it had sent when called.
fn wait_for_heartbeats(host: &Host, service: &HeartbeatService, count: usize) {
    let before = last_heartbeat(host);
    let mut seen = BTreeSet::new();
    let reached = poll_until(SETTLE_TIMEOUT * count as u32, || {
        if let Some(at) = last_heartbeat(host).filter(|at| Some(*at) != before) {
            seen.insert(at);
        }
        (seen.len() >= count).then_some(())
    });
    assert!(
        reached.is_some(),
        "{} of {count} heartbeats were sent\n{}",
        seen.len(),
        service.output()
    );
}

/// Counts the GET requests moto recorded for `key`.
fn reads_of(store: &ObjectStore, key: &str) -> usize {
    let full_key = store.bucket.full_key(key);
    store
        .server
        .recorded_requests()
        .iter()
        .filter(|request| request.method == "GET")
        .filter(|request| {
            let path = request.url.split('?').next().unwrap_or_default();
            path.ends_with(&format!("/{full_key}"))
        })
        .count()
}

/// Counts the PUT, POST and DELETE requests moto recorded for `key`.
fn writes_to(store: &ObjectStore, key: &str) -> usize {
    let full_key = store.bucket.full_key(key);
    store
        .server
        .recorded_requests()
        .iter()
        .filter(|request| matches!(request.method.as_str(), "PUT" | "POST" | "DELETE"))
        .filter(|request| {
            let path = request.url.split('?').next().unwrap_or_default();
            path.ends_with(&format!("/{full_key}"))
        })
        .count()
}

/// Counts every PUT, POST and DELETE request moto recorded.
fn all_writes(store: &ObjectStore) -> usize {
    store
        .server
        .recorded_requests()
        .iter()
        .filter(|request| matches!(request.method.as_str(), "PUT" | "POST" | "DELETE"))
        .count()
}

/// Parses an ISO 8601 UTC time written with a `Z`, as the contract asks.
fn parse_utc(value: &Value, field: &str) -> DateTime<Utc> {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {value}"));
    assert!(text.ends_with('Z'), "{field} {text:?} is not in UTC with Z");
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|error| panic!("{field} {text:?} is not ISO 8601: {error}"))
        .with_timezone(&Utc)
}

/// Parses an RFC 3339 time as the agent's state files write it.
fn parse_utc_text(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|error| panic!("{text:?} is not RFC 3339: {error}"))
        .with_timezone(&Utc)
}

/// Returns the document without `lastSyncAt`.
fn without_last_sync(document: &Value) -> Value {
    let mut document = document.clone();
    document
        .as_object_mut()
        .expect("vps-meta.json is an object")
        .remove("lastSyncAt");
    document
}

/// Asserts that a registration request has exactly the contract's fields,
/// with this host's values and the right JSON types.
fn assert_registration_body(request: &RecordedRequest, host: &Host) {
    let sequence = request.sequence;
    let body = request.body.as_ref().unwrap_or_else(|| {
        panic!(
            "request {sequence} has no JSON body: {:?}",
            request.body_text
        )
    });
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("request {sequence}: body is not an object: {body}"));
    let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "hetznerServerId",
            "imageVersion",
            "machineId",
            "publicIPv4",
            "publicIPv6"
        ],
        "request {sequence}: fields of {body}"
    );
    assert_eq!(
        body["machineId"].as_str(),
        Some(host.machine_id()),
        "request {sequence}: machineId"
    );
    assert_eq!(
        body["hetznerServerId"].as_u64(),
        Some(FIXTURE_SERVER_ID),
        "request {sequence}: hetznerServerId must be a number: {body}"
    );
    assert_eq!(
        body["publicIPv4"].as_str(),
        Some(FIXTURE_IPV4),
        "request {sequence}: publicIPv4"
    );
    assert_eq!(
        body["publicIPv6"].as_str(),
        Some(FIXTURE_IPV6),
        "request {sequence}: publicIPv6"
    );
    assert_eq!(
        body["imageVersion"].as_str(),
        Some(IMAGE_VERSION),
        "request {sequence}: imageVersion"
    );
}

/// Asserts that the request carried the token as a bearer token, without
/// printing the header, which would print the token.
fn assert_bearer_token(request: &RecordedRequest) {
    let expected = format!("Bearer {REGISTRATION_TOKEN}");
    assert!(
        request.header("authorization") == Some(expected.as_str()),
        "request {} does not carry the registration token as a bearer token",
        request.sequence
    );
}

/// Asserts that `meta` is the `vps-meta.json` this host writes for itself:
/// version 1 with every field of the contract, written after `since`.
fn assert_own_meta(meta: &Value, host: &Host, since: DateTime<Utc>) {
    let object = meta.as_object().expect("vps-meta.json is an object");
    let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
    fields.sort_unstable();
    let mut expected_fields = META_FIELDS.to_vec();
    expected_fields.sort_unstable();
    assert_eq!(fields, expected_fields, "fields of {meta}");

    assert_eq!(meta["version"].as_u64(), Some(1), "version in {meta}");
    assert_eq!(meta["userId"], USER_ID);
    assert_eq!(meta["machineId"], host.machine_id());
    assert_eq!(
        meta["hetznerServerId"].as_u64(),
        Some(FIXTURE_SERVER_ID),
        "hetznerServerId must be a number: {meta}"
    );
    assert_eq!(meta["imageVersion"], IMAGE_VERSION);
    assert_eq!(meta["status"], "running");
    assert_eq!(meta["publicIPv4"], FIXTURE_IPV4);
    assert_eq!(meta["publicIPv6"], FIXTURE_IPV6);

    let provisioned_at = parse_utc(&meta["provisionedAt"], "provisionedAt");
    let last_sync_at = parse_utc(&meta["lastSyncAt"], "lastSyncAt");
    let slack = chrono::Duration::seconds(1);
    assert!(
        provisioned_at >= since - slack && provisioned_at <= Utc::now() + slack,
        "provisionedAt {provisioned_at} is not the time of registration (after {since})"
    );
    assert!(
        last_sync_at >= provisioned_at,
        "lastSyncAt {last_sync_at} is before provisionedAt {provisioned_at}"
    );
}

#[test]
fn registration_survives_500s_and_dropped_connection() {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    let platform = start_platform(
        &store,
        PlatformConfig::new(REGISTRATION_TOKEN).responses(vec![
            ScriptedResponse::Status(500),
            ScriptedResponse::Status(500),
            ScriptedResponse::DropConnection,
            ScriptedResponse::Register,
        ]),
    );
    let service = HeartbeatService::start(&heartbeat_agent(&host, &platform));

    wait_for_registration_state(&host, &service, "registered");
    wait_for_heartbeats(&host, &service, QUIET_TICKS);
    let registrations = platform.registrations();
    let run = service.stop();

    let statuses: Vec<Option<u16>> = registrations.iter().map(|request| request.status).collect();
    assert_eq!(
        statuses,
        [Some(500), Some(500), None, Some(200)],
        "responses to the registration requests\n{run}"
    );
    for request in &registrations {
        assert_registration_body(request, &host);
        assert_bearer_token(request);
        assert!(
            request
                .header("content-type")
                .is_some_and(|value| value.starts_with("application/json")),
            "Content-Type of request {}: {:?}",
            request.sequence,
            request.header("content-type")
        );
    }

    // Exponential backoff from one second with jitter over the upper half
    // waits at least 0.5 s, 1 s and 2 s. The bound leaves half a second for
    // a first request that the loaded platform recorded late.
    let span = registrations[3].received_at - registrations[0].received_at;
    assert!(
        span >= chrono::Duration::milliseconds(3000),
        "the retries came sooner than the backoff allows: {span} from first to last"
    );

    let failed_attempts = run
        .stderr
        .lines()
        .filter(|line| line.contains("registration attempt") && line.contains("failed"))
        .count();
    assert_eq!(failed_attempts, 3, "log lines for failed attempts\n{run}");
    assert!(
        run.stderr.contains("after 4 attempts"),
        "no log line for the success\n{run}"
    );
    let record = state_file(&host, "registration.json").expect("registration.json exists");
    assert_eq!(record["attempts"], 4, "{record}");
    let meta = meta_document(&store).expect("the platform wrote vps-meta.json");
    assert_eq!(meta["machineId"], host.machine_id());
    assert_no_token_in_files(&host.state_dir());
}

/// Starts a heartbeat whose registration `config` refuses with `status`,
/// and checks that nothing retries it and that the log says why.
fn assert_refusal_is_final(config: PlatformConfig, status: u16, reason: &str) {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    let platform = start_platform(&store, config);
    let mut service = HeartbeatService::start(&heartbeat_agent(&host, &platform));

    let refusal = service.wait_for_log("registration refused", SETTLE_TIMEOUT);
    wait_for_heartbeats(&host, &service, QUIET_TICKS);
    let registrations = platform.registrations();
    let still_running = service.is_running();
    let report = service.get("/status");
    let run = service.stop();

    assert_eq!(
        registrations.len(),
        1,
        "registration requests after a {status}\n{run}"
    );
    assert_eq!(registrations[0].status, Some(status));
    assert_bearer_token(&registrations[0]);
    assert!(
        refusal.contains(&format!("HTTP {status}")),
        "the log line does not name the status: {refusal}"
    );
    assert!(
        refusal.contains(reason),
        "the log line does not say {reason:?}: {refusal}"
    );
    assert!(still_running, "the service exited after the refusal\n{run}");

    let record = state_file(&host, "registration.json").expect("registration.json exists");
    assert_eq!(record["state"], "rejected", "{record}");
    assert_eq!(record["attempts"], 1, "{record}");
    let report: Value = serde_json::from_str(&report.body).expect("/status is JSON");
    assert_eq!(
        report["registration"]["state"], "rejected",
        "/status: {report}"
    );

    assert_no_token_in_files(&host.state_dir());
    for key in store.bucket.list("") {
        let body = store.bucket.get(&key).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&body).contains(REGISTRATION_TOKEN),
            "the bucket object {key} contains the registration token"
        );
    }
}

#[test]
fn registration_stops_at_401() {
    assert_refusal_is_final(
        PlatformConfig::new("a-token-the-platform-issued-later"),
        401,
        "invalid or expired registration token",
    );
}

#[test]
fn registration_stops_at_404() {
    let another_machine = uuid::Uuid::new_v4().to_string();
    assert_refusal_is_final(
        PlatformConfig::new(REGISTRATION_TOKEN).known_machine(another_machine),
        404,
        "does not know this machine",
    );
}

#[test]
fn registration_stops_at_409() {
    assert_refusal_is_final(
        PlatformConfig::new(REGISTRATION_TOKEN).responses(vec![ScriptedResponse::Status(409)]),
        409,
        "wrong state",
    );
}

#[test]
fn registration_needs_image_version() {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    let platform = start_platform(&store, PlatformConfig::new(REGISTRATION_TOKEN));
    let mut agent = heartbeat_agent(&host, &platform);
    agent.remove("MATRIX_IMAGE_VERSION");
    let service = HeartbeatService::start(&agent);

    let refusal = service.wait_for_log("registration refused", SETTLE_TIMEOUT);
    wait_for_heartbeats(&host, &service, QUIET_TICKS);
    let registrations = platform.registrations();
    let run = service.stop();

    assert!(
        refusal.contains("MATRIX_IMAGE_VERSION is not set"),
        "the log line does not name the missing variable: {refusal}"
    );
    assert!(
        registrations.is_empty(),
        "{} registration requests without an image version\n{run}",
        registrations.len()
    );
    assert_eq!(registration_state(&host).as_deref(), Some("rejected"));
}

#[test]
fn persistence_warning_makes_host_write_meta() {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    let platform = start_platform(
        &store,
        PlatformConfig::new(REGISTRATION_TOKEN)
            .responses(vec![ScriptedResponse::RegisterWithoutMeta]),
    );
    let started = Utc::now();
    let service = HeartbeatService::start(&heartbeat_agent(&host, &platform));

    wait_for_registration_state(&host, &service, "registered");
    let meta = wait_for_meta_naming(&store, host.machine_id(), &service);
    let run = service.stop();

    assert_eq!(platform.registrations().len(), 1, "{run}");
    assert_own_meta(&meta, &host, started);
    assert!(
        run.stderr
            .lines()
            .any(|line| line.contains("vps-meta.json") && line.contains(host.machine_id())),
        "no log line says the host wrote vps-meta.json\n{run}"
    );
}

/// A replacement host whose platform could not store the metadata must
/// replace the previous machine's metadata with its own, and must not
/// take the previous machine for a newer replacement.
#[test]
fn persistence_warning_replaces_previous_meta() {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    let previous_machine = uuid::Uuid::new_v4().to_string();
    store.register(&previous_machine);
    let platform = start_platform(
        &store,
        PlatformConfig::new(REGISTRATION_TOKEN)
            .responses(vec![ScriptedResponse::RegisterWithoutMeta]),
    );
    let started = Utc::now();
    let service = HeartbeatService::start(&heartbeat_agent(&host, &platform));

    wait_for_registration_state(&host, &service, "registered");
    let meta = wait_for_meta_naming(&store, host.machine_id(), &service);
    wait_for_heartbeats(&host, &service, QUIET_TICKS);
    let health = service.get("/healthz");
    let heartbeat = state_file(&host, "heartbeat.json").expect("heartbeat.json exists");
    let later_meta = meta_document(&store).expect("vps-meta.json exists");
    let run = service.stop();

    assert_own_meta(&meta, &host, started);
    assert_eq!(
        later_meta["machineId"],
        host.machine_id(),
        "vps-meta.json no longer names this machine\n{run}"
    );
    assert_eq!(health.status, 200, "/healthz: {}\n{run}", health.body);
    assert_eq!(
        heartbeat["superseded_by"],
        Value::Null,
        "heartbeat.json: {heartbeat}"
    );
    assert!(
        !run.stderr.contains("superseded"),
        "the host took the machine it replaces for a newer replacement\n{run}"
    );
}

/// A failed write of the metadata that the platform could not store is
/// retried at the next heartbeat, and until it succeeds the machine it
/// names is still the one this host replaces, never a newer replacement.
#[test]
fn failed_meta_write_is_retried() {
    let store = ObjectStore::start_with_proxy();
    let host = fresh_host(&store);
    let previous_machine = uuid::Uuid::new_v4().to_string();
    store.register(&previous_machine);
    let platform = start_platform(
        &store,
        PlatformConfig::new(REGISTRATION_TOKEN)
            .responses(vec![ScriptedResponse::RegisterWithoutMeta]),
    );
    let proxy = store.fault_proxy();
    let failing_writes = proxy.inject(
        Rule::on(Operation::PutObject).key_contains(VPS_META),
        Fault::error(500),
    );
    let mut agent = heartbeat_agent(&host, &platform);
    agent.set("MATRIX_S3_MAX_ATTEMPTS", "1");
    let started = Utc::now();
    let service = HeartbeatService::start(&agent);

    wait_for_registration_state(&host, &service, "registered");
    let failed = poll_until(SETTLE_TIMEOUT * 2, || {
        (proxy.fired(failing_writes) >= 2).then_some(())
    });
    let backup_while_pending = agent.run(&["backup"]);
    proxy.clear_faults();
    let meta = wait_for_meta_naming(&store, host.machine_id(), &service);
    wait_for_heartbeats(&host, &service, QUIET_TICKS);
    let health = service.get("/healthz");
    let registration = state_file(&host, "registration.json").expect("registration.json exists");
    let run = service.stop();

    assert!(
        failed.is_some(),
        "the host did not try to write vps-meta.json twice\n{run}"
    );
    assert_own_meta(&meta, &host, started);
    assert!(
        !run.stderr.contains("superseded"),
        "the host took the machine it replaces for a newer replacement\n{run}"
    );
    assert_eq!(health.status, 200, "/healthz: {}\n{run}", health.body);
    assert_eq!(
        registration["vps_meta_pending"], false,
        "registration.json: {registration}"
    );
    backup_while_pending.assert_exit_code(1);
    assert!(
        backup_while_pending
            .output_lowercase()
            .contains("not registered yet"),
        "backup does not wait for the metadata\n{backup_while_pending}"
    );
}

#[test]
fn registration_happens_once_across_restarts() {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    let platform = start_platform(&store, PlatformConfig::new(REGISTRATION_TOKEN));
    let agent = heartbeat_agent(&host, &platform);

    let first = HeartbeatService::start(&agent);
    wait_for_registration_state(&host, &first, "registered");
    wait_for_meta_naming(&store, host.machine_id(), &first);
    first.stop();
    let second = HeartbeatService::start(&agent);
    wait_for_heartbeats(&host, &second, QUIET_TICKS);
    let run = second.stop();

    assert_eq!(
        platform.registrations().len(),
        1,
        "registration requests over two runs\n{run}"
    );
    assert!(
        !run.stderr.contains("registering machine"),
        "the restarted service registered again\n{run}"
    );
}

#[test]
fn heartbeat_refreshes_only_last_sync_at() {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    let platform = start_platform(&store, PlatformConfig::new(REGISTRATION_TOKEN));
    let service = HeartbeatService::start(&heartbeat_agent(&host, &platform));
    wait_for_registration_state(&host, &service, "registered");
    let registered_meta = wait_for_meta_naming(&store, host.machine_id(), &service);

    // Fields that other writers own, and a lastSyncAt an hour old.
    let mut seeded = registered_meta;
    seeded["plan"] = json!({
        "tier": "pro",
        "storageGiB": 80,
        "addons": ["gateway", "backups"],
        "price": {"amount": 12.5, "currency": "EUR"}
    });
    seeded["notes"] = json!("x");
    seeded["lastSyncAt"] = json!((Utc::now() - chrono::Duration::hours(1))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string());
    let seeded_at = Utc::now();
    store.bucket.put(
        VPS_META,
        &serde_json::to_vec_pretty(&seeded).expect("serializing vps-meta.json"),
    );

    let refreshed = poll_until(SETTLE_TIMEOUT, || {
        meta_document(&store).filter(|meta| meta["lastSyncAt"] != seeded["lastSyncAt"])
    });
    let later = refreshed.as_ref().and_then(|refreshed| {
        poll_until(SETTLE_TIMEOUT, || {
            meta_document(&store).filter(|meta| meta["lastSyncAt"] != refreshed["lastSyncAt"])
        })
    });
    let run = service.stop();

    let refreshed = refreshed.unwrap_or_else(|| panic!("lastSyncAt was never refreshed\n{run}"));
    let later = later.unwrap_or_else(|| panic!("lastSyncAt was refreshed only once\n{run}"));
    assert_eq!(
        without_last_sync(&refreshed),
        without_last_sync(&seeded),
        "the first heartbeat changed more than lastSyncAt"
    );
    assert_eq!(
        without_last_sync(&later),
        without_last_sync(&seeded),
        "later heartbeats changed more than lastSyncAt"
    );
    let first_sync = parse_utc(&refreshed["lastSyncAt"], "lastSyncAt");
    let later_sync = parse_utc(&later["lastSyncAt"], "lastSyncAt");
    assert!(
        first_sync >= seeded_at - chrono::Duration::seconds(1),
        "lastSyncAt {first_sync} is older than the seeded document ({seeded_at})"
    );
    assert!(
        later_sync > first_sync,
        "lastSyncAt did not advance: {first_sync}, then {later_sync}"
    );
}

/// A replacement host whose registration keeps failing must leave the
/// replaced machine's metadata alone, and its backups must wait.
#[test]
fn unregistered_host_leaves_previous_meta_alone() {
    let store = ObjectStore::start_recording();
    let host = Host::new(&store);
    fixtures::load_notes(&host.cluster);
    store.publish_snapshot(OLD_SNAPSHOT, &host.cluster.dump_custom_format());
    let previous_machine = uuid::Uuid::new_v4().to_string();
    store.register(&previous_machine);
    host.restore().assert_exit_code(0);
    let platform = start_platform(
        &store,
        PlatformConfig::new(REGISTRATION_TOKEN).fallback(ScriptedResponse::Status(500)),
    );
    let agent = heartbeat_agent(&host, &platform);
    let meta_before = store.bucket.get(VPS_META);
    let etag_before = store.bucket.head(VPS_META).map(|head| head.etag);
    let meta_writes_before = writes_to(&store, VPS_META);

    let service = HeartbeatService::start(&agent);
    let ticks = poll_until(SETTLE_TIMEOUT, || {
        let count = service.log_lines_containing("not registered yet");
        (count >= 3).then_some(count)
    });
    let backup = agent.run(&["backup"]);
    let registrations = platform.registrations();
    let run = service.stop();

    assert!(
        ticks.is_some(),
        "the heartbeat did not report \"not registered yet\" three times\n{run}"
    );
    assert!(
        registrations.len() >= 2,
        "registration was not retried through the 500s\n{run}"
    );
    assert_eq!(
        store.bucket.get(VPS_META),
        meta_before,
        "vps-meta.json changed\n{run}"
    );
    assert_eq!(
        store.bucket.head(VPS_META).map(|head| head.etag),
        etag_before,
        "the ETag of vps-meta.json changed\n{run}"
    );
    assert_eq!(
        writes_to(&store, VPS_META),
        meta_writes_before,
        "vps-meta.json was written\n{run}"
    );

    backup.assert_exit_code(1);
    assert_no_token_in_run(&backup);
    assert!(
        backup.output_lowercase().contains("not registered yet"),
        "backup does not say why it refused\n{backup}"
    );
    assert_eq!(
        store.bucket.latest_pointer().as_deref(),
        Some(OLD_SNAPSHOT),
        "the pointer moved\n{backup}"
    );
    assert_eq!(store.bucket.list(SNAPSHOTS), [OLD_SNAPSHOT]);
}

/// Once registered, metadata naming another machine means a newer
/// replacement owns the bucket: this host must stop every write.
#[test]
fn superseded_host_stops_every_write() {
    let store = ObjectStore::start_recording();
    let host = fresh_host(&store);
    let platform = start_platform(&store, PlatformConfig::new(REGISTRATION_TOKEN));
    let agent = heartbeat_agent(&host, &platform);
    let service = HeartbeatService::start(&agent);
    wait_for_registration_state(&host, &service, "registered");
    wait_for_meta_naming(&store, host.machine_id(), &service);
    poll_until(SETTLE_TIMEOUT, || store.bucket.head(HOST_STATUS))
        .unwrap_or_else(|| panic!("no host-status.json\n{}", service.output()));

    let replacement = uuid::Uuid::new_v4().to_string();
    store.register(&replacement);
    let noticed = poll_until(SETTLE_TIMEOUT, || {
        let health = service.get("/healthz");
        (health.status == 503).then_some(health)
    });
    let etags_after_notice = (
        store.bucket.head(HOST_STATUS).map(|head| head.etag),
        store.bucket.head(VPS_META).map(|head| head.etag),
    );
    let writes_after_notice = all_writes(&store);
    // Every heartbeat reads the metadata, so these reads are heartbeats that
    // came after the host saw it was superseded.
    let reads_after_notice = reads_of(&store, VPS_META);
    let ticked = poll_until(SETTLE_TIMEOUT * QUIET_TICKS as u32, || {
        (reads_of(&store, VPS_META) >= reads_after_notice + QUIET_TICKS).then_some(())
    });
    assert!(
        ticked.is_some(),
        "the superseded heartbeat stopped reading vps-meta.json\n{}",
        service.output()
    );
    let etags_later = (
        store.bucket.head(HOST_STATUS).map(|head| head.etag),
        store.bucket.head(VPS_META).map(|head| head.etag),
    );
    let writes_later = all_writes(&store);
    let health = service.get("/healthz");
    let backup = agent.run(&["backup"]);
    let status = agent.run(&["status"]);
    let writes_after_backup = all_writes(&store);
    let run = service.stop();

    assert!(
        noticed.is_some(),
        "/healthz never answered 503 after the replacement registered\n{run}"
    );
    assert_eq!(
        etags_later, etags_after_notice,
        "host-status.json or vps-meta.json changed after the host was superseded\n{run}"
    );
    assert_eq!(
        writes_later, writes_after_notice,
        "the superseded host wrote to the bucket\n{run}"
    );
    assert_eq!(health.status, 503, "/healthz: {}", health.body);
    assert!(
        health.body.contains("superseded"),
        "/healthz does not say superseded: {}",
        health.body
    );
    assert!(
        health.body.contains(&replacement),
        "/healthz does not name the replacement: {}",
        health.body
    );
    assert!(
        run.stderr
            .lines()
            .any(|line| line.contains("superseded") && line.contains(&replacement)),
        "the journal does not say the host is superseded\n{run}"
    );

    backup.assert_exit_code(1);
    assert_no_token_in_run(&backup);
    assert!(
        backup.output_lowercase().contains("superseded"),
        "backup does not say why it refused\n{backup}"
    );
    assert_eq!(
        writes_after_backup, writes_later,
        "the refused backup wrote to the bucket\n{backup}"
    );
    assert_eq!(
        store.bucket.latest_pointer(),
        None,
        "the refused backup moved the pointer\n{backup}"
    );
    status.assert_exit_code(0);
    assert!(
        status.stdout.contains("superseded"),
        "status does not say superseded\n{status}"
    );
}

#[test]
fn superseded_host_keeps_off_missing_meta() {
    let store = ObjectStore::start_recording();
    let host = fresh_host(&store);
    let platform = start_platform(&store, PlatformConfig::new(REGISTRATION_TOKEN));
    let agent = heartbeat_agent(&host, &platform);
    let service = HeartbeatService::start(&agent);
    wait_for_registration_state(&host, &service, "registered");
    wait_for_meta_naming(&store, host.machine_id(), &service);

    let replacement = uuid::Uuid::new_v4().to_string();
    store.register(&replacement);
    let noticed = poll_until(SETTLE_TIMEOUT, || {
        (service.get("/healthz").status == 503).then_some(())
    });
    store.bucket.delete(VPS_META);
    let reads_after_delete = reads_of(&store, VPS_META);
    let ticked = poll_until(SETTLE_TIMEOUT * QUIET_TICKS as u32, || {
        (reads_of(&store, VPS_META) >= reads_after_delete + QUIET_TICKS).then_some(())
    });
    let meta_after_ticks = store.bucket.get(VPS_META);
    let health = service.get("/healthz");
    let backup = agent.run(&["backup"]);
    let run = service.stop();

    assert!(
        noticed.is_some(),
        "/healthz never answered 503 after the replacement registered\n{run}"
    );
    assert!(
        ticked.is_some(),
        "the heartbeat stopped reading vps-meta.json\n{run}"
    );
    assert!(
        meta_after_ticks.is_none(),
        "the superseded host wrote vps-meta.json again\n{run}"
    );
    assert_eq!(health.status, 503, "/healthz: {}", health.body);
    backup.assert_exit_code(1);
    assert_no_token_in_run(&backup);
    assert!(
        backup.output_lowercase().contains("superseded"),
        "backup does not say why it refused\n{backup}"
    );
    assert_eq!(
        store.bucket.latest_pointer(),
        None,
        "the refused backup moved the pointer\n{backup}"
    );
}

/// Reads the value of one sample, or panics with the scrape.
fn metric(exposition: &Exposition, scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .value(name, labels)
        .unwrap_or_else(|| panic!("/metrics has no sample {name} {labels:?}:\n{scrape}"))
}

#[test]
fn metrics_match_backup_just_made() {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    fixtures::load_notes(&host.cluster);
    let platform = start_platform(&store, PlatformConfig::new(REGISTRATION_TOKEN));
    let agent = heartbeat_agent(&host, &platform);
    let service = HeartbeatService::start(&agent);
    wait_for_registration_state(&host, &service, "registered");
    wait_for_meta_naming(&store, host.machine_id(), &service);

    let backup_started = Utc::now();
    let clock = Instant::now();
    let backup = agent.run(&["backup"]);
    let backup_took = clock.elapsed();
    wait_for_heartbeats(&host, &service, 1);
    let scrape = service.get("/metrics");
    let status = service.get("/status");
    let health = service.get("/healthz");
    let run = service.stop();

    backup.assert_exit_code(0);
    let record = state_file(&host, "last-backup.json").expect("last-backup.json exists");
    let success = &record["last_success"];
    let snapshot = success["snapshot"]
        .as_str()
        .unwrap_or_else(|| panic!("last-backup.json names no snapshot: {record}"));
    assert_eq!(
        store.bucket.latest_pointer().as_deref(),
        Some(snapshot),
        "latest does not point at the backup just made\n{backup}"
    );
    let object = store
        .bucket
        .head(snapshot)
        .unwrap_or_else(|| panic!("the snapshot {snapshot} is not in the bucket"));

    assert_eq!(scrape.status, 200, "/metrics: {}\n{run}", scrape.body);
    assert!(
        scrape
            .content_type
            .as_deref()
            .is_some_and(|value| value.starts_with("text/plain; version=0.0.4")),
        "Content-Type of /metrics: {:?}",
        scrape.content_type
    );
    let body = scrape.body.as_str();
    let exposition = Exposition::parse(body)
        .unwrap_or_else(|error| panic!("/metrics is not valid text exposition: {error}\n{body}"));

    assert_eq!(
        metric(&exposition, body, "matrix_backup_last_size_bytes", &[]),
        object.size as f64,
        "size of the snapshot"
    );
    let finished_at = parse_utc_text(success["finished_at"].as_str().unwrap_or_default());
    let last_success = metric(
        &exposition,
        body,
        "matrix_backup_last_success_timestamp_seconds",
        &[],
    );
    assert_eq!(
        last_success,
        finished_at.timestamp() as f64,
        "time of the last backup"
    );
    assert!(
        last_success >= (backup_started.timestamp() - 1) as f64,
        "the last backup finished at {last_success}, before this one started ({backup_started})"
    );
    let duration = metric(
        &exposition,
        body,
        "matrix_backup_last_duration_seconds",
        &[],
    );
    assert_eq!(
        Some(duration),
        success["duration_seconds"].as_f64(),
        "duration of the last backup"
    );
    assert!(
        duration > 0.0 && duration <= backup_took.as_secs_f64(),
        "the backup took {backup_took:?} but /metrics says {duration} s"
    );
    assert_eq!(
        metric(&exposition, body, "matrix_backup_failures_total", &[]),
        0.0
    );
    assert_eq!(
        exposition
            .family("matrix_backup_failures_total")
            .and_then(|family| family.kind),
        Some(MetricType::Counter),
        "matrix_backup_failures_total must be a counter"
    );

    for (state, expected) in [
        ("fresh_host", 1.0),
        ("restored", 0.0),
        ("failed", 0.0),
        ("none", 0.0),
    ] {
        assert_eq!(
            metric(
                &exposition,
                body,
                "matrix_restore_state",
                &[("state", state)]
            ),
            expected,
            "matrix_restore_state{{state={state:?}}}"
        );
    }
    for (state, expected) in [
        ("registered", 1.0),
        ("pending", 0.0),
        ("rejected", 0.0),
        ("none", 0.0),
    ] {
        assert_eq!(
            metric(
                &exposition,
                body,
                "matrix_registration_state",
                &[("state", state)]
            ),
            expected,
            "matrix_registration_state{{state={state:?}}}"
        );
    }

    let heartbeat = metric(
        &exposition,
        body,
        "matrix_heartbeat_last_success_timestamp_seconds",
        &[],
    );
    let last_heartbeat = last_heartbeat(&host).expect("heartbeat.json has a success");
    assert_eq!(
        heartbeat,
        last_heartbeat.timestamp() as f64,
        "heartbeat time"
    );
    assert!(
        heartbeat >= last_success - 1.0,
        "the heartbeat at {heartbeat} is older than the backup at {last_success}"
    );

    let report: Value = serde_json::from_str(&status.body).expect("/status is JSON");
    let agent_version = report["agent_version"]
        .as_str()
        .unwrap_or_else(|| panic!("/status has no agent_version: {report}"));
    assert_eq!(
        metric(
            &exposition,
            body,
            "matrix_agent_build_info",
            &[("version", agent_version), ("image_version", IMAGE_VERSION)]
        ),
        1.0
    );
    assert_eq!(
        metric(&exposition, body, "matrix_restore_gate_open", &[]),
        1.0
    );
    assert_eq!(
        metric(&exposition, body, "matrix_host_superseded", &[]),
        0.0
    );
    assert_eq!(metric(&exposition, body, "matrix_host_healthy", &[]), 1.0);
    assert_eq!(health.status, 200, "/healthz: {}", health.body);
    assert_eq!(report["backup"]["last_success"]["snapshot"], snapshot);
}

#[test]
fn status_json_names_latest_snapshot() {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    fixtures::load_notes(&host.cluster);
    let agent = host.agent();
    let backup = agent.run(&["backup"]);
    let json_run = agent.run(&["status", "--json"]);
    let human = agent.run(&["status"]);
    // Another writer moves the pointer away from this host's snapshot.
    store
        .bucket
        .put(LATEST, format!("{OLD_SNAPSHOT}\n").as_bytes());
    let moved_json = agent.run(&["status", "--json"]);
    let moved_human = agent.run(&["status"]);

    backup.assert_exit_code(0);
    json_run.assert_exit_code(0);
    let latest = store.bucket.latest_pointer();
    let report: Value = serde_json::from_str(&json_run.stdout)
        .unwrap_or_else(|error| panic!("status --json did not print JSON: {error}\n{json_run}"));
    let snapshot = report["backup"]["last_success"]["snapshot"]
        .as_str()
        .unwrap_or_else(|| panic!("status --json names no last backup: {report}"));
    assert_eq!(
        report["bucket"]["latest"], snapshot,
        "status --json: {report}"
    );
    assert_eq!(report["bucket"]["matches_last_backup"], true, "{report}");
    assert_eq!(report["bucket"]["error"], Value::Null, "{report}");
    assert_eq!(report["gate"]["open"], true, "{report}");
    assert_eq!(report["restore"]["outcome"], "fresh_host", "{report}");
    assert_eq!(report["health"]["healthy"], true, "{report}");
    assert_eq!(latest.as_deref(), Some(OLD_SNAPSHOT));

    human.assert_exit_code(0);
    assert!(
        human.stdout.contains(&format!(
            "bucket latest: {snapshot} (this host's last backup)"
        )),
        "status does not name the snapshot latest points to\n{human}"
    );

    moved_json.assert_exit_code(0);
    let moved: Value = serde_json::from_str(&moved_json.stdout)
        .unwrap_or_else(|error| panic!("status --json did not print JSON: {error}\n{moved_json}"));
    assert_eq!(moved["bucket"]["latest"], OLD_SNAPSHOT, "{moved}");
    assert_eq!(moved["bucket"]["matches_last_backup"], false, "{moved}");
    assert!(
        moved_human.stdout.contains(&format!(
            "bucket latest: {OLD_SNAPSHOT} (NOT this host's last backup)"
        )),
        "status does not say latest moved away\n{moved_human}"
    );
    for run in [&json_run, &human, &moved_json, &moved_human] {
        assert_no_token_in_run(run);
    }
}

/// Heartbeats whose `STATUS=` lines the notify test waits for.
const BEATS_WATCHED: usize = 5;

#[test]
fn notify_socket_gets_ready_and_watchdog() {
    let store = ObjectStore::start();
    let host = fresh_host(&store);
    let platform = start_platform(&store, PlatformConfig::new(REGISTRATION_TOKEN));
    let mut socket = NotifySocket::bind();
    let mut agent = heartbeat_agent(&host, &platform);
    agent
        .set("NOTIFY_SOCKET", socket.path())
        .set("WATCHDOG_USEC", "1000000")
        .remove("WATCHDOG_PID");

    let service = HeartbeatService::start(&agent);
    let heartbeat_statuses = |received: &[Notification]| {
        received
            .iter()
            .filter(|notification| {
                notification
                    .get("STATUS")
                    .is_some_and(|status| status.starts_with("heartbeat sent"))
            })
            .count()
    };
    let heard_all = socket.receive_until(SETTLE_TIMEOUT * 2, |received| {
        let ready = received.iter().any(|n| n.has("READY", "1"));
        ready && heartbeat_statuses(received) >= BEATS_WATCHED
    });
    let run = service.stop();
    let heard_stopping = socket.receive_until(Duration::from_secs(5), |received| {
        received.iter().any(|n| n.has("STOPPING", "1"))
    });

    let received = socket.received();
    assert!(
        heard_all,
        "READY=1 and {BEATS_WATCHED} heartbeat STATUS= lines did not all arrive: \
         {received:?}\n{run}"
    );
    assert!(
        socket.malformed().is_empty(),
        "lines that are not KEY=VALUE: {:?}",
        socket.malformed()
    );
    let first_ready = received
        .iter()
        .position(|n| n.has("READY", "1"))
        .expect("READY=1 arrived");
    assert!(
        received[first_ready].get("STATUS").is_some(),
        "READY=1 came without a STATUS= line: {received:?}"
    );
    assert_eq!(
        received.iter().filter(|n| n.has("READY", "1")).count(),
        1,
        "READY=1 was sent more than once: {received:?}"
    );

    // Heartbeats are at least a second apart, so the first and the last
    // watched are at least four seconds apart: eight pings at half of
    // WATCHDOG_USEC, four at the whole of it. Counting datagrams in the
    // order they arrived, instead of timing them, keeps this true on a
    // loaded machine.
    let beats: Vec<usize> = received
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.get("STATUS")
                .is_some_and(|status| status.starts_with("heartbeat sent"))
        })
        .map(|(index, _)| index)
        .collect();
    let window = &received[beats[0]..=beats[BEATS_WATCHED - 1]];
    let pings = window.iter().filter(|n| n.has("WATCHDOG", "1")).count();
    assert!(
        pings >= 6,
        "{pings} WATCHDOG=1 pings between the first and the {BEATS_WATCHED}th heartbeat; \
         expected one every half second: {received:?}"
    );
    assert!(heard_stopping, "no STOPPING=1 after SIGTERM: {received:?}");
}
