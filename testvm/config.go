package testvm

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// Workload is what the guest does on each vCPU.
type Workload uint32

const (
	// Idle paces itself with rdtsc and writes nothing but its status page.
	Idle Workload = wlIdle
	// Dirty writes stamped pages over a working set.
	Dirty Workload = wlDirty
	// Counter runs a monotonic counter with a running hash of its history.
	Counter Workload = wlCounter
	// UDPEcho answers each UDP datagram sent to Net.Port with an 8-byte
	// big-endian sequence number (1, 2, ...) followed by the datagram's payload,
	// and answers ARP requests for Net.IP. It runs on vCPU 0; other vCPUs idle.
	UDPEcho Workload = wlUDPEcho
	// UDPStream sends numbered datagrams (8-byte big-endian sequence number,
	// 8-byte guest TSC, fill) at Net.StreamRate to whoever last sent a datagram
	// to Net.Port, and answers ARP. It runs on vCPU 0; other vCPUs idle.
	UDPStream Workload = wlUDPStrm
	// Disk writes stamped blocks to the block device (Config.Disk) and reads
	// earlier ones back to verify them, recording every block's version in
	// guest memory (see VerifyDisk). It runs on vCPU 0; other vCPUs idle.
	Disk Workload = wlDisk
)

// Pattern is how the Dirty workload picks the next page, and the Disk
// workload the next block after its first sequential sweep.
type Pattern uint32

const (
	// Seq writes pages 0, 1, ..., W-1, 0, 1, ...
	Seq Pattern = patSeq
	// Random writes uniformly random pages.
	Random Pattern = patRandom
	// HotCold sends most writes to a small hot set.
	HotCold Pattern = patHotcold
)

// Content is what a Dirty workload write puts in its page: how much of the
// page changes and how well it compresses. Each one verifies exactly (see
// Machine.VerifyPages).
type Content uint32

const (
	// Stamp changes every byte of the page with each write; the bytes do not
	// compress.
	Stamp Content = contentStamp
	// Text fills the page with text-like words that LZ4 compresses to about
	// half (the stamp and version words are kept, so it verifies the same).
	Text Content = contentText
	// Sparse changes one 64-byte line of the page with each write; the rest
	// of the page keeps its bytes (zero until a write reaches them).
	Sparse Content = contentSparse
)

var contentNames = map[Content]string{Stamp: "stamp", Text: "text", Sparse: "sparse"}

func (c Content) String() string {
	if s, ok := contentNames[c]; ok {
		return s
	}
	return fmt.Sprintf("content(%d)", uint32(c))
}

// ParseContent parses "stamp", "text" or "sparse".
func ParseContent(s string) (Content, error) {
	for c, n := range contentNames {
		if n == s {
			return c, nil
		}
	}
	return 0, fmt.Errorf("unknown page content %q (want stamp, text or sparse)", s)
}

var workloadNames = map[Workload]string{Idle: "idle", Dirty: "dirty", Counter: "counter",
	UDPEcho: "udp-echo", UDPStream: "udp-stream", Disk: "disk"}
var patternNames = map[Pattern]string{Seq: "seq", Random: "random", HotCold: "hotcold"}

func (w Workload) String() string {
	if s, ok := workloadNames[w]; ok {
		return s
	}
	return fmt.Sprintf("workload(%d)", uint32(w))
}

func (p Pattern) String() string {
	if s, ok := patternNames[p]; ok {
		return s
	}
	return fmt.Sprintf("pattern(%d)", uint32(p))
}

// IsNet reports whether w is a network workload, which needs Config.Net.
func (w Workload) IsNet() bool { return w == UDPEcho || w == UDPStream }

// ParseWorkload parses "idle", "dirty", "counter", "udp-echo", "udp-stream"
// or "disk".
func ParseWorkload(s string) (Workload, error) {
	for w, n := range workloadNames {
		if n == s {
			return w, nil
		}
	}
	return 0, fmt.Errorf("unknown workload %q (want idle, dirty, counter, udp-echo or udp-stream), or disk with a block device", s)
}

// ParsePattern parses "seq", "random" or "hotcold".
func ParsePattern(s string) (Pattern, error) {
	for p, n := range patternNames {
		if n == s {
			return p, nil
		}
	}
	return 0, fmt.Errorf("unknown pattern %q (want seq, random or hotcold)", s)
}

// Memory size limits. The lower bound leaves room for the fixed layout and one
// 2 MiB data page per vCPU; the upper bound is what the page tables cover.
const (
	hugePage   = 2 << 20
	MinMemSize = 8 << 20
	MaxMemSize = 64 << 30
	// DefaultMemSize is the guest memory size when Config.MemSize is 0.
	DefaultMemSize = 256 << 20
)

// Config describes a test VM.
type Config struct {
	// MemSize is the guest memory in bytes: a multiple of 2 MiB from 8 MiB to
	// 64 GiB. 0 means DefaultMemSize.
	MemSize uint64
	// VCPUs is the number of vCPUs, 1 to MaxVCPUs.
	VCPUs int
	// Workload is what each vCPU runs. 0 means Idle.
	Workload Workload
	// Pattern is the Dirty workload's page order, and the Disk workload's
	// block order after its first sweep (Seq: sweeps only). 0 means Random.
	Pattern Pattern
	// Content is what the Dirty workload writes into a page. 0 means Stamp.
	Content Content
	// WorkingSet is the number of 4 KiB pages each vCPU's Dirty workload writes,
	// from the start of its region. 0 means the whole region.
	WorkingSet uint64
	// Rate is the Dirty workload's target in page writes per second per vCPU,
	// or the Disk workload's in block writes per second (one block per
	// batch then). 0 means as fast as it can.
	Rate uint64
	// Seed seeds the Random and HotCold patterns.
	Seed uint64
	// HotPercent is the HotCold hot set's share of the working set (default 10),
	// and HotWritePercent the share of writes that go to it (default 90).
	HotPercent, HotWritePercent uint32
	// PhaseOps, when not 0, makes the guest stop after every PhaseOps operations
	// and wait for Machine.Go to allow the next phase. Tests use it to know
	// exactly what the guest did between two points.
	PhaseOps uint64
	// IdleTickMicros is the Idle workload's status-update period (default 1000).
	IdleTickMicros uint64
	// Net, when not nil, gives the machine a paravirtual network device (see
	// net.go) and the guest its MAC and IP. The network workloads need it.
	Net *NetConfig
	// Tap is the tap device the network device sends to and receives from
	// (see OpenTap); the caller keeps ownership and closes it after the
	// machine. nil with Net set: the guest's frames are dropped and counted.
	Tap *os.File
	// Disk, when not nil, gives the machine a paravirtual block device (see
	// disk.go) of Disk.Blocks blocks. The Disk workload needs it.
	Disk *DiskConfig
	// DiskIO is the block device's backing store (an *os.File holding a raw
	// image will do, or a writer that mirrors it). It is required with Disk,
	// belongs to the caller (who closes it after the machine), and is not part
	// of the saved configuration (RestoreOptions.DiskIO).
	DiskIO DiskBackend
	// DiskPoll is how long the block device goes on polling its ring after
	// the last request before it sleeps and asks the guest for a doorbell.
	// The doorbell costs no exit, but waking the sleeping device thread costs
	// hundreds of microseconds, so a guest that issues batch after batch
	// runs about four times faster with polling. It costs a host thread
	// spinning that long after each burst. 0 means DefaultDiskPoll; a
	// negative value makes the device sleep at once (doorbells only). Not
	// saved (RestoreOptions.DiskPoll).
	DiskPoll time.Duration
	// DirtyLog turns KVM_MEM_LOG_DIRTY_PAGES on for every memory slot at start.
	DirtyLog bool
	// DirtyRingEntries, when not 0, enables KVM's dirty ring with this many
	// entries per vCPU (a power of two) before the vCPUs are created.
	DirtyRingEntries uint32
	// Console receives the guest's console lines, one Write per line with a
	// trailing newline. nil discards them.
	Console io.Writer
	// DirtyRingFull is called on a vCPU's thread when KVM exits with
	// KVM_EXIT_DIRTY_RING_FULL; it must harvest and reset the rings before it
	// returns. nil hands the exit to the tracker from DirtyTracker, if any.
	DirtyRingFull func(vcpu int) error
}

// withDefaults returns c with zero fields replaced by defaults.
func (c Config) withDefaults() Config {
	if c.MemSize == 0 {
		c.MemSize = DefaultMemSize
	}
	if c.Workload == 0 {
		c.Workload = Idle
	}
	if c.Pattern == 0 {
		c.Pattern = Random
	}
	if c.Content == 0 {
		c.Content = Stamp
	}
	if c.HotPercent == 0 {
		c.HotPercent = 10
	}
	if c.HotWritePercent == 0 {
		c.HotWritePercent = 90
	}
	if c.IdleTickMicros == 0 {
		c.IdleTickMicros = 1000
	}
	if c.Net != nil {
		n := c.Net.withDefaults()
		if c.Workload.IsNet() {
			n.Service = c.Workload
		}
		c.Net = &n
	}
	if c.Disk != nil {
		d := c.Disk.withDefaults()
		c.Disk = &d
		if c.DiskPoll == 0 {
			c.DiskPoll = DefaultDiskPoll
		}
	}
	return c
}

// Validate reports the first problem with c (after defaults), naming it.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []string
	if c.MemSize%hugePage != 0 {
		errs = append(errs, fmt.Sprintf("memory size %s (%d bytes) is not a multiple of 2 MiB", FormatSize(c.MemSize), c.MemSize))
	} else if c.MemSize < MinMemSize || c.MemSize > MaxMemSize {
		errs = append(errs, fmt.Sprintf("memory size %s is outside %s..%s", FormatSize(c.MemSize), FormatSize(MinMemSize), FormatSize(MaxMemSize)))
	}
	if c.VCPUs < 1 || c.VCPUs > MaxVCPUs {
		errs = append(errs, fmt.Sprintf("%d vCPUs: want 1 to %d", c.VCPUs, MaxVCPUs))
	}
	if _, ok := workloadNames[c.Workload]; !ok {
		errs = append(errs, fmt.Sprintf("unknown workload %d", c.Workload))
	}
	if _, ok := patternNames[c.Pattern]; !ok {
		errs = append(errs, fmt.Sprintf("unknown pattern %d", c.Pattern))
	}
	if _, ok := contentNames[c.Content]; !ok {
		errs = append(errs, fmt.Sprintf("unknown page content %d", c.Content))
	}
	if c.HotPercent > 100 || c.HotWritePercent > 100 {
		errs = append(errs, fmt.Sprintf("hot set %d%% / hot writes %d%%: percentages must be at most 100", c.HotPercent, c.HotWritePercent))
	}
	if c.Workload.IsNet() && c.Net == nil {
		errs = append(errs, fmt.Sprintf("workload %s needs a network device (Config.Net)", c.Workload))
	}
	if c.Net != nil {
		if err := c.Net.validate(); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if c.Tap != nil && c.Net == nil {
		errs = append(errs, "a tap without a network device (Config.Net)")
	}
	if c.Workload == Disk && c.Disk == nil {
		errs = append(errs, "workload disk needs a block device (Config.Disk)")
	}
	if c.DiskIO != nil && c.Disk == nil {
		errs = append(errs, "a disk backend without a block device (Config.Disk)")
	}
	if c.Disk != nil {
		if err := c.Disk.validate(); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if c.DirtyRingEntries != 0 && c.DirtyRingEntries&(c.DirtyRingEntries-1) != 0 {
		errs = append(errs, fmt.Sprintf("dirty ring of %d entries is not a power of two", c.DirtyRingEntries))
	}
	if len(errs) == 0 && c.MemSize%hugePage == 0 {
		l := newLayout(c.MemSize, c.VCPUs)
		if l.regionPages == 0 {
			errs = append(errs, fmt.Sprintf("memory size %s leaves no data pages for %d vCPUs", FormatSize(c.MemSize), c.VCPUs))
		} else if c.WorkingSet > l.regionPages {
			errs = append(errs, fmt.Sprintf("working set of %d pages exceeds the %d pages each vCPU owns (memory %s, %d vCPUs)", c.WorkingSet, l.regionPages, FormatSize(c.MemSize), c.VCPUs))
		}
		if c.Disk != nil && c.Workload == Disk && l.regionPages != 0 {
			if err := c.Disk.checkTable(l.regionPages); err != nil {
				errs = append(errs, err.Error())
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("invalid VM config: %s", strings.Join(errs, "; "))
	}
	return nil
}

// FormatSize prints a byte count with a binary unit.
func FormatSize(n uint64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}

// layout is where things live in guest memory.
type layout struct {
	memSize     uint64
	lowSize     uint64 // bytes of slot 0, mapped at GPA 0
	regionPages uint64 // pages each vCPU owns from its base
}

// highGPA is where slot 1 starts in guest-physical space: above a hole that
// holds KVM's TSS and identity-map pages, as on real machines.
const highGPA = 4 << 30

// Addresses in the hole below highGPA, covered by no memory slot.
const (
	kvmTSSAddr         = 0xfffbd000
	kvmIdentityMapAddr = 0xfffbc000
)

func newLayout(mem uint64, vcpus int) layout {
	low := mem / 2 / hugePage * hugePage
	if low < 2*hugePage {
		low = 2 * hugePage
	}
	if low > 3<<30 {
		low = 3 << 30
	}
	l := layout{memSize: mem, lowSize: low}
	if mem > DataAddr && vcpus > 0 {
		l.regionPages = (mem - DataAddr) / pageSize / uint64(vcpus)
	}
	return l
}

// regionBase is the guest-virtual address (= memory offset) of vCPU i's region.
func (l layout) regionBase(i int) uint64 { return DataAddr + uint64(i)*l.regionPages*pageSize }

// gpa maps a guest-virtual address (= offset into guest memory) to its
// guest-physical address.
func (l layout) gpa(off uint64) uint64 {
	if off < l.lowSize {
		return off
	}
	return off - l.lowSize + highGPA
}
