package testvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"time"

	"github.com/repagent/repagent/internal/le"
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
//
// Each component that is checkpointed has a part, a type beside it with the
// section's encoding and decoding (which checks what the part alone can):
// configState (config_state.go) the config and layout sections, netState
// (net_state.go) the net section, diskState (disk_state.go) the disk
// section, kvm.VMState and kvm.VCPUState the in-kernel state. SavedState
// composes them and checks what needs more than one part: Config.Validate,
// the layout, the vCPUs ready.

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
	s.setConfig(m.cfg)
	if m.net != nil {
		m.net.save(s.net)
	}
	if m.disk != nil {
		m.disk.save(s.disk)
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

// SavedState is a decoded machine state.
type SavedState struct {
	// Config is the guest configuration (no runtime fields). Config.Net
	// and Config.Disk point into the devices' parts.
	Config Config
	ready  int
	net    *netState  // nil without a network device
	disk   *diskState // nil without a block device
	vm     kvm.VMState
	vcpus  []kvm.VCPUState
}

// setConfig sets s's configuration to c less its runtime fields, with a part
// for each device c has, its ring positions 0.
func (s *SavedState) setConfig(c Config) {
	c.Tap = nil
	c.DiskIO, c.DiskPoll = nil, 0
	s.net, s.disk = nil, nil
	if c.Net != nil {
		s.net = &netState{cfg: *c.Net}
		c.Net = &s.net.cfg
	}
	if c.Disk != nil {
		s.disk = &diskState{cfg: *c.Disk}
		c.Disk = &s.disk.cfg
	}
	s.Config = c
}

// encode returns the state's encoding, described above.
func (s *SavedState) encode() []byte {
	b := make([]byte, 0, 16+len(s.vcpus)*12<<10)
	b = append(b, stateMagic...)
	b = binary.LittleEndian.AppendUint32(b, stateVersion)
	b = binary.LittleEndian.AppendUint32(b, 0) // length, patched below
	cs := newConfigState(s.Config)
	b = cs.appendBinary(b)
	b = appendPart(b, s.net)
	b = appendPart(b, s.disk)
	b = appendU32(b, uint32(s.ready))
	b, _ = s.vm.AppendBinary(b)
	for i := range s.vcpus {
		b, _ = s.vcpus[i].AppendBinary(b)
	}
	binary.LittleEndian.PutUint32(b[12:], uint32(len(b)-16))
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// statePart is the encoding of a device's part, after its present flag.
type statePart[T any] interface {
	*T
	appendBinary(b []byte) []byte
	decode(r *le.Reader)
}

// appendPart appends a device's present flag and, if it has one (p is not
// nil), its part.
func appendPart[T any, P statePart[T]](b []byte, p *T) []byte {
	if p == nil {
		return appendU32(b, 0)
	}
	return P(p).appendBinary(appendU32(b, 1))
}

// decodePart reads what appendPart writes: nil for a machine without the
// device (or on error).
func decodePart[T any, P statePart[T]](r *le.Reader, what string) *T {
	switch present := r.U32(what + " flag"); present {
	case 0:
		return nil
	case 1:
		p := P(new(T))
		p.decode(r)
		return p
	default:
		r.Fail(fmt.Errorf("%s flag %d, want 0 or 1", what, present))
		return nil
	}
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
	r := le.NewReader(b[16 : 16+n])
	s := &SavedState{}
	var cs configState
	cs.decode(&r)
	s.net = decodePart[netState](&r, "network device")
	s.disk = decodePart[diskState](&r, "block device")
	s.ready = int(r.U32("devices ready"))
	if err := r.Err(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadState, err)
	}
	c := &s.Config
	*c = cs.cfg
	if s.net != nil {
		c.Net = &s.net.cfg
	}
	if s.disk != nil {
		c.Disk = &s.disk.cfg
	}
	if err := c.Validate(); err != nil {
		return nil, bad("%v", err)
	}
	if err := cs.checkLayout(); err != nil {
		return nil, bad("%v", err)
	}
	if s.ready < 0 || s.ready > c.VCPUs {
		return nil, bad("%d vCPUs ready of %d", s.ready, c.VCPUs)
	}
	rest, err := s.vm.Decode(r.Rest())
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
	sh, s, err := prepare(state, mem, opt, true)
	if err != nil {
		return nil, err
	}
	return sh.load(s)
}

// Shell is a machine built for a restore and not yet restored: its KVM VM,
// its memory slots over the replica's file, its vCPUs with their CPUID.
// Building them is most of a restore's cost (registering the memory slots
// alone is milliseconds, as KVM waits for its readers each time), so a
// backup builds the Shell once its first checkpoint arrives, while the
// primary runs, and a failover only loads the state into it (Restore).
type Shell struct {
	m    *Machine
	used bool
}

// Prepare builds a Shell for the checkpoints of the machine whose state is
// state (any checkpoint of the session: only its configuration is used),
// over mem, which the backup keeps writing (its replica; the Shell maps it
// shared). The devices come at Restore, with their tap and backend. mem
// stays the caller's until a Restore succeeds.
func Prepare(state []byte, mem *os.File, opt RestoreOptions) (*Shell, error) {
	sh, _, err := prepare(state, mem, opt, false)
	return sh, err
}

// Memory is the file the Shell maps.
func (sh *Shell) Memory() *os.File { return sh.m.memF }

// Restore loads state, a checkpoint of the same machine, into the Shell,
// with the devices over opt's tap and backend, and returns the machine, not
// yet started, which owns the memory file from now on. A Shell restores
// once; on an error it is closed.
func (sh *Shell) Restore(state []byte, opt RestoreOptions) (*Machine, error) {
	if sh.used {
		return nil, errors.New("restore: the shell was already restored")
	}
	sh.used = true
	s, err := DecodeState(state)
	if err == nil && !sameShape(s.Config, sh.m.cfg) {
		err = fmt.Errorf("%w: the state is of another machine than the shell (%s, %d vCPUs)", ErrBadState,
			FormatSize(sh.m.cfg.MemSize), sh.m.cfg.VCPUs)
	}
	if err != nil {
		sh.Close()
		return nil, fmt.Errorf("restore: %w", err)
	}
	m := sh.m
	m.cfg.Console, m.console = opt.Console, opt.Console
	if m.console == nil {
		m.console = io.Discard
	}
	m.cfg.Tap, m.cfg.DiskIO = opt.Tap, opt.DiskIO
	if m.cfg.Disk != nil && opt.DiskPoll != 0 {
		m.cfg.DiskPoll = opt.DiskPoll
	}
	if err := m.addDevices(); err != nil {
		sh.Close()
		return nil, fmt.Errorf("restore: %w", err)
	}
	return sh.load(s)
}

// Close frees a Shell that was not restored; its memory file stays the
// caller's.
func (sh *Shell) Close() error {
	if sh.m == nil {
		return nil
	}
	sh.m.memF = nil
	err := sh.m.Close()
	sh.m = nil
	return err
}

// sameShape reports whether a and b describe the same machine: what a
// Shell was built for.
func sameShape(a, b Config) bool {
	return a.MemSize == b.MemSize && a.VCPUs == b.VCPUs && (a.Net == nil) == (b.Net == nil) &&
		(a.Disk == nil) == (b.Disk == nil) && (a.Disk == nil || a.Disk.Blocks == b.Disk.Blocks)
}

// prepare checks state and mem and builds the machine for them, with its
// devices or not.
func prepare(state []byte, mem *os.File, opt RestoreOptions, devices bool) (*Shell, *SavedState, error) {
	s, err := DecodeState(state)
	if err != nil {
		return nil, nil, fmt.Errorf("restore: %w", err)
	}
	fi, err := mem.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("restore: stat memory file: %w", err)
	}
	if uint64(fi.Size()) != s.Config.MemSize {
		return nil, nil, fmt.Errorf("restore: %w: the state is for a %s guest, the memory image holds %d bytes",
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
		return nil, nil, fmt.Errorf("restore: %w", err)
	}
	m, err := buildWith(cfg, mem, devices)
	if err != nil {
		return nil, nil, fmt.Errorf("restore: %w", err)
	}
	return &Shell{m: m}, s, nil
}

// load restores s into the Shell's machine (devices, vCPUs, VM), which then
// owns its memory file.
func (sh *Shell) load(s *SavedState) (*Machine, error) {
	m := sh.m
	fail := func(err error) (*Machine, error) {
		m.memF = nil // the caller keeps the file on failure
		m.Close()
		sh.m = nil
		return nil, err
	}
	if err := m.restoreDevices(s); err != nil {
		return fail(fmt.Errorf("restore: %w", err))
	}
	for i, v := range m.vcpus {
		if err := v.cpu.RestoreState(&s.vcpus[i]); err != nil {
			return fail(fmt.Errorf("restore vCPU %d: %w", i, err))
		}
	}
	if err := m.vm.RestoreState(&s.vm); err != nil {
		return fail(fmt.Errorf("restore VM state: %w", err))
	}
	m.ready = s.ready
	sh.m = nil
	return m, nil
}

// restoreDevices sets the devices from their parts of s. A machine built
// from s.Config has exactly the devices s has parts for.
func (m *Machine) restoreDevices(s *SavedState) error {
	if m.net != nil {
		if err := m.net.restore(s.net); err != nil {
			return err
		}
	}
	if m.disk != nil {
		return m.disk.restore(s.disk)
	}
	return nil
}
