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
	s := &SavedState{Config: Config{MemSize: 32 << 20, VCPUs: vcpus, Workload: Dirty, Pattern: Seq, WorkingSet: 10}.withDefaults(), ready: vcpus}
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
	for _, seed := range [][]byte{seedState(1), seedState(2)} {
		f.Add(seed[16 : len(seed)-4]) // a valid body
	}
	f.Add([]byte{})             // empty body
	f.Add(seedState(1)[16:200]) // cut short
	f.Fuzz(func(t *testing.T, body []byte) {
		b := append([]byte(stateMagic), 1, 0, 0, 0)
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
