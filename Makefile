# Dramatis: the two commands (`make run`, `make test`) and `make package`.
# Each installs what is missing first, on Debian/Ubuntu (apt) or macOS.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

UNAME := $(shell uname -s)
CARGO ?= cargo
TAURI_DRIVER_VERSION := 2.1.0
APT_PACKAGES := build-essential pkg-config libssl-dev libwebkit2gtk-4.1-dev libgtk-3-dev \
	librsvg2-dev libayatana-appindicator3-dev libxdo-dev
APT_TEST_PACKAGES := xvfb xauth imagemagick webkit2gtk-driver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help run test package lint deps deps-test ui ui-deps e2e-deps rust-tests ui-tests e2e-tests app

help:
	@echo "make run      build and open Dramatis (installs what is missing)"
	@echo "make test     run every test: Rust, UI, and end-to-end in a real window"
	@echo "make package  build the installable bundle (.deb on Linux, .dmg on macOS)"
	@echo "make lint     rustfmt, clippy -D warnings, and the UI type check"

## --- the two commands -------------------------------------------------------

run: deps ui
	$(CARGO) run --bin dramatis

test: deps deps-test ui rust-tests ui-tests e2e-tests

# The UI is built first (the Tauri CLI would look for it in the wrong package.json).
package: deps ui
	ui/node_modules/.bin/tauri build --bundles $(if $(filter Darwin,$(UNAME)),dmg,deb)

lint: ui-deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	npm --prefix ui run check

## --- tests --------------------------------------------------------------------

rust-tests: ui
	$(CARGO) test --workspace

ui-tests: ui-deps
	npm --prefix ui run check
	npm --prefix ui test

# The built app in a real WebKit window, driven through tauri-driver.
# macOS has no WebDriver for WKWebView, so these run on Linux only.
e2e-tests: app e2e-deps
ifeq ($(UNAME),Linux)
	cd tests/e2e && if [ -n "$${DISPLAY:-}" ]; then npm test; \
	  else xvfb-run -a -s "-screen 0 1280x860x24" npm test; fi
else
	@echo "e2e tests need WebKitWebDriver (Linux); skipped on $(UNAME)"
endif

# The app, and what the end-to-end tests drive it with (the CLI, a fake hub).
app: ui
	$(CARGO) build --workspace --bins

## --- set-up -------------------------------------------------------------------

ui: ui-deps
	npm --prefix ui run build

ui-deps: ui/node_modules/.stamp
ui/node_modules/.stamp: ui/package-lock.json
	npm --prefix ui ci --no-audit --no-fund
	touch $@

e2e-deps: tests/e2e/node_modules/.stamp
ifeq ($(UNAME),Linux)
	@command -v tauri-driver >/dev/null || $(CARGO) install tauri-driver --locked --version $(TAURI_DRIVER_VERSION)
endif
tests/e2e/node_modules/.stamp: tests/e2e/package-lock.json
	npm --prefix tests/e2e ci --no-audit --no-fund
	touch $@

deps:
	@command -v $(CARGO) >/dev/null || { echo "Rust is needed: install it from https://rustup.rs, then run make again."; exit 1; }
	@command -v node >/dev/null && node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)' \
	  || { echo "Node.js 20.19 or newer is needed (with npm): install it, then run make again."; exit 1; }
ifeq ($(UNAME),Linux)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing system packages: $$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endif

deps-test:
ifeq ($(UNAME),Linux)
	@missing=$$(for p in $(APT_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing test packages: $$missing"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endif
