package testvm

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"net/netip"
	"reflect"
	"testing"

	"github.com/repagent/repagent/kvm"
)

// goldenRings are the device ring positions of a golden state.
type goldenRings struct{ txCons, rxProd, reqCons uint32 }

// goldenState builds a state with every field set to a value of its own, so
// that a field moved, dropped or swapped changes the encoding.
func goldenState(c Config, rings goldenRings) *SavedState {
	s := &SavedState{ready: c.VCPUs}
	s.setConfig(c)
	if s.net != nil {
		s.net.txCons, s.net.rxProd = rings.txCons, rings.rxProd
	}
	if s.disk != nil {
		s.disk.reqCons = rings.reqCons
	}
	s.vm.Clock = kvm.ClockData{Clock: 0x1111_2222_3333, Flags: 2, Realtime: 0x4444, HostTSC: 0x5555}
	s.vm.PICMaster.Chip[0] = 0x61
	s.vm.PICSlave.ChipID, s.vm.PICSlave.Chip[1] = kvm.KVM_IRQCHIP_PIC_SLAVE, 0x62
	s.vm.IOAPIC.ChipID, s.vm.IOAPIC.Chip[511] = kvm.KVM_IRQCHIP_IOAPIC, 0x63
	s.vm.PIT.Flags, s.vm.PIT.Channels[2].Count = 1, 0xffff
	s.vcpus = make([]kvm.VCPUState, c.VCPUs)
	for i := range s.vcpus {
		v := &s.vcpus[i]
		k := uint64(i + 1)
		v.MPState.MPState = uint32(i)
		v.Regs.RIP, v.Regs.RSP, v.Regs.RFLAGS = 0x100000*k, 0x8000*k, 2
		v.Sregs.CR0, v.Sregs.CR3, v.Sregs.EFER, v.Sregs.CS.Selector = 0x80050033, 0x1000*k, 0xd01, 0x2b
		v.XSave = make([]byte, 4096)
		for j := range v.XSave {
			v.XSave[j] = byte(j*7) ^ byte(i)
		}
		v.XCRs.NrXCRs, v.XCRs.XCRs[0].Value = 1, 7
		v.DebugRegs.DR6, v.DebugRegs.DR7 = 0xffff0ff0, 0x400
		v.LAPIC.Regs[0x20], v.LAPIC.Regs[0x3ff] = byte(i), 0xaa
		v.MSRs = []kvm.MSREntry{{Index: 0x10, Data: 42 * k}, {Index: 0xc0000080, Data: 0xd01}}
		v.Events.SIPIVector, v.Events.Flags, v.Events.ExceptionPayload = uint32(i), 3, 0x99
		v.CPUID = []kvm.CPUIDEntry2{{Function: 0, EAX: 0xd}, {Function: 1, Index: uint32(i), EBX: 0x800}}
		v.TSCKHz = 2_999_000
	}
	return s
}

// Golden states, each a distinct combination of the encoding's parts. The
// sums and the prefix were recorded from the format's first implementation
// (one function over the whole state, before it was split into a part per
// component): existing snapshots, and the states a primary sends its backup,
// must keep their bytes.
var goldenCases = []struct {
	name  string
	cfg   Config
	rings goldenRings
	sum   string // SHA-256 of the whole encoding
}{
	{
		name: "bare",
		cfg:  Config{MemSize: 32 << 20, VCPUs: 1, Workload: Counter, Pattern: Random, Content: Stamp, HotPercent: 10, HotWritePercent: 90, IdleTickMicros: 1000},
		sum:  "c8cee62f82db6221fee03e834688aba46a42e3c8ffb48bcdf233ffeaa0a3b4a9",
	},
	{
		name: "all",
		cfg: Config{MemSize: 64 << 20, VCPUs: 2, Workload: Disk, Pattern: HotCold, Content: Text,
			WorkingSet: 1234, Rate: 5678, Seed: 0x5eed, HotPercent: 20, HotWritePercent: 80, PhaseOps: 77, IdleTickMicros: 1500,
			Net:  &NetConfig{MAC: net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}, IP: netip.MustParseAddr("10.1.2.3"), Port: 4242, StreamRate: 333, StreamBytes: 100, Service: UDPEcho},
			Disk: &DiskConfig{Blocks: 5000, WorkingSet: 4000, FlushEvery: 64}},
		rings: goldenRings{txCons: 0x1001, rxProd: 0x2002, reqCons: 0x3003},
		sum:   "418005085ead74b4fbd96be9a76e31ef85b1ac7786b2744b65dccc2caf655624",
	},
	{
		name: "net",
		cfg: Config{MemSize: 16 << 20, VCPUs: 1, Workload: UDPStream, Pattern: Random, Content: Sparse, HotPercent: 10, HotWritePercent: 90, IdleTickMicros: 1000,
			Net: &NetConfig{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, IP: netip.MustParseAddr("192.168.0.2"), Port: DefaultNetPort, StreamRate: DefaultStreamRate, StreamBytes: DefaultStreamBytes, Service: UDPStream}},
		rings: goldenRings{txCons: 0xffffffff, rxProd: 1},
		sum:   "f03ba69fa6a31a468cbd271c9b92e0ca16b0f22a5370afe8115da5f595553ff1",
	},
	{
		name: "disk",
		cfg: Config{MemSize: 32 << 20, VCPUs: 3, Workload: Disk, Pattern: Seq, Content: Stamp, HotPercent: 10, HotWritePercent: 90, IdleTickMicros: 1000,
			Disk: &DiskConfig{Blocks: MaxDiskBlocks, WorkingSet: 100, FlushEvery: DefaultDiskFlushEvery}},
		rings: goldenRings{reqCons: 0x80000000},
		sum:   "54b952f7a39bd162d2e0cf1cad573686a97f0e071cf2f430a0925728812180d1",
	},
}

// goldenAllPrefix is the "all" case's encoding up to the kvm state, field
// by field as the format comment in state.go lists them.
var goldenAllPrefix = "" +
	"52504147564d5354" + "03000000" + "8c380000" + // magic, version, body length
	"0000000400000000" + // config: memSize
	"02000000" + "06000000" + "03000000" + "14000000" + "50000000" + "02000000" + // vcpus, workload, pattern, hot, hotWrites, content
	"d204000000000000" + "2e16000000000000" + "ed5e000000000000" + "4d00000000000000" + "dc05000000000000" + // workingSet, rate, seed, phaseOps, idleTick
	"0000000200000000" + "001e000000000000" + // layout: lowSize, regionPages
	"01000000" + "5254001234560000" + "0a010203" + "92100000" + // net: present, mac, ip, port
	"4d01000000000000" + "64000000" + "04000000" + "01100000" + "02200000" + // streamRate, streamBytes, service, txCons, rxProd
	"01000000" + "8813000000000000" + "a00f000000000000" + "4000000000000000" + // disk: present, blocks, workingSet, flushEvery
	"03300000" + "00000000" + // reqCons, reserved
	"02000000" // devices: ready

// TestStateGolden: the encoding of known states is byte for byte the one the
// format has always had (stateVersion 3), and decoding it gives the state
// back.
func TestStateGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			want := goldenState(tc.cfg, tc.rings)
			b := want.encode()
			if sum := sha256.Sum256(b); hex.EncodeToString(sum[:]) != tc.sum {
				t.Errorf("encoding of %d bytes has SHA-256 %x, want %s", len(b), sum, tc.sum)
			}
			if tc.name == "all" {
				prefix, _ := hex.DecodeString(goldenAllPrefix)
				if !bytes.HasPrefix(b, prefix) {
					t.Errorf("encoding starts\n%x\nwant\n%x", b[:min(len(b), len(prefix))], prefix)
				}
			}
			got, err := DecodeState(b)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("decoded\n%+v\nwant\n%+v", got, want)
			}
		})
	}
}
