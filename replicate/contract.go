package replicate

import (
	"os"

	"github.com/repagent/repagent/dirtylog"
)

// PageSize is the unit of replication: the guest page KVM tracks.
const PageSize = 4096

// VM is what the primary's engine needs from a VMM: the VM contract.
// testvm.Machine implements it; so can a user's own VMM (see the package
// example). The engine calls Pause, Save and Resume from one goroutine.
type VM interface {
	// DirtySlots returns the guest memory regions with their host mappings,
	// in the order the replica lays them out back to back.
	DirtySlots() []dirtylog.Slot
	// DirtySource returns a source of dirty pages over those regions with the
	// given mechanism: KVM's log plus the pages the VMM itself writes. It is
	// not started.
	DirtySource(mech dirtylog.Mechanism) (dirtylog.Source, error)
	// NumVCPUs is the number of vCPUs, for the VM's shape.
	NumVCPUs() int
	// Pause stops every vCPU and returns once none runs guest code.
	Pause() error
	// Resume lets them run again.
	Resume() error
	// Save returns the complete machine state (every vCPU, in-kernel irqchip,
	// clock, every device) of the paused VM, in a form Restore-side code
	// checks fully before it builds anything.
	Save() ([]byte, error)
}

// VCPUThreads is implemented by a VM whose vCPUs each run on an OS thread of
// this process that runs nothing else. It is optional. With it, the engine
// reads what those threads spend outside guest mode each epoch
// (EpochStats.VCPUHost), which is what capture costs the guest beyond the
// pause, and auto capture keeps that cost within its budget (lazy.go).
type VCPUThreads interface {
	// VCPUThreadIDs returns the thread ID of each vCPU's thread, 0 for one
	// that has not started.
	VCPUThreadIDs() []int
}

// GuestProgress is implemented by a VM that can count the work its guest
// gets done: operations, requests, retired instructions, anything that grows
// with the guest's useful work at a steady rate when the guest is not held
// back. It is optional, and used with VCPUThreads: auto capture then prices
// lazy capture by the guest's rate against eager capture's, which catches
// costs the vCPU threads' host time does not (a guest slowed inside guest
// mode, by TLB flushes for one).
type GuestProgress interface {
	// GuestProgress returns the count so far; it must not decrease.
	GuestProgress() uint64
}

// MemoryBacking is implemented by a VM whose guest memory is a file the
// engine may ask where its holes are (lseek SEEK_DATA and SEEK_HOLE: a
// memfd, a tmpfs or a regular file). It is optional. With it, the initial
// sync's first round sends the pages in holes, which the guest never wrote,
// as zero pages without reading them: a read of a hole through a shared
// mapping makes the kernel allocate a page, so an idle guest's sync would
// otherwise take all of its memory, at about a microsecond a page. The
// engine only seeks the file; it neither reads nor writes it.
type MemoryBacking interface {
	// SlotFile returns the file backing slot i of DirtySlots and the file
	// offset of the slot's first byte; nil if the slot has no such file.
	SlotFile(i int) (f *os.File, off int64)
}

// PageNamer is implemented by a VM that can say what its guest keeps in a
// page ("status page of vCPU 0", "stack of vCPU 1"). It is optional: the
// engine uses it only to name the pages in an audit failure.
type PageNamer interface {
	// NamePage describes the page at guest-physical address gpa, or returns
	// "" if it has nothing to say.
	NamePage(gpa uint64) string
}

// Checkpoint is what the backup resumes on failover: a complete machine
// state and the replica memory at the same epoch boundary.
type Checkpoint struct {
	// Epoch is the checkpoint's epoch number.
	Epoch uint64
	// State is the machine state the primary saved during the epoch's pause.
	State []byte
	// Memory is the replica: the guest memory regions back to back, in the
	// order of the primary's VM.DirtySlots, in a file of Shape.MemSize bytes.
	// Resume takes ownership of it (a VMM maps it directly: no copy).
	Memory *os.File
	// Digest is the memory digest (see Digest) the primary computed for this
	// epoch; the backup checked the replica against it.
	Digest uint64
	// Shape is the VM's shape as the primary declared it.
	Shape Shape
	// Verified says the backup digested the whole replica and it matched
	// Digest (BackupConfig.VerifyReplica).
	Verified bool
	// Session is the session that delivered the checkpoint, as its welcome
	// named it; zero for a primary of version 2 or 3.
	Session SessionID
}

// OutputGate holds a VM's externally visible output (network frames, disk
// writes) until the epoch that produced it is safe on the backup. The engine
// drives it; ebpf and diskmirror implement it. Opens come from one goroutine
// in epoch order, and so do Commits; an Open may run while a Commit of an
// earlier epoch is still releasing (the pause must not wait for a release).
// Discard and Release run alone.
type OutputGate interface {
	// Open starts epoch n: output produced from now on belongs to n. The engine
	// calls it during the pause that ends epoch n-1, with the vCPUs stopped.
	Open(n uint64) error
	// Commit releases the output of every epoch up to and including n: the
	// backup acknowledged n.
	Commit(n uint64) error
	// Discard drops the output of every epoch after n: those epochs will never
	// be committed. The engine calls it when the VM itself fails (its pause,
	// save or resume): the backup is told not to resume, and the output of
	// the failed state since the last acknowledged epoch n is not shown to
	// anyone. Release follows.
	Discard(n uint64) error
	// Release stops holding: the backup is lost and the VM runs unprotected,
	// so everything held is released and output passes from now on.
	Release() error
}
