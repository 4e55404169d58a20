package testvm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"strings"
	"testing"

	"github.com/repagent/repagent/internal/le"
	"github.com/repagent/repagent/kvm"
)

// seedState is a structurally valid state built without KVM.
func seedState(vcpus int) []byte {
	return seedStateOf(Config{MemSize: 32 << 20, VCPUs: vcpus, Workload: Dirty, Pattern: Seq, WorkingSet: 10})
}

// seedDiskState is a valid state of a machine with a block device.
func seedDiskState() []byte {
	return seedStateOf(Config{MemSize: 32 << 20, VCPUs: 1, Workload: Disk, Disk: &DiskConfig{Blocks: 1000}})
}

func seedStateOf(c Config) []byte {
	vcpus := c.VCPUs
	c = c.withDefaults()
	c.DiskPoll = 0 // not saved
	s := &SavedState{ready: vcpus}
	s.setConfig(c)
	if s.disk != nil {
		s.disk.reqCons = 77
	}
	s.vm.PICSlave.ChipID = kvm.KVM_IRQCHIP_PIC_SLAVE
	s.vm.IOAPIC.ChipID = kvm.KVM_IRQCHIP_IOAPIC
	s.vcpus = make([]kvm.VCPUState, vcpus)
	for i := range s.vcpus {
		s.vcpus[i].XSave = make([]byte, 4096)
		s.vcpus[i].MSRs = []kvm.MSREntry{{Index: 0x10, Data: 42}}
		s.vcpus[i].CPUID = []kvm.CPUIDEntry2{{Function: 0, EAX: 0xd}}
		s.vcpus[i].Regs.RIP = 0x100000
	}
	return s.encode()
}

// FuzzDecodeState: an error means no result; a decoded state encodes back to
// the same bytes.
func FuzzDecodeState(f *testing.F) {
	f.Add(seedState(1))            // a valid 1-vCPU state
	f.Add(seedState(2))            // a valid 2-vCPU state
	f.Add(seedDiskState())         // a valid state with a block device
	f.Add(seedState(1)[:100])      // truncated inside the body
	f.Add([]byte("RPAGVMST"))      // magic only
	f.Add(append(seedState(1), 0)) // trailing byte
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeState(b)
		if err != nil {
			if s != nil {
				t.Fatal("DecodeState returned a state with an error")
			}
			return
		}
		if again := s.encode(); !bytes.Equal(again, withContent(b)) {
			t.Fatalf("decode+encode changed the state:\n%x\n%x", b, again)
		}
	})
}

// FuzzDecodeStateBody fuzzes the body behind a valid header and checksum, so
// the decoders past the CRC (config, layout, kvm state, limits) are reached.
func FuzzDecodeStateBody(f *testing.F) {
	for _, seed := range [][]byte{seedState(1), seedState(2), seedDiskState()} {
		f.Add(seed[16 : len(seed)-4]) // a valid body
	}
	f.Add([]byte{})                                               // empty body
	f.Add(seedState(1)[16:200])                                   // cut short
	f.Add(withoutContent(seedState(1))[16 : len(seedState(1))-4]) // saved before Content existed
	f.Fuzz(func(t *testing.T, body []byte) {
		b := frameState(body)
		s, err := DecodeState(b)
		if err != nil {
			if s != nil {
				t.Fatal("DecodeState returned a state with an error")
			}
			return
		}
		if again := s.encode(); !bytes.Equal(again, withContent(b)) {
			t.Fatalf("decode+encode changed the state")
		}
	})
}

// contentAt is the offset of the config's content field in a state.
const contentAt = 16 + 28

// withoutContent returns a copy of the valid state b as saved before Content
// existed: content 0.
func withoutContent(b []byte) []byte {
	b = bytes.Clone(b)
	binary.LittleEndian.PutUint32(b[contentAt:], 0)
	return frameState(b[16 : len(b)-4])
}

// withContent returns the valid state b as it encodes again: a content of 0
// (from before Content existed) reads as Stamp, the one other thing a
// decoded state does not keep. Other states are returned as they are.
func withContent(b []byte) []byte {
	if binary.LittleEndian.Uint32(b[contentAt:]) != 0 {
		return b
	}
	b = bytes.Clone(b)
	binary.LittleEndian.PutUint32(b[contentAt:], uint32(Stamp))
	return frameState(b[16 : len(b)-4])
}

// frameState puts body behind a valid header and before its checksum.
func frameState(body []byte) []byte {
	b := binary.LittleEndian.AppendUint32([]byte(stateMagic), stateVersion)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(body)))
	b = append(b, body...)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// TestDecodeStateErrors: each part's checks, and those of the composition,
// refuse a state with ErrBadState and say what is wrong; a state cut short
// names the field it ends in.
func TestDecodeStateErrors(t *testing.T) {
	all := goldenCases[1]
	if all.name != "all" {
		t.Fatal("goldenCases[1] is not the state with every part")
	}
	body := func() []byte {
		b := goldenState(all.cfg, all.rings).encode()
		return b[16 : len(b)-4]
	}
	// Offsets in the body, from goldenAllPrefix.
	const (
		netFlag   = 88
		netPort   = netFlag + 16
		netTxCons = netFlag + 36
		diskFlag  = netFlag + 44
		diskWS    = diskFlag + 12
		diskCons  = diskFlag + 28
		diskRes   = diskFlag + 32
		ready     = diskFlag + 36
		layout    = 72
	)
	set32 := func(at int, v uint32) []byte {
		b := body()
		binary.LittleEndian.PutUint32(b[at:], v)
		return b
	}
	set := func(at int, v ...byte) []byte {
		b := body()
		copy(b[at:], v)
		return b
	}
	tests := []struct {
		name      string
		body      []byte
		wantErr   string
		wantShort string // the field a cut body ends in
	}{
		{"cut in config", body()[:4], "config memSize needs 8 bytes, 4 left", "config memSize"},
		{"cut in layout", body()[:layout+9], "layout regionPages needs 8 bytes, 1 left", "layout regionPages"},
		{"cut before net", body()[:netFlag], "network device flag needs 4 bytes, 0 left", "network device flag"},
		{"cut in net", body()[:netTxCons+2], "net txCons needs 4 bytes, 2 left", "net txCons"},
		{"cut in disk", body()[:diskCons+3], "disk reqCons needs 4 bytes, 3 left", "disk reqCons"},
		{"cut before ready", body()[:ready], "devices ready needs 4 bytes, 0 left", "devices ready"},
		{"cut in the kvm state", body()[:ready+4+20], "decode VM state: truncated kvm state: clock needs 48 bytes, 20 left", ""},
		{"cut in the last vCPU", body()[:len(body())-1], "vCPU 1: decode vCPU state: truncated kvm state: tsc_khz needs 4 bytes, 3 left", ""},
		{"trailing byte", append(body(), 0), "1 bytes after the last vCPU", ""},
		{"net flag", set32(netFlag, 2), "network device flag 2, want 0 or 1", ""},
		{"net port", set32(netPort, 0x10000), "network port 65536", ""},
		{"net MAC padding", set(netFlag+4+6, 0, 1), "network MAC padding 0001, want zeros", ""},
		{"disk flag", set32(diskFlag, 7), "block device flag 7, want 0 or 1", ""},
		{"disk reserved", set32(diskRes, 1), "block device reserved field 1", ""},
		{"disk working set", set32(diskWS, 0), "block device working set 0, flush every 64: want both set", ""},
		{"cut before the disk's checked fields", body()[:diskWS+5], "disk workingSet needs 8 bytes, 5 left", "disk workingSet"},
		{"layout", set32(layout+8, 1), "memory layout (low 33554432, region 1 pages) does not match this build's (33554432, 7680)", ""},
		{"ready", set32(ready, 3), "3 vCPUs ready of 2", ""},
		{"config", set32(8, 9), "invalid VM config: 9 vCPUs: want 1 to", ""},
		{"no disk for the disk workload", append(set32(diskFlag, 0)[:diskFlag+4], body()[ready:]...), "workload disk needs a block device", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := DecodeState(frameState(tc.body))
			if s != nil || !errors.Is(err, ErrBadState) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("DecodeState = %v, want ErrBadState saying %q", err, tc.wantErr)
			}
			if tc.wantShort == "" {
				return
			}
			if short, ok := errors.AsType[*le.ShortError](err); !ok || short.What != tc.wantShort {
				t.Errorf("error %v does not name the field %q as short", err, tc.wantShort)
			}
		})
	}
}

// TestDiskStateRoundTrip: the block device's configuration and ring position
// survive encode and decode.
func TestDiskStateRoundTrip(t *testing.T) {
	s, err := DecodeState(seedDiskState())
	if err != nil {
		t.Fatal(err)
	}
	if d := s.Config.Disk; d == nil || *d != (DiskConfig{Blocks: 1000, WorkingSet: 1000, FlushEvery: DefaultDiskFlushEvery}) || s.disk.reqCons != 77 {
		t.Fatalf("decoded disk %+v, req_cons %d", s.Config.Disk, s.disk.reqCons)
	}
	if _, err := DecodeState(seedState(1)); err != nil {
		t.Fatal(err)
	}
}
