package testvm

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/kvm"
)

// guestImage is the guest program, built from guest/ by `make guest`.
//
//go:embed guest/guest.bin
var guestImage []byte

// Slot is one KVM memory slot of the guest's memory.
type Slot struct {
	ID     uint32 // KVM slot id
	GPA    uint64 // guest-physical base
	Size   uint64 // bytes
	Offset uint64 // offset of the slot's first byte in Memory() and the memory file
}

// RunState is a Machine's lifecycle state.
type RunState int32

const (
	// Created: built or restored, vCPUs not started.
	Created RunState = iota
	// Running: vCPUs are in or entering KVM_RUN.
	Running
	// Paused: every vCPU is out of KVM_RUN and stays out.
	Paused
	// Stopped: vCPUs have exited, by Close or on an error (see Err).
	Stopped
)

func (s RunState) String() string {
	return [...]string{"created", "running", "paused", "stopped"}[s]
}

// ErrStopped is returned by Pause, Resume and Save when the machine has
// stopped; Err tells why.
var ErrStopped = errors.New("machine stopped")

// Machine is a test VM: guest memory in a memfd spread over two KVM memory
// slots, 1 to 4 vCPUs each on its own locked OS thread, and the console and
// control ports. Pause, Resume, Save and Close may be called from any
// goroutine; they are serialised.
type Machine struct {
	cfg    Config
	layout layout
	sys    *kvm.System
	vm     *kvm.VM
	memF   *os.File
	memMu  sync.RWMutex // guards mem against Close while a reader (Status, ...) runs
	mem    []byte
	slots  []Slot
	vcpus  []*vcpu
	msrs   []uint32

	ctl   sync.Mutex // serialises Start, Pause, Resume, Save, Close
	state atomic.Int32

	evMu    sync.Mutex
	changed chan struct{} // closed and replaced on every guest event
	ready   int
	err     error
	done    chan struct{} // closed when every vCPU goroutine has exited
	wg      sync.WaitGroup

	saved SavedState // reused by Save, so a checkpoint does not reallocate the vCPUs' state

	net     *netDev  // nil without Config.Net
	disk    *diskDev // nil without Config.Disk
	devHeld bool     // Pause holds the devices' locks (guarded by ctl)

	recorder atomic.Pointer[func(gpa, length uint64)]
	guard    atomic.Pointer[func(gpa, length uint64)] // called before a VMM write (SetWriteGuard)
	tracker  atomic.Pointer[dirtylog.Tracker]         // set by DirtyTracker
	console  io.Writer
}

// New builds a test VM from cfg: memory, slots, irqchip, vCPUs in their boot
// state, the guest image and its params. The vCPUs do not run until Start.
func New(cfg Config) (*Machine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	m, err := build(cfg, nil)
	if err != nil {
		return nil, err
	}
	if len(guestImage) > codeMax {
		m.Close()
		return nil, fmt.Errorf("guest image of %d bytes exceeds %d", len(guestImage), codeMax)
	}
	copy(m.mem[codeAddr:], guestImage)
	writeBootTables(m.mem, m.layout)
	var sregs kvm.Sregs
	for i, v := range m.vcpus {
		if err := v.cpu.GetSregs(&sregs); err != nil {
			m.Close()
			return nil, err
		}
		bootSregs(&sregs)
		if err := v.cpu.SetSregs(&sregs); err != nil {
			m.Close()
			return nil, err
		}
		regs := bootRegs(i)
		if err := v.cpu.SetRegs(&regs); err != nil {
			m.Close()
			return nil, err
		}
		// With the in-kernel LAPIC, every vCPU but the first would wait for
		// INIT/SIPI; the test VM starts them all at once.
		if err := v.cpu.SetMPState(&kvm.MPState{MPState: kvm.KVM_MP_STATE_RUNNABLE}); err != nil {
			m.Close()
			return nil, err
		}
	}
	khz, err := m.vcpus[0].cpu.GetTSCKHz()
	if err != nil {
		m.Close()
		return nil, err
	}
	writeParams(m.mem, cfg, m.layout, khz)
	return m, nil
}

// build creates the KVM side of a machine: memory (a new memfd, or memF when
// restoring), slots, irqchip, PIT and vCPUs with CPUID set.
func build(cfg Config, memF *os.File) (*Machine, error) { return buildWith(cfg, memF, true) }

// buildWith is build, with the devices or without them (a Shell adds them
// at its restore, when their tap and backend are known).
func buildWith(cfg Config, memF *os.File, devices bool) (_ *Machine, err error) {
	callerMem := memF
	m := &Machine{cfg: cfg, layout: newLayout(cfg.MemSize, cfg.VCPUs), changed: make(chan struct{}),
		done: make(chan struct{}), console: cfg.Console}
	if m.console == nil {
		m.console = io.Discard
	}
	defer func() {
		if err != nil {
			if callerMem != nil {
				m.memF = nil // the caller keeps its file when build fails
			}
			m.Close()
		}
	}()
	if m.sys, err = kvm.Open(); err != nil {
		return nil, err
	}
	if m.vm, err = m.sys.CreateVM(); err != nil {
		return nil, err
	}
	if memF == nil {
		if memF, err = newMemFile(cfg.MemSize); err != nil {
			return nil, err
		}
	}
	m.memF = memF
	if m.mem, err = mapMemFile(memF, cfg.MemSize); err != nil {
		return nil, err
	}
	if err = m.vm.SetTSSAddr(kvmTSSAddr); err != nil {
		return nil, err
	}
	if err = m.vm.SetIdentityMapAddr(kvmIdentityMapAddr); err != nil {
		return nil, err
	}
	if err = m.vm.CreateIRQChip(); err != nil {
		return nil, err
	}
	if err = m.vm.CreatePIT2(0); err != nil {
		return nil, err
	}
	if cfg.DirtyRingEntries != 0 {
		if err = m.enableDirtyRing(cfg.DirtyRingEntries); err != nil {
			return nil, err
		}
	}
	m.slots = []Slot{
		{ID: 0, GPA: 0, Size: m.layout.lowSize, Offset: 0},
		{ID: 1, GPA: highGPA, Size: cfg.MemSize - m.layout.lowSize, Offset: m.layout.lowSize},
	}
	var flags uint32
	if cfg.DirtyLog {
		flags = kvm.KVM_MEM_LOG_DIRTY_PAGES
	}
	if err = m.SetSlotFlags(flags); err != nil {
		return nil, err
	}
	supported, err := m.sys.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	msrList, err := m.sys.MSRIndexList()
	if err != nil {
		return nil, err
	}
	for i := 0; i < cfg.VCPUs; i++ {
		c, err := m.vm.CreateVCPU(i)
		if err != nil {
			return nil, err
		}
		v := &vcpu{m: m, id: i, cpu: c}
		v.cond = sync.NewCond(&v.mu)
		m.vcpus = append(m.vcpus, v)
		if err := c.SetCPUID(vcpuCPUID(supported, i)); err != nil {
			return nil, err
		}
	}
	if m.msrs, err = m.vcpus[0].cpu.ReadableMSRs(msrList); err != nil {
		return nil, err
	}
	if devices {
		if err := m.addDevices(); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// addDevices makes the devices m.cfg has: the network device over its tap,
// the block device over its backend.
func (m *Machine) addDevices() error {
	cfg := m.cfg
	var err error
	if cfg.Net != nil {
		if m.net, err = newNetDev(m, cfg.Tap); err != nil {
			return err
		}
	}
	if cfg.Disk != nil {
		if cfg.DiskIO == nil {
			return fmt.Errorf("block device of %d blocks without a backend (set Config.DiskIO or RestoreOptions.DiskIO, e.g. to an image file)", cfg.Disk.Blocks)
		}
		if m.disk, err = newDiskDev(m, cfg.DiskIO, cfg.Disk.Blocks, cfg.DiskPoll); err != nil {
			return err
		}
	}
	return nil
}

func (m *Machine) enableDirtyRing(entries uint32) error {
	bytes := uint64(entries) * 16
	if m.vm.CheckExtension(kvm.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) != 0 {
		return m.vm.EnableCap(kvm.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, bytes)
	}
	return m.vm.EnableCap(kvm.KVM_CAP_DIRTY_LOG_RING, bytes)
}

// SetSlotFlags re-registers every memory slot with flags (0 or
// KVM_MEM_LOG_DIRTY_PAGES), turning dirty logging on or off.
func (m *Machine) SetSlotFlags(flags uint32) error {
	for _, s := range m.slots {
		r := kvm.UserspaceMemoryRegion{Slot: s.ID, Flags: flags, GuestPhysAddr: s.GPA, MemorySize: s.Size,
			UserspaceAddr: hostAddr(m.mem, s.Offset)}
		if err := m.vm.SetUserMemoryRegion(r); err != nil {
			// The addresses are in the message: an EINVAL seen once in
			// about 25 test runs under load, not reproduced, is to be
			// traced from them.
			return fmt.Errorf("set memory slot %d flags %#x (GPA %#x, %s at host %#x): %w",
				s.ID, flags, s.GPA, FormatSize(s.Size), r.UserspaceAddr, err)
		}
	}
	return nil
}

// Config returns the machine's configuration, defaults filled in.
func (m *Machine) Config() Config { return m.cfg }

// VM returns the KVM VM, for dirty-log harvests.
func (m *Machine) VM() *kvm.VM { return m.vm }

// VCPU returns vCPU i's KVM handle (for its dirty ring). Issue ioctls on it
// only while the machine is paused, or from DirtyRingFull.
func (m *Machine) VCPU(i int) *kvm.VCPU { return m.vcpus[i].cpu }

// NumVCPUs returns the number of vCPUs.
func (m *Machine) NumVCPUs() int { return len(m.vcpus) }

// Memory returns the host mapping of all guest memory; byte V is guest-virtual
// address V. It is valid until Close.
func (m *Machine) Memory() []byte { return m.mem }

// MemFile returns the memfd that backs guest memory.
func (m *Machine) MemFile() *os.File { return m.memF }

// Slots returns the KVM memory slots, in order of Offset.
func (m *Machine) Slots() []Slot { return m.slots }

// GPA returns the guest-physical address of memory offset off.
func (m *Machine) GPA(off uint64) uint64 { return m.layout.gpa(off) }

// RegionBase and RegionPages give vCPU i's workload region: offset and pages.
func (m *Machine) RegionBase(i int) uint64 { return m.layout.regionBase(i) }

// RegionPages is the number of pages each vCPU's region holds.
func (m *Machine) RegionPages() uint64 { return m.layout.regionPages }

// WorkingSet is the number of pages each vCPU's Dirty workload writes.
func (m *Machine) WorkingSet() uint64 {
	if m.cfg.WorkingSet != 0 {
		return m.cfg.WorkingSet
	}
	return m.layout.regionPages
}

// StackRange returns vCPU i's stack as a memory offset range [start, end).
func StackRange(i int) (start, end uint64) {
	return stackAddr + uint64(i)*stackSize, stackAddr + uint64(i+1)*stackSize
}

// StatusOffset is the memory offset of vCPU i's status page.
func StatusOffset(i int) uint64 { return statusAddr + uint64(i)*statusStride }

// ParamsOffset is the memory offset of the params page.
const ParamsOffset = paramsAddr

// SetWriteRecorder registers f to be told of every range of guest memory the
// VMM itself writes (guest-physical address and length): device DMA that KVM's
// dirty log does not see. nil unregisters. f may be called from any goroutine.
func (m *Machine) SetWriteRecorder(f func(gpa, length uint64)) {
	if f == nil {
		m.recorder.Store(nil)
		return
	}
	m.recorder.Store(&f)
}

// VCPUThreadIDs returns the OS thread of each vCPU (replicate.VCPUThreads):
// each runs on a thread locked to it for its life, 0 until it starts.
func (m *Machine) VCPUThreadIDs() []int {
	ids := make([]int, len(m.vcpus))
	for i, v := range m.vcpus {
		v.mu.Lock()
		ids[i] = v.tid
		v.mu.Unlock()
	}
	return ids
}

// GuestProgress is the operations the guest has done on every vCPU (page
// writes, counter steps, idle ticks or block writes: Status.Iterations),
// for replicate.GuestProgress. It reads the status pages, without an exit.
func (m *Machine) GuestProgress() uint64 {
	var n uint64
	for i := range m.vcpus {
		n += m.Status(i).Iterations
	}
	return n
}

// SetWriteGuard registers f to be called before every write the VMM itself
// makes into guest memory, with the range about to be written
// (replicate.WriteGuard: lazy capture copies those pages of the epoch being
// captured first). nil unregisters. f may be called from any goroutine.
func (m *Machine) SetWriteGuard(f func(gpa, length uint64)) {
	if f == nil {
		m.guard.Store(nil)
		return
	}
	m.guard.Store(&f)
}

// guardWrite calls the write guard for a VMM write of [off, off+n) in
// memory offsets, split at the slot boundary, before the write.
func (m *Machine) guardWrite(off, n uint64) {
	if f := m.guard.Load(); f != nil && n != 0 {
		m.forRanges(off, n, *f)
	}
}

// forRanges calls f with the guest-physical ranges of [off, off+n) in memory
// offsets, split at the slot boundary.
func (m *Machine) forRanges(off, n uint64, f func(gpa, length uint64)) {
	if off < m.layout.lowSize && off+n > m.layout.lowSize {
		first := m.layout.lowSize - off
		f(m.layout.gpa(off), first)
		off, n = m.layout.lowSize, n-first
	}
	f(m.layout.gpa(off), n)
}

// WriteGuest copies data into guest memory at offset off and reports the write
// to the recorder. Every VMM write into guest memory goes through here (or
// through recordWrite), so the replica sees it.
func (m *Machine) WriteGuest(off uint64, data []byte) error {
	if off > uint64(len(m.mem)) || uint64(len(data)) > uint64(len(m.mem))-off {
		return fmt.Errorf("write guest memory [%#x, +%d): beyond %s", off, len(data), FormatSize(uint64(len(m.mem))))
	}
	m.guardWrite(off, uint64(len(data)))
	copy(m.mem[off:], data)
	m.recordWrite(off, uint64(len(data)))
	return nil
}

// recordWrite reports a VMM write of [off, off+n) in memory offsets, split at
// the slot boundary.
func (m *Machine) recordWrite(off, n uint64) {
	if f := m.recorder.Load(); f != nil && n != 0 {
		m.forRanges(off, n, *f)
	}
}

// Go lets a guest with phases (Config.PhaseOps) run up to phase p.
func (m *Machine) Go(p uint64) {
	m.guardWrite(paramsAddr+pGo, 8)
	store64(m.mem, paramsAddr+pGo, p)
	m.recordWrite(paramsAddr+pGo, 8)
}

// State returns the machine's lifecycle state.
func (m *Machine) State() RunState { return RunState(m.state.Load()) }

// Start runs the vCPUs.
func (m *Machine) Start() error {
	m.ctl.Lock()
	defer m.ctl.Unlock()
	if m.State() != Created {
		return fmt.Errorf("start: machine is %s", m.State())
	}
	started := make(chan struct{}, len(m.vcpus))
	m.state.Store(int32(Running))
	m.wg.Add(len(m.vcpus))
	for _, v := range m.vcpus {
		go v.loop(started)
	}
	for range m.vcpus {
		<-started
	}
	if m.net != nil {
		m.net.start()
	}
	if m.disk != nil {
		m.disk.start()
	}
	go func() {
		m.wg.Wait()
		m.state.Store(int32(Stopped))
		close(m.done)
		m.notify()
	}()
	return nil
}

// Pause kicks every vCPU out of KVM_RUN and returns once all of them are out
// and parked, and the network and block devices finished the batch they were
// processing; vCPUs and devices stay still until Resume. It returns an error,
// and leaves nothing paused, only if the machine stopped.
func (m *Machine) Pause() error {
	m.ctl.Lock()
	defer m.ctl.Unlock()
	switch m.State() {
	case Paused:
		return nil
	case Running:
	default:
		return m.stoppedErr("pause")
	}
	for _, v := range m.vcpus {
		v.requestPause()
	}
	spin := len(m.vcpus) < runtime.NumCPU()
	for _, v := range m.vcpus {
		if !v.waitParked(spin) {
			for _, v := range m.vcpus {
				v.requestRun()
			}
			return m.stoppedErr("pause")
		}
	}
	if !m.state.CompareAndSwap(int32(Running), int32(Paused)) {
		return m.stoppedErr("pause")
	}
	if m.net != nil {
		m.net.mu.Lock()
	}
	if m.disk != nil {
		m.disk.mu.Lock()
	}
	m.devHeld = true
	return nil
}

// releaseDevices lets the devices run again after a pause. With ctl held.
func (m *Machine) releaseDevices() {
	if !m.devHeld {
		return
	}
	m.devHeld = false
	if m.disk != nil {
		m.disk.mu.Unlock()
	}
	if m.net != nil {
		m.net.mu.Unlock()
	}
}

// Resume lets paused vCPUs run again.
func (m *Machine) Resume() error {
	m.ctl.Lock()
	defer m.ctl.Unlock()
	switch m.State() {
	case Running:
		return nil
	case Paused:
	default:
		return m.stoppedErr("resume")
	}
	if !m.state.CompareAndSwap(int32(Paused), int32(Running)) {
		return m.stoppedErr("resume")
	}
	m.releaseDevices()
	for _, v := range m.vcpus {
		v.requestRun()
	}
	return nil
}

// stoppedErr explains why op cannot run: ErrStopped (with the cause, if the
// machine failed), or the state the machine is in.
func (m *Machine) stoppedErr(op string) error {
	if err := m.Err(); err != nil {
		return fmt.Errorf("%s: %w: %w", op, ErrStopped, err)
	}
	if m.State() == Stopped {
		return fmt.Errorf("%s: %w", op, ErrStopped)
	}
	return fmt.Errorf("%s: machine is %s", op, m.State())
}

// Done is closed when every vCPU has stopped.
func (m *Machine) Done() <-chan struct{} { return m.done }

// Err returns the error that stopped the machine, if any.
func (m *Machine) Err() error {
	m.evMu.Lock()
	defer m.evMu.Unlock()
	return m.err
}

// fail records the first error and stops every vCPU.
func (m *Machine) fail(err error) {
	m.evMu.Lock()
	if m.err == nil {
		m.err = err
	}
	m.evMu.Unlock()
	for _, v := range m.vcpus {
		v.requestStop()
	}
	m.notify()
}

// notify wakes everyone waiting for a guest event.
func (m *Machine) notify() {
	m.evMu.Lock()
	close(m.changed)
	m.changed = make(chan struct{})
	m.evMu.Unlock()
}

// waitFor blocks until cond() holds, the machine stops, or ctx ends.
func (m *Machine) waitFor(ctx context.Context, what string, cond func() bool) error {
	for {
		m.evMu.Lock()
		ch := m.changed
		m.evMu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ch:
		case <-m.done:
			if cond() {
				return nil
			}
			return m.stoppedErr("wait for " + what)
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", what, ctx.Err())
		}
	}
}

// WaitReady waits until every vCPU's guest reported READY.
func (m *Machine) WaitReady(ctx context.Context) error {
	return m.waitFor(ctx, "guest ready", func() bool {
		m.evMu.Lock()
		defer m.evMu.Unlock()
		return m.ready >= len(m.vcpus)
	})
}

// WaitPhase waits until every vCPU completed phase p (Config.PhaseOps).
func (m *Machine) WaitPhase(ctx context.Context, p uint64) error {
	return m.waitFor(ctx, fmt.Sprintf("phase %d", p), func() bool {
		for i := range m.vcpus {
			if m.Status(i).Phase < p {
				return false
			}
		}
		return true
	})
}

// Close stops the vCPUs, if they run, and frees everything: vCPUs, VM, memory
// mapping and memory file. Close the machine before dropping it.
func (m *Machine) Close() error {
	m.ctl.Lock()
	defer m.ctl.Unlock()
	if m.State() == Stopped && m.vm == nil {
		return nil // closed already
	}
	started := m.State() != Created
	if started {
		for _, v := range m.vcpus {
			v.requestStop()
		}
		<-m.done
	}
	m.releaseDevices()
	if m.net != nil {
		m.net.stop(started)
		m.net = nil
	}
	if m.disk != nil {
		m.disk.stop(started)
		m.disk = nil
	}
	m.state.Store(int32(Stopped))
	for _, v := range m.vcpus {
		v.cpu.Close()
	}
	if m.vm != nil {
		m.vm.Close()
		m.vm = nil
	}
	if m.sys != nil {
		m.sys.Close()
		m.sys = nil
	}
	m.memMu.Lock()
	if m.mem != nil {
		unmapMem(m.mem)
		m.mem = nil
	}
	m.memMu.Unlock()
	if m.memF != nil {
		m.memF.Close()
		m.memF = nil
	}
	return nil
}
