# QBlock build entry points. `make test` is what CI runs (.ci/run).
SWIFT        ?= swift
SCRATCH      ?= .build
SWIFT_FLAGS  ?= --scratch-path $(SCRATCH)
APT_PACKAGES := zlib1g-dev libzstd-dev qemu-utils qemu-system-common libnbd-bin nbdkit fio

.PHONY: all build release test demo bench clean deps soak examples iotests iotests-slice

all: build

# Installs the system packages the build and the interop tests need, only those missing.
# apt-get update runs once, and only when something has to be installed.
deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "Installing:$$missing"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

	@# The QMP tests drive the monitor with QEMU's own Python client.
	@python3 -c 'import qemu.qmp' 2>/dev/null || { echo "Installing qemu.qmp (pip)"; \
		python3 -m pip install -q qemu.qmp 2>/dev/null || python3 -m pip install -q --break-system-packages qemu.qmp || \
		echo "warning: could not install qemu.qmp; QMP tests will be skipped"; }

build: deps
	$(SWIFT) build $(SWIFT_FLAGS) $(LAYER_CHECK)

release: deps
	$(SWIFT) build $(SWIFT_FLAGS) -c release

# --explicit-target-dependency-import-check: a target that imports another target of the
# package without declaring it a dependency fails the build, so no layer reaches upward.
LAYER_CHECK := --explicit-target-dependency-import-check error

test: deps
	$(SWIFT) build $(SWIFT_FLAGS) --build-tests $(LAYER_CHECK)
	# --no-parallel: on 2 cores, suites that block on child processes (qemu-img, qemu-io) and
	# CPU-heavy replay tests can starve the in-process NBD servers of the other suites.
	$(SWIFT) test $(SWIFT_FLAGS) --skip-build --no-parallel

# Examples/ is a separate package that depends on QBlock by version, as another project
# would: built and run from a tagged scratch clone of the committed HEAD.
examples: deps
	SWIFT=$(SWIFT) bash scripts/consumer-check.sh

test: examples

# The randomized live-operations model test in its long mode: new seeds for SOAK_SECONDS
# (default one hour) against nbd --qmp; every seed is printed, failures are shrunk. Then
# CRASH_TRIALS random SIGKILL trials of a qcow2 writer under every cache mode (each trial
# printed with its seed; acknowledged write-through requests and flushed rounds must survive).
SOAK_SECONDS ?= 3600
CRASH_TRIALS ?= 300
soak: deps
	$(SWIFT) build $(SWIFT_FLAGS) --build-tests
	QBLOCK_LIVEMODEL_SECONDS=$(SOAK_SECONDS) $(SWIFT) test $(SWIFT_FLAGS) --skip-build --filter 'LiveModelTests/soak'
	QBLOCK_CRASH_TRIALS=$(CRASH_TRIALS) $(SWIFT) test $(SWIFT_FLAGS) --skip-build --filter 'Qcow2CacheModeCrashTests/soak'

# QEMU's own test suite (qemu-iotests from Debian's qemu source package, fetched once into
# IOTESTS_CACHE) with QEMU's tools and with ours under their names; prints both pass lists
# and fails on a test that passes with QEMU's and not with ours unless docs/iotests.md
# explains it. IOTESTS_FORMATS, IOTESTS_GROUP, IOTESTS_JOBS: see scripts/iotests/run.sh.
APT_PACKAGES += qemu-system-x86 dpkg-dev
iotests: release
	BIN="$$($(SWIFT) build $(SWIFT_FLAGS) -c release --show-bin-path)" bash scripts/iotests/run.sh

# The slice of it that `make test` runs: the tests of scripts/iotests/slice with our tools
# only (each must pass; exit 2 from the fetch, offline, skips).
iotests-slice: build
	BIN="$$($(SWIFT) build $(SWIFT_FLAGS) --show-bin-path)" bash scripts/iotests/slice.sh

test: iotests-slice

demo: release
	BIN="$$($(SWIFT) build $(SWIFT_FLAGS) -c release --show-bin-path)" bash scripts/demo.sh

bench: release
	@set -e; found=0; \
	for b in benchmarks/*.sh; do \
		[ -f "$$b" ] || continue; found=1; \
		echo "== $$b"; BIN="$$($(SWIFT) build $(SWIFT_FLAGS) -c release --show-bin-path)" bash "$$b"; \
	done; \
	[ $$found = 1 ] || echo "no benchmarks/*.sh yet"

clean:
	rm -rf $(SCRATCH)

# QMachine: the riscv64 test guest (Debian 13 kernel Image + busybox initramfs, downloaded
# once into .build-guest with a private apt configuration; exit 2 = offline, the boot tests
# then skip), and the optimized vm the boot tests run (the interpreter is ~10x slower in debug).
APT_PACKAGES += device-tree-compiler cpio
.PHONY: guest vm-release boot
guest:
	@bash scripts/guest/build-guest.sh --test scripts/guest/tests/disk-pattern.sh >/dev/null || [ $$? = 2 ]

vm-release: deps
	$(SWIFT) build $(SWIFT_FLAGS) -c release --product vm

test: guest vm-release

# Boots the guest once on a scratch raw disk: make boot
boot: guest vm-release
	@set -e; eval "$$(bash scripts/guest/build-guest.sh --test scripts/guest/tests/disk-pattern.sh)"; \
	disk="$$(mktemp /tmp/vm-boot.XXXXXX.raw)"; truncate -s 64M "$$disk"; \
	"$$($(SWIFT) build $(SWIFT_FLAGS) -c release --show-bin-path)/vm" --kernel "$$KERNEL" --initrd "$$INITRD" \
		--append "console=ttyS0 cryptomgr.notests" --drive "file=$$disk,format=raw"; rm -f "$$disk"
