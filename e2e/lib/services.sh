# shellcheck shell=bash
# The servers a scenario talks to, all on 127.0.0.1: moto_server holding
# the customer's bucket, and the fake platform serving the bundle and
# POST /vps/register over HTTPS.

MOTO_PID=""
PLATFORM_PID=""
PLATFORM_PORT=""
PLATFORM_REQUESTS=""

# Makes a test CA and a server certificate for 127.0.0.1 under $1:
# ca.pem (the container trusts it), server.pem and server.key.
make_tls_certs() {
    local dir=$1
    mkdir -p "$dir"
    {
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout "$dir/ca.key" -out "$dir/ca.pem" -days 2 \
            -subj "/CN=matrix e2e test CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout "$dir/server.key" -out "$dir/server.csr" -subj "/CN=127.0.0.1"
        printf '%s\n' "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
            "subjectAltName=IP:127.0.0.1,DNS:localhost" >"$dir/server.ext"
        openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
            -CAcreateserial -out "$dir/server.pem" -days 2 -extfile "$dir/server.ext"
    } >"$dir/openssl.log" 2>&1 || die "creating the test certificates failed; see $dir/openssl.log"
    rm -f "$dir/ca.key"
}

# Starts moto_server on 127.0.0.1:$1, logging to $2, and waits until it
# accepts connections. Fails with a message after 60 seconds.
start_moto() {
    local port=$1 log=$2
    moto_server -H 127.0.0.1 -p "$port" >>"$log" 2>&1 &
    MOTO_PID=$!
    if ! wait_until 60 port_open "$port"; then
        tail -n 20 "$log" >&2
        say "moto_server did not accept connections on 127.0.0.1:$port within 60 s"
        return 1
    fi
}

stop_moto() {
    stop_process "$MOTO_PID"
    MOTO_PID=""
}

# Starts the fake platform for the current customer, serving the bundle
# in directory $1 and logging to directory $2. Further arguments are passed
# on, e.g. --responses 500,ok. Fails with a message after 30 seconds.
start_platform() {
    local bundle_dir=$1 log_dir=$2
    shift 2
    local port_file="$log_dir/platform.port"
    rm -f "$port_file"
    PLATFORM_REQUESTS="$log_dir/platform-requests.jsonl"
    FAKE_PLATFORM_TOKEN=$TOKEN AWS_ACCESS_KEY_ID=$ACCESS_KEY_ID \
        AWS_SECRET_ACCESS_KEY=$SECRET_ACCESS_KEY \
        "$FAKE_PLATFORM" --port-file "$port_file" \
        --request-log "$PLATFORM_REQUESTS" \
        --bundle-dir "$bundle_dir" --image-version "$IMAGE_VERSION" \
        --tls-cert "$E2E_TLS/server.pem" --tls-key "$E2E_TLS/server.key" \
        --s3-endpoint "$S3_ENDPOINT" --bucket "$BUCKET" --user-id "$USER_ID" \
        --machine-id "$MACHINE_ID" "$@" \
        >>"$log_dir/platform.log" 2>&1 &
    PLATFORM_PID=$!
    if ! wait_until 30 test -s "$port_file"; then
        tail -n 20 "$log_dir/platform.log" >&2
        say "the fake platform did not start within 30 s"
        return 1
    fi
    # shellcheck disable=SC2034 # render_user_data builds the URLs from it
    PLATFORM_PORT=$(cat "$port_file")
}

stop_platform() {
    stop_process "$PLATFORM_PID"
    PLATFORM_PID=""
}

# Runs the bucket helper against the current customer's bucket.
bucket() {
    E2E_S3_ENDPOINT=$S3_ENDPOINT E2E_S3_BUCKET=$BUCKET \
        E2E_S3_ACCESS_KEY_ID=$ACCESS_KEY_ID \
        E2E_S3_SECRET_ACCESS_KEY=$SECRET_ACCESS_KEY \
        "$E2E_PYTHON" "$E2E_DIR/bucket.py" "$@"
}
