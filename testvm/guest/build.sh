#!/bin/sh
# build.sh OUT: build the flat guest image (linked at 0x100000) into OUT.
# Reproducible: no build id, no debug info, fixed flags and input order.
set -eu

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTPUT" >&2
	exit 2
fi

case $1 in
/*) out=$1 ;;
*) out=$(pwd)/$1 ;;
esac
src=$(cd "$(dirname "$0")" && pwd)
CC=${CC:-gcc}
OBJCOPY=${OBJCOPY:-objcopy}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM

cd "$src"
"$CC" -ffreestanding -fno-pic -fno-pie -no-pie -mno-red-zone -mgeneral-regs-only \
	-mcmodel=small -fno-stack-protector -fcf-protection=none \
	-fno-asynchronous-unwind-tables -fno-unwind-tables -fno-ident \
	-nostdlib -static -O2 -Wall -Wextra -Werror \
	-Wl,--build-id=none -Wl,-T,guest.ld \
	-o "$tmp/guest.elf" entry.S guest.c
"$OBJCOPY" -O binary "$tmp/guest.elf" "$tmp/guest.bin"

size=$(wc -c <"$tmp/guest.bin")
if [ "$size" -ge $((0x80000)) ]; then
	echo "build.sh: guest image is $size bytes, CODE_MAX is 524288" >&2
	exit 1
fi
cat "$tmp/guest.bin" >"$out"
