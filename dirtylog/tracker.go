package dirtylog

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/repagent/repagent/kvm"
)

// Mechanism is how KVM reports dirty pages.
type Mechanism int

const (
	// Auto picks a mechanism: see New and Recommend.
	Auto Mechanism = iota
	// Bitmap is classic KVM_GET_DIRTY_LOG: one ioctl per slot fetches the
	// bitmap and re-protects the pages.
	Bitmap
	// Manual is KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG only
	// fetches, and KVM_CLEAR_DIRTY_LOG re-protects exactly the pages harvested.
	Manual
	// Ring is KVM_CAP_DIRTY_LOG_RING: each vCPU pushes the pages it dirties
	// into a ring shared with userspace, which KVM_RESET_DIRTY_RINGS recycles.
	Ring
)

var mechanismNames = []string{Auto: "auto", Bitmap: "bitmap", Manual: "manual", Ring: "ring"}

func (m Mechanism) String() string {
	if int(m) < len(mechanismNames) {
		return mechanismNames[m]
	}
	return fmt.Sprintf("mechanism(%d)", int(m))
}

// ParseMechanism parses auto, bitmap, manual or ring (the CLI's --dirty-track).
func ParseMechanism(s string) (Mechanism, error) {
	for m, n := range mechanismNames {
		if n == s {
			return Mechanism(m), nil
		}
	}
	return 0, fmt.Errorf("unknown dirty tracking mechanism %q (want auto, bitmap, manual or ring)", s)
}

// ErrNotSupported is returned (wrapped) when the kernel lacks the mechanism
// asked for. It is kvm.ErrNotSupported, so either matches.
var ErrNotSupported = kvm.ErrNotSupported

// Config describes what a Tracker tracks.
type Config struct {
	// VM is the VM whose memory is tracked.
	VM *kvm.VM
	// Slots are its memory slots, with their host mappings.
	Slots []Slot
	// Mechanism to use. Auto means Ring when RingEntries is set (a VM with a
	// dirty ring cannot use the bitmap), else Manual where the kernel has it,
	// else Bitmap.
	Mechanism Mechanism
	// VCPUs and RingEntries are for Ring: the vCPUs, whose rings the tracker
	// maps, and the ring size in entries that the VM was created with
	// (KVM_CAP_DIRTY_LOG_RING must be enabled before the vCPUs exist, so the
	// VMM does it; see Recommend).
	VCPUs       []*kvm.VCPU
	RingEntries uint32
	// InitiallySet (Manual only) starts every page dirty, so the first harvest
	// returns all of memory (KVM_DIRTY_LOG_INITIALLY_SET); KVM then protects
	// pages lazily, as they are cleared, instead of all at Start.
	InitiallySet bool
	// ClearChunk is the most pages one KVM_CLEAR_DIRTY_LOG covers (a multiple
	// of 64; default 32768 = 128 MiB), bounding how long KVM holds its MMU lock.
	ClearChunk uint64
}

// Stats describe one harvest.
type Stats struct {
	KVMPages int           // pages KVM reported (bitmap bits or ring entries, before merging), with any owed from RingFull or a failed harvest
	VMMPages int           // pages the VMM marked written
	Pages    int           // pages added to the set that it did not hold before
	Fetch    time.Duration // getting the log: GET_DIRTY_LOG, or reading the rings
	Protect  time.Duration // re-protecting: CLEAR_DIRTY_LOG or RESET_DIRTY_RINGS (in Fetch for Bitmap)
	Total    time.Duration
}

// Tracker harvests the pages of a VM's memory dirtied since the last harvest:
// by the guest, through the chosen KVM mechanism, and by the VMM, through
// MarkWritten. Harvest is exact: every page written before a harvest starts is
// in that harvest's set; a page written while it runs is in it or the next.
// Harvest, Start and Stop are for one goroutine at a time (the engine's, usually
// with the vCPUs paused); MarkWritten and RingFull are safe from any goroutine.
type Tracker struct {
	cfg     Config
	mech    Mechanism
	slots   []trackedSlot
	started bool

	ringMu  sync.Mutex // rings, fetch indices, unreset and pending
	rings   [][]kvm.DirtyGFN
	fetch   []uint64
	unreset uint64 // ring entries marked for reset that no reset has taken yet
	pending *Set   // pages owed to the next harvest: ring entries RingFull took, or what a failed harvest had fetched
	owed    bool   // pending may hold pages (so harvests skip it when it cannot)

	vmmAny     atomic.Bool   // some page was marked since the last harvest
	ringFulls  atomic.Uint64 // KVM_EXIT_DIRTY_RING_FULL exits handled
	shortReset atomic.Uint64 // ring resets that stopped early and were repaired
}

// RingFullExits returns how many ring-full exits RingFull has handled.
func (t *Tracker) RingFullExits() uint64 { return t.ringFulls.Load() }

// ShortRingResets returns how many times KVM_RESET_DIRTY_RINGS reset fewer
// entries than the tracker had marked, so that the tracker re-protected all
// of memory and owed every page to the next harvest (see the package doc).
func (t *Tracker) ShortRingResets() uint64 { return t.shortReset.Load() }

type trackedSlot struct {
	Slot
	pages   uint64
	scratch []uint64        // KVM's bitmap for this slot
	vmm     []atomic.Uint64 // pages the VMM marked
}

// New checks cfg and the kernel's support for the mechanism and returns a
// tracker, not yet started.
func New(cfg Config) (*Tracker, error) {
	if cfg.VM == nil || len(cfg.Slots) == 0 {
		return nil, errors.New("dirty tracker: no VM or no memory slots")
	}
	if cfg.ClearChunk == 0 {
		cfg.ClearChunk = 32768
	}
	if cfg.ClearChunk%64 != 0 {
		return nil, fmt.Errorf("dirty tracker: clear chunk of %d pages is not a multiple of 64", cfg.ClearChunk)
	}
	t := &Tracker{cfg: cfg, mech: cfg.Mechanism}
	for _, s := range cfg.Slots {
		if s.GPA%PageSize != 0 || s.Size%PageSize != 0 || s.Size == 0 || uint64(len(s.Host)) != s.Size {
			return nil, fmt.Errorf("dirty tracker: slot %d (GPA %#x, %d bytes, host mapping %d bytes) is not page aligned and fully mapped",
				s.ID, s.GPA, s.Size, len(s.Host))
		}
		pages := s.Size / PageSize
		t.slots = append(t.slots, trackedSlot{Slot: s, pages: pages,
			scratch: make([]uint64, (pages+63)/64), vmm: make([]atomic.Uint64, (pages+63)/64)})
	}
	if t.mech == Auto {
		switch {
		case cfg.RingEntries != 0:
			t.mech = Ring
		case cfg.VM.CheckExtension(kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) != 0:
			t.mech = Manual
		default:
			t.mech = Bitmap
		}
	}
	switch t.mech {
	case Bitmap:
	case Manual:
		flags := cfg.VM.CheckExtension(kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
		if flags == 0 {
			return nil, fmt.Errorf("dirty tracker: manual protect: %w (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)", ErrNotSupported)
		}
		if cfg.InitiallySet && flags&kvm.KVM_DIRTY_LOG_INITIALLY_SET == 0 {
			return nil, fmt.Errorf("dirty tracker: manual protect with initially-set: %w", ErrNotSupported)
		}
	case Ring:
		if cfg.VM.CheckExtension(kvm.KVM_CAP_DIRTY_LOG_RING) == 0 && cfg.VM.CheckExtension(kvm.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) == 0 {
			return nil, fmt.Errorf("dirty tracker: dirty ring: %w (KVM_CAP_DIRTY_LOG_RING)", ErrNotSupported)
		}
		if cfg.RingEntries == 0 || len(cfg.VCPUs) == 0 {
			return nil, errors.New("dirty tracker: the ring mechanism needs the VM's vCPUs and the ring size it was created with")
		}
	default:
		return nil, fmt.Errorf("dirty tracker: unknown mechanism %d", cfg.Mechanism)
	}
	t.pending = NewSet(cfg.Slots)
	if cfg.InitiallySet && t.mech != Manual {
		return nil, fmt.Errorf("dirty tracker: initially-set needs the manual mechanism, not %s", t.mech)
	}
	return t, nil
}

// Mechanism returns the mechanism in use (never Auto).
func (t *Tracker) Mechanism() Mechanism { return t.mech }

// NewSet returns an empty set over the tracked slots.
func (t *Tracker) NewSet() *Set { return NewSet(t.cfg.Slots) }

// Start turns dirty logging on for every slot. From now on every write is
// tracked; the first harvest returns what was written since Start (with
// InitiallySet: all of memory).
func (t *Tracker) Start() error {
	if t.started {
		return errors.New("dirty tracker: already started")
	}
	switch t.mech {
	case Manual:
		arg := uint64(kvm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
		if t.cfg.InitiallySet {
			arg |= kvm.KVM_DIRTY_LOG_INITIALLY_SET
		}
		if err := t.cfg.VM.EnableCap(kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, arg); err != nil {
			return fmt.Errorf("dirty tracker: enable manual protect: %w", err)
		}
	case Ring:
		if t.rings == nil {
			// All or nothing: a tracker with some rings unmapped would miss
			// their pages.
			rings := make([][]kvm.DirtyGFN, 0, len(t.cfg.VCPUs))
			for i, c := range t.cfg.VCPUs {
				r, err := c.MapDirtyRing(int(t.cfg.RingEntries))
				if err != nil {
					for _, done := range t.cfg.VCPUs[:i] {
						done.UnmapDirtyRing()
					}
					return fmt.Errorf("dirty tracker: %w", err)
				}
				rings = append(rings, r)
			}
			t.ringMu.Lock()
			t.rings, t.fetch = rings, make([]uint64, len(rings))
			t.ringMu.Unlock()
		}
	}
	if t.cfg.InitiallySet {
		// KVM sets every bit only when a slot's logging goes from off to on;
		// the VMM may have built the slots with logging on already.
		if err := t.setLogging(false); err != nil {
			return err
		}
	}
	if err := t.setLogging(true); err != nil {
		return err
	}
	t.started = true
	return nil
}

// Reusable reports whether the tracker is stopped and was made without
// InitiallySet, so that Start may begin tracking again: a second session of
// a VM reuses its tracker (and the dirty rings it mapped).
func (t *Tracker) Reusable() bool { return !t.started && !t.cfg.InitiallySet }

// Stop turns dirty logging off. Pages written since the last harvest are not
// reported.
func (t *Tracker) Stop() error {
	if !t.started {
		return nil
	}
	t.started = false
	return t.setLogging(false)
}

func (t *Tracker) setLogging(on bool) error {
	var flags uint32
	if on {
		flags = kvm.KVM_MEM_LOG_DIRTY_PAGES
	}
	for _, s := range t.slots {
		r := kvm.UserspaceMemoryRegion{Slot: s.ID, Flags: flags, GuestPhysAddr: s.GPA, MemorySize: s.Size, UserspaceAddr: hostAddr(s.Host)}
		if err := t.cfg.VM.SetUserMemoryRegion(r); err != nil {
			return fmt.Errorf("dirty tracker: turn logging %s for slot %d: %w", map[bool]string{true: "on", false: "off"}[on], s.ID, err)
		}
	}
	return nil
}

// MarkWritten records that the VMM wrote [gpa, gpa+length) of guest memory,
// which KVM's log does not see (device DMA). Safe from any goroutine; it does
// not allocate. It reports an error, marking nothing, for a range outside the
// slots.
func (t *Tracker) MarkWritten(gpa, length uint64) error {
	if length == 0 {
		return nil
	}
	end := gpa + length
	if end < gpa {
		return fmt.Errorf("mark written [%#x, +%d): wraps around", gpa, length)
	}
	for p := gpa &^ (PageSize - 1); p < end; {
		i := t.slotFor(p)
		if i < 0 {
			return fmt.Errorf("mark written [%#x, +%d): %#x is in no memory slot", gpa, length, p)
		}
		s := &t.slots[i]
		p = s.GPA + s.pages*PageSize
	}
	for p := gpa &^ (PageSize - 1); p < end; {
		s := &t.slots[t.slotFor(p)]
		first := (p - s.GPA) / PageSize
		last := (min(end, s.GPA+s.Size) - s.GPA + PageSize - 1) / PageSize
		for pg := first; pg < last; {
			w, off := pg/64, pg%64
			n := min(64-off, last-pg)
			mask := ^uint64(0)
			if n < 64 {
				mask = (1<<n - 1) << off
			}
			s.vmm[w].Or(mask)
			pg += n
		}
		p = s.GPA + last*PageSize
	}
	t.vmmAny.Store(true)
	return nil
}

func (t *Tracker) slotFor(gpa uint64) int {
	for i := range t.slots {
		if gpa >= t.slots[i].GPA && gpa-t.slots[i].GPA < t.slots[i].Size {
			return i
		}
	}
	return -1
}

// Harvest adds to into (a set over the tracked slots) every page dirtied since
// the previous harvest, or since Start, and re-arms tracking for those pages.
// For an epoch checkpoint, call it with the vCPUs paused and copy page contents
// after it returns.
func (t *Tracker) Harvest(into *Set) (Stats, error) {
	var st Stats
	if !t.started {
		return st, errors.New("dirty tracker: harvest before Start")
	}
	if !into.sameShape(t.pending) {
		return st, errors.New("dirty tracker: harvest into a set over other slots")
	}
	start := time.Now()
	var err error
	switch t.mech {
	case Bitmap:
		err = t.harvestBitmap(into, &st)
	case Manual:
		err = t.harvestManual(into, &st)
	case Ring:
		err = t.harvestRings(into, &st)
	}
	if err != nil {
		// KVM may already have re-protected some of what into now holds; keep
		// it for the next harvest so no page is lost with the caller's set.
		t.ringMu.Lock()
		t.pending.Union(into)
		t.owed = true
		t.ringMu.Unlock()
		return st, err
	}
	if t.mech != Ring {
		t.takePending(into, &st)
	}
	t.harvestVMM(into, &st)
	st.Total = time.Since(start)
	return st, nil
}

// takePending moves pages owed (from RingFull or a failed harvest) into
// into. Caller holds ringMu, or takePendingLocked does.
func (t *Tracker) takePendingLocked(into *Set, st *Stats) {
	if !t.owed {
		return
	}
	for i := range t.pending.slots {
		src := t.pending.slots[i].bits
		set, added := orInto(into.slots[i].bits, src)
		st.KVMPages += set
		st.Pages += added
		if set > 0 {
			clear(src)
		}
	}
	t.owed = false
}

func (t *Tracker) takePending(into *Set, st *Stats) {
	t.ringMu.Lock()
	defer t.ringMu.Unlock()
	t.takePendingLocked(into, st)
}

func (t *Tracker) harvestBitmap(into *Set, st *Stats) error {
	t0 := time.Now()
	for i := range t.slots {
		s := &t.slots[i]
		if err := t.cfg.VM.GetDirtyLog(s.ID, s.scratch); err != nil {
			return fmt.Errorf("dirty tracker: %w", err)
		}
		set, added := orInto(into.slots[i].bits, s.scratch)
		st.KVMPages += set
		st.Pages += added
	}
	st.Fetch = time.Since(t0)
	return nil
}

func (t *Tracker) harvestManual(into *Set, st *Stats) error {
	t0 := time.Now()
	for i := range t.slots {
		if err := t.cfg.VM.GetDirtyLog(t.slots[i].ID, t.slots[i].scratch); err != nil {
			return fmt.Errorf("dirty tracker: %w", err)
		}
	}
	t1 := time.Now()
	st.Fetch = t1.Sub(t0)
	// Clear exactly what was fetched, chunk by chunk, skipping clean chunks.
	// The vCPUs are normally paused; if one runs, a page it writes after the
	// fetch but before the clear was fetched already, and its content is
	// copied after the harvest, so the write is not lost.
	words := t.cfg.ClearChunk / 64
	for i := range t.slots {
		s := &t.slots[i]
		dst := into.slots[i].bits
		for w := uint64(0); w < uint64(len(s.scratch)); w += words {
			end := min(w+words, uint64(len(s.scratch)))
			// Merge before clearing: once cleared, the pages exist only in into.
			set, added := orInto(dst[w:end], s.scratch[w:end])
			if set == 0 {
				continue
			}
			st.KVMPages += set
			st.Pages += added
			first := w * 64
			num := min((end-w)*64, s.pages-first)
			if err := t.cfg.VM.ClearDirtyLog(s.ID, first, uint32(num), s.scratch[w:end]); err != nil {
				return fmt.Errorf("dirty tracker: %w", err)
			}
		}
	}
	st.Protect = time.Since(t1)
	return nil
}

// harvestRings moves every published ring entry, and what RingFull collected,
// into into, then has KVM re-protect the pages and recycle the entries.
func (t *Tracker) harvestRings(into *Set, st *Stats) error {
	t.ringMu.Lock()
	defer t.ringMu.Unlock()
	t0 := time.Now()
	n, added, err := t.collectRings(into)
	st.KVMPages, st.Pages = n, added
	if err != nil {
		return err
	}
	t1 := time.Now()
	st.Fetch = t1.Sub(t0)
	if err := t.resetRings(); err != nil {
		return err
	}
	// Entries RingFull took since the last harvest, and every page if this
	// reset had to be repaired.
	t.takePendingLocked(into, st)
	st.Protect = time.Since(t1)
	return nil
}

// resetDirtyRings is kvm.VM.ResetDirtyRings; tests replace it to make a reset
// stop early.
var resetDirtyRings = (*kvm.VM).ResetDirtyRings

// resetRings has KVM re-protect the pages of the entries collected and
// recycle them. A reset that takes fewer entries than were marked stopped
// early, and may have left some of their pages writable, so that the guest's
// next writes to them go unlogged (a pending signal does that on Linux 6.17
// and later, see kvm.VM.ResetDirtyRings, which blocks signals to prevent it).
// Such a reset is repaired: logging is turned off and on, which re-protects
// every page, and every page is owed to the next harvest, since a write while
// logging was off is not logged either. Caller holds ringMu.
func (t *Tracker) resetRings() error {
	short := false
	for try := 0; t.unreset > 0 && try < 3; try++ {
		n, err := resetDirtyRings(t.cfg.VM)
		if errors.Is(err, syscall.EINTR) {
			short = true
			continue
		}
		if err != nil {
			return fmt.Errorf("dirty tracker: %w", err)
		}
		if uint64(n) < t.unreset {
			short = true
		}
		t.unreset -= min(uint64(max(n, 0)), t.unreset)
	}
	if !short && t.unreset == 0 {
		return nil
	}
	t.shortReset.Add(1)
	t.unreset = 0
	if err := t.setLogging(false); err != nil {
		return fmt.Errorf("repair a dirty ring reset that stopped early: %w", err)
	}
	if err := t.setLogging(true); err != nil {
		return fmt.Errorf("repair a dirty ring reset that stopped early: %w", err)
	}
	t.pending.fill()
	t.owed = true
	return nil
}

// collectRings reads every vCPU's ring from its fetch index, adds each entry's
// page to into and marks the entry harvested. It returns the entries read and
// the pages new to into. Caller holds ringMu.
func (t *Tracker) collectRings(into *Set) (count, added int, err error) {
	for v, ring := range t.rings {
		size := uint64(len(ring))
		for {
			e := &ring[t.fetch[v]%size]
			if kvm.LoadDirtyGFNFlags(e)&kvm.KVM_DIRTY_GFN_F_DIRTY == 0 {
				break
			}
			isNew, err := t.addRingEntry(into, e)
			if err != nil {
				return count, added, fmt.Errorf("dirty tracker: vCPU %d ring entry %d: %w", v, t.fetch[v], err)
			}
			if isNew {
				added++
			}
			kvm.StoreDirtyGFNFlags(e, kvm.KVM_DIRTY_GFN_F_RESET)
			t.fetch[v]++
			t.unreset++
			count++
		}
	}
	return count, added, nil
}

// addRingEntry sets the entry's page in into and reports whether it was new.
func (t *Tracker) addRingEntry(into *Set, e *kvm.DirtyGFN) (bool, error) {
	id := e.Slot & 0xffff // low 16 bits: slot id; high: address space
	for i := range t.slots {
		if t.slots[i].ID == id && e.Slot>>16 == 0 {
			if e.Offset >= t.slots[i].pages {
				return false, fmt.Errorf("page %d is beyond slot %d's %d pages", e.Offset, id, t.slots[i].pages)
			}
			w, bit := &into.slots[i].bits[e.Offset/64], uint64(1)<<(e.Offset%64)
			isNew := *w&bit == 0
			*w |= bit
			return isNew, nil
		}
	}
	return false, fmt.Errorf("slot %#x is not tracked", e.Slot)
}

// RingFull empties every ring into the tracker's pending set and has KVM
// recycle the entries, so a vCPU that exited with KVM_EXIT_DIRTY_RING_FULL can
// go on; the pages come out of the next Harvest. Call it from the vCPU's run
// loop before re-entering KVM_RUN. Safe from any goroutine.
func (t *Tracker) RingFull(vcpu int) error {
	if t.mech != Ring {
		return fmt.Errorf("dirty tracker: vCPU %d: dirty ring full, but the tracker uses %s", vcpu, t.mech)
	}
	t.ringFulls.Add(1)
	t.ringMu.Lock()
	defer t.ringMu.Unlock()
	if t.rings == nil {
		// Nothing to empty: returning nil would send the vCPU straight back
		// into a full ring, forever.
		return fmt.Errorf("dirty tracker: vCPU %d: dirty ring full before tracking started (start the tracker before running a guest with dirty logging on)", vcpu)
	}
	if _, _, err := t.collectRings(t.pending); err != nil {
		return err
	}
	t.owed = true
	return t.resetRings()
}

// harvestVMM moves the pages the VMM marked into into. Each word is swapped
// atomically, so a mark made during the harvest is in this one or the next.
func (t *Tracker) harvestVMM(into *Set, st *Stats) {
	if !t.vmmAny.Swap(false) {
		return
	}
	for i := range t.slots {
		dst := into.slots[i].bits
		for w := range t.slots[i].vmm {
			a := &t.slots[i].vmm[w]
			if a.Load() == 0 {
				continue
			}
			v := a.Swap(0)
			st.VMMPages += popcount(v)
			st.Pages += popcount(v &^ dst[w])
			dst[w] |= v
		}
	}
}

// orInto ORs src into dst and returns the bits set in src and how many of
// them were new to dst.
func orInto(dst, src []uint64) (set, added int) {
	for w, v := range src {
		if v != 0 {
			set += popcount(v)
			added += popcount(v &^ dst[w])
			dst[w] |= v
		}
	}
	return set, added
}

// Source harvests the pages of a VM's memory dirtied since the last harvest.
// Tracker is the KVM implementation; a VMM that tracks writes its own way (or
// a test double with no KVM at all) can supply another. replicate's VM
// contract asks for a Source.
type Source interface {
	// Start turns tracking on; pages written from then on are reported.
	Start() error
	// Stop turns tracking off.
	Stop() error
	// Harvest adds to into every page written since the last harvest (or
	// Start) and starts a new interval, with Tracker's exactness guarantee.
	Harvest(into *Set) (Stats, error)
	// Mechanism names how pages are tracked, for reports.
	Mechanism() Mechanism
}

var _ Source = (*Tracker)(nil)
