package ebpf

// The BPF programs are compiled with Debian's clang 14, named explicitly so
// that `make generate` gives the same bytes on every machine (see the
// Makefile's generate-check). The committed hold_x86_bpfel.{go,o} are what
// a plain build uses: no clang needed.
//
//go:generate go tool bpf2go -cc clang-14 -strip llvm-strip-14 -tags linux -target amd64 -type gate_ctl -type epoch_drops hold bpf/hold.c -- -Wall -Werror -mcpu=v3 -I/usr/include/x86_64-linux-gnu
