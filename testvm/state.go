package testvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/repagent/repagent/kvm"
)

// Machine state encoding (Save, Restore):
//
//	magic   [8]byte "RPAGVMST"
//	version uint32  stateVersion
//	length  uint32  bytes of body
//	body:
//	  config   memSize u64, vcpus u32, workload u32, pattern u32, hot u32,
//	           hotWrites u32, content u32 (0, from before it existed: stamp),
//	           workingSet u64, rate u64, seed u64,
//	           phaseOps u64, idleTick u64
//	  layout   lowSize u64, regionPages u64 (derived; checked on restore)
//	  net      present u32; if 1: mac [8]byte (6 used), ip [4]byte, port u32,
//	           streamRate u64, streamBytes u32, service u32, txCons u32,
//	           rxProd u32
//	  disk     present u32; if 1: blocks u64, workingSet u64, flushEvery u64,
//	           reqCons u32, reserved u32
//	  devices  ready u32 (guest vCPUs that reported READY)
//	  vm       kvm.VMState encoding
//	  vcpus    vcpus x kvm.VCPUState encoding
//	crc32c  uint32 over everything before it
//
// All integers are little-endian. Guest memory is not part of the state: it
// travels separately (a memory file, or a replica).

const (
	stateMagic   = "RPAGVMST"
	stateVersion = 3
	// maxStateSize bounds what Restore accepts, so a hostile length cannot
	// make it allocate without limit. Real states are about 10 KiB per vCPU.
	maxStateSize = 1 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrBadState is returned (wrapped) by Restore and DecodeState for a state
// that is truncated, corrupted, of another version or inconsistent.
var ErrBadState = errors.New("bad machine state")

// Save returns the complete machine state: every vCPU, the in-kernel irqchip,
// PIT and clock, the devices and the guest configuration. The machine must be
// paused (or created and not yet started).
func (m *Machine) Save() ([]byte, error) {
	m.ctl.Lock()
	defer m.ctl.Unlock()
	return m.saveLocked()
}

// saveLocked is Save with m.ctl held.
func (m *Machine) saveLocked() ([]byte, error) {
	switch st := m.State(); st {
	case Paused, Created:
	case Stopped:
		return nil, m.stoppedErr("save")
	default:
		return nil, fmt.Errorf("save: machine is %s, pause it first", st)
	}
	s := &m.saved
	s.Config = m.cfg
	s.Config.Tap = nil
	s.Config.DiskIO, s.Config.DiskPoll = nil, 0
	s.netTxCons, s.netRxProd, s.diskReqCons = 0, 0, 0
	if m.net != nil {
		// Pause holds the device still (or it never ran): these are the
		// values in guest memory too.
		s.netTxCons, s.netRxProd = m.net.cons, m.net.rxProd
	}
	if m.disk != nil {
		s.diskReqCons = m.disk.cons
	}
	m.evMu.Lock()
	s.ready = m.ready
	m.evMu.Unlock()
	if err := m.vm.SaveState(&s.vm); err != nil {
		return nil, fmt.Errorf("save VM state: %w", err)
	}
	if len(s.vcpus) != len(m.vcpus) {
		s.vcpus = make([]kvm.VCPUState, len(m.vcpus))
	}
	for i, v := range m.vcpus {
		if err := v.cpu.SaveState(&s.vcpus[i], m.msrs); err != nil {
			return nil, fmt.Errorf("save vCPU %d: %w", v.id, err)
		}
	}
	return s.encode(), nil
}

// encode returns the state's encoding, described above.
func (s *SavedState) encode() []byte {
	b := make([]byte, 0, 16+len(s.vcpus)*12<<10)
	b = append(b, stateMagic...)
	b = binary.LittleEndian.AppendUint32(b, stateVersion)
	b = binary.LittleEndian.AppendUint32(b, 0) // length, patched below
	c := s.Config
	l := newLayout(c.MemSize, c.VCPUs)
	b = appendU64(b, c.MemSize)
	b = appendU32(b, uint32(c.VCPUs), uint32(c.Workload), uint32(c.Pattern), c.HotPercent, c.HotWritePercent, uint32(c.Content))
	b = appendU64(b, c.WorkingSet, c.Rate, c.Seed, c.PhaseOps, c.IdleTickMicros)
	b = appendU64(b, l.lowSize, l.regionPages)
	if n := c.Net; n != nil {
		var mac [8]byte
		copy(mac[:], n.MAC)
		ip := n.IP.As4()
		b = appendU32(b, 1)
		b = append(b, mac[:]...)
		b = append(b, ip[:]...)
		b = appendU32(b, uint32(n.Port))
		b = appendU64(b, n.StreamRate)
		b = appendU32(b, n.StreamBytes, uint32(n.Service), s.netTxCons, s.netRxProd)
	} else {
		b = appendU32(b, 0)
	}
	if d := c.Disk; d != nil {
		b = appendU32(b, 1)
		b = appendU64(b, d.Blocks, d.WorkingSet, d.FlushEvery)
		b = appendU32(b, s.diskReqCons, 0)
	} else {
		b = appendU32(b, 0)
	}
	b = appendU32(b, uint32(s.ready))
	b, _ = s.vm.AppendBinary(b)
	for i := range s.vcpus {
		b, _ = s.vcpus[i].AppendBinary(b)
	}
	binary.LittleEndian.PutUint32(b[12:], uint32(len(b)-16))
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

func appendU64(b []byte, vs ...uint64) []byte {
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b
}

func appendU32(b []byte, vs ...uint32) []byte {
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	return b
}

// SavedState is a decoded machine state.
type SavedState struct {
	Config Config // the guest configuration (no runtime fields)
	ready  int
	// The network device's ring positions (with Config.Net).
	netTxCons, netRxProd uint32
	// The block device's req_cons (with Config.Disk).
	diskReqCons uint32
	vm          kvm.VMState
	vcpus       []kvm.VCPUState
}

// DecodeState checks and decodes a state made by Save. It returns an error
// wrapping ErrBadState, naming the problem, for anything truncated, corrupted,
// of an unknown version or inconsistent; it never panics.
func DecodeState(b []byte) (*SavedState, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadState, fmt.Sprintf(format, args...))
	}
	if len(b) > maxStateSize {
		return nil, bad("%d bytes, more than the %d a state may have", len(b), maxStateSize)
	}
	if len(b) < 20 {
		return nil, bad("%d bytes, too short for a header", len(b))
	}
	if string(b[:8]) != stateMagic {
		return nil, bad("magic %q, want %q (not a repagent machine state)", b[:8], stateMagic)
	}
	if v := binary.LittleEndian.Uint32(b[8:]); v != stateVersion {
		return nil, bad("version %d, this build reads version %d", v, stateVersion)
	}
	n := int(binary.LittleEndian.Uint32(b[12:]))
	if len(b) != 16+n+4 {
		return nil, bad("length field says %d body bytes, have %d (truncated or trailing data)", n, len(b)-20)
	}
	if got, want := crc32.Checksum(b[:16+n], castagnoli), binary.LittleEndian.Uint32(b[16+n:]); got != want {
		return nil, bad("checksum %#08x, computed %#08x (corrupted)", want, got)
	}
	body := b[16 : 16+n]
	d := &rd{b: body}
	s := &SavedState{}
	c := &s.Config
	c.MemSize = d.u64()
	c.VCPUs = int(d.u32())
	c.Workload, c.Pattern = Workload(d.u32()), Pattern(d.u32())
	c.HotPercent, c.HotWritePercent = d.u32(), d.u32()
	c.Content = Content(d.u32())
	if c.Content == 0 {
		c.Content = Stamp
	}
	c.WorkingSet, c.Rate, c.Seed, c.PhaseOps, c.IdleTickMicros = d.u64(), d.u64(), d.u64(), d.u64(), d.u64()
	lowSize, regionPages := d.u64(), d.u64()
	switch present := d.u32(); present {
	case 0:
	case 1:
		n := &NetConfig{}
		mac := d.bytes(8)
		ip := d.bytes(4)
		n.MAC = net.HardwareAddr(mac[:6])
		n.IP = netip.AddrFrom4([4]byte(ip))
		port := d.u32()
		n.StreamRate = d.u64()
		n.StreamBytes = d.u32()
		n.Service = Workload(d.u32())
		s.netTxCons, s.netRxProd = d.u32(), d.u32()
		if port > 0xffff {
			return nil, bad("network port %d", port)
		}
		n.Port = uint16(port)
		c.Net = n
	default:
		return nil, bad("network device flag %d, want 0 or 1", present)
	}
	switch present := d.u32(); present {
	case 0:
	case 1:
		dc := &DiskConfig{}
		dc.Blocks, dc.WorkingSet, dc.FlushEvery = d.u64(), d.u64(), d.u64()
		s.diskReqCons = d.u32()
		if r := d.u32(); r != 0 {
			return nil, bad("block device reserved field %d", r)
		}
		// Saved configurations have their defaults filled in.
		if dc.WorkingSet == 0 || dc.FlushEvery == 0 {
			return nil, bad("block device working set %d, flush every %d: want both set", dc.WorkingSet, dc.FlushEvery)
		}
		c.Disk = dc
	default:
		return nil, bad("block device flag %d, want 0 or 1", present)
	}
	s.ready = int(d.u32())
	if d.short {
		return nil, bad("body ends inside the config")
	}
	if err := c.Validate(); err != nil {
		return nil, bad("%v", err)
	}
	if l := newLayout(c.MemSize, c.VCPUs); l.lowSize != lowSize || l.regionPages != regionPages {
		return nil, bad("memory layout (low %d, region %d pages) does not match this build's (%d, %d)", lowSize, regionPages, l.lowSize, l.regionPages)
	}
	if s.ready < 0 || s.ready > c.VCPUs {
		return nil, bad("%d vCPUs ready of %d", s.ready, c.VCPUs)
	}
	rest, err := s.vm.Decode(d.b)
	if err != nil {
		return nil, bad("%v", err)
	}
	s.vcpus = make([]kvm.VCPUState, c.VCPUs)
	for i := range s.vcpus {
		if rest, err = s.vcpus[i].Decode(rest); err != nil {
			return nil, bad("vCPU %d: %v", i, err)
		}
	}
	if len(rest) != 0 {
		return nil, bad("%d bytes after the last vCPU", len(rest))
	}
	return s, nil
}

type rd struct {
	b     []byte
	short bool
}

func (d *rd) u64() uint64 {
	if len(d.b) < 8 {
		d.short = true
		d.b = nil
		return 0
	}
	v := binary.LittleEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

// bytes returns the next n bytes (zeros once the body is short).
func (d *rd) bytes(n int) []byte {
	if len(d.b) < n {
		d.short = true
		d.b = nil
		return make([]byte, n)
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}

func (d *rd) u32() uint32 {
	if len(d.b) < 4 {
		d.short = true
		d.b = nil
		return 0
	}
	v := binary.LittleEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}

// RestoreOptions are the runtime settings of a restored machine; everything
// else comes from the saved state.
type RestoreOptions struct {
	Console io.Writer
	// Tap is the restored network device's tap (see Config.Tap).
	Tap *os.File
	// DiskIO is the restored block device's backend (see Config.DiskIO),
	// required when the state has a block device. It must hold the disk as
	// it was at the checkpoint: the image the saved machine wrote, or a
	// replica of it at the same epoch.
	DiskIO DiskBackend
	// DiskPoll is the restored block device's polling (see Config.DiskPoll).
	DiskPoll         time.Duration
	DirtyLog         bool
	DirtyRingEntries uint32
	DirtyRingFull    func(vcpu int) error
}

// Restore builds a machine, not yet started, from a state made by Save and the
// guest memory in mem: a memfd (or any file) of exactly the state's memory size,
// which the machine maps shared and takes ownership of (it is closed with the
// machine; on error it stays the caller's). Mapping the file directly means a backup restores from its replica
// without copying memory. The state is fully checked before anything is built.
func Restore(state []byte, mem *os.File, opt RestoreOptions) (*Machine, error) {
	s, err := DecodeState(state)
	if err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	fi, err := mem.Stat()
	if err != nil {
		return nil, fmt.Errorf("restore: stat memory file: %w", err)
	}
	if uint64(fi.Size()) != s.Config.MemSize {
		return nil, fmt.Errorf("restore: %w: the state is for a %s guest, the memory image holds %d bytes",
			ErrBadState, FormatSize(s.Config.MemSize), fi.Size())
	}
	cfg := s.Config.withDefaults()
	cfg.Console, cfg.DirtyLog, cfg.DirtyRingEntries, cfg.DirtyRingFull = opt.Console, opt.DirtyLog, opt.DirtyRingEntries, opt.DirtyRingFull
	cfg.Tap = opt.Tap
	cfg.DiskIO = opt.DiskIO
	if cfg.Disk != nil && opt.DiskPoll != 0 {
		cfg.DiskPoll = opt.DiskPoll
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	m, err := build(cfg, mem)
	if err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	if m.net != nil {
		// The ring positions live in guest memory too; a state and a memory
		// image that disagree are not from the same checkpoint.
		tx, rx := load32(m.mem, netAddr+nTxCons), load32(m.mem, netAddr+nRxProd)
		if tx != s.netTxCons || rx != s.netRxProd {
			m.memF = nil
			m.Close()
			return nil, fmt.Errorf("restore: %w: network rings at tx %d rx %d in the state, %d and %d in memory (not the same checkpoint)",
				ErrBadState, s.netTxCons, s.netRxProd, tx, rx)
		}
		m.net.cons, m.net.rxProd = s.netTxCons, s.netRxProd
	}
	if m.disk != nil {
		// Likewise req_cons. The requests after it (up to req_prod) were not
		// started when the state was saved: the restored device executes them.
		c, p := load32(m.mem, diskAddr+dkReqCons), load32(m.mem, diskAddr+dkReqProd)
		if c != s.diskReqCons || p-c > diskSlots {
			m.memF = nil
			m.Close()
			return nil, fmt.Errorf("restore: %w: block device ring at req_cons %d in the state, req_cons %d and req_prod %d in memory (not the same checkpoint)",
				ErrBadState, s.diskReqCons, c, p)
		}
		m.disk.cons = s.diskReqCons
	}
	for i, v := range m.vcpus {
		if err := v.cpu.RestoreState(&s.vcpus[i]); err != nil {
			m.memF = nil // the caller keeps the file on failure
			m.Close()
			return nil, fmt.Errorf("restore vCPU %d: %w", i, err)
		}
	}
	if err := m.vm.RestoreState(&s.vm); err != nil {
		m.memF = nil
		m.Close()
		return nil, fmt.Errorf("restore VM state: %w", err)
	}
	m.ready = s.ready
	return m, nil
}
