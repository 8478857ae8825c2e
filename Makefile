# Developer entry points. `make` alone lists the targets.
#
# A target documents itself with a `## text` comment after its name, which
# `make help` prints.

CARGO ?= cargo
SHELL_SCRIPTS := $(wildcard scripts/*.sh bundle/*.sh e2e/*.sh e2e/lib/*.sh bench/*.sh) .ci/run

.DEFAULT_GOAL := help
.PHONY: help deps build test demo bundle e2e bench lint clean

help: ## List the targets
	@awk 'BEGIN { FS = ":.*## " } \
		/^[a-z][a-z0-9-]*:.*## / { printf "  make %-8s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

deps: ## Install PostgreSQL and moto_server when missing, check for cargo
	bash scripts/install-deps.sh

build: ## Build every crate of the workspace (debug)
	$(CARGO) build --workspace

# The packaging tests also need systemd-analyze and cloud-init, which
# scripts/install-test-tools.sh installs. The integration tests run
# target/debug/matrix-agent, so it is built first. cargo-nextest does not
# run doctests, so `cargo test --doc` runs them beside it. The backup and
# restore suites then run a second time with MATRIX_TEST_S3=r2, through a
# proxy that rejects what Cloudflare R2 rejects and moto accepts.
R2_SUITES := --test round_trip --test backup --test restore_gate --test verify

test: deps ## Install deps, then run all tests, rustfmt and clippy
	sh scripts/install-test-tools.sh
	$(CARGO) build -p matrix-agent
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		set -x; \
		$(CARGO) test --workspace --doc && \
		$(CARGO) nextest run --workspace --no-fail-fast && \
		MATRIX_TEST_S3=r2 $(CARGO) nextest run -p matrix-agent-tests \
			--no-fail-fast $(R2_SUITES); \
	else \
		set -x; \
		$(CARGO) test --workspace --no-fail-fast && \
		MATRIX_TEST_S3=r2 $(CARGO) test -p matrix-agent-tests \
			--no-fail-fast $(R2_SUITES); \
	fi
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The demo needs only the agent binary, so it builds only that crate.
demo: deps ## Back up, wipe and restore a sample database with the agent
	$(CARGO) build -p matrix-agent
	bash scripts/demo.sh

bundle: ## Build dist/matrix-host-bundle.tar.gz and its .sha256 (reproducible)
	sh scripts/bundle.sh

# e2e/run.sh builds the bundle itself and installs debootstrap and
# systemd-container when missing; it needs root.
e2e: deps ## Boot a host under systemd-nspawn and run the first-boot scenarios
	bash e2e/run.sh

bench: ## Compare the agent with the pg_dump + aws s3 cp pipeline (about 10 min)
	bash bench/run.sh

lint: ## Run rustfmt, clippy and shellcheck without changing files
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@command -v shellcheck >/dev/null 2>&1 || \
		{ echo "shellcheck not found: install the Debian package shellcheck" >&2; exit 1; }
	shellcheck $(SHELL_SCRIPTS)

clean: ## Remove build output (target/, dist/, build/)
	$(CARGO) clean
	rm -rf dist build
