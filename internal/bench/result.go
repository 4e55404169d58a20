package bench

import (
	"time"

	"github.com/repagent/repagent/internal/epochstat"
	"github.com/repagent/repagent/replicate"
)

// Result is everything one run measured; --json writes it.
type Result struct {
	Started  time.Time `json:"started"`
	Config   Config    `json:"config"`
	Rates    []Rate    `json:"rates"`
	Check10k *Mode     `json:"check_10k"`
	Check    Check10k  `json:"check_10k_summary"`
	// Check10kOne is the 10k check with the pause's copy on one goroutine
	// (Config.CopyThreads 1), Copy the two copies per page side by side.
	Check10kOne *Mode           `json:"check_10k_one_copy_goroutine"`
	Copy        CopyCheck       `json:"check_10k_copy"`
	Tails       *TailsResult    `json:"pause_tails"`
	Capture     *CaptureResult  `json:"capture,omitempty"`
	Link        *LinkResult     `json:"link,omitempty"`
	Failover    *FailoverResult `json:"failover,omitempty"`
	Migrate     *MigrateResult  `json:"migration,omitempty"`
	Fence       *FenceResult    `json:"fenced_failover,omitempty"`
	Sync        *SyncResult     `json:"sync,omitempty"`
	Disk        *DiskResult     `json:"disk,omitempty"`
	Net         *NetResult      `json:"network,omitempty"`
	Goals       []Goal          `json:"goals"`
	TookSecs    float64         `json:"took_s"`
}

type Config struct {
	Mem         uint64    `json:"mem"`
	VCPUs       int       `json:"vcpus"`
	Pattern     string    `json:"pattern"`
	Rates       []uint64  `json:"rates"`
	IntervalsMS []float64 `json:"intervals_ms"`
	ModeTimeS   float64   `json:"mode_time_s"`
	Failovers   int       `json:"failovers"`
	DirtyTrack  string    `json:"dirty_track"`
	HeartbeatMS float64   `json:"heartbeat_timeout_ms"`
	Net         bool      `json:"network"`
	Disk        bool      `json:"disk"`
	DiskSize    uint64    `json:"disk_size"`
	DiskSync    uint64    `json:"disk_sync_size"`
	EchoRate    int       `json:"echo_rate"`
	StreamRate  uint64    `json:"stream_rate"`
	FailSizes   []uint64  `json:"failover_sizes"`
	Sync        bool      `json:"sync"`
	SyncSizes   []uint64  `json:"sync_sizes"`
}

// Rate is one rate's modes.
type Rate struct {
	Rate  uint64  `json:"rate"`
	Modes []*Mode `json:"modes"`
}

// Mode is what one mode measured. Durations are in microseconds.
type Mode struct {
	Mode       string  `json:"mode"` // none, floor, or the interval
	IntervalMS float64 `json:"interval_ms,omitempty"`
	Track      string  `json:"dirty_track,omitempty"`
	Seconds    float64 `json:"seconds"`
	Writes     uint64  `json:"guest_writes"`
	GuestRate  float64 `json:"guest_writes_per_s"`
	VsFloor    float64 `json:"vs_floor"`
	VsNone     float64 `json:"vs_none"`

	// The floor's harvests in the window.
	Harvests      int     `json:"harvests,omitempty"`
	HarvestMeanUS float64 `json:"harvest_mean_us,omitempty"`
	HarvestPages  float64 `json:"harvest_pages_mean,omitempty"`
	RingFullExits uint64  `json:"ring_full_exits,omitempty"`

	// The replicated modes' epochs that started in the window.
	Epochs       uint64  `json:"epochs,omitempty"`
	PauseP50US   float64 `json:"pause_p50_us,omitempty"`
	PauseP99US   float64 `json:"pause_p99_us,omitempty"`
	PauseMaxUS   float64 `json:"pause_max_us,omitempty"`
	KickUS       float64 `json:"kick_mean_us,omitempty"`
	HarvestUS    float64 `json:"harvest_mean_us_epoch,omitempty"`
	SaveUS       float64 `json:"save_mean_us,omitempty"`
	CopyUS       float64 `json:"copy_mean_us,omitempty"`
	StallUS      float64 `json:"stall_mean_us,omitempty"`
	GatesUS      float64 `json:"gates_mean_us,omitempty"`
	ResumeUS     float64 `json:"resume_mean_us,omitempty"`
	WaitUS       float64 `json:"wait_mean_us,omitempty"`
	DirtyPages   float64 `json:"dirty_pages_mean,omitempty"`
	RawKiB       float64 `json:"raw_kib_per_epoch,omitempty"`
	WireKiB      float64 `json:"wire_kib_per_epoch,omitempty"`
	WireRatio    float64 `json:"wire_over_raw,omitempty"`
	WireMBps     float64 `json:"wire_mb_per_s,omitempty"`
	AckP50US     float64 `json:"ack_p50_us,omitempty"`
	Oversize     uint64  `json:"oversize,omitempty"`
	SyncSeconds  float64 `json:"sync_s,omitempty"`
	epochs       []replicate.EpochStats
	agg          epochstat.Agg
	harvestTotal time.Duration

	// The engine's CPU per dirty page over the window, primary and backup
	// side, and the floor: a plain copy of CopyPages scattered pages (the
	// mean per epoch) in this process; the ratios to it.
	CPUPageUS       float64 `json:"cpu_us_per_page,omitempty"`
	BackupCPUPageUS float64 `json:"backup_cpu_us_per_page,omitempty"`
	CopyPageUS      float64 `json:"plain_copy_us_per_page,omitempty"`
	CopyPages       int     `json:"plain_copy_pages,omitempty"`
	CPUVsCopy       float64 `json:"cpu_vs_copy,omitempty"`
	BackupVsCopy    float64 `json:"backup_cpu_vs_copy,omitempty"`
}

// Check10k is the 10k check's verdict: its pause p99 against the
// median of its epochs' kick + harvest + save + copy (BaseP50US).
type Check10k struct {
	DirtyPages float64 `json:"dirty_pages_mean"`
	PauseP99US float64 `json:"pause_p99_us"`
	BaseP50US  float64 `json:"kick_harvest_save_copy_p50_us"`
	Ratio      float64 `json:"ratio"`
}

type Goal struct {
	Text string `json:"text"`
	Met  bool   `json:"met"`
}
