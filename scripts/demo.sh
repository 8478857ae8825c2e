#!/usr/bin/env bash
# Shows a host being lost and replaced: loads a database into a throwaway
# PostgreSQL cluster, backs it up with `matrix-agent backup` into a local
# directory in place of the bucket, deletes the cluster, restores
# into a new empty cluster with `matrix-agent restore`, and compares the two
# databases table by table.
#
# Run by `make demo`, which installs PostgreSQL and builds the agent first.
# Everything listens on 127.0.0.1 only and lives in one temporary directory
# that is removed on exit, also after a failure or Ctrl-C. Exits 0 when the
# restored database matches the original, 1 otherwise.
#
# Environment:
#   MATRIX_AGENT_BIN  agent binary (default: target/debug/matrix-agent)
#   DEMO_SCALE        pgbench scale factor, 100,000 accounts each (default: 2)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
agent=${MATRIX_AGENT_BIN:-$repo/target/debug/matrix-agent}
scale=${DEMO_SCALE:-2}

readonly pg_install_root=/usr/lib/postgresql
readonly owner=matrix_owner
readonly database=matrix
readonly user_id=user_demo
readonly prefix="matrixos-sync/$user_id/"

step_number=0

step() {
    step_number=$((step_number + 1))
    printf '\n[%d] %s\n' "$step_number" "$*"
}

info() {
    printf '    %s\n' "$*"
}

die() {
    printf 'demo: %s\n' "$*" >&2
    exit 1
}

# --- Preconditions -----------------------------------------------------------

[ -x "$agent" ] || die "the agent binary $agent is missing; run 'make build' first"
[[ $scale =~ ^[1-9][0-9]*$ ]] || die "DEMO_SCALE must be a positive integer, not '$scale'"

# The newest installed major, as the agent picks its tools by the server's.
pg_bin=$(for candidate in "$pg_install_root"/*/bin; do
    [ -x "$candidate/postgres" ] && printf '%s\n' "$candidate"
done | sort -V | tail -n 1)
[ -n "$pg_bin" ] ||
    die "no PostgreSQL server under $pg_install_root; run scripts/install-deps.sh"

if [ "$(id -u)" -eq 0 ]; then
    # initdb and postgres reject root, so the clusters belong to the
    # postgres system account that the Debian packages create.
    id postgres >/dev/null 2>&1 ||
        die "running as root needs the 'postgres' system user; install the postgresql package"
    server_account=postgres
else
    server_account=$(id -un)
fi

# Runs a PostgreSQL server program as the account that owns the clusters.
as_server() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u "$server_account" -- "$@")
    else
        "$@"
    fi
}

# --- Scratch space and cleanup -----------------------------------------------

work=$(mktemp -d -t matrix-demo.XXXXXX)
chmod 755 "$work"

cleanup() {
    local status=$? dir
    trap - EXIT INT TERM
    set +e
    for dir in "$work"/*-cluster; do
        if [ -f "$dir/data/postmaster.pid" ]; then
            as_server "$pg_bin/pg_ctl" --pgdata "$dir/data" --mode fast --wait stop >/dev/null 2>&1 ||
                as_server "$pg_bin/pg_ctl" --pgdata "$dir/data" --mode immediate stop >/dev/null 2>&1
        fi
    done
    rm -rf "$work"
    if [ "$status" -ne 0 ]; then
        printf '\ndemo: stopped the clusters and removed %s\n' "$work" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$(id -u)" -eq 0 ] && ! runuser -u "$server_account" -- test -x "$work"; then
    die "the $server_account user cannot reach $work; set TMPDIR to a directory it can enter, such as /tmp"
fi

# The owner's password comes from the kernel's random source and reaches
# psql and pgbench only through a password file, so it never appears on a
# command line or in this script's output.
password=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
(
    umask 077
    printf '127.0.0.1:*:%s:%s:%s\n' "$database" "$owner" "$password" >"$work/pgpass"
)
export PGPASSFILE="$work/pgpass"
# Timestamps print in one zone on both sides, so the content hashes agree.
export PGTZ=UTC
unset PGHOST PGPORT PGUSER PGDATABASE PGPASSWORD PGSERVICE PGOPTIONS

# --- PostgreSQL clusters -----------------------------------------------------

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Creates a cluster in directory $1, whose name must end in -cluster so
# that cleanup finds it, and starts it on a free loopback port, which it
# stores in cluster_port.
start_cluster() {
    local dir=$1 attempt port
    mkdir -p "$dir"
    chown "$server_account" "$dir"
    chmod 700 "$dir"

    if ! as_server "$pg_bin/initdb" --pgdata "$dir/data" --username postgres \
        --auth-local trust --auth-host scram-sha-256 \
        --encoding UTF8 --locale C --no-sync >"$work/initdb.log" 2>&1; then
        cat "$work/initdb.log" >&2
        die "initdb failed for $dir/data"
    fi

    # Another process may take the port between the check and the start,
    # so a failed start is retried on another port.
    for attempt in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 30000))
        port_in_use "$port" && continue
        if as_server "$pg_bin/pg_ctl" --pgdata "$dir/data" --log "$dir/server.log" \
            --wait --timeout 60 \
            -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='$dir'" \
            start >/dev/null 2>&1; then
            cluster_port=$port
            return 0
        fi
    done
    tail -n 20 "$dir/server.log" >&2
    die "PostgreSQL in $dir did not start after $attempt attempts"
}

stop_cluster() {
    as_server "$pg_bin/pg_ctl" --pgdata "$1/data" --mode fast --wait stop >/dev/null
}

# Runs psql as the superuser over the cluster's unix socket.
psql_superuser() {
    local dir=$1 port=$2
    shift 2
    "$pg_bin/psql" --no-psqlrc --quiet --set ON_ERROR_STOP=1 \
        --host "$dir" --port "$port" --username postgres "$@"
}

# Runs psql as the database owner over TCP, as the agent connects.
psql_owner() {
    local port=$1
    shift
    "$pg_bin/psql" --no-psqlrc --quiet --set ON_ERROR_STOP=1 \
        --host 127.0.0.1 --port "$port" --username "$owner" --dbname "$database" "$@"
}

# Creates the owner role with the password and an empty database it owns,
# as cloud-init does on a new host.
create_owner_and_database() {
    # printf is a shell builtin, so the password stays off command lines.
    printf "CREATE ROLE %s LOGIN PASSWORD '%s';\nCREATE DATABASE %s OWNER %s;\n" \
        "$owner" "$password" "$database" "$owner" |
        psql_superuser "$1" "$2" --dbname postgres --file -
}

# --- Data --------------------------------------------------------------------

load_application_schema() {
    psql_owner "$1" --file - <<'SQL'
CREATE SCHEMA shop;
COMMENT ON SCHEMA shop IS 'A small web shop beside the pgbench tables';

CREATE TYPE shop.order_status AS ENUM ('pending', 'paid', 'shipped', 'cancelled');

CREATE TABLE shop.customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    profile jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO shop.customers (name, email, profile) VALUES
    ('Zoë Hernández', 'zoe@example.com', '{"tier": "pro", "locale": "es-ES"}'),
    ('Łukasz Żółć', 'lukasz@example.com', '{"tier": "free", "locale": "pl-PL"}'),
    ('Søren Kierkegård', 'soren@example.com', '{"tier": "team", "tags": ["philosophy"]}'),
    ('山田 太郎', 'taro@example.jp', '{"tier": "pro", "locale": "ja-JP"}'),
    ('Ольга Петрова', 'olga@example.ru', '{"tier": "free", "note": "Привет"}'),
    ('فاطمة الزهراء', 'fatima@example.com', '{"tier": "pro", "rtl": true}'),
    ('Nguyễn Văn An', 'an@example.vn', '{"emoji": "🚀", "tier": "team"}');

INSERT INTO shop.customers (name, email, profile)
SELECT 'Customer ' || g,
       'customer' || g || '@example.com',
       jsonb_build_object(
           'tier', (ARRAY['free', 'pro', 'team'])[1 + g % 3],
           'newsletter', g % 2 = 0,
           'visits', jsonb_build_array(g % 7, g % 11, g % 13))
FROM generate_series(1, 2000) AS g;

CREATE TABLE shop.products (
    id serial PRIMARY KEY,
    sku text NOT NULL UNIQUE,
    title text NOT NULL,
    price numeric(10, 2) NOT NULL CHECK (price >= 0),
    attributes jsonb,
    thumbnail bytea
);

INSERT INTO shop.products (sku, title, price, attributes, thumbnail)
SELECT 'SKU-' || lpad(g::text, 5, '0'),
       (ARRAY['Kaffeebecher', 'Crème brûlée torch', 'Tatami mat', 'Smørrebrød board'])[1 + g % 4]
           || ' #' || g,
       round((random() * 200)::numeric, 2),
       jsonb_build_object('colour', (ARRAY['red', 'green', 'blue'])[1 + g % 3], 'weight_g', g * 10),
       decode(md5(g::text) || md5((g * 7)::text), 'hex')
FROM generate_series(1, 300) AS g;

-- Every byte value once, to catch any text conversion of bytea.
INSERT INTO shop.products (sku, title, price, thumbnail)
SELECT 'SKU-ALLBYTES', 'All 256 byte values', 0,
       string_agg(set_byte('\x00'::bytea, 0, b), ''::bytea ORDER BY b)
FROM generate_series(0, 255) AS b;

CREATE TABLE shop.orders (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES shop.customers (id),
    status shop.order_status NOT NULL DEFAULT 'pending',
    placed_at timestamptz NOT NULL,
    note text
);

INSERT INTO shop.orders (customer_id, status, placed_at, note)
SELECT 1 + g % 2007,
       (ARRAY['pending', 'paid', 'shipped', 'cancelled']::shop.order_status[])[1 + g % 4],
       timestamptz '2026-01-01 00:00:00+00' + g * interval '37 minutes',
       CASE WHEN g % 5 = 0 THEN 'Bitte nicht klingeln — Paket beim Nachbarn abgeben' END
FROM generate_series(1, 5000) AS g;

CREATE TABLE shop.order_lines (
    order_id bigint NOT NULL REFERENCES shop.orders (id) ON DELETE CASCADE,
    product_id integer NOT NULL REFERENCES shop.products (id),
    quantity integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);

INSERT INTO shop.order_lines (order_id, product_id, quantity)
SELECT o, 1 + (o * 7 + k) % 300, 1 + (o + k) % 5
FROM generate_series(1, 5000) AS o, generate_series(0, 2) AS k;

CREATE INDEX orders_customer_placed ON shop.orders (customer_id, placed_at);

CREATE VIEW shop.revenue_by_status AS
SELECT o.status, count(DISTINCT o.id) AS orders, sum(l.quantity * p.price) AS revenue
FROM shop.orders AS o
JOIN shop.order_lines AS l ON l.order_id = o.id
JOIN shop.products AS p ON p.id = l.product_id
GROUP BY o.status;

-- Invoices as large objects, which pg_dump stores apart from the tables.
CREATE TABLE shop.invoices (
    id serial PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES shop.orders (id),
    filename text NOT NULL,
    document oid NOT NULL
);

INSERT INTO shop.invoices (order_id, filename, document) VALUES
    (1, 'Rechnung-0001.txt',
     lo_from_bytea(0, convert_to('Rechnung Nr. 1 — Grüße aus Köln, Summe: 42,00 €', 'UTF8'))),
    (2, 'invoice-0002.bin',
     lo_from_bytea(0, decode(repeat('89504e470d0a1a0a0000000d49484452', 4096), 'hex')));
SQL
}

# Prints "name|rows|md5" for every table and view of the database, then
# one line each for its large objects, its sequences and its schema. A
# table's hash covers every row as text, sorted, so it depends on the
# content and not on the physical row order.
fingerprint() {
    local dir=$1 port=$2 schema_lines schema_hash
    psql_superuser "$dir" "$port" --dbname "$database" --tuples-only --no-align \
        --field-separator '|' --file - <<'SQL'
SELECT format('%I.%I', n.nspname, c.relname),
       (xpath('/row/n/text()', query_to_xml(
           format('SELECT count(*) AS n FROM %I.%I', n.nspname, c.relname),
           false, true, '')))[1]::text,
       (xpath('/row/h/text()', query_to_xml(
           format('SELECT md5(coalesce(string_agg(t::text, E''\n'' ORDER BY t::text), '''')) AS h
                   FROM %I.%I AS t', n.nspname, c.relname),
           false, true, '')))[1]::text
FROM pg_class AS c
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\_%'
ORDER BY 1;

SELECT '(large objects)', count(*),
       md5(coalesce(string_agg(oid::text || ':' || md5(lo_get(oid)), ',' ORDER BY oid), ''))
FROM pg_largeobject_metadata;

SELECT '(sequences)', count(*),
       md5(coalesce(string_agg(format('%I.%I=%s', schemaname, sequencename, last_value),
                               ',' ORDER BY schemaname, sequencename), ''))
FROM pg_sequences
WHERE schemaname NOT IN ('pg_catalog', 'information_schema');
SQL

    # Types, indexes, constraints, view definitions and comments, as DDL.
    # pg_dump 15.14 and later write a random key into \restrict lines,
    # which is not part of the schema, so those lines are left out.
    "$pg_bin/pg_dump" --schema-only --host "$dir" --port "$port" --username postgres \
        --dbname "$database" | grep -v -e '^\\restrict ' -e '^\\unrestrict ' >"$work/schema.sql"
    schema_lines=$(wc -l <"$work/schema.sql")
    schema_hash=$(md5sum <"$work/schema.sql")
    printf '(schema, lines of DDL)|%s|%s\n' "$schema_lines" "${schema_hash%% *}"
}

# --- The agent ---------------------------------------------------------------

# Writes the env file of one host: what cloud-init writes into the files
# under /opt/matrix/env/, with a local directory in place of the bucket.
write_host_env() {
    local host_dir=$1 port=$2
    mkdir -p "$host_dir/state"
    (
        umask 077
        {
            printf 'MATRIX_MACHINE_ID=%s\n' "$(cat /proc/sys/kernel/random/uuid)"
            printf 'MATRIX_CLERK_USER_ID=%s\n' "$user_id"
            printf 'MATRIX_R2_PREFIX=%q\n' "$prefix"
            printf 'MATRIX_STORE_DIR=%q\n' "$work/store"
            printf 'MATRIX_STATE_DIR=%q\n' "$host_dir/state"
            printf 'MATRIX_RESTORE_MARKER=%q\n' "$host_dir/restore-complete"
            printf 'MATRIX_PG_WAIT=30s\n'
            printf 'POSTGRES_DB=%s\n' "$database"
            printf 'POSTGRES_USER=%s\n' "$owner"
            printf 'POSTGRES_PASSWORD=%s\n' "$password"
            printf 'PGHOST=127.0.0.1\n'
            printf 'PGPORT=%s\n' "$port"
        } >"$host_dir/agent.env"
    )
}

# Runs the agent with only the variables of env file $1, as systemd's
# EnvironmentFile= does, prints its log indented, and stops the demo when
# the agent fails.
run_agent() {
    local env_file=$1 log="$work/agent.log" status=0
    shift
    # shellcheck disable=SC2016 # the inner shell expands its own arguments
    env -i PATH="$PATH" HOME="$work" \
        bash -c 'set -a; . "$1"; set +a; shift; exec "$@"' agent-env \
        "$env_file" "$agent" "$@" >"$log" 2>&1 || status=$?

    if grep -qF -- "$password" "$log"; then
        die "matrix-agent $* printed the database password; its log is withheld"
    fi
    sed 's/^/    | /' "$log"
    [ "$status" -eq 0 ] ||
        die "matrix-agent $* failed with exit status $status (its log is above)"
}

print_store() {
    local file
    while IFS= read -r file; do
        info "$(printf '%10s bytes  %s' "$(stat -c %s "$file")" "${file#"$work/store/"}")"
    done < <(find "$work/store" -path '*/.matrix-store' -prune -o -type f -print | sort)
}

# --- Comparison --------------------------------------------------------------

# Prints the two fingerprints side by side and returns 1 when any line
# differs or is missing on one side.
compare() {
    awk -F'|' '
        function short(hash) { return hash == "" ? "-" : substr(hash, 1, 12) }
        FNR == 1 { side++ }
        {
            if (!($1 in seen)) { order[++count] = $1; seen[$1] = 1 }
            rows[side, $1] = $2
            hash[side, $1] = $3
            present[side, $1] = 1
        }
        END {
            format = "    %-30s %12s %12s  %-12s  %-12s  %s\n"
            printf format, "object", "rows before", "rows after", "hash before", "hash after", "result"
            printf format, "------", "-----------", "----------", "-----------", "----------", "------"
            differ = 0
            for (i = 1; i <= count; i++) {
                name = order[i]
                if (!present[1, name]) { verdict = "NEW"; differ++ }
                else if (!present[2, name]) { verdict = "MISSING"; differ++ }
                else if (rows[1, name] != rows[2, name] || hash[1, name] != hash[2, name]) {
                    verdict = "DIFFERS"; differ++
                } else { verdict = "same" }
                printf format, name, \
                    present[1, name] ? rows[1, name] : "-", \
                    present[2, name] ? rows[2, name] : "-", \
                    short(hash[1, name]), short(hash[2, name]), verdict
            }
            printf "\n    %d objects compared, %d differ\n", count, differ
            exit differ > 0
        }
    ' "$1" "$2"
}

# --- The demo ----------------------------------------------------------------

printf 'matrix-agent demo: back up a database, lose the host, restore on a new one\n'
info "agent:      $agent"
info "postgresql: $pg_bin"
info "scratch:    $work"

step "Starting the original host's PostgreSQL cluster"
source_dir="$work/source-cluster"
start_cluster "$source_dir"
source_port=$cluster_port
create_owner_and_database "$source_dir" "$source_port"
info "listening on 127.0.0.1:$source_port, database '$database' owned by '$owner'"

step "Loading data: pgbench at scale $scale, a short pgbench run, and a shop schema"
"$pg_bin/pgbench" --initialize --scale "$scale" --quiet \
    --host 127.0.0.1 --port "$source_port" --username "$owner" "$database" \
    >"$work/pgbench.log" 2>&1 || { cat "$work/pgbench.log" >&2; die "pgbench --initialize failed"; }
"$pg_bin/pgbench" --client 2 --jobs 2 --transactions 200 \
    --host 127.0.0.1 --port "$source_port" --username "$owner" "$database" \
    >"$work/pgbench.log" 2>&1 || { cat "$work/pgbench.log" >&2; die "pgbench run failed"; }
load_application_schema "$source_port"
info "database size: $(psql_owner "$source_port" --tuples-only --no-align \
    --command "SELECT pg_size_pretty(pg_database_size(current_database()))")"

host_a="$work/host-a"
write_host_env "$host_a" "$source_port"

step "matrix-agent restore on the original host: the store is empty, so this is a fresh host"
run_agent "$host_a/agent.env" restore
[ -f "$host_a/restore-complete" ] ||
    die "restore exited 0 but wrote no marker at $host_a/restore-complete"
info "the restore marker exists, so backups may run"

step "matrix-agent backup: streaming pg_dump into the store"
run_agent "$host_a/agent.env" backup
info "store contents:"
print_store
latest_file="$work/store/${prefix}system/db/latest"
[ -f "$latest_file" ] || die "backup exited 0 but wrote no pointer at $latest_file"
info "system/db/latest -> $(tr -d '\n' <"$latest_file")"

step "matrix-agent verify: reading the snapshot back through SHA-256 and pg_restore"
run_agent "$host_a/agent.env" verify

fingerprint "$source_dir" "$source_port" >"$work/before.txt"

step "Losing the host: stopping the original cluster and deleting its data directory"
stop_cluster "$source_dir"
rm -rf "$source_dir/data"
info "only the store is left"

step "Starting the replacement host's PostgreSQL cluster, empty"
target_dir="$work/target-cluster"
start_cluster "$target_dir"
target_port=$cluster_port
create_owner_and_database "$target_dir" "$target_port"
info "listening on 127.0.0.1:$target_port, database '$database' owned by '$owner', no tables"

host_b="$work/host-b"
write_host_env "$host_b" "$target_port"

step "matrix-agent restore on the replacement host (new machine id)"
run_agent "$host_b/agent.env" restore
[ -f "$host_b/restore-complete" ] ||
    die "restore exited 0 but wrote no marker at $host_b/restore-complete"
info "the restore marker exists, so the gateway would start now"

fingerprint "$target_dir" "$target_port" >"$work/after.txt"

step "Comparing the original database (before) with the restored one (after)"
if compare "$work/before.txt" "$work/after.txt"; then
    printf '\nRESULT: the data came back: every table, view, large object, sequence and the schema match.\n'
else
    printf '\nRESULT: the data did NOT come back intact: see the rows marked above.\n'
    exit 1
fi
