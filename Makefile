# The two commands of the README: `make demo` (the main job) and `make test`.
# Both install what they need first (Debian packages, the Python package),
# and build the lab images on first use (cached under ~/.cache/kvmvfio).
PYTHON ?= python3

.PHONY: deps demo test unit lab lint types docs bench soak compare

deps:
	./.ci/install-host-deps
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[dev]'

demo: deps
	$(PYTHON) -m kvmvfio lab demo

test: deps
	KVMVFIO_REQUIRE_HEADERS=1 $(PYTHON) -m tox run -e lint,types,unit,docs,package,lab

unit lint types docs package lab: deps
	$(PYTHON) -m tox run -e $@

# Benchmarks: figures go to docs/BENCHMARKS.md by hand, with these commands.
bench: deps
	$(PYTHON) bench/bench_inventory.py
	$(PYTHON) bench/bench_hook.py
	$(PYTHON) -m kvmvfio lab run -- python3 bench/bench_vfio_open.py
	$(PYTHON) -m kvmvfio lab run -- python3 bench/bench_qemu_attach.py
	$(PYTHON) -m kvmvfio lab run -- python3 bench/bench_prepare.py
	$(PYTHON) -m kvmvfio lab run --topology sriov -- python3 bench/bench_sriov.py --rounds 5
	$(PYTHON) -m kvmvfio lab run --topology default -- python3 bench/bench_mdev.py

# The soak: 1000 attach/detach cycles of two devices by fd on a running L2 VM and
# 200 prepare/release cycles of the e1000e, inside L1 (figures: docs/BENCHMARKS.md).
soak: deps
	$(PYTHON) -m kvmvfio lab run --timeout 14400 -- python3 bench/soak.py

# kvmvfio against libvirt's managed hostdev and a hand-written hook, in one lab run
# (figures: docs/COMPARISON.md).
compare: deps
	$(PYTHON) -m kvmvfio lab run -- python3 bench/compare.py
