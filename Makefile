# Quickstart targets: each creates and fills its own virtualenv, so on a fresh Debian
# machine with Python 3.11 `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit unit-pure integration bench bench-deps prometheus-bin docker-bin cc-bin \
  soak regen clean shared-check shared-copies

# The compiled observer core (setup.py: the exporter/*.c extensions) needs a C compiler
# and Python's headers; without them the package installs and runs pure Python, so
# this installs them first (Debian: gcc, python3-dev) where they are missing.
CORE_SOURCES := $(wildcard exporter/*.c exporter/*.h)
cc-bin:
	@command -v cc >/dev/null && \
	  [ -f "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq gcc python3-dev >/dev/null; }

$(STAMP): pyproject.toml setup.py $(CORE_SOURCES) | cc-bin
	@# Debian's system Python needs python3-venv (and pip's ensurepip) for this.
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv >/dev/null; \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,fast,demo]'
	touch $(STAMP)

# promtool and a real Prometheus server come from Debian's prometheus package.
prometheus-bin:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus >/dev/null; }

# The docker tap's tests start their own daemon from Debian's docker.io (as root, on
# temp paths); they never use the machine's own daemon.
docker-bin:
	@command -v dockerd >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq docker.io >/dev/null; }

# The benchmark (issue 5) builds its Go client and step-runner stand-in from Debian's
# Go packages in GOPATH mode; `make bench BENCH_ARGS=--quick` for a small run.
BENCH_DEBS := golang-go golang-google-grpc-dev golang-google-protobuf-dev \
  golang-github-golang-protobuf-1-5-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc \
  libprotobuf-dev
BENCH_ARGS ?=

bench-deps:
	@dpkg -s $(BENCH_DEBS) >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(BENCH_DEBS) >/dev/null; }

bench: $(STAMP) bench-deps
	$(PY) -m benchmarks.run $(BENCH_ARGS)

demo: $(STAMP)
	$(VENV)/bin/step-runner-exporter demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy exporter monitoring benchmarks tests
	$(PY) -m monitoring.build --check

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# The unit suite again on the pure-Python observer (the compiled core's reference).
unit-pure: $(STAMP)
	STEP_RUNNER_EXPORTER_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit

integration: $(STAMP) prometheus-bin bench-deps docker-bin
	$(PY) -m pytest -q tests/integration

# Every test with the compiled observer core, then the unit suite (every observer
# test) with the pure-Python one; the differential tests compare the two directly.
test: $(STAMP) prometheus-bin bench-deps docker-bin lint shared-check
	$(PY) -m pytest -q -p no:cacheprovider tests
	STEP_RUNNER_EXPORTER_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit

# The tests read only the repository's own copies of the contract (docs/SPEC.md) and of
# the recorded captures (tests/captures/), so a clone with nothing beside it runs every
# test. Where the coordinator's ../shared is beside it (as in CI), a copy that differs
# from it is reported loudly but does not fail `make test`: the suite proves the code
# against the contract the repository was built to, and a newer contract is the next
# change's work (`make shared-copies` takes the current files), not a reason to reject
# unrelated work.
SHARED ?= ../shared
shared-check:
	@[ ! -d $(SHARED) ] || { cmp -s $(SHARED)/SPEC.md docs/SPEC.md && \
	  for f in $(SHARED)/captures/*; do cmp -s "$$f" "tests/captures/$${f##*/}" || exit 1; done; } || \
	  echo "WARNING: docs/SPEC.md or tests/captures/ differ from $(SHARED): the contract changed; run make shared-copies and build to it" >&2

shared-copies:
	install -m 644 $(SHARED)/SPEC.md docs/SPEC.md
	install -m 644 $(SHARED)/captures/* tests/captures/

# 100,000 simulated jobs with periodic step-runner restarts: exact counts, bounded
# tracking, flat memory (minutes; `SOAK_ARGS=--short` for a few seconds).
SOAK_ARGS ?= --jobs 100000
soak: $(STAMP)
	$(PY) -m tests.soak $(SOAK_ARGS)

regen: $(STAMP)
	$(PY) -m exporter.proto.regenerate

clean:
	rm -rf $(VENV) build *.egg-info exporter/*.so
