# Thin wrappers. `make up` and `make test` work on a fresh clone with only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The uv that installs the lock; deploy/Dockerfile's UV_VERSION is the same.
UV_VERSION := 0.13.9
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: compile up test test-deploy lint typecheck contracts unit bench fuzz chaos install clean

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	@$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c requirements.lock -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# Bytecode for Shop's own modules as pip would write it for an installed package: where
# PYTHONDONTWRITEBYTECODE is set, every start would compile them again (docs/launcher.md).
compile: $(STAMP)
	@$(BIN)/python -m compileall -q src

up: compile
	@$(BIN)/shop up

lint: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check

typecheck: $(STAMP)
	$(BIN)/mypy

contracts: $(STAMP)
	$(BIN)/lint-imports

test: lint typecheck contracts
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The image built with podman from a local Debian base, then the whole system in containers
# through an order (3-4 min; 2 more the first time on a machine; needs Debian's podman, runc
# and mmdebstrap: .ci/run installs them). docs/deploy.md.
test-deploy: $(STAMP)
	deploy/build-image.sh
	$(BIN)/python -m pytest tests/deploy/system_in_containers.py $(PYTEST_ARGS)

# Long fuzzing run (not part of `make test`): 1,000 fresh examples per public operation.
FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP)
	SHOP_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SHOP_FUZZ_RANDOM=1 \
		$(BIN)/python -m pytest tests/e2e/test_fuzz.py $(PYTEST_ARGS)

# The whole system against issue 8's targets (about 3 min; needs wrk and nginx; not part of
# `make test`). `make bench BENCH_ARGS=--mariadb` adds a run on MariaDB stores.
BENCH_ARGS ?=
bench: compile
	$(BIN)/python -m bench $(BENCH_ARGS)

# Chaos (issue 11 point 4; docs/chaos.md): 5 trials of each scenario, 8 s outages and a
# 3-minute soak (about 13 min; not part of `make test`, which runs 1 trial, 3 s and 5 s).
CHAOS_TRIALS ?= 5
CHAOS_OUTAGE_S ?= 8
CHAOS_SOAK_S ?= 180
chaos: compile
	SHOP_CHAOS_TRIALS=$(CHAOS_TRIALS) SHOP_CHAOS_OUTAGE_S=$(CHAOS_OUTAGE_S) \
		SHOP_CHAOS_SOAK_S=$(CHAOS_SOAK_S) $(BIN)/python -m pytest tests/chaos -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
