package replicate

import (
	"encoding/json"
	"fmt"
	"time"
)

// EpochStats describes one checkpoint epoch on the primary. The pause the
// guest saw is Pause = Kick + Harvest + Save + Audit + Stall + Copy + Gates +
// Resume.
type EpochStats struct {
	Epoch uint64
	// Start is when the pause began.
	Start time.Time
	// Wait is the back-pressure wait before the pause: Config.MaxInFlight
	// epochs were captured and not yet acknowledged. The guest ran on.
	Wait time.Duration
	// Pause is how long the vCPUs were stopped, and the parts of it:
	Pause   time.Duration
	Kick    time.Duration // stopping every vCPU (VM.Pause)
	Harvest time.Duration // the dirty log, and listing its pages
	Save    time.Duration // machine state (VM.Save) and Config.Note
	Stall   time.Duration // waiting, paused, for staging room (back-pressure on the guest)
	Copy    time.Duration // dirty pages into staging (or, for an oversized epoch, sending them)
	Gates   time.Duration // opening the next epoch on the output gates
	Resume  time.Duration // VM.Resume
	Audit   time.Duration // Config.AuditEvery: digesting all of memory
	// Oversize is set when the epoch's pages did not fit in staging, so they
	// were sent from guest memory during the pause (stop-and-copy).
	Oversize bool
	// CopyThreads is how many goroutines copied the pages during the pause.
	CopyThreads int
	// Lazy capture (Config.Capture): Protect is the part of the pause spent
	// write-protecting LazyPages of the dirty pages (the rest were copied,
	// in Copy). Behind is how long copying them took after the resume;
	// Faults is the guest's writes that found a page not yet copied (each
	// copied first; FaultTime is the handler's time on them, copy and
	// unprotect), GuardedPages the pages the VMM's own writes had copied
	// first (WriteGuard).
	Protect      time.Duration
	LazyPages    int
	Behind       time.Duration
	Faults       int
	FaultTime    time.Duration
	GuardedPages int
	// VCPUHost is the CPU time the vCPU threads spent outside guest mode
	// between the previous resume and this one (KVM's page faults, exits,
	// device emulation), when the VM names its threads (VCPUThreads). The
	// kernel samples it at its tick, so one epoch's figure is coarse; sums
	// over many are not. LazyCap is, with auto capture, how many pages the
	// guest-cost budget let the epoch capture lazily; it is -1 where no
	// budget applied (eager, lazy, or a VM that does not name its threads).
	VCPUHost time.Duration
	LazyCap  int
	// DirtyPages is the pages captured; ZeroPages of them were zero, and
	// LZ4Pages went compressed.
	DirtyPages, ZeroPages, LZ4Pages int
	// RawBytes is the pages' size; WireBytes what the epoch took on the wire
	// (pages, state, headers); StateBytes the machine state's size.
	RawBytes, WireBytes, StateBytes uint64
	// StreamRecords is the records of the stream (Config.Stream: a disk's
	// writes) the epoch carried, StreamBytes their data, StreamWireBytes
	// their messages (part of WireBytes). The first checkpoint carries the
	// stream sync's residual instead (units sent, their bytes).
	StreamRecords                int
	StreamBytes, StreamWireBytes uint64
	// Transfer is from the end of the pause to the epoch's end record written.
	Transfer time.Duration
	// AckLatency is from the end record written to the backup's ack.
	AckLatency time.Duration
	// CPU is the primary engine's CPU time for the epoch: its pause, the
	// helpers that copied its pages, the workers that built its batches
	// and the sender, each read from its own thread's clock (the vCPUs'
	// threads are not the engine's). BackupCPU is the backup engine's, from
	// its acks: the receipt and check of this epoch and the application of
	// the one before (see Ack).
	CPU, BackupCPU time.Duration
	// Digest is the memory digest at the epoch boundary. With Audited, it was
	// checked against a digest of all of guest memory taken in the pause.
	Digest  uint64
	Audited bool
	// Note is what Config.Note returned during the pause.
	Note any
}

// Ratio is the compression ratio, wire bytes over raw bytes.
func (s *EpochStats) Ratio() float64 {
	if s.RawBytes == 0 {
		return 1
	}
	return float64(s.WireBytes) / float64(s.RawBytes)
}

func us(d time.Duration) float64 { return float64(d) / 1e3 }

// MarshalJSON writes the stats as one flat object, durations in microseconds.
func (s *EpochStats) MarshalJSON() ([]byte, error) {
	var lazyCap *int
	if s.LazyCap >= 0 {
		lazyCap = &s.LazyCap
	}
	return json.Marshal(struct {
		Epoch      uint64  `json:"epoch"`
		Start      string  `json:"start"`
		WaitUS     float64 `json:"wait_us"`
		PauseUS    float64 `json:"pause_us"`
		KickUS     float64 `json:"kick_us"`
		HarvestUS  float64 `json:"harvest_us"`
		SaveUS     float64 `json:"save_us"`
		StallUS    float64 `json:"stall_us"`
		CopyUS     float64 `json:"copy_us"`
		GatesUS    float64 `json:"gates_us"`
		ResumeUS   float64 `json:"resume_us"`
		AuditUS    float64 `json:"audit_us,omitempty"`
		Oversize   bool    `json:"oversize,omitempty"`
		CopyThr    int     `json:"copy_threads"`
		ProtectUS  float64 `json:"protect_us,omitempty"`
		LazyPages  int     `json:"lazy_pages,omitempty"`
		BehindUS   float64 `json:"behind_us,omitempty"`
		Faults     int     `json:"faults,omitempty"`
		FaultUS    float64 `json:"fault_us,omitempty"`
		Guarded    int     `json:"guarded_pages,omitempty"`
		VCPUHostUS float64 `json:"vcpu_host_us"`
		LazyCap    *int    `json:"lazy_cap,omitempty"`
		Dirty      int     `json:"dirty_pages"`
		Zero       int     `json:"zero_pages"`
		LZ4        int     `json:"lz4_pages"`
		Raw        uint64  `json:"raw_bytes"`
		Wire       uint64  `json:"wire_bytes"`
		State      uint64  `json:"state_bytes"`
		Records    int     `json:"stream_records,omitempty"`
		StreamB    uint64  `json:"stream_bytes,omitempty"`
		StreamWire uint64  `json:"stream_wire_bytes,omitempty"`
		TransferUS float64 `json:"transfer_us"`
		AckUS      float64 `json:"ack_us"`
		CPUUS      float64 `json:"cpu_us"`
		BackupUS   float64 `json:"backup_cpu_us"`
		Digest     string  `json:"digest"`
		Audited    bool    `json:"audited,omitempty"`
		Note       any     `json:"note,omitempty"`
	}{
		s.Epoch, s.Start.UTC().Format(time.RFC3339Nano), us(s.Wait), us(s.Pause), us(s.Kick), us(s.Harvest), us(s.Save),
		us(s.Stall), us(s.Copy), us(s.Gates), us(s.Resume), us(s.Audit), s.Oversize, s.CopyThreads,
		us(s.Protect), s.LazyPages, us(s.Behind), s.Faults, us(s.FaultTime), s.GuardedPages, us(s.VCPUHost), lazyCap, s.DirtyPages, s.ZeroPages, s.LZ4Pages,
		s.RawBytes, s.WireBytes, s.StateBytes, s.StreamRecords, s.StreamBytes, s.StreamWireBytes, us(s.Transfer), us(s.AckLatency),
		us(s.CPU), us(s.BackupCPU), FormatDigest(s.Digest), s.Audited, s.Note,
	})
}

// FormatDigest prints a memory digest the way stats files and logs do: 16
// lower-case hex digits.
func FormatDigest(d uint64) string { return fmt.Sprintf("%016x", d) }

// SyncEnd says why the initial sync ended.
type SyncEnd int

const (
	// SyncConverged: a round left at most Config.PrecopyThreshold pages.
	SyncConverged SyncEnd = 1 + iota
	// SyncNotShrinking: a round shrank the dirty set by less than a quarter
	// (the guest dirties memory about as fast as it is sent, and more rounds
	// would not help), and what is left fits Config.SyncPause: the first
	// checkpoint copies it in its pause (stop-and-copy).
	SyncNotShrinking
	// SyncRoundLimit: Config.MaxPrecopyRounds rounds ran; the rest is
	// copied as for SyncNotShrinking, in however long a pause it takes.
	SyncRoundLimit
	// SyncThrottleLimit: the rounds stopped shrinking with more left than
	// Config.SyncPause, and the vCPUs were throttled as far as they go (or
	// Config.NoThrottle): the rest is copied in however long a pause it
	// takes.
	SyncThrottleLimit
)

func (e SyncEnd) String() string {
	switch e {
	case SyncConverged:
		return "converged"
	case SyncNotShrinking:
		return "rounds stopped shrinking"
	case SyncRoundLimit:
		return "round limit"
	case SyncThrottleLimit:
		return "throttle limit"
	}
	return "in progress"
}

// SyncProgress reports one round of the initial sync.
type SyncProgress struct {
	Round     int           // 0 copies all of memory; later rounds what the guest dirtied meanwhile
	Pages     int           // pages sent in the round
	WireBytes uint64        // bytes the round took on the wire
	Took      time.Duration // the round's time
	Elapsed   time.Duration // since the sync began
	Remaining int           // pages dirty when the round ended
	Done      bool          // the last report: the first checkpoint follows
	End       SyncEnd       // with Done: why the sync ended
	CPU       time.Duration // the engine's CPU time on the round (workers and sender)
	// Throttle is the share of time the vCPUs were held paused during the
	// round (0: not throttled), Held how long that came to.
	Throttle float64
	Held     time.Duration
	// PauseEstimate, once rounds stop shrinking well, is how long the first
	// checkpoint's pause would take to capture the pages left.
	PauseEstimate time.Duration
	// Holes, in round 0, is how many of its pages lay in holes of the VM's
	// memory file and were sent as zero pages unread (MemoryBacking).
	Holes int
}

// Rate is the round's replication rate in bytes of guest memory per second.
func (s SyncProgress) Rate() float64 {
	if s.Took <= 0 {
		return 0
	}
	return float64(s.Pages) * PageSize / s.Took.Seconds()
}
