package testvm

import (
	"fmt"
	"os"

	"github.com/repagent/repagent/dirtylog"
)

// DirtySlots returns the machine's memory slots as dirty tracking sees them,
// with their host mappings.
func (m *Machine) DirtySlots() []dirtylog.Slot {
	out := make([]dirtylog.Slot, len(m.slots))
	for i, s := range m.slots {
		out[i] = dirtylog.Slot{ID: s.ID, GPA: s.GPA, Size: s.Size, Host: m.mem[s.Offset : s.Offset+s.Size]}
	}
	return out
}

// SlotFile returns the memfd behind slot i and the slot's offset in it
// (replicate.MemoryBacking: the engine's initial sync skips the memfd's
// holes, memory the guest never touched).
func (m *Machine) SlotFile(i int) (*os.File, int64) {
	if i < 0 || i >= len(m.slots) {
		return nil, 0
	}
	return m.memF, int64(m.slots[i].Offset)
}

// DirtyTracker builds a dirty tracker for the machine with the given mechanism
// (Auto picks Ring when the machine has a dirty ring, else Manual or Bitmap),
// routes the VMM's own writes (WriteGuest, Go) into it, and hands ring-full
// exits to it unless Config.DirtyRingFull is set. The tracker is not started.
func (m *Machine) DirtyTracker(mech dirtylog.Mechanism, initiallySet bool) (*dirtylog.Tracker, error) {
	cfg := dirtylog.Config{VM: m.vm, Slots: m.DirtySlots(), Mechanism: mech, InitiallySet: initiallySet}
	if m.cfg.DirtyRingEntries != 0 {
		cfg.RingEntries = m.cfg.DirtyRingEntries
		for _, v := range m.vcpus {
			cfg.VCPUs = append(cfg.VCPUs, v.cpu)
		}
	}
	t, err := dirtylog.New(cfg)
	if err != nil {
		return nil, err
	}
	m.tracker.Store(t)
	m.SetWriteRecorder(func(gpa, n uint64) {
		if err := t.MarkWritten(gpa, n); err != nil {
			// recordWrite only passes ranges inside the slots; anything else is
			// a VMM bug that would make the replica miss a write.
			m.fail(fmt.Errorf("record VMM write: %w", err))
		}
	})
	return t, nil
}

// DirtySource is DirtyTracker(mech, false) as a dirtylog.Source: the form
// replicate's VM contract asks for.
//
// A second source with the mechanism of the last one (a VM protected again
// after its backup was lost) is that tracker again, stopped: a vCPU's dirty
// ring is mapped once for its life, and the tracker keeps its place in it.
func (m *Machine) DirtySource(mech dirtylog.Mechanism) (dirtylog.Source, error) {
	if t := m.tracker.Load(); t != nil && (mech == dirtylog.Auto || t.Mechanism() == mech) && t.Reusable() {
		return t, nil
	}
	t, err := m.DirtyTracker(mech, false)
	if err != nil {
		return nil, err
	}
	return t, nil
}
