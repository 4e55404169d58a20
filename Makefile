# repagent: build, test and benchmark.
#
#   make run      build and run the main job on the built-in test VM
#   make test     install what the tests need, then vet, check the guest, test
#   make bench    run the benchmarks (figures: docs/BENCHMARKS.md)
#   make guest    rebuild testvm/guest/guest.bin from its C source
#   make generate rebuild the ebpf package's BPF objects from their C source
#   make lint     gofmt and go vet
#
# Everything the targets need is installed by `make deps` (called by test and
# run): nothing relies on what someone installed by hand.

SHELL := /bin/bash
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
GOFMT ?= $(dir $(GO))gofmt
BIN := bin/repagent
GUEST := testvm/guest/guest.bin
GOTEST_FLAGS ?= -count=1 -timeout 20m
BENCH_FLAGS ?= -benchtime 2s

.PHONY: all build run test bench bench-smoke guest guest-check generate generate-check lint deps clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/repagent

# The main job: the test VM replicated to a backup in the same process, for
# 10 seconds (without --duration it runs until Ctrl-C).
run: deps build
	./$(BIN) --interval 100ms --duration 10s

test: deps generate-check lint guest-check bench-smoke
	$(GO) test $(GOTEST_FLAGS) ./...

# Every benchmark once, so benchmark code cannot rot; figures need `make bench`.
bench-smoke:
	@log=$$(mktemp) && trap 'rm -f $$log' EXIT && \
	if $(GO) test -run '^$$' -bench . -benchtime 1x ./... >$$log 2>&1; then echo "bench-smoke: every benchmark ran once"; \
	else cat $$log; exit 1; fi

bench: deps
	$(GO) test -run '^$$' -bench . $(BENCH_FLAGS) ./...

guest:
	sh testvm/guest/build.sh $(GUEST)

# The committed guest binary must be what its source builds to.
guest-check:
	@tmp=$$(mktemp) && trap 'rm -f $$tmp' EXIT && \
	sh testvm/guest/build.sh $$tmp && \
	if cmp -s $$tmp $(GUEST); then echo "guest-check: $(GUEST) matches its source"; \
	else echo "guest-check: $(GUEST) does not match its source: run 'make guest' and commit" >&2; exit 1; fi

# The ebpf package's BPF programs, compiled by bpf2go with Debian's clang 14
# (named in ebpf/gen.go). The generated ebpf/hold_x86_bpfel.{go,o} are
# committed, so a plain build needs no clang.
BPF_GENERATED := ebpf/hold_x86_bpfel.go ebpf/hold_x86_bpfel.o
generate: deps
	$(GO) generate ./ebpf/

# The committed BPF objects must be what their source builds to, also from
# another directory (the objects carry no checkout path): regenerate in a
# temporary copy and compare.
generate-check: deps
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	cp -r go.mod go.sum ebpf $$tmp/ && \
	(cd $$tmp && $(GO) generate ./ebpf/) && \
	for f in $(BPF_GENERATED); do \
		if ! cmp -s $$tmp/$$f $$f; then \
			echo "generate-check: $$f does not match ebpf/bpf/hold.c: run 'make generate' and commit" >&2; exit 1; \
		fi; \
	done && echo "generate-check: $(BPF_GENERATED) match their source"

lint:
	@out=$$($(GOFMT) -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:" $$out >&2; exit 1; fi
	$(GO) vet ./...

# Tools the build and tests need. On Debian, as root, missing ones are installed.
DEPS := gcc:gcc objcopy:binutils ip:iproute2 clang-14:clang-14 llvm-strip-14:llvm-14 etcd:etcd-server
deps:
	@missing=""; for d in $(DEPS); do cmd=$${d%%:*}; pkg=$${d##*:}; \
		command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "deps: installing$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "deps: missing$$missing (install them, or run as root on Debian)" >&2; exit 1; fi; \
	fi
	@command -v $(GO) >/dev/null 2>&1 || [ -x $(GO) ] || { echo "deps: no Go toolchain (want go1.26 at /usr/local/go)" >&2; exit 1; }

clean:
	rm -rf bin
