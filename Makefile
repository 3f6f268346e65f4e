# agentctl-swarm developer entry points. Python children use the interpreter that runs make.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: setup demo test test-fast test-systemd soak bench deb clean

setup:
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q systemd-python || echo "systemd-python not built (journald logging off; needs libsystemd-dev pkg-config gcc)"

demo: setup
	$(PYTHON) examples/demo.py

test: setup
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not systemd and not soak"

test-systemd:
	$(PYTHON) -m pytest -q -m systemd tests/systemd

bench:
	$(PYTHON) bench/swarm_bench.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
