# shellcheck shell=bash
# A test customer: fresh identities and secrets, the rendered cloud-init
# user data, the NoCloud meta-data, and the known database that the
# replacement scenarios restore.

# The digest query runs on both sides of a restore. It covers every row,
# the sequence position and the view, in a fixed time zone and date style.
readonly KNOWN_DATABASE_DIGEST_SQL="SELECT concat_ws(':',
  (SELECT count(*) FROM customers),
  (SELECT md5(string_agg(c::text, '|' ORDER BY id)) FROM customers c),
  (SELECT count(*) FROM events),
  (SELECT md5(string_agg(e::text, '|' ORDER BY id)) FROM events e),
  (SELECT last_value FROM customers_id_seq),
  (SELECT sum(event_count) FROM customer_event_counts))"

# Every secret of every customer of this run, for redact_logs.
CUSTOMER_SECRETS=()

# Sets the globals that describe a new customer and its machine. Every
# secret is hex, so it needs no quoting in the env files (nor in sed).
new_customer() {
    MACHINE_ID=$("$E2E_PYTHON" -c 'import uuid; print(uuid.uuid4())')
    USER_ID="user_e2e$(random_hex 12)"
    HANDLE="e2e-$(random_hex 6)"
    TOKEN="tok$(random_hex 40)"
    POSTGRES_PASSWORD="pw$(random_hex 32)"
    ACCESS_KEY_ID="AKE2E$(random_hex 15)"
    SECRET_ACCESS_KEY="sk$(random_hex 40)"
    BUCKET="matrix-e2e-$(random_hex 10)"
    PREFIX="matrixos-sync/$USER_ID/"
    # Hetzner server ids are positive integers; the addresses are from the
    # documentation ranges (RFC 5737, RFC 3849) and are never contacted.
    SERVER_ID=$((100000000 + RANDOM * 1000 + RANDOM % 1000))
    PUBLIC_IPV4="203.0.113.$((RANDOM % 250 + 1))"
    PUBLIC_IPV6="2001:db8:e2e::$(random_hex 4)"
    CUSTOMER_SECRETS+=("$TOKEN" "$POSTGRES_PASSWORD" "$SECRET_ACCESS_KEY")
}

# Replaces every customer secret in the files under $1 with "[redacted]".
# The fake platform's request log contains the bearer token, which the
# registration check reads, so this runs once the servers have stopped.
redact_logs() {
    local secret file
    [ -d "$1" ] || return 0
    for secret in "${CUSTOMER_SECRETS[@]}"; do
        while read -r file; do
            sed -i "s/$secret/[redacted]/g" "$file"
        done < <(grep -rlF -- "$secret" "$1" 2>/dev/null || true)
    done
}

# Writes the user data rendered from the template for the current
# customer to $1. Fails when a placeholder is left unrendered.
render_user_data() {
    local out=$1
    local bundle_url="https://127.0.0.1:$PLATFORM_PORT/system-bundles/$IMAGE_VERSION/matrix-host-bundle.tar.gz"
    # Values go through the environment, not the command line, so that no
    # secret shows up in the process list.
    E2E_machineId=$MACHINE_ID E2E_clerkUserId=$USER_ID E2E_handle=$HANDLE \
        E2E_imageVersion=$IMAGE_VERSION \
        E2E_platformRegisterUrl="https://127.0.0.1:$PLATFORM_PORT/vps/register" \
        E2E_registrationToken=$TOKEN E2E_r2Bucket=$BUCKET E2E_r2Prefix=$PREFIX \
        E2E_r2Endpoint=$S3_ENDPOINT E2E_r2AccessKeyId=$ACCESS_KEY_ID \
        E2E_r2SecretAccessKey=$SECRET_ACCESS_KEY \
        E2E_postgresPassword=$POSTGRES_PASSWORD E2E_hostBundleUrl=$bundle_url \
        "$E2E_PYTHON" - "$TEMPLATE" "$out" <<'PY'
import os, re, sys

template_path, out_path = sys.argv[1], sys.argv[2]
text = open(template_path, encoding="utf-8").read()

def value(match):
    name = match.group(1)
    if "E2E_" + name not in os.environ:
        sys.exit(f"render: the template uses {{{{{name}}}}}, which the test does not know")
    return os.environ["E2E_" + name]

rendered = re.sub(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}", value, text)
open(out_path, "w", encoding="utf-8").write(rendered)
PY
}

# Writes Hetzner-shaped NoCloud meta-data to $1. cloud-init copies it into
# /run/cloud-init/instance-data.json, where the agent reads the server id
# (instance-id), publicIPv4 (public-ipv4) and publicIPv6 (the static IPv6
# subnet of network-config).
write_meta_data() {
    cat >"$1" <<META
instance-id: "$SERVER_ID"
local-hostname: $HANDLE
public-ipv4: $PUBLIC_IPV4
network-config:
  version: 1
  config:
    - type: physical
      name: eth0
      subnets:
        - type: static
          ipv6: true
          address: $PUBLIC_IPV6/64
          gateway: fe80::1
META
}

# Makes the known database in a throwaway cluster inside the cached root
# file system, so that pg_dump is the container's own version. Writes
# $1/known.dump (custom format, owned by the role matrix) and
# $1/known.digest. The cluster has no TCP listener and lives in the tmpfs
# that systemd-nspawn mounts on /tmp; the tree itself stays read-only, so
# $1 is bound to /mnt, which Debian's tree has empty.
make_known_database() {
    local out=$1
    mkdir -p "$out"
    chmod 1777 "$out"
    # shellcheck disable=SC2016 # expanded by the container's shell
    local script='set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
export PGHOST=/tmp PGTZ=UTC PGDATESTYLE=ISO
"$bin/initdb" -D /tmp/data -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
"$bin/pg_ctl" -D /tmp/data -o "-c listen_addresses= -k /tmp" -w start >/dev/null
psql -q -v ON_ERROR_STOP=1 -U postgres -d postgres \
  -c "CREATE ROLE matrix LOGIN" -c "CREATE DATABASE matrix OWNER matrix"
psql -q -v ON_ERROR_STOP=1 -U matrix -d matrix <<SQL
CREATE TYPE tier AS ENUM ('"'"'free'"'"', '"'"'pro'"'"');
CREATE TABLE customers (
  id bigserial PRIMARY KEY,
  name text NOT NULL,
  tier tier NOT NULL,
  joined timestamptz NOT NULL,
  profile jsonb
);
INSERT INTO customers (name, tier, joined, profile)
SELECT '"'"'Zoë Ångström #'"'"' || i,
       CASE WHEN i % 3 = 0 THEN '"'"'pro'"'"'::tier ELSE '"'"'free'"'"'::tier END,
       timestamptz '"'"'2026-01-01 00:00:00+00'"'"' + i * interval '"'"'17 minutes'"'"',
       jsonb_build_object('"'"'n'"'"', i, '"'"'tags'"'"', jsonb_build_array('"'"'a'"'"', i % 7))
FROM generate_series(1, 3000) AS i;
CREATE TABLE events (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  customer_id bigint NOT NULL REFERENCES customers,
  payload bytea NOT NULL
);
INSERT INTO events (customer_id, payload)
SELECT 1 + i % 3000, decode(md5(i::text), '"'"'hex'"'"')
FROM generate_series(1, 20000) AS i;
CREATE VIEW customer_event_counts AS
  SELECT customer_id, count(*) AS event_count FROM events GROUP BY customer_id;
SQL
"$bin/pg_dump" -U matrix -d matrix --format=custom --file=/mnt/known.dump
psql -At -U matrix -d matrix -c "$DIGEST_SQL" >/mnt/known.digest
"$bin/pg_ctl" -D /tmp/data -m fast -w stop >/dev/null'
    if ! systemd-nspawn --quiet --register=no --keep-unit --private-network \
        --read-only --link-journal=no --directory="$ROOTFS" \
        --bind="$out:/mnt" --user=postgres \
        --setenv=DIGEST_SQL="$KNOWN_DATABASE_DIGEST_SQL" \
        /bin/sh -c "$script" >"$out/make-known-database.log" 2>&1; then
        cat "$out/make-known-database.log" >&2
        die "making the known database failed"
    fi
    if ! [ -s "$out/known.dump" ] || ! [ -s "$out/known.digest" ]; then
        die "making the known database left no dump or digest in $out"
    fi
}
