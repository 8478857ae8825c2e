# shellcheck shell=bash
# The five first-boot scenarios. Each function returns 0 when every check
# held, and otherwise calls `fail` with the first check that did not and
# returns 1. run_scenario in run.sh prints the PASS or FAIL line.

SCENARIO_FAILURE=""
# The restored host of replacement-host, which reboot-of-restored-host
# boots again. Empty when that scenario did not get as far as a restore.
REPLACEMENT_ROOT=""
REPLACEMENT_RESTORE_RESULT=""

fail() {
    # shellcheck disable=SC2034 # run_scenario in run.sh prints it
    SCENARIO_FAILURE=$1
    return 1
}

readonly LATEST_KEY=system/db/latest
readonly META_KEY=system/vps-meta.json
readonly SNAPSHOT_KEY_PATTERN='^system/db/snapshots/[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{4}Z\.dump$'
# How long cloud-init may take on a first boot: apt-get update, PostgreSQL
# setup, the bundle download and the restore.
readonly CLOUD_INIT_LIMIT=420

# Starts moto on a free port with the customer's empty bucket.
start_bucket() {
    local port
    port=$(free_port)
    S3_ENDPOINT="http://127.0.0.1:$port"
    start_moto "$port" "$SCENARIO_LOGS/moto.log" || return 1
    bucket create-bucket
}

# Puts the known database into the bucket as its only snapshot, an hour
# old, with `latest` pointing at it and vps-meta.json naming the machine
# this host replaces. Sets SEEDED_SNAPSHOT to the snapshot's relative key.
seed_replaced_host() {
    local stamp previous
    stamp=$(date -u -d '-1 hour' +%Y-%m-%dT%H%MZ)
    SEEDED_SNAPSHOT="system/db/snapshots/$stamp.dump"
    previous=$("$E2E_PYTHON" -c 'import uuid; print(uuid.uuid4())')
    bucket put "$PREFIX$SEEDED_SNAPSHOT" "$E2E_KNOWN/known.dump" || return 1
    printf '%s\n' "$SEEDED_SNAPSHOT" | bucket put "$PREFIX$LATEST_KEY" - || return 1
    cat <<META | bucket put "$PREFIX$META_KEY" -
{
  "version": 1,
  "userId": "$USER_ID",
  "machineId": "$previous",
  "hetznerServerId": 11111111,
  "imageVersion": "matrix-os-host-2026.01.01-1",
  "status": "running",
  "provisionedAt": "2026-01-01T10:00:00Z",
  "lastSyncAt": "$(date -u -d '-2 hours' +%Y-%m-%dT%H:%M:%SZ)",
  "publicIPv4": "198.51.100.7"
}
META
}

# Copies the cached tree for scenario $1, boots it and waits for cloud-init.
# Sets CLOUD_INIT_STATUS to cloud-init's final status line.
boot_new_host() {
    local name=$1
    prepare_root "$name"
    boot_container "$name" "$SCENARIO_LOGS/console.log" ||
        fail "the container did not start; see $SCENARIO_LOGS/console.log" || return 1
    CLOUD_INIT_STATUS=$(wait_for_cloud_init "$CLOUD_INIT_LIMIT")
    say "$name: cloud-init finished with '$CLOUD_INIT_STATUS'"
}

gate_open() {
    in_container test -f /opt/matrix/restore-complete &&
        ! in_container test -L /opt/matrix/restore-complete
}

gateway_started() {
    in_container test -s /var/lib/matrix-e2e/gateway-starts
}

# Prints the digest of the customer database in the container.
database_digest() {
    in_container runuser -u postgres -- env PGTZ=UTC PGDATESTYLE=ISO \
        psql -X -At -d matrix -c "$KNOWN_DATABASE_DIGEST_SQL"
}

check_database_matches() {
    local digest
    digest=$(database_digest 2>&1) || true
    [ "$digest" = "$(cat "$E2E_KNOWN/known.digest")" ] ||
        fail "the database differs from the known database: digest '$digest'"
}

# Checks that this boot's journal shows matrix-restore.service finished
# before matrix-gateway.service started.
check_restore_before_gateway() {
    local order
    if ! order=$(in_container journalctl -b 0 -o json --no-pager \
        -u matrix-restore.service -u matrix-gateway.service |
        "$E2E_PYTHON" "$E2E_DIR/checks.py" order \
            matrix-restore.service matrix-gateway.service 2>&1); then
        fail "restore before gateway: $order"
    fi
}

check_one_registration() {
    local result
    # The heartbeat registers after the gate opened; give it a moment.
    wait_until 60 registered_at_least 1 || true
    result=$(E2E_TOKEN=$TOKEN E2E_MACHINE_ID=$MACHINE_ID E2E_SERVER_ID=$SERVER_ID \
        E2E_PUBLIC_IPV4=$PUBLIC_IPV4 E2E_PUBLIC_IPV6=$PUBLIC_IPV6 \
        E2E_IMAGE_VERSION=$IMAGE_VERSION \
        "$E2E_PYTHON" "$E2E_DIR/checks.py" registration "$PLATFORM_REQUESTS" 2>&1) ||
        fail "registration: $result"
}

registration_count() {
    "$E2E_PYTHON" "$E2E_DIR/checks.py" registrations "$PLATFORM_REQUESTS"
}

registered_at_least() {
    [ "$(registration_count)" -ge "$1" ]
}

# Succeeds when vps-meta.json names this machine with a lastSyncAt at most
# $1 seconds old; "refreshed" as $2 also requires the heartbeat's update.
meta_is_fresh() {
    local file="$SCENARIO_LOGS/vps-meta.json"
    bucket get "$PREFIX$META_KEY" >"$file" 2>/dev/null || return 1
    E2E_USER_ID=$USER_ID E2E_MACHINE_ID=$MACHINE_ID \
        "$E2E_PYTHON" "$E2E_DIR/checks.py" meta "$file" "$1" ${2:+"$2"} 2>"$SCENARIO_LOGS/vps-meta.check"
}

check_meta_fresh() {
    wait_until 40 meta_is_fresh "$@" ||
        fail "vps-meta.json: $(cat "$SCENARIO_LOGS/vps-meta.check" 2>/dev/null || echo 'not readable')"
}

# Prints the relative key that system/db/latest names, or nothing.
latest_snapshot() {
    bucket get "$PREFIX$LATEST_KEY" 2>/dev/null | tr -d '[:space:]'
}

# Runs one backup by hand and checks that latest moved to a new, valid,
# existing snapshot newer than $1 (a relative key, or empty for none).
check_backup_moves_latest() {
    local before=$1 after output
    if ! output=$(in_container systemctl start matrix-db-backup.service 2>&1); then
        fail "matrix-db-backup.service failed: $output; journal: $(in_container \
            journalctl -b 0 -u matrix-db-backup.service -n 5 -o cat --no-pager | tr '\n' ' ')"
        return 1
    fi
    after=$(latest_snapshot)
    [[ $after =~ $SNAPSHOT_KEY_PATTERN ]] ||
        fail "after the backup, latest names '$after', not a snapshot key" || return 1
    bucket list "$PREFIX$after" | grep -qx "$PREFIX$after" ||
        fail "latest names $after, which does not exist" || return 1
    if [ -n "$before" ] && ! [[ $after > $before ]]; then
        fail "latest moved from $before to $after, which is not newer"
    fi
}

# Checks that no secret of the customer appears in this boot's journal
# (with every field, command lines included), in cloud-init's logs, or in
# any world-readable file cloud-init left under /run/cloud-init.
check_no_secret_in_logs() {
    local secret found=""
    in_container journalctl -b 0 -o verbose --no-pager >"$SCENARIO_LOGS/journal-verbose.txt" 2>&1
    for secret in "$TOKEN" "$POSTGRES_PASSWORD" "$SECRET_ACCESS_KEY"; do
        if grep -qF -- "$secret" "$SCENARIO_LOGS/journal-verbose.txt"; then
            found="$found journal"
        fi
        # shellcheck disable=SC2016 # $1 is expanded by the container's sh
        if in_container sh -c 'grep -rlF -- "$1" /var/log/cloud-init.log \
            /var/log/cloud-init-output.log 2>/dev/null; find /run/cloud-init -type f \
            -perm -o+r -exec grep -lF -- "$1" {} + 2>/dev/null' sh "$secret" | grep -q .; then
            found="$found cloud-init-files"
        fi
    done
    [ -z "$found" ] || fail "a secret of the customer appears in:$found"
}

scenario_first_install() {
    new_customer
    start_bucket || fail "moto_server did not start" || return 1
    start_platform "$BUNDLE_DIR" "$SCENARIO_LOGS" ||
        fail "the fake platform did not start" || return 1
    boot_new_host first-install || return 1

    [ "$CLOUD_INIT_STATUS" = "status: done" ] ||
        fail "cloud-init ended with '$CLOUD_INIT_STATUS'" || return 1
    gate_open || fail "the restore marker was not written" || return 1
    in_container journalctl -b 0 -u matrix-restore.service -o cat --no-pager |
        grep -q "fresh host" ||
        fail "matrix-restore did not report a fresh host" || return 1
    gateway_started || fail "the gateway did not start" || return 1
    check_restore_before_gateway || return 1
    check_one_registration || return 1
    check_meta_fresh 120 || return 1
    [ -z "$(latest_snapshot)" ] ||
        fail "latest exists before the first backup" || return 1
    check_backup_moves_latest "" || return 1
    check_no_secret_in_logs
}

scenario_replacement_host() {
    new_customer
    start_bucket || fail "moto_server did not start" || return 1
    seed_replaced_host || fail "seeding the bucket failed" || return 1
    start_platform "$BUNDLE_DIR" "$SCENARIO_LOGS" ||
        fail "the fake platform did not start" || return 1
    boot_new_host replacement-host || return 1

    [ "$CLOUD_INIT_STATUS" = "status: done" ] ||
        fail "cloud-init ended with '$CLOUD_INIT_STATUS'" || return 1
    gate_open || fail "the restore marker was not written" || return 1
    check_database_matches || return 1
    REPLACEMENT_ROOT=$ROOT
    check_restore_before_gateway || return 1
    check_one_registration || return 1
    check_meta_fresh 60 refreshed || return 1
    check_backup_moves_latest "$SEEDED_SNAPSHOT" || return 1
    check_no_secret_in_logs || return 1

    # Newer local data, which a reboot must not restore over.
    in_container runuser -u postgres -- psql -X -q -d matrix -c \
        "INSERT INTO customers (name, tier, joined) VALUES ('e2e: written after the restore', 'free', now())" ||
        fail "writing a row after the restore failed" || return 1
    REPLACEMENT_RESTORE_RESULT=$(in_container cat /var/lib/matrix/restore-result.json)
}

scenario_reboot_of_restored_host() {
    [ -n "$REPLACEMENT_ROOT" ] && [ -d "$REPLACEMENT_ROOT" ] ||
        fail "needs the restored host of replacement-host, which did not get that far" ||
        return 1
    ROOT=$REPLACEMENT_ROOT
    local registrations_before
    registrations_before=$(registration_count)

    # A real gateway is enabled once installed; this one starts at boot now,
    # so that the gate is exercised without cloud-init's help.
    ln -sf ../matrix-gateway.service \
        "$ROOT/etc/systemd/system/multi-user.target.wants/matrix-gateway.service"
    boot_container reboot "$SCENARIO_LOGS/console.log" ||
        fail "the container did not boot again" || return 1
    wait_until 30 in_container true || fail "cannot enter the container" || return 1
    in_container timeout 180 systemctl is-system-running --wait >/dev/null 2>&1 || true

    in_container journalctl -b 0 -u matrix-restore.service -o cat --no-pager |
        grep -q "already open" ||
        fail "matrix-restore did not find the gate already open on this boot" || return 1
    [ "$(in_container cat /var/lib/matrix/restore-result.json)" = "$REPLACEMENT_RESTORE_RESULT" ] ||
        fail "restore-result.json changed across the reboot: a second restore ran" || return 1
    [ "$(in_container runuser -u postgres -- psql -X -At -d matrix -c \
        "SELECT count(*) FROM customers WHERE name = 'e2e: written after the restore'")" = 1 ] ||
        fail "the row written after the restore is gone" || return 1
    check_restore_before_gateway || return 1

    in_container systemctl is-active --quiet matrix-heartbeat.service ||
        fail "matrix-heartbeat.service is not running after the reboot" || return 1
    # Three heartbeat intervals, in which a second registration would show.
    sleep 15
    [ "$(registration_count)" = "$registrations_before" ] ||
        fail "the platform received $(registration_count) registrations, $registrations_before before the reboot" ||
        return 1
    check_meta_fresh 30 refreshed
}

scenario_outage_at_boot() {
    new_customer
    local port
    port=$(free_port)
    # Nothing listens on the bucket's port until the outage ends.
    # shellcheck disable=SC2034 # read by start_platform and render_user_data
    S3_ENDPOINT="http://127.0.0.1:$port"
    start_platform "$BUNDLE_DIR" "$SCENARIO_LOGS" ||
        fail "the fake platform did not start" || return 1
    boot_new_host outage-at-boot || return 1

    ! gate_open || fail "the gate opened while the bucket was unreachable" || return 1
    ! gateway_started || fail "the gateway started while the bucket was unreachable" || return 1
    local status
    status=$(in_container systemctl status --no-pager --lines=20 matrix-restore.service 2>&1)
    printf '%s\n' "$status" >"$SCENARIO_LOGS/restore-status.txt"
    grep -q "Active: failed" <<<"$status" ||
        fail "systemctl status matrix-restore does not show a failed unit" || return 1
    grep -qiE "127\.0\.0\.1:$port|connection refused|unreachable|cannot (reach|connect)" <<<"$status" ||
        fail "systemctl status matrix-restore does not say why: $(tail -n 3 <<<"$status" | tr '\n' ' ')" ||
        return 1

    # Starting the gateway by hand runs the restore again through its
    # Requires=, which fails the same way, so the gateway stays down.
    if in_container systemctl start matrix-gateway.service >/dev/null 2>&1 ||
        gateway_started; then
        fail "the gateway started by hand while the bucket was unreachable"
        return 1
    fi

    start_moto "$port" "$SCENARIO_LOGS/moto.log" || fail "moto_server did not start" || return 1
    bucket create-bucket || fail "creating the bucket failed" || return 1
    seed_replaced_host || fail "seeding the bucket failed" || return 1
    in_container systemctl restart matrix-restore.service ||
        fail "systemctl restart matrix-restore failed after the bucket returned" || return 1
    gate_open || fail "the gate did not open after the bucket returned" || return 1
    check_database_matches || return 1
    in_container systemctl start matrix-gateway.service ||
        fail "the gateway did not start after the gate opened" || return 1
    gateway_started || fail "the gateway did not record its start" || return 1
}

scenario_bad_bundle() {
    new_customer
    start_bucket || fail "moto_server did not start" || return 1
    local bad="$E2E_RUN/bad-bundle-files"
    mkdir -p "$bad"
    cp "$BUNDLE_DIR/matrix-host-bundle.tar.gz" "$bad/"
    # A well-formed checksum file whose hash belongs to other bytes.
    printf '%s  matrix-host-bundle.tar.gz\n' \
        "$(printf 'not the bundle' | sha256sum | cut -d' ' -f1)" \
        >"$bad/matrix-host-bundle.tar.gz.sha256"
    start_platform "$bad" "$SCENARIO_LOGS" ||
        fail "the fake platform did not start" || return 1
    boot_new_host bad-bundle || return 1

    [ "$CLOUD_INIT_STATUS" = "status: error" ] ||
        fail "cloud-init ended with '$CLOUD_INIT_STATUS', expected an error" || return 1
    grep -q "checksum mismatch" "$ROOT/var/log/cloud-init-output.log" ||
        fail "cloud-init-output.log does not report the checksum mismatch" || return 1
    local installed=""
    local path
    for path in /opt/matrix/bin/matrix-agent /opt/matrix/matrix-host-bundle \
        /etc/systemd/system/matrix-restore.service \
        /etc/systemd/system/matrix-gateway.service.d/10-restore-gate.conf; do
        [ -e "$ROOT$path" ] && installed="$installed $path"
    done
    [ -z "$installed" ] || fail "installed despite the bad checksum:$installed" || return 1
    ! gateway_started || fail "the gateway started" || return 1
    grep -q '"path":"/system-bundles/.*\.sha256"' "$PLATFORM_REQUESTS" ||
        fail "the checksum was never requested from the platform" || return 1
    [ "$(registration_count)" = 0 ] || fail "the host registered with the platform"
}
