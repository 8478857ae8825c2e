//! Host packaging: the systemd units, the cloud-init template, the bundle
//! tarball and its installer. These tests shell out to systemd-analyze,
//! cloud-init, tar, sha256sum and /usr/bin/python3 (with PyYAML, which
//! cloud-init depends on); scripts/install-test-tools.sh installs them.
//!
//! The bundle tests run `make bundle` (scripts/bundle.sh), which makes a
//! release build and writes build/bundle/ and dist/ in the workspace. It
//! runs once per test process, plus twice more for the reproducibility
//! test: under nextest, every test process runs it, and every run after
//! the first finds the release build up to date. bundle.sh holds a lock,
//! so runs from parallel processes take turns.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

const SERVICES: [&str; 3] = [
    "matrix-restore.service",
    "matrix-db-backup.service",
    "matrix-heartbeat.service",
];
const TIMER: &str = "matrix-db-backup.timer";
const DROP_IN: &str = "matrix-gateway.service.d/10-restore-gate.conf";
const MAX_EXPOSURE: f64 = 2.5;

const BUNDLE_NAME: &str = "matrix-host-bundle.tar.gz";

/// Placeholders the template documents, with the sample value each is
/// rendered with. The secrets are marked so a test can look for them.
const SAMPLE_VALUES: [(&str, &str, bool); 13] = [
    ("machineId", "9f05824c-2d3e-4b8a-9c1d-0e5f6a7b8c9d", false),
    ("clerkUserId", "user_2xPackagingTest", false),
    ("handle", "alice", false),
    ("imageVersion", "matrix-os-host-2026.04.26-1", false),
    (
        "platformRegisterUrl",
        "https://platform.invalid/vps/register",
        false,
    ),
    ("registrationToken", "regtok-Secret-7f3a91c2", true),
    ("r2Bucket", "matrix-backups", false),
    ("r2Prefix", "matrixos-sync/user_2xPackagingTest/", false),
    ("r2Endpoint", "https://account.r2.invalid", false),
    ("r2AccessKeyId", "AKIDSecret5b0e44d1", true),
    ("r2SecretAccessKey", "sak-Secret/9c+e2$f\\x\"q", true),
    ("postgresPassword", "pgpw-Secret:%s$HOME\\n\"x`id`", true),
    (
        "hostBundleUrl",
        "https://platform.invalid/system-bundles/v1/matrix-host-bundle.tar.gz",
        false,
    ),
];

// ---------------------------------------------------------------- units

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = TempDir::new("units-verify");
    let units = stage_units(dir.path());
    let mut args = vec!["verify".to_string(), "--man=no".to_string()];
    args.extend(units.iter().map(|path| path.display().to_string()));
    args.push(
        dir.path()
            .join("matrix-gateway.service")
            .display()
            .to_string(),
    );

    let output = run(Command::new("systemd-analyze").args(&args));

    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{}",
        text(&output.stderr)
    );
    assert_eq!(
        text(&output.stderr).trim(),
        "",
        "systemd-analyze verify printed warnings"
    );
}

#[test]
fn services_exposure_at_most_2_5() {
    let dir = TempDir::new("units-security");
    stage_units(dir.path());

    let mut figures = Vec::new();
    for service in SERVICES {
        let output = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(dir.path().join(service)));
        let report = text(&output.stdout);
        let exposure = overall_exposure(&report).unwrap_or_else(|| {
            panic!(
                "no overall exposure level for {service} in:\n{report}\n{}",
                text(&output.stderr)
            )
        });
        figures.push((service, exposure));
    }

    // Written past the test harness's capture, so that `cargo test` shows
    // the figures even when the test passes.
    let mut stderr = std::io::stderr();
    for (service, exposure) in &figures {
        let _ = writeln!(
            stderr,
            "systemd-analyze security --offline=true: {service} exposure {exposure:.1}"
        );
    }
    for (service, exposure) in figures {
        assert!(
            exposure <= MAX_EXPOSURE,
            "{service} has exposure {exposure}, above {MAX_EXPOSURE}"
        );
    }
}

#[test]
fn units_state_the_gate_contract() {
    let restore = read_unit("matrix-restore.service");
    let backup = read_unit("matrix-db-backup.service");
    let heartbeat = read_unit("matrix-heartbeat.service");
    let timer = read_unit(TIMER);
    let drop_in = read_unit(DROP_IN);
    let agent = "/opt/matrix/bin/matrix-agent";
    let marker = "/opt/matrix/restore-complete";

    assert_has(&restore, "Type", "oneshot");
    assert_has(&restore, "RemainAfterExit", "yes");
    assert_has(&restore, "TimeoutStartSec", "infinity");
    assert_has(&restore, "ExecStart", &format!("{agent} restore"));
    assert_has(&restore, "ReadWritePaths", "/opt/matrix");
    assert!(
        values(&restore, "After")
            .iter()
            .any(|after| after.contains("postgresql.service")
                && after.contains("network-online.target")),
        "matrix-restore.service is not ordered after PostgreSQL and the network"
    );

    assert_has(&backup, "ExecStart", &format!("{agent} backup"));
    assert_has(&backup, "ConditionPathExists", marker);
    assert_has(&backup, "IOSchedulingClass", "idle");
    assert_has(&backup, "CPUSchedulingPolicy", "batch");
    assert!(!values(&backup, "Nice").is_empty(), "backup sets no Nice=");

    assert_has(&heartbeat, "Type", "notify");
    assert_has(&heartbeat, "Restart", "on-failure");
    assert_has(&heartbeat, "ExecStart", &format!("{agent} heartbeat"));
    assert_has(
        &heartbeat,
        "EnvironmentFile",
        "-/opt/matrix/env/registration.env",
    );
    assert!(
        !values(&heartbeat, "WatchdogSec").is_empty(),
        "heartbeat sets no WatchdogSec="
    );

    assert_has(&timer, "OnCalendar", "hourly");
    assert_has(&timer, "Persistent", "true");
    assert!(
        !values(&timer, "RandomizedDelaySec").is_empty(),
        "the timer sets no RandomizedDelaySec="
    );

    assert_has(&drop_in, "Requires", "matrix-restore.service");
    assert_has(&drop_in, "After", "matrix-restore.service");
    assert_has(&drop_in, "ConditionPathExists", marker);

    for (name, unit) in [
        ("matrix-restore.service", &restore),
        ("matrix-db-backup.service", &backup),
        ("matrix-heartbeat.service", &heartbeat),
    ] {
        assert_eq!(values(unit, "User"), ["matrix"], "{name}: User=");
        assert_eq!(
            values(unit, "StateDirectory"),
            ["matrix"],
            "{name}: StateDirectory="
        );
        for env_file in ["host.env", "r2.env", "postgres.env"] {
            let path = format!("/opt/matrix/env/{env_file}");
            assert!(
                values(unit, "EnvironmentFile").contains(&path),
                "{name} does not read {path}"
            );
        }
        assert_eq!(
            values(unit, "CapabilityBoundingSet"),
            [""],
            "{name}: CapabilityBoundingSet="
        );
        assert_has(unit, "ProtectSystem", "strict");
        assert_has(unit, "NoNewPrivileges", "yes");
        assert_has(unit, "MemoryDenyWriteExecute", "yes");
        assert_has(unit, "UMask", "0077");
    }
}

// ----------------------------------------------------------- cloud-init

#[test]
fn template_documents_every_placeholder() {
    let template = read_repo_file("cloud-init/user-data.yaml.tmpl");
    let used = placeholders(&template);
    let sampled: BTreeSet<String> = SAMPLE_VALUES
        .iter()
        .map(|(name, _, _)| name.to_string())
        .collect();

    assert_eq!(used, sampled, "placeholders used by the template");
    assert!(
        template.starts_with("#cloud-config\n"),
        "the template does not start with #cloud-config"
    );
    for name in &used {
        let documented = template
            .lines()
            .take_while(|line| line.starts_with('#'))
            .any(|line| line.split_whitespace().nth(1) == Some(name.as_str()));
        assert!(documented, "the header comment does not list {name}");
    }
}

#[test]
fn rendered_template_passes_cloud_init_schema() {
    let dir = TempDir::new("cloud-init-schema");
    let rendered = render_template();
    assert!(
        !rendered.contains("{{") && !rendered.contains("}}"),
        "the rendered template still contains a placeholder"
    );
    let path = dir.path().join("user-data.yaml");
    fs::write(&path, &rendered).expect("writing the rendered user data");

    let output = run(Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&path));

    assert!(
        output.status.success(),
        "cloud-init schema rejected the rendered template:\n{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(
        text(&output.stdout).contains("Valid cloud-config"),
        "unexpected cloud-init schema output:\n{}",
        text(&output.stdout)
    );
}

#[test]
fn rendered_secrets_stay_in_env_files() {
    let dir = TempDir::new("cloud-init-secrets");
    let user_data = UserData::parse(&render_template(), dir.path());
    let secrets: Vec<&str> = SAMPLE_VALUES
        .iter()
        .filter(|(_, _, secret)| *secret)
        .map(|(_, value, _)| *value)
        .collect();

    assert!(!user_data.runcmd.is_empty(), "the template has no runcmd");
    for line in user_data.runcmd.iter().chain(&user_data.bootcmd) {
        assert!(
            !line.contains("{{"),
            "a command line holds a placeholder: {line}"
        );
        for secret in &secrets {
            assert!(
                !line.contains(secret),
                "a runcmd or bootcmd line holds a secret: {line}"
            );
        }
    }

    for file in &user_data.files {
        let holds_secret = secrets.iter().any(|secret| file.content.contains(secret));
        if holds_secret {
            assert!(
                file.path.starts_with("/opt/matrix/env/") && file.path.ends_with(".env"),
                "{} holds a secret outside /opt/matrix/env/",
                file.path
            );
        }
        if file.path.starts_with("/opt/matrix/env/") {
            assert_eq!(file.owner, "root:matrix", "owner of {}", file.path);
            assert_eq!(file.permissions, "0640", "permissions of {}", file.path);
            // The matrix group exists only after users-groups has run.
            assert!(file.defer, "{} is not deferred", file.path);
        }
    }
}

#[test]
fn rendered_env_files_hold_exact_values() {
    let dir = TempDir::new("cloud-init-env");
    let user_data = UserData::parse(&render_template(), dir.path());
    let expected = [
        ("host.env", "MATRIX_MACHINE_ID", "machineId"),
        ("host.env", "MATRIX_CLERK_USER_ID", "clerkUserId"),
        ("host.env", "MATRIX_HANDLE", "handle"),
        ("host.env", "MATRIX_IMAGE_VERSION", "imageVersion"),
        (
            "host.env",
            "MATRIX_PLATFORM_REGISTER_URL",
            "platformRegisterUrl",
        ),
        ("host.env", "MATRIX_HOST_BUNDLE_URL", "hostBundleUrl"),
        ("r2.env", "MATRIX_R2_BUCKET", "r2Bucket"),
        ("r2.env", "MATRIX_R2_PREFIX", "r2Prefix"),
        ("r2.env", "R2_ENDPOINT", "r2Endpoint"),
        ("r2.env", "AWS_ACCESS_KEY_ID", "r2AccessKeyId"),
        ("r2.env", "AWS_SECRET_ACCESS_KEY", "r2SecretAccessKey"),
        ("postgres.env", "POSTGRES_PASSWORD", "postgresPassword"),
        (
            "registration.env",
            "MATRIX_REGISTRATION_TOKEN",
            "registrationToken",
        ),
    ];

    for (env_file, variable, placeholder) in expected {
        let path = format!("/opt/matrix/env/{env_file}");
        let file = user_data
            .files
            .iter()
            .find(|file| file.path == path)
            .unwrap_or_else(|| panic!("the template writes no {path}"));
        let value = sourced_value(&file.local, variable);
        assert_eq!(
            value,
            sample_value(placeholder),
            "{variable} in {path}, read by sh"
        );
    }
}

#[test]
fn template_scripts_parse_without_tracing() {
    let dir = TempDir::new("cloud-init-scripts");
    let user_data = UserData::parse(&render_template(), dir.path());
    let scripts: Vec<&WrittenFile> = user_data
        .files
        .iter()
        .filter(|file| file.content.starts_with("#!/bin/sh"))
        .collect();

    assert!(
        scripts.len() >= 2,
        "expected matrix-db-setup and matrix-host-setup in write_files"
    );
    for script in scripts {
        let output = run(Command::new("sh").arg("-n").arg(&script.local));
        assert!(
            output.status.success(),
            "{} has a syntax error:\n{}",
            script.path,
            text(&output.stderr)
        );
        assert!(
            !script.content.lines().any(|line| {
                let line = line.trim();
                line.starts_with("set -") && line.contains('x')
            }),
            "{} turns on command tracing, which would print secrets",
            script.path
        );
        assert_eq!(script.owner, "root:root", "owner of {}", script.path);
        assert_eq!(script.permissions, "0700", "permissions of {}", script.path);
    }
}

// --------------------------------------------------------------- bundle

#[test]
fn bundle_is_reproducible() {
    // Two builds back to back, so that no commit lands in between.
    let mut bundle = Bundle::lock();
    bundle.rebuild();
    let first = bundle.read_build();
    bundle.rebuild();
    let second = bundle.read_build();

    // The MANIFEST names the file that differs, if one does.
    assert_eq!(first.manifest, second.manifest, "MANIFEST of two builds");
    assert!(
        first.tarball == second.tarball,
        "two bundle builds differ byte for byte"
    );
    assert_eq!(first.checksum, second.checksum, ".sha256 of two builds");
}

#[test]
fn bundle_checksum_file_verifies() {
    let bundle = Bundle::lock();
    let checksum = fs::read_to_string(bundle.checksum_file()).expect("reading .sha256");

    let (hex, name) = checksum
        .trim_end_matches('\n')
        .split_once("  ")
        .unwrap_or_else(|| panic!("malformed checksum file: {checksum:?}"));
    assert_eq!(hex.len(), 64, "checksum {hex:?}");
    assert!(hex
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(name, BUNDLE_NAME);

    let output = run(Command::new("sha256sum")
        .args(["--check", "--strict"])
        .arg(bundle.checksum_file())
        .current_dir(bundle.dist_dir()));
    assert!(
        output.status.success(),
        "sha256sum --check failed:\n{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

#[test]
fn bundle_holds_exactly_the_host_files() {
    let bundle = Bundle::lock();
    let output = run(Command::new("tar")
        .args(["--list", "--verbose", "--numeric-owner", "--gzip", "--file"])
        .arg(bundle.tarball()));
    assert!(output.status.success(), "tar --list failed");
    drop(bundle);

    let listing: BTreeMap<String, (String, String)> = text(&output.stdout)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = fields.last().expect("a tar entry name").to_string();
            (name, (fields[0].to_string(), fields[1].to_string()))
        })
        .collect();
    let expected = [
        ("matrix-host-bundle/", "drwxr-xr-x"),
        ("matrix-host-bundle/MANIFEST", "-rw-r--r--"),
        ("matrix-host-bundle/bin/", "drwxr-xr-x"),
        ("matrix-host-bundle/bin/matrix-agent", "-rwxr-xr-x"),
        ("matrix-host-bundle/install.sh", "-rwxr-xr-x"),
        ("matrix-host-bundle/units/", "drwxr-xr-x"),
        (
            "matrix-host-bundle/units/matrix-db-backup.service",
            "-rw-r--r--",
        ),
        (
            "matrix-host-bundle/units/matrix-db-backup.timer",
            "-rw-r--r--",
        ),
        (
            "matrix-host-bundle/units/matrix-gateway.service.d/",
            "drwxr-xr-x",
        ),
        (
            "matrix-host-bundle/units/matrix-gateway.service.d/10-restore-gate.conf",
            "-rw-r--r--",
        ),
        (
            "matrix-host-bundle/units/matrix-heartbeat.service",
            "-rw-r--r--",
        ),
        (
            "matrix-host-bundle/units/matrix-restore.service",
            "-rw-r--r--",
        ),
    ];

    let names: Vec<&str> = listing.keys().map(String::as_str).collect();
    let expected_names: Vec<&str> = expected.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, expected_names, "entries of {BUNDLE_NAME}");
    for (name, mode) in expected {
        let (actual_mode, owner) = &listing[name];
        assert_eq!(actual_mode, mode, "mode of {name}");
        assert_eq!(owner, "0/0", "owner of {name}");
    }
}

#[test]
fn bundle_manifest_lists_every_file() {
    let dir = TempDir::new("bundle-manifest");
    let bundle_dir = Bundle::lock().unpack(dir.path());
    let manifest = fs::read_to_string(bundle_dir.join("MANIFEST")).expect("reading MANIFEST");

    let version = manifest
        .lines()
        .find_map(|line| line.strip_prefix("# version: "))
        .expect("MANIFEST names no version");
    assert!(!version.is_empty(), "MANIFEST has an empty version");

    let listed: BTreeSet<&str> = manifest
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split_once("  ").expect("a checksum line").1)
        .collect();
    let files: BTreeSet<String> = walk(&bundle_dir)
        .into_iter()
        .filter(|path| path.is_file() && !path.ends_with("MANIFEST"))
        .map(|path| relative(&bundle_dir, &path))
        .collect();
    let files: BTreeSet<&str> = files.iter().map(String::as_str).collect();
    assert_eq!(listed, files, "files the MANIFEST lists");

    let output = run(Command::new("sha256sum")
        .args(["--check", "--strict", "MANIFEST"])
        .current_dir(&bundle_dir));
    assert!(
        output.status.success(),
        "the MANIFEST does not match the files:\n{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

// -------------------------------------------------------------- install

#[test]
fn install_creates_documented_tree() {
    require_root();
    let dir = TempDir::new("install-tree");
    let bundle_dir = Bundle::lock().unpack(&dir.path().join("unpacked"));
    let root = seeded_root(dir.path());

    let output = install(&bundle_dir, &root);
    assert!(
        output.status.success(),
        "install.sh failed:\n{}",
        text(&output.stderr)
    );

    let passwd = fs::read_to_string(root.join("etc/passwd")).expect("reading etc/passwd");
    let entry: Vec<&str> = passwd
        .lines()
        .find(|line| line.starts_with("matrix:"))
        .expect("install.sh created no matrix user")
        .split(':')
        .collect();
    let uid: u32 = entry[2].parse().expect("a numeric uid");
    let gid = group_id(&root, "matrix");
    assert!(uid < 1000, "matrix has uid {uid}, not a system uid");
    assert_eq!(entry[5], "/var/lib/matrix", "home of matrix");
    assert_eq!(entry[6], "/usr/sbin/nologin", "shell of matrix");

    let expected = [
        ("opt/matrix", 0, gid, 0o1775),
        ("opt/matrix/bin", 0, 0, 0o755),
        ("opt/matrix/bin/matrix-agent", 0, 0, 0o755),
        ("opt/matrix/env", 0, gid, 0o750),
        ("var/lib/matrix", uid, gid, 0o750),
        ("etc/systemd/system/matrix-restore.service", 0, 0, 0o644),
        ("etc/systemd/system/matrix-db-backup.service", 0, 0, 0o644),
        ("etc/systemd/system/matrix-db-backup.timer", 0, 0, 0o644),
        ("etc/systemd/system/matrix-heartbeat.service", 0, 0, 0o644),
        ("etc/systemd/system/matrix-gateway.service.d", 0, 0, 0o755),
        (
            "etc/systemd/system/matrix-gateway.service.d/10-restore-gate.conf",
            0,
            0,
            0o644,
        ),
    ];
    for (path, uid, gid, mode) in expected {
        let metadata = fs::symlink_metadata(root.join(path))
            .unwrap_or_else(|error| panic!("{path} is missing: {error}"));
        assert_eq!(metadata.uid(), uid, "owner of {path}");
        assert_eq!(metadata.gid(), gid, "group of {path}");
        assert_eq!(
            metadata.permissions().mode() & 0o7777,
            mode,
            "mode of {path}"
        );
    }

    let installed_pairs = [
        ("opt/matrix/bin/matrix-agent", "bin/matrix-agent"),
        (
            "etc/systemd/system/matrix-restore.service",
            "units/matrix-restore.service",
        ),
        (
            "etc/systemd/system/matrix-gateway.service.d/10-restore-gate.conf",
            "units/matrix-gateway.service.d/10-restore-gate.conf",
        ),
    ];
    for (installed, shipped) in installed_pairs {
        assert!(
            fs::read(root.join(installed)).ok() == fs::read(bundle_dir.join(shipped)).ok(),
            "{installed} differs from the bundle's {shipped}"
        );
    }

    for (link, unit) in [
        ("multi-user.target.wants", "matrix-restore.service"),
        ("multi-user.target.wants", "matrix-heartbeat.service"),
        ("timers.target.wants", TIMER),
    ] {
        let target = fs::read_link(root.join("etc/systemd/system").join(link).join(unit))
            .unwrap_or_else(|error| panic!("{unit} is not enabled in {link}: {error}"));
        assert_eq!(target, Path::new("/etc/systemd/system").join(unit));
    }
    assert!(
        !root.join("opt/matrix/restore-complete").exists(),
        "install.sh created the restore marker"
    );
}

#[test]
fn install_second_run_changes_nothing() {
    require_root();
    let dir = TempDir::new("install-again");
    let bundle_dir = Bundle::lock().unpack(&dir.path().join("unpacked"));
    let root = seeded_root(dir.path());
    assert!(
        install(&bundle_dir, &root).status.success(),
        "first install failed"
    );

    // What the host contains by the time of a bundle update, which the
    // installer must leave as it is.
    let gid = group_id(&root, "matrix");
    let marker = root.join("opt/matrix/restore-complete");
    fs::write(&marker, "restored 2026-04-26T1800Z\n").expect("writing the marker");
    fs::set_permissions(&marker, fs::Permissions::from_mode(0o600)).expect("chmod marker");
    let env_file = root.join("opt/matrix/env/postgres.env");
    fs::write(&env_file, "POSTGRES_PASSWORD='kept'\n").expect("writing an env file");
    std::os::unix::fs::chown(&env_file, Some(0), Some(gid)).expect("chown env file");
    fs::set_permissions(&env_file, fs::Permissions::from_mode(0o640)).expect("chmod env file");
    fs::write(root.join("var/lib/matrix/last-backup.json"), "{}\n").expect("writing state");

    let before = tree_listing(&root);
    let output = install(&bundle_dir, &root);
    let after = tree_listing(&root);

    assert!(
        output.status.success(),
        "second install failed:\n{}",
        text(&output.stderr)
    );
    assert_eq!(before, after, "the second install changed the tree");
    assert!(
        text(&output.stderr).contains("nothing changed"),
        "install.sh did not report an unchanged host:\n{}",
        text(&output.stderr)
    );
}

#[test]
fn install_upgrade_keeps_marker_and_state() {
    require_root();
    let dir = TempDir::new("install-upgrade");
    let bundle_dir = Bundle::lock().unpack(&dir.path().join("unpacked"));
    let root = seeded_root(dir.path());
    assert!(
        install(&bundle_dir, &root).status.success(),
        "first install failed"
    );

    let marker = root.join("opt/matrix/restore-complete");
    fs::write(&marker, "restored 2026-04-26T1800Z\n").expect("writing the marker");
    let env_file = root.join("opt/matrix/env/postgres.env");
    fs::write(&env_file, "POSTGRES_PASSWORD='kept'\n").expect("writing an env file");
    let state_file = root.join("var/lib/matrix/last-backup.json");
    fs::write(&state_file, "{}\n").expect("writing state");
    let kept = [&marker, &env_file, &state_file].map(|path| tree_entry(&root, path));

    // A newer bundle: one unit changed, its MANIFEST line updated.
    let unit = bundle_dir.join("units/matrix-restore.service");
    let mut content = fs::read_to_string(&unit).expect("reading the unit");
    content.push_str("# A newer release.\n");
    fs::write(&unit, &content).expect("changing the unit");
    rewrite_manifest_line(&bundle_dir, "units/matrix-restore.service");

    let output = install(&bundle_dir, &root);

    assert!(
        output.status.success(),
        "the upgrade failed:\n{}",
        text(&output.stderr)
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/systemd/system/matrix-restore.service")).ok(),
        Some(content),
        "the upgrade did not install the changed unit"
    );
    for (path, before) in [&marker, &env_file, &state_file].iter().zip(kept) {
        assert_eq!(
            tree_entry(&root, path),
            before,
            "the upgrade changed {}",
            path.display()
        );
    }
}

#[test]
fn install_keeps_modes_of_system_dirs() {
    require_root();
    let dir = TempDir::new("install-system-dirs");
    let bundle_dir = Bundle::lock().unpack(&dir.path().join("unpacked"));
    let root = seeded_root(dir.path());
    let opt = root.join("opt");
    fs::create_dir(&opt).expect("creating opt");
    fs::set_permissions(&opt, fs::Permissions::from_mode(0o711)).expect("chmod opt");

    let output = install(&bundle_dir, &root);

    assert!(
        output.status.success(),
        "install.sh failed:\n{}",
        text(&output.stderr)
    );
    let mode = fs::metadata(&opt)
        .expect("reading opt")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o711, "install.sh changed the mode of /opt");
}

#[test]
fn install_rejects_tampered_bundle() {
    require_root();
    let dir = TempDir::new("install-tampered");
    let bundle_dir = Bundle::lock().unpack(&dir.path().join("unpacked"));
    let root = seeded_root(dir.path());
    let unit = bundle_dir.join("units/matrix-restore.service");
    let mut content = fs::read_to_string(&unit).expect("reading the unit");
    content.push_str("ExecStartPre=/bin/true\n");
    fs::write(&unit, content).expect("tampering with the unit");

    let output = install(&bundle_dir, &root);

    assert!(
        !output.status.success(),
        "install.sh accepted a bundle that does not match its MANIFEST"
    );
    assert!(
        text(&output.stderr).contains("does not match its MANIFEST"),
        "unexpected message:\n{}",
        text(&output.stderr)
    );
    assert!(
        !root.join("opt").exists(),
        "install.sh installed files from a tampered bundle"
    );
}

// ------------------------------------------------------------- helpers

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn read_repo_file(path: &str) -> String {
    fs::read_to_string(repo_root().join(path))
        .unwrap_or_else(|error| panic!("reading {path}: {error}"))
}

/// Runs a command, panicking with a hint when the tool is not installed.
fn run(command: &mut Command) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    command.output().unwrap_or_else(|error| {
        panic!("cannot run {program}: {error}; run scripts/install-test-tools.sh")
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn require_root() {
    let output = run(Command::new("id").arg("-u"));
    assert_eq!(
        text(&output.stdout).trim(),
        "0",
        "the install tests set owners and must run as root"
    );
}

/// A directory under the system temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "matrix-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).unwrap_or_else(|error| panic!("creating {path:?}: {error}"));
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Lists every path under `dir`, depth first, without following symlinks.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("listing {dir:?}: {error}"))
        .map(|entry| entry.expect("reading a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        let is_dir = fs::symlink_metadata(&path)
            .map(|metadata| metadata.is_dir())
            .unwrap_or(false);
        paths.push(path.clone());
        if is_dir {
            paths.extend(walk(&path));
        }
    }
    paths
}

fn relative(base: &Path, path: &Path) -> String {
    path.strip_prefix(base)
        .expect("a path under the base")
        .display()
        .to_string()
}

// ------------------------------------------------------- unit helpers

/// Copies the units into `dir` with ExecStart pointed at /bin/true, and
/// adds a stand-in matrix-gateway.service for the drop-in to extend.
/// Returns the paths of the copied unit files.
fn stage_units(dir: &Path) -> Vec<PathBuf> {
    let mut staged = Vec::new();
    for unit in SERVICES.iter().chain([&TIMER]) {
        let content = read_repo_file(&format!("units/{unit}"))
            .replace("/opt/matrix/bin/matrix-agent", "/bin/true");
        let path = dir.join(unit);
        fs::write(&path, content).expect("staging a unit");
        staged.push(path);
    }
    fs::create_dir(dir.join("matrix-gateway.service.d")).expect("creating the drop-in dir");
    fs::write(
        dir.join(DROP_IN),
        read_repo_file(&format!("units/{DROP_IN}")),
    )
    .expect("staging the drop-in");
    fs::write(
        dir.join("matrix-gateway.service"),
        "[Unit]\nDescription=Stand-in for the Matrix gateway\n\n\
         [Service]\nExecStart=/bin/true\n",
    )
    .expect("writing the stand-in gateway unit");
    staged
}

/// Parses "→ Overall exposure level for X.service: 1.2 OK".
fn overall_exposure(report: &str) -> Option<f64> {
    report
        .lines()
        .find(|line| line.contains("Overall exposure level for"))
        .and_then(|line| line.rsplit_once(": "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|figure| figure.parse().ok())
}

/// Reads a unit file as (key, value) pairs, without comments and section
/// headers.
fn read_unit(path: &str) -> Vec<(String, String)> {
    read_repo_file(&format!("units/{path}"))
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
        .collect()
}

fn values(unit: &[(String, String)], key: &str) -> Vec<String> {
    unit.iter()
        .filter(|(name, _)| name == key)
        .map(|(_, value)| value.clone())
        .collect()
}

fn assert_has(unit: &[(String, String)], key: &str, value: &str) {
    let found = values(unit, key);
    assert!(
        found.iter().any(|found| found == value),
        "expected {key}={value}, found {found:?}"
    );
}

// ------------------------------------------------- cloud-init helpers

fn sample_value(placeholder: &str) -> &'static str {
    SAMPLE_VALUES
        .iter()
        .find(|(name, _, _)| *name == placeholder)
        .map(|(_, value, _)| *value)
        .unwrap_or_else(|| panic!("no sample value for {placeholder}"))
}

/// Names written as `{{name}}` in `template`.
fn placeholders(template: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").expect("an unclosed placeholder");
        names.insert(after[..end].to_string());
        rest = &after[end + 2..];
    }
    names
}

/// Renders the template with the sample values, replacing every
/// placeholder as the platform does.
fn render_template() -> String {
    let mut rendered = read_repo_file("cloud-init/user-data.yaml.tmpl");
    for (name, value, _) in SAMPLE_VALUES {
        rendered = rendered.replace(&format!("{{{{{name}}}}}"), value);
    }
    rendered
}

struct WrittenFile {
    path: String,
    owner: String,
    permissions: String,
    defer: bool,
    content: String,
    /// A copy of the content in the test's temporary directory.
    local: PathBuf,
}

/// The parts of rendered user data that the tests inspect, read with
/// PyYAML (as cloud-init reads it).
struct UserData {
    runcmd: Vec<String>,
    bootcmd: Vec<String>,
    files: Vec<WrittenFile>,
}

const EXTRACT_USER_DATA: &str = r#"
import os, sys, yaml
data = yaml.safe_load(open(sys.argv[1]))
out = sys.argv[2]
def command(item):
    return item if isinstance(item, str) else " ".join(str(part) for part in item)
for key in ("runcmd", "bootcmd"):
    for item in data.get(key) or []:
        print(key + "\t" + command(item).replace("\n", "\\n"))
for index, entry in enumerate(data.get("write_files") or []):
    local = os.path.join(out, "file-%d" % index)
    with open(local, "w") as handle:
        handle.write(entry.get("content", ""))
    print("\t".join(["file", entry["path"], entry.get("owner", ""),
                     str(entry.get("permissions", "")),
                     str(entry.get("defer", False)), local]))
"#;

impl UserData {
    fn parse(rendered: &str, dir: &Path) -> UserData {
        let yaml = dir.join("user-data.yaml");
        fs::write(&yaml, rendered).expect("writing the rendered user data");
        let files_dir = dir.join("files");
        fs::create_dir(&files_dir).expect("creating the files directory");
        let output = run(Command::new("/usr/bin/python3")
            .args(["-c", EXTRACT_USER_DATA])
            .arg(&yaml)
            .arg(&files_dir));
        assert!(
            output.status.success(),
            "reading the user data with PyYAML failed:\n{}",
            text(&output.stderr)
        );

        let mut user_data = UserData {
            runcmd: Vec::new(),
            bootcmd: Vec::new(),
            files: Vec::new(),
        };
        for line in text(&output.stdout).lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            match fields[0] {
                "runcmd" => user_data.runcmd.push(fields[1].to_string()),
                "bootcmd" => user_data.bootcmd.push(fields[1].to_string()),
                "file" => {
                    let local = PathBuf::from(fields[5]);
                    user_data.files.push(WrittenFile {
                        path: fields[1].to_string(),
                        owner: fields[2].to_string(),
                        permissions: fields[3].to_string(),
                        defer: fields[4] == "True",
                        content: fs::read_to_string(&local).expect("reading a written file"),
                        local,
                    });
                }
                other => panic!("unexpected extractor output {other:?}"),
            }
        }
        user_data
    }
}

/// Returns the value of `variable` after sh sources `env_file`, as the
/// setup scripts do.
fn sourced_value(env_file: &Path, variable: &str) -> String {
    let output = run(Command::new("sh")
        .arg("-c")
        .arg(format!(". \"$1\" && printf '%s' \"${variable}\""))
        .arg("sh")
        .arg(env_file));
    assert!(
        output.status.success(),
        "sh cannot source {env_file:?}:\n{}",
        text(&output.stderr)
    );
    text(&output.stdout)
}

// ----------------------------------------------------- bundle helpers

/// Set once scripts/bundle.sh has run in this test process.
static BUNDLE_BUILT: Mutex<bool> = Mutex::new(false);

/// Exclusive use of build/bundle/ and dist/, built at least once.
struct Bundle {
    _guard: MutexGuard<'static, bool>,
}

impl Bundle {
    fn lock() -> Bundle {
        let mut built = BUNDLE_BUILT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !*built {
            run_bundle_script();
            *built = true;
        }
        Bundle { _guard: built }
    }

    fn rebuild(&mut self) {
        run_bundle_script();
    }

    /// Reads dist/ and the MANIFEST inside the tarball. bundle.sh replaces
    /// each file in dist/ by a rename, so a build running in another test
    /// process never shows a half-written one.
    fn read_build(&self) -> BuildOutput {
        let dir = TempDir::new("bundle-build");
        let bundle_dir = self.unpack(dir.path());
        BuildOutput {
            tarball: fs::read(self.tarball()).expect("reading the tarball"),
            checksum: fs::read_to_string(self.checksum_file()).expect("reading .sha256"),
            manifest: fs::read_to_string(bundle_dir.join("MANIFEST"))
                .expect("reading the MANIFEST"),
        }
    }

    fn dist_dir(&self) -> PathBuf {
        repo_root().join("dist")
    }

    fn tarball(&self) -> PathBuf {
        self.dist_dir().join(BUNDLE_NAME)
    }

    fn checksum_file(&self) -> PathBuf {
        self.dist_dir().join(format!("{BUNDLE_NAME}.sha256"))
    }

    /// Unpacks the tarball into `dir` as cloud-init does, and returns the
    /// bundle directory in it.
    fn unpack(&self, dir: &Path) -> PathBuf {
        fs::create_dir_all(dir).expect("creating the unpack directory");
        let output = run(Command::new("tar")
            .args(["--extract", "--gzip", "--file"])
            .arg(self.tarball())
            .arg("--directory")
            .arg(dir));
        assert!(
            output.status.success(),
            "unpacking the bundle failed:\n{}",
            text(&output.stderr)
        );
        dir.join("matrix-host-bundle")
    }
}

/// What one `make bundle` leaves in dist/.
struct BuildOutput {
    tarball: Vec<u8>,
    checksum: String,
    manifest: String,
}

fn run_bundle_script() {
    let output = run(Command::new("make")
        .args(["--no-print-directory", "bundle"])
        .current_dir(repo_root()));
    assert!(
        output.status.success(),
        "make bundle failed:\n{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

// ---------------------------------------------------- install helpers

/// Creates an install root that contains only etc/passwd and etc/group with
/// root in them, as install.sh --root requires.
fn seeded_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("etc")).expect("creating the install root");
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .expect("writing etc/passwd");
    fs::write(root.join("etc/group"), "root:x:0:\n").expect("writing etc/group");
    root
}

fn install(bundle_dir: &Path, root: &Path) -> Output {
    run(Command::new(bundle_dir.join("install.sh"))
        .arg("--root")
        .arg(root))
}

fn group_id(root: &Path, name: &str) -> u32 {
    fs::read_to_string(root.join("etc/group"))
        .expect("reading etc/group")
        .lines()
        .find(|line| line.starts_with(&format!("{name}:")))
        .and_then(|line| line.split(':').nth(2))
        .and_then(|gid| gid.parse().ok())
        .unwrap_or_else(|| panic!("no group {name} in the install root"))
}

/// Returns the line of [`tree_listing`] for `path`.
fn tree_entry(root: &Path, path: &Path) -> String {
    let name = relative(root, path);
    tree_listing(root)
        .into_iter()
        .find(|line| line.split(' ').next() == Some(name.as_str()))
        .unwrap_or_else(|| panic!("{name} is missing from the install root"))
}

/// Replaces the MANIFEST line of `file` with the file's current SHA-256.
fn rewrite_manifest_line(bundle_dir: &Path, file: &str) {
    let output = run(Command::new("sha256sum").arg(file).current_dir(bundle_dir));
    assert!(output.status.success(), "sha256sum {file} failed");
    let new_line = text(&output.stdout).trim_end().to_string();
    let manifest_path = bundle_dir.join("MANIFEST");
    let manifest = fs::read_to_string(&manifest_path).expect("reading MANIFEST");
    let suffix = format!("  {file}");
    assert!(
        manifest.lines().any(|line| line.ends_with(&suffix)),
        "MANIFEST does not list {file}"
    );
    let rewritten: String = manifest
        .lines()
        .map(|line| {
            if line.ends_with(&suffix) {
                format!("{new_line}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    fs::write(&manifest_path, rewritten).expect("writing MANIFEST");
}

/// Lists one line per path under `root`: type and mode, owner, and the SHA-256
/// of a file or the target of a symlink.
fn tree_listing(root: &Path) -> Vec<String> {
    let paths = walk(root);
    let files: Vec<&PathBuf> = paths
        .iter()
        .filter(|path| fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file()))
        .collect();
    let mut checksums = BTreeMap::new();
    if !files.is_empty() {
        let output = run(Command::new("sha256sum").args(&files));
        assert!(output.status.success(), "sha256sum failed");
        for line in text(&output.stdout).lines() {
            let (hex, path) = line.split_once("  ").expect("a sha256sum line");
            checksums.insert(PathBuf::from(path), hex.to_string());
        }
    }

    paths
        .iter()
        .map(|path| {
            let metadata = fs::symlink_metadata(path).expect("reading metadata");
            let content = if metadata.file_type().is_symlink() {
                format!("-> {}", fs::read_link(path).expect("a link").display())
            } else {
                checksums.get(path).cloned().unwrap_or_default()
            };
            format!(
                "{} {:o} {}:{} {}",
                relative(root, path),
                metadata.mode(),
                metadata.uid(),
                metadata.gid(),
                content
            )
        })
        .collect()
}
