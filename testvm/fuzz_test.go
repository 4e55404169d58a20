package testvm

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"testing"

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
	s := &SavedState{Config: c, ready: vcpus, diskReqCons: 77}
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
		if again := s.encode(); !bytes.Equal(again, b) {
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
	f.Add([]byte{})             // empty body
	f.Add(seedState(1)[16:200]) // cut short
	f.Fuzz(func(t *testing.T, body []byte) {
		b := binary.LittleEndian.AppendUint32([]byte(stateMagic), stateVersion)
		b = binary.LittleEndian.AppendUint32(b, uint32(len(body)))
		b = append(b, body...)
		b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
		s, err := DecodeState(b)
		if err != nil {
			if s != nil {
				t.Fatal("DecodeState returned a state with an error")
			}
			return
		}
		if again := s.encode(); !bytes.Equal(again, b) {
			t.Fatalf("decode+encode changed the state")
		}
	})
}

// TestDiskStateRoundTrip: the block device's configuration and ring position
// survive encode and decode.
func TestDiskStateRoundTrip(t *testing.T) {
	s, err := DecodeState(seedDiskState())
	if err != nil {
		t.Fatal(err)
	}
	if d := s.Config.Disk; d == nil || *d != (DiskConfig{Blocks: 1000, WorkingSet: 1000, FlushEvery: DefaultDiskFlushEvery}) || s.diskReqCons != 77 {
		t.Fatalf("decoded disk %+v, req_cons %d", s.Config.Disk, s.diskReqCons)
	}
	if _, err := DecodeState(seedState(1)); err != nil {
		t.Fatal(err)
	}
}
