package kvm_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"unsafe"

	"github.com/repagent/repagent/internal/le"
	"github.com/repagent/repagent/kvm"
)

// seedXSave is the size of seedVCPUState's XSAVE area.
const seedXSave = 4096

// seedVCPUState is a vCPU state with every variable part, built without KVM.
func seedVCPUState() []byte {
	s := kvm.VCPUState{
		XSave: make([]byte, seedXSave),
		MSRs:  []kvm.MSREntry{{Index: 0x10, Data: 42}},
		CPUID: []kvm.CPUIDEntry2{{Function: 0, EAX: 0xd}},
	}
	s.Regs.RIP = 0x100000
	b, _ := s.AppendBinary(nil)
	return b
}

func seedVMState() []byte {
	var s kvm.VMState
	s.PICSlave.ChipID, s.IOAPIC.ChipID = kvm.KVM_IRQCHIP_PIC_SLAVE, kvm.KVM_IRQCHIP_IOAPIC
	b, _ := s.AppendBinary(nil)
	return b
}

// A state cut anywhere is ErrShortState, and the error names the field it
// was cut in.
func TestDecodeNamesTruncatedField(t *testing.T) {
	fields := map[string]bool{}
	cutEverywhere[kvm.VCPUState](t, seedVCPUState(), fields)
	cutEverywhere[kvm.VMState](t, seedVMState(), fields)
	for _, f := range []string{"mp_state", "regs", "sregs", "xsave length", "xsave", "xcrs", "debugregs", "lapic",
		"msrs length", "msrs", "vcpu_events", "cpuid length", "cpuid", "tsc_khz",
		"clock", "pic master", "pic slave", "ioapic", "pit2"} {
		if !fields[f] {
			t.Errorf("no truncation named %q", f)
		}
	}
}

// cutEverywhere decodes every prefix of the valid state b as a T, checks
// each is ErrShortState naming a field, and adds the fields to named.
func cutEverywhere[T any, P stateCodec[T]](t *testing.T, b []byte, named map[string]bool) {
	t.Helper()
	for n := range len(b) {
		_, err := P(new(T)).Decode(b[:n])
		short, ok := errors.AsType[*le.ShortError](err)
		if !errors.Is(err, kvm.ErrShortState) || !ok {
			t.Fatalf("%T.Decode(%d of %d bytes) = %v, want ErrShortState naming a field", P(nil), n, len(b), err)
		}
		named[short.What] = true
	}
}

// A length over its limit is refused, and is not a truncation.
func TestDecodeLimits(t *testing.T) {
	vcpu := seedVCPUState()
	var z kvm.VCPUState
	xsaveAt := int(unsafe.Sizeof(z.MPState) + unsafe.Sizeof(z.Regs) + unsafe.Sizeof(z.Sregs))
	msrsAt := xsaveAt + 4 + seedXSave + int(unsafe.Sizeof(z.XCRs)+unsafe.Sizeof(z.DebugRegs)+unsafe.Sizeof(z.LAPIC))
	tests := []struct {
		name    string
		at      int // offset of the length to replace
		wantErr string
	}{
		{"xsave", xsaveAt, "xsave: length 4294967295 exceeds the limit of 1048576"},
		{"msrs", msrsAt, "msrs: length 4294967295 exceeds the limit of 4096"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := bytes.Clone(vcpu)
			binary.LittleEndian.PutUint32(b[tc.at:], 0xffffffff)
			var s kvm.VCPUState
			_, err := s.Decode(b)
			if _, ok := errors.AsType[*le.LimitError](err); !ok || errors.Is(err, kvm.ErrShortState) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Decode = %v, want a limit error %q", err, tc.wantErr)
			}
		})
	}
}

// stateCodec is what VCPUState and VMState have in common.
type stateCodec[T any] interface {
	*T
	Decode(b []byte) ([]byte, error)
	AppendBinary(b []byte) ([]byte, error)
}

// checkDecode decodes b as a T: an error means no result; what decodes
// encodes back to the bytes it was read from.
func checkDecode[T any, P stateCodec[T]](t *testing.T, b []byte) {
	p := P(new(T))
	rest, err := p.Decode(b)
	if err != nil {
		if rest != nil {
			t.Fatal("Decode returned the rest with an error")
		}
		return
	}
	again, _ := p.AppendBinary(nil)
	if read := b[:len(b)-len(rest)]; !bytes.Equal(again, read) {
		t.Fatalf("decode+encode changed the state:\n%x\n%x", read, again)
	}
}

// FuzzVCPUStateDecode checks VCPUState.Decode as checkDecode says.
func FuzzVCPUStateDecode(f *testing.F) {
	f.Add(seedVCPUState())                  // a valid state
	f.Add(seedVCPUState()[:600])            // cut inside the xsave area
	f.Add(append(seedVCPUState(), 1, 2, 3)) // followed by more
	f.Add(bytes.Repeat([]byte{0xff}, 4096)) // lengths far over the limits
	f.Fuzz(checkDecode[kvm.VCPUState])
}

// FuzzVMStateDecode checks VMState.Decode as checkDecode says.
func FuzzVMStateDecode(f *testing.F) {
	f.Add(seedVMState())                    // a valid state
	f.Add(seedVMState()[:100])              // cut inside the PIC master
	f.Add(append(seedVMState(), 0))         // followed by more
	f.Add(make([]byte, len(seedVMState()))) // every chip id 0
	f.Fuzz(checkDecode[kvm.VMState])
}
