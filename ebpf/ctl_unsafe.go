package ebpf

import (
	"fmt"
	"os"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// mmapArray maps a BPF_F_MMAPABLE array map read-write. The kernel lays the
// elements out from offset 0, each value rounded up to 8 bytes.
func mmapArray(m *ebpf.Map) ([]byte, error) {
	size := int(m.MaxEntries()) * int((m.ValueSize()+7)&^7)
	page := os.Getpagesize()
	size = (size + page - 1) &^ (page - 1)
	mem, err := unix.Mmap(m.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap map %s: %w", m.String(), err)
	}
	return mem, nil
}

// controlBlock is the gate's view of the ctl map's single element. Its
// fields are accessed with sync/atomic only: the programs update them
// concurrently.
func controlBlock(mem []byte) *holdGateCtl {
	if len(mem) < int(unsafe.Sizeof(holdGateCtl{})) {
		panic("ebpf: ctl mapping smaller than struct gate_ctl")
	}
	return (*holdGateCtl)(unsafe.Pointer(&mem[0]))
}

// dropSlots is the gate's view of the drops map: epochSlots elements.
func dropSlots(mem []byte) []holdEpochDrops {
	if len(mem) < epochSlots*int(unsafe.Sizeof(holdEpochDrops{})) {
		panic("ebpf: drops mapping smaller than EPOCH_SLOTS struct epoch_drops")
	}
	return unsafe.Slice((*holdEpochDrops)(unsafe.Pointer(&mem[0])), epochSlots)
}
