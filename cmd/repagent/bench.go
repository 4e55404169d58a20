package main

// The bench command: whole-system figures from one run, every mode side by
// side, as ratios against baselines measured in the same run (the machines
// are shared and noisy, so only same-run ratios mean much).

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/internal/epochstat"
	"github.com/repagent/repagent/internal/track"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

const benchUsage = `Usage: repagent bench [flags]

Measure replication on this machine, every mode side by side from one run.
For the dirty workload at each of --rates (page writes per second per vCPU,
0 = full speed), each mode on a fresh test VM, after a warm-up:

  none       no dirty tracking: the guest's own write rate
  floor      dirty logging on, harvested every 100ms while the guest runs
             (no pause): the dirty-logging tax every replication mode pays
  INTERVAL   replicated at each of --intervals to a backup in this process
             over loopback TCP

It prints one table per rate: guest writes/s and its ratio to the floor and to
none, pause p50/p99 and the mean of its parts, dirty pages, raw and wire bytes
per epoch, the compression ratio, MB/s on the wire, the ack latency and the
back-pressure wait. Beside it, each replicated mode's engine CPU per dirty
page (the thread CPU time of the primary's pause work, copy helpers,
compression workers and sender, and of the backup's receiving, checking and
applying, over the window's pages), against a floor measured in the same
process right after: the thread CPU time of copying as many 4 KiB pages as
the mean epoch dirtied, picked at random across a buffer of the guest's size
and copied in address order into another, per page. Then the 10k check (a
sequential writer over 10000 pages at full speed, with 300ms epochs so that
each one dirties all 10k pages even when the guest shares two cores with the
engine and the backup: pause p99 against the median of kick + harvest +
save + copy of the same epochs, and its CPU per page), and the same guest
again with the pause's copy on one goroutine (the engine's CopyThreads 1):
the pause copy per page (copy / dirty pages, the mean over the epochs) of
both runs, and the ratio. Then the pause tails at a moderate rate: the dirty
workload at 20000 page writes/s on 1 vCPU, random over 16384 pages (64 MiB)
of a guest of --mem (at least 128MiB), replicated at 100ms: pause p50, p99,
and p99 / p50. Then failover: at each of --failover-sizes
(a size whose guest, replica and staging, about 3 times its memory, would
not fit in 80% of the free RAM is skipped, with the reason), a primary run
as a separate process (this program's primary command) is killed with
SIGKILL --failovers times, and once more with the backup digesting its whole
replica first (as backup --verify-replica does); at the first size it is
also frozen with SIGSTOP once. The time from the signal to the guest making
progress on the backup is measured, and split into detection (the backup
deciding the primary is lost) and what follows (restore, first write); the
last size is compared with the first.

Then the initial sync of a large guest (--no-sync skips it): at each of
--sync-sizes (skipped as failover's are when they do not fit), a guest of
that size with 2 vCPUs running the dirty workload at full speed is
replicated at 100ms to a backup in this process over loopback TCP: the time
from the engine's Run to the first acknowledged checkpoint ("time to
protected"), the sync's rounds, how it ended, how far the engine throttled
the vCPUs, the first checkpoint's pause and the longest one until the end
of the window, and the epochs per second over --mode-time after the
warm-up (the sync done and 3 checkpoints acknowledged). The floor, in the same
run: a plain copy of as much memory over loopback TCP (one goroutine writing
a buffer with 4 MiB writes, one reading into another, both faulted in
beforehand; the time to fault the destination in is shown too).

Then the disk (--no-disk skips it). Its guest writes random 4 KiB blocks
over a --disk-size image of random contents (the workload testvm.Disk: 32
blocks per batch, verified reads, a FUA write every 8 batches and a flush
every 256 writes), each mode on a fresh 1-vCPU test VM over the same image
file (fsynced and in the page cache), measured for --mode-time once the
guest's first sequential sweep is over:

  plain      the image file itself
  mirror     through a diskmirror.Mirror, an epoch opened at the first of
             --intervals and its stream read and committed, no pause, no
             backup: the interposer's own cost
  INTERVAL   through a Mirror, replicated at each of --intervals to a backup
             (its own image) in this process over loopback TCP
  INTERVAL, backup in RAM
             the same at the first of --intervals, the backup's image in
             memory: what sharing this machine's disk with the backup costs

It prints block writes/s, MiB/s and the ratio to plain, the image's fsyncs
(the guest's flushes and FUA writes: how many, how long, the share of the
window), the disk writes and bytes per epoch, pauses, acks and the backup
image's fsync per epoch. Then the initial sync of a --disk-sync-size image
of random blocks to a backup image that holds 0%, 50% and 100% of its 1 MiB
blocks (an idle guest, replicated at 20ms): the time to hash and send, the
blocks and bytes sent, and the times to the first checkpoint and to the
backup's first fsync, against two baselines from the same run: hashing the
image, and a plain copy of it over loopback TCP. The images are in a
temporary directory, removed at the end.

Then the network (output commit; --no-net skips it). In a network of its
own (two namespaces, a bridge and the guest's tap), each mode on a fresh
1-vCPU test VM (--mem, at most 64MiB) with an output gate on its tap:

  none       the gate attached but never opened (frames pass), no replication
  INTERVAL   replicated at each of --intervals, the gate holding every frame
             the guest sends until its epoch is acknowledged

A client sends --echo-rate requests per second to the guest's udp-echo for
--mode-time and times the answers: round trip p50 and p99, the p50 added
over none, and the epochs' pause, transfer, ack and the gate's hold times.
Then the same with the main job's shape: the dirty workload at full speed
(random, stamp pages) on 1 vCPU of 256MiB whose vCPU 0 also answers the
echo requests between page writes (as the main job runs it, without its idle
disk), without replication and replicated at 100ms, 20ms and 10ms
(whatever --intervals says): the gate's hold time p50 (the main job's "hold
time (added latency)"), the client's round trip, the dirty pages, pause and
transfer per epoch, the transfer's share of the interval, and the
prediction interval/2 + pause p50 + transfer p50 + 1 ms beside the hold
time. Then held-frame throughput: the guest's udp-stream (64-byte datagrams at up
to --stream-rate per second; the device's TX ring back-pressures the guest,
so the rate is what the device and the gate sustain) to a client, without
replication and replicated at 20ms (every frame held, then released): the
frames per second the client receives, and the ratio.

Last, the goal lines, each MET or NOT MET, among them: the 10k check's
pause p99 (<= 1.5x kick + harvest + save + copy) and its copy per page (the
default >= 1.3x faster than one goroutine), the moderate rate's pause p99
(<= 2x its p50), the engine's CPU per page (the worst replicated mode of
each rate; primary <= 3 µs, backup <= 2 µs for the stamp pages the dirty
workload writes), the failover at the last of --failover-sizes against the
first (after detection the same and <= 60 ms), the time to protected (<= 2x
the plain copy), and, with the main job's shape at each interval, the hold
time p50 (<= the prediction) and the transfer p50 (<= 10% of the interval).
With the defaults it takes about 4 minutes (the 4GiB sync and failover
sizes need about 15 GiB of free RAM, or are skipped). The network needs
root.

Exit code 0 when every measurement ran (whatever the goals say), 1 on a
runtime error, 2 on a usage error.

Flags:
`

// benchExecutable is the repagent binary whose primary command the failover
// runs; empty means this program (os.Executable). Tests, whose executable is
// the test binary, set it to a built repagent.
var benchExecutable string

// Fixed settings of the bench.
const (
	floorHarvest     = 100 * time.Millisecond // the floor's harvest period
	failoverInterval = 100 * time.Millisecond // the failover primary's interval
	check10kPages    = 10000                  // the 10k check's working set
	check10kInterval = 300 * time.Millisecond // 10k pages at >= 34k writes/s
	check10kMinMem   = 64 << 20               // room for 10000 pages in the region
	warmEpochs       = 3                      // epochs acknowledged after the sync before measuring
	failoverEpochs   = 5                      // checkpoints the backup holds before the primary dies
	// benchHeartbeatTimeout is the heartbeat timeout of the measuring modes:
	// it only decides when a silent side counts as lost, so it is generous,
	// so that a descheduled process on a busy machine does not end a mode.
	benchHeartbeatTimeout = 5 * time.Second
	setupTimeout          = 60 * time.Second // readiness, sync, first epochs
	benchSetupRate        = 32 << 20         // bytes/s: a large guest's setup may take mem/rate (benchSetupTimeout)
	maxEchoRate           = 10000            // --echo-rate's limit
)

// Goals the figures are compared with (not assertions).
const (
	// The 10k check's pause p99 over the median of its epochs' kick +
	// harvest + save + copy.
	goalPauseRatio    = 1.5
	goalGuestVsFloor  = 0.90
	goalFailoverExtra = 500 * time.Millisecond
	// The failover's time after detection is the same at every guest size
	// (the last of --failover-sizes within goalFailoverSame times the first,
	// or goalFailoverSlack more), and at most goalFailoverAfter.
	goalFailoverSame  = 1.25
	goalFailoverSlack = 10 * time.Millisecond
	goalFailoverAfter = 60 * time.Millisecond
)

// benchOptions is what the bench command was asked to do.
type benchOptions struct {
	mem              uint64
	vcpus            int
	rates            []uint64
	pattern          testvm.Pattern
	intervals        []time.Duration
	modeTime         time.Duration
	failovers        int
	mech             dirtylog.Mechanism
	heartbeatTimeout time.Duration
	net              bool   // measure the network section
	disk             bool   // measure the disk section
	diskSize         uint64 // the disk throughput image
	diskSyncSize     uint64 // the disk sync image
	echoRate         int    // the echo client's requests per second
	streamRate       uint64 // the stream guest's datagrams per second
	failoverSizes    []uint64
	sync             bool     // measure the large guest's initial sync
	syncSizes        []uint64 // its guest sizes
	quiet            bool
	json             string
}

type benchFlags struct {
	fs                          *pflag.FlagSet
	mem, rates, pattern         string
	intervals, dirtyTrack, json string
	vcpus, failovers            int
	modeTime, heartbeatTimeout  time.Duration
	echoRate                    int
	streamRate                  uint64
	quiet, noNet, noDisk        bool
	diskSize, diskSyncSize      string
	failoverSizes, syncSizes    string
	noSync                      bool
}

func newBenchFlags() *benchFlags {
	f := &benchFlags{fs: newFlagSet("bench")}
	fs := f.fs
	fs.StringVar(&f.mem, "mem", testvm.FormatSize(testvm.DefaultMemSize), "guest memory `size` of every test VM (a multiple of 2MiB: 256M, 1GiB)")
	fs.IntVar(&f.vcpus, "vcpus", 1, fmt.Sprintf("vCPUs of every test VM (but the 10k check's, which has 1), 1 to %d", testvm.MaxVCPUs))
	fs.StringVar(&f.rates, "rates", "10000,50000,0", "comma-separated dirty workload `rates` to measure, page writes per second per vCPU (0: full speed)")
	fs.StringVar(&f.pattern, "pattern", "random", "the dirty workload's page order: seq, random or hotcold")
	fs.StringVar(&f.intervals, "intervals", "100ms,20ms,10ms",
		fmt.Sprintf("comma-separated checkpoint `intervals` of the replicated modes, each %v to %v", replicate.MinInterval, replicate.MaxInterval))
	fs.DurationVar(&f.modeTime, "mode-time", 3*time.Second, "how long each mode measures, after its warm-up (a replicated dirty workload mode at least two of its intervals)")
	fs.IntVar(&f.failovers, "failovers", 5, "primaries to kill at each of --failover-sizes for the failover figure (0: no failover figure)")
	fs.StringVar(&f.failoverSizes, "failover-sizes", "256M,4G",
		"comma-separated guest memory `sizes` of the failover primaries (a size that does not fit in free memory is skipped)")
	fs.BoolVar(&f.noSync, "no-sync", false, "skip the large guest's initial sync section")
	fs.StringVar(&f.syncSizes, "sync-sizes", "1G,4G",
		"comma-separated guest memory `sizes` of the initial sync section (a size that does not fit in free memory is skipped)")
	fs.StringVar(&f.dirtyTrack, "dirty-track", "auto",
		"dirty page tracking: auto, bitmap, manual or ring (auto picks per mode from the expected dirty pages per interval)")
	fs.DurationVar(&f.heartbeatTimeout, "heartbeat-timeout", 0,
		fmt.Sprintf("the failover backup's (and primary's) heartbeat timeout (default 0: the engine's, 5 intervals, at least %v)", replicate.MinHeartbeatTimeout))
	fs.BoolVar(&f.noNet, "no-net", false, "skip the network section (it needs root)")
	fs.BoolVar(&f.noDisk, "no-disk", false, "skip the disk section")
	fs.StringVar(&f.diskSize, "disk-size", testvm.FormatSize(64<<20), "the disk section's throughput image and the guest's working set: `size`, a multiple of 4KiB")
	fs.StringVar(&f.diskSyncSize, "disk-sync-size", testvm.FormatSize(1<<30), "the disk section's sync image: `size`, a multiple of 1MiB, at least 2MiB")
	fs.IntVar(&f.echoRate, "echo-rate", 200, fmt.Sprintf("the network section's echo requests per second, 1 to %d", maxEchoRate))
	fs.Uint64Var(&f.streamRate, "stream-rate", 100000, "the network section's stream: the guest's datagrams per second (at most; at least 1)")
	fs.BoolVar(&f.quiet, "quiet", false, "print only the tables and goal lines, no progress on stderr")
	fs.StringVar(&f.json, "json", "", "also write the results as JSON to `file`")
	return f
}

// parseBenchArgs parses and checks the bench command's arguments. It returns
// pflag.ErrHelp for --help, and otherwise any error is a usage error.
func parseBenchArgs(args []string) (*benchOptions, error) {
	f := newBenchFlags()
	if err := parseFlags(f.fs, args); err != nil {
		return nil, err
	}
	o := &benchOptions{vcpus: f.vcpus, modeTime: f.modeTime, failovers: f.failovers,
		heartbeatTimeout: f.heartbeatTimeout, net: !f.noNet, disk: !f.noDisk, echoRate: f.echoRate, streamRate: f.streamRate,
		quiet: f.quiet, json: f.json}
	var err error
	if o.mem, err = parseSize(f.mem); err != nil {
		return nil, usagef("--mem: %w", err)
	}
	if f.vcpus < 1 || f.vcpus > testvm.MaxVCPUs {
		return nil, usagef("--vcpus %d: want 1 to %d", f.vcpus, testvm.MaxVCPUs)
	}
	if o.pattern, err = testvm.ParsePattern(f.pattern); err != nil {
		return nil, usagef("--pattern: %w", err)
	}
	if err := (testvm.Config{MemSize: o.mem, VCPUs: o.vcpus, Workload: testvm.Dirty, Pattern: o.pattern}).Validate(); err != nil {
		return nil, usagef("--mem %s, --vcpus %d: %w", f.mem, f.vcpus, err)
	}
	if o.diskSize, err = parseSize(f.diskSize); err != nil {
		return nil, usagef("--disk-size: %w", err)
	}
	if o.diskSyncSize, err = parseSize(f.diskSyncSize); err != nil {
		return nil, usagef("--disk-sync-size: %w", err)
	}
	if err := checkDiskSizes(o.mem, o.diskSize, o.diskSyncSize); err != nil {
		return nil, err
	}
	if o.rates, err = parseRates(f.rates); err != nil {
		return nil, err
	}
	if o.intervals, err = parseIntervals(f.intervals); err != nil {
		return nil, err
	}
	if f.modeTime < 100*time.Millisecond {
		return nil, usagef("--mode-time %v: want at least 100ms", f.modeTime)
	}
	if f.failovers < 0 {
		return nil, usagef("--failovers %d: must not be negative", f.failovers)
	}
	if o.failoverSizes, err = parseGuestSizes("--failover-sizes", f.failoverSizes, o.vcpus); err != nil {
		return nil, err
	}
	o.sync = !f.noSync
	if o.syncSizes, err = parseGuestSizes("--sync-sizes", f.syncSizes, syncVCPUs); err != nil {
		return nil, err
	}
	if f.echoRate < 1 || f.echoRate > maxEchoRate {
		return nil, usagef("--echo-rate %d: want 1 to %d requests per second", f.echoRate, maxEchoRate)
	}
	if f.streamRate == 0 {
		return nil, usagef("--stream-rate 0: want at least 1 datagram per second")
	}
	if o.mech, err = dirtylog.ParseMechanism(f.dirtyTrack); err != nil {
		return nil, usagef("--dirty-track: %w", err)
	}
	// The failover primary's heartbeat period is its interval, at most 100ms.
	if hb := min(failoverInterval, 100*time.Millisecond); f.heartbeatTimeout != 0 && f.heartbeatTimeout < 2*hb {
		return nil, usagef("--heartbeat-timeout %v: want 0 (the default) or at least %v (two heartbeats at the failover's %v interval)",
			f.heartbeatTimeout, 2*hb, failoverInterval)
	}
	if f.json != "" {
		if err := checkDir("--json", f.json); err != nil {
			return nil, err
		}
	}
	return o, nil
}

// parseRates parses --rates: a comma-separated list of whole numbers.
func parseRates(s string) ([]uint64, error) {
	var out []uint64
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		n, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return nil, usagef("--rates %q: %q is not a rate (want page writes per second per vCPU, 0 for full speed, e.g. 10000,50000,0)", s, f)
		}
		out = append(out, n)
	}
	return out, nil
}

// parseGuestSizes parses a comma-separated list of guest memory sizes, each
// valid for a dirty workload guest of vcpus vCPUs.
func parseGuestSizes(flag, s string, vcpus int) ([]uint64, error) {
	var out []uint64
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		n, err := parseSize(f)
		if err != nil {
			return nil, usagef("%s %q: %w", flag, s, err)
		}
		if err := (testvm.Config{MemSize: n, VCPUs: vcpus, Workload: testvm.Dirty}).Validate(); err != nil {
			return nil, usagef("%s %q: %w", flag, s, err)
		}
		out = append(out, n)
	}
	return out, nil
}

// parseIntervals parses --intervals: a comma-separated list of durations in
// the engine's range.
func parseIntervals(s string) ([]time.Duration, error) {
	var out []time.Duration
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		d, err := time.ParseDuration(f)
		if err != nil {
			return nil, usagef("--intervals %q: %q is not a duration (e.g. 100ms,20ms,10ms)", s, f)
		}
		if d < replicate.MinInterval || d > replicate.MaxInterval {
			return nil, usagef("--intervals %q: %v is out of range (%v to %v)", s, d, replicate.MinInterval, replicate.MaxInterval)
		}
		out = append(out, d)
	}
	return out, nil
}

// runBench is the bench command.
func runBench(args []string, stdout, stderr io.Writer) int {
	o, err := parseBenchArgs(args)
	if errors.Is(err, pflag.ErrHelp) {
		fmt.Fprint(stdout, benchUsage+newBenchFlags().fs.FlagUsages())
		return 0
	}
	if err == nil {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		err = o.run(ctx, stdout, &syncWriter{w: stderr})
	}
	if err != nil {
		fmt.Fprintf(stderr, "repagent bench: %v\n", err)
		if errors.As(err, new(usageError)) {
			return 2
		}
		return 1
	}
	return 0
}

// benchResults is everything one run measured; --json writes it.
type benchResults struct {
	Started  time.Time       `json:"started"`
	Config   benchConfigJSON `json:"config"`
	Rates    []benchRate     `json:"rates"`
	Check10k *benchMode      `json:"check_10k"`
	Check    benchCheck10k   `json:"check_10k_summary"`
	// Check10kOne is the 10k check with the pause's copy on one goroutine
	// (Config.CopyThreads 1), Copy the two copies per page side by side.
	Check10kOne *benchMode           `json:"check_10k_one_copy_goroutine"`
	Copy        benchCopyCheck       `json:"check_10k_copy"`
	Tails       *benchTailsResult    `json:"pause_tails"`
	Failover    *benchFailoverResult `json:"failover,omitempty"`
	Sync        *benchSyncResult     `json:"sync,omitempty"`
	Disk        *benchDiskResult     `json:"disk,omitempty"`
	Net         *benchNetResult      `json:"network,omitempty"`
	Goals       []benchGoal          `json:"goals"`
	TookSecs    float64              `json:"took_s"`
}

type benchConfigJSON struct {
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

// benchRate is one rate's modes.
type benchRate struct {
	Rate  uint64       `json:"rate"`
	Modes []*benchMode `json:"modes"`
}

// benchMode is what one mode measured. Durations are in microseconds.
type benchMode struct {
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
	agg          epochAgg
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

// benchCheck10k is the 10k check's verdict: its pause p99 against the
// median of its epochs' kick + harvest + save + copy (BaseP50US).
type benchCheck10k struct {
	DirtyPages float64 `json:"dirty_pages_mean"`
	PauseP99US float64 `json:"pause_p99_us"`
	BaseP50US  float64 `json:"kick_harvest_save_copy_p50_us"`
	Ratio      float64 `json:"ratio"`
}

// benchFailoverRun is one failover.
type benchFailoverRun struct {
	Signal    string  `json:"signal"`
	Epoch     uint64  `json:"epoch"`
	DetectMS  float64 `json:"detect_ms"`  // signal to the backup deciding the primary is lost
	VerifyMS  float64 `json:"verify_ms"`  // digesting the replica
	RestoreMS float64 `json:"restore_ms"` // testvm.Restore and Start
	FirstMS   float64 `json:"first_ms"`   // Start to the guest's first progress
	TotalMS   float64 `json:"total_ms"`   // signal to the guest's first progress
	Error     string  `json:"error,omitempty"`

	// Mem is the guest's memory size. With VerifyReplica the backup
	// digested its whole replica before resuming it (backup
	// --verify-replica), in VerifyMS.
	Mem           uint64 `json:"mem"`
	VerifyReplica bool   `json:"verify_replica,omitempty"`
}

// benchFailoverResult is the failover figure: every run, and each size's
// summary. KillP50MS, KillMaxMS and FrozenMS are the first measured size's.
type benchFailoverResult struct {
	Rate        uint64             `json:"rate"`
	HeartbeatMS float64            `json:"heartbeat_timeout_ms"`
	Runs        []benchFailoverRun `json:"runs"`
	KillP50MS   float64            `json:"kill_p50_ms"`
	KillMaxMS   float64            `json:"kill_max_ms"`
	FrozenMS    float64            `json:"frozen_ms"`

	Sizes []benchFailoverSize `json:"sizes"`
	// SizeRatio is the last size's SIGKILL p50 over the first's, and
	// AfterRatio the same after detection (0 unless both were measured).
	SizeRatio  float64 `json:"last_over_first"`
	AfterRatio float64 `json:"after_detect_last_over_first"`
}

// benchFailoverSize is one guest size's SIGKILL failovers (Skipped says why
// there are none).
type benchFailoverSize struct {
	Mem     uint64 `json:"mem"`
	Skipped string `json:"skipped,omitempty"`
	Kills   int    `json:"kills"`
	// The total (signal to the guest's progress on the backup): p50 and
	// max; the p50s of its detection and of what follows it (verify,
	// restore, first write).
	KillP50MS   float64 `json:"kill_p50_ms"`
	KillMaxMS   float64 `json:"kill_max_ms"`
	DetectP50MS float64 `json:"detect_p50_ms"`
	AfterP50MS  float64 `json:"after_detect_p50_ms"`
	// The extra run with the whole replica digested first (0: failed).
	VerifiedMS       float64 `json:"verify_replica_total_ms,omitempty"`
	VerifiedDigestMS float64 `json:"verify_replica_digest_ms,omitempty"`
}

type benchGoal struct {
	Text string `json:"text"`
	Met  bool   `json:"met"`
}

func benchUS(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
func benchMS(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// benchRun is one run of the bench command.
type benchRun struct {
	*benchOptions
	stdout, stderr io.Writer
	log            *slog.Logger
	copySrc        []byte // the plain copy's source pages (benchcpu.go)
}

// progressf prints a progress line on stderr unless --quiet.
func (b *benchRun) progressf(format string, args ...any) {
	if !b.quiet {
		fmt.Fprintf(b.stderr, "bench: "+format+"\n", args...)
	}
}

// warmup is how long every mode's guest runs before its window opens.
func (b *benchRun) warmup() time.Duration {
	return min(max(b.modeTime/3, 200*time.Millisecond), time.Second)
}

// guestConfig is the dirty workload at rate on a VM of the bench's shape.
func (b *benchRun) guestConfig(rate uint64) testvm.Config {
	return testvm.Config{MemSize: b.mem, VCPUs: b.vcpus, Workload: testvm.Dirty, Pattern: b.pattern, Rate: rate, Seed: 1}
}

// run runs every measurement and prints the tables and goals.
func (o *benchOptions) run(ctx context.Context, stdout, stderr io.Writer) error {
	b := &benchRun{benchOptions: o, stdout: stdout, stderr: stderr, log: newLogger(stderr, true)}
	res := &benchResults{Started: time.Now()}
	res.Config = benchConfigJSON{Mem: o.mem, VCPUs: o.vcpus, Pattern: o.pattern.String(), Rates: o.rates,
		ModeTimeS: o.modeTime.Seconds(), Failovers: o.failovers, DirtyTrack: o.mech.String(), HeartbeatMS: benchMS(b.failoverTimeout()),
		Net: o.net, Disk: o.disk, DiskSize: o.diskSize, DiskSync: o.diskSyncSize, EchoRate: o.echoRate, StreamRate: o.streamRate,
		FailSizes: o.failoverSizes, Sync: o.sync, SyncSizes: o.syncSizes}
	for _, iv := range o.intervals {
		res.Config.IntervalsMS = append(res.Config.IntervalsMS, benchMS(iv))
	}
	fmt.Fprintf(stdout, "repagent bench: dirty workload, %s pattern, %s, %d vCPU(s); each mode %v after a %v warm-up; dirty tracking %v\n",
		o.pattern, testvm.FormatSize(o.mem), o.vcpus, o.modeTime, b.warmup(), o.mech)
	for _, rate := range o.rates {
		rr, err := b.measureRate(ctx, rate)
		if err != nil {
			return err
		}
		res.Rates = append(res.Rates, *rr)
		fmt.Fprintln(stdout)
		benchPrintRate(stdout, rr)
	}

	b.progressf("10k check: seq over %d pages, full speed, %v", check10kPages, check10kInterval)
	cfg := testvm.Config{MemSize: max(o.mem, check10kMinMem), VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Seq,
		WorkingSet: check10kPages, Seed: 1}
	cm, err := b.measureReplicated(ctx, cfg, check10kInterval)
	if err != nil {
		return fmt.Errorf("10k check: %w", err)
	}
	b.progressf("10k check: the same, the pause's copy on one goroutine (copy threads 1)")
	one, err := b.measureReplicatedCopy(ctx, cfg, check10kInterval, 1)
	if err != nil {
		return fmt.Errorf("10k check, one copy goroutine: %w", err)
	}
	res.Check10k, res.Check = cm, benchSummarize10k(cm)
	res.Check10kOne, res.Copy = one, benchSummarizeCopy(cm, one)
	fmt.Fprintln(stdout)
	benchPrint10k(stdout, cfg, cm, res.Check)
	fmt.Fprintln(stdout)
	benchPrintCopy(stdout, cm, one, res.Copy)

	tr, err := b.benchTails(ctx)
	if err != nil {
		return fmt.Errorf("pause tails: %w", err)
	}
	res.Tails = tr
	fmt.Fprintln(stdout)
	benchPrintTails(stdout, tr)

	if o.failovers > 0 {
		fo, err := b.benchFailover(ctx)
		if err != nil {
			return fmt.Errorf("failover: %w", err)
		}
		res.Failover = fo
		fmt.Fprintln(stdout)
		benchPrintFailover(stdout, fo)
	}

	if o.sync {
		sr, err := b.benchSync(ctx)
		if err != nil {
			return fmt.Errorf("sync: %w", err)
		}
		res.Sync = sr
		fmt.Fprintln(stdout)
		benchPrintSync(stdout, sr, o.pattern, o.modeTime)
	}

	if o.disk {
		dr, err := b.benchDisk(ctx)
		if err != nil {
			return fmt.Errorf("disk: %w", err)
		}
		res.Disk = dr
		fmt.Fprintln(stdout)
		benchPrintDisk(stdout, dr, o.modeTime, b.warmup())
	}

	if o.net {
		nr, err := b.benchNet(ctx)
		if err != nil {
			return fmt.Errorf("network: %w", err)
		}
		res.Net = nr
		fmt.Fprintln(stdout)
		benchPrintNet(stdout, nr, o.modeTime)
	}

	res.Goals = b.goals(res)
	fmt.Fprintln(stdout)
	fmt.Fprintln(stdout, "Goals:")
	for _, g := range res.Goals {
		fmt.Fprintln(stdout, "  "+g.Text)
	}
	res.TookSecs = time.Since(res.Started).Seconds()
	fmt.Fprintf(stdout, "\nbench took %.0fs\n", res.TookSecs)
	if o.json != "" {
		j, err := json.MarshalIndent(res, "", "  ")
		if err != nil {
			return err
		}
		if err := os.WriteFile(o.json, append(j, '\n'), 0o644); err != nil {
			return fmt.Errorf("write --json file: %w", err)
		}
	}
	return nil
}

// measureRate measures every mode at one rate.
func (b *benchRun) measureRate(ctx context.Context, rate uint64) (*benchRate, error) {
	rr := &benchRate{Rate: rate}
	cfg := b.guestConfig(rate)
	b.progressf("rate %s: none", benchRateName(rate))
	none, err := b.measureNone(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("rate %s, none: %w", benchRateName(rate), err)
	}
	b.progressf("rate %s: floor", benchRateName(rate))
	floor, err := b.measureFloor(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("rate %s, floor: %w", benchRateName(rate), err)
	}
	rr.Modes = append(rr.Modes, none, floor)
	for _, iv := range b.intervals {
		b.progressf("rate %s: replicated at %v", benchRateName(rate), iv)
		m, err := b.measureReplicated(ctx, cfg, iv)
		if err != nil {
			return nil, fmt.Errorf("rate %s, replicated at %v: %w", benchRateName(rate), iv, err)
		}
		rr.Modes = append(rr.Modes, m)
	}
	for _, m := range rr.Modes {
		m.VsNone = benchRatio(m.GuestRate, none.GuestRate)
		m.VsFloor = benchRatio(m.GuestRate, floor.GuestRate)
	}
	return rr, nil
}

func benchRatio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// benchRateName names a rate for messages: "10000/s" or "full speed".
func benchRateName(rate uint64) string {
	if rate == 0 {
		return "full speed"
	}
	return fmt.Sprintf("%d/s", rate)
}

// resolveTrack picks the dirty tracking mechanism for a VM about to be built
// with cfg and harvested every interval, as the primary command does, and
// sizes its dirty ring.
// bootTracked picks the dirty tracking for cfg at interval and boots the
// guest; the caller closes it.
func (b *benchRun) bootTracked(ctx context.Context, cfg testvm.Config, interval time.Duration) (*testvm.Machine, time.Time, dirtylog.Mechanism, error) {
	cfg, mech, err := b.resolveTrack(cfg, interval)
	if err != nil {
		return nil, time.Time{}, 0, err
	}
	m, ready, err := benchBoot(ctx, cfg)
	return m, ready, mech, err
}

func (b *benchRun) resolveTrack(cfg testvm.Config, interval time.Duration) (testvm.Config, dirtylog.Mechanism, error) {
	cfg.DirtyRingEntries = 0
	switch b.mech {
	case dirtylog.Ring:
		cfg.DirtyRingEntries = track.RingEntries
		return cfg, dirtylog.Ring, nil
	case dirtylog.Auto:
		mech, entries, err := track.Recommend(cfg, interval)
		if err != nil {
			return cfg, 0, err
		}
		cfg.DirtyRingEntries = entries
		return cfg, mech, nil
	}
	return cfg, b.mech, nil
}

// benchBoot builds and starts a test VM and waits for its guest.
func benchBoot(ctx context.Context, cfg testvm.Config) (*testvm.Machine, time.Time, error) {
	m, err := testvm.New(cfg)
	if err != nil {
		return nil, time.Time{}, err
	}
	if err := m.Start(); err != nil {
		m.Close()
		return nil, time.Time{}, err
	}
	rctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()
	if err := m.WaitReady(rctx); err != nil {
		m.Close()
		return nil, time.Time{}, err
	}
	return m, time.Now(), nil
}

// benchWrites is the dirty workload's page writes, all vCPUs.
func benchWrites(m *testvm.Machine) uint64 {
	var n uint64
	for i := 0; i < m.NumVCPUs(); i++ {
		n += m.Status(i).Writes
	}
	return n
}

// benchSleep sleeps for d, or until ctx ends or the machine stops.
func benchSleep(ctx context.Context, m *testvm.Machine, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-m.Done():
		return benchStopped(m)
	case <-t.C:
		return nil
	}
}

func benchStopped(m *testvm.Machine) error {
	if err := m.Err(); err != nil {
		return fmt.Errorf("machine stopped: %w", err)
	}
	return errors.New("machine stopped unexpectedly")
}

// window measures the guest's writes over --mode-time.
func (b *benchRun) window(ctx context.Context, m *testvm.Machine, r *benchMode) (t0, t1 time.Time, err error) {
	return b.windowFor(ctx, m, r, b.modeTime)
}

// windowFor measures the guest's writes over d.
func (b *benchRun) windowFor(ctx context.Context, m *testvm.Machine, r *benchMode, d time.Duration) (t0, t1 time.Time, err error) {
	w0, t0 := benchWrites(m), time.Now()
	if err := benchSleep(ctx, m, d); err != nil {
		return t0, t0, err
	}
	w1, t1 := benchWrites(m), time.Now()
	r.Seconds = t1.Sub(t0).Seconds()
	r.Writes = w1 - w0
	r.GuestRate = float64(r.Writes) / r.Seconds
	return t0, t1, nil
}

// measureNone is the guest alone: no dirty tracking.
func (b *benchRun) measureNone(ctx context.Context, cfg testvm.Config) (*benchMode, error) {
	m, _, err := benchBoot(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	if err := benchSleep(ctx, m, b.warmup()); err != nil {
		return nil, err
	}
	r := &benchMode{Mode: "none", Track: "off"}
	if _, _, err := b.window(ctx, m, r); err != nil {
		return nil, err
	}
	return r, nil
}

// measureFloor is dirty logging alone: a harvest every floorHarvest while the
// guest runs, no pause, nothing copied.
func (b *benchRun) measureFloor(ctx context.Context, cfg testvm.Config) (*benchMode, error) {
	m, _, mech, err := b.bootTracked(ctx, cfg, floorHarvest)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	tr, err := m.DirtyTracker(mech, false)
	if err != nil {
		return nil, err
	}
	if err := tr.Start(); err != nil {
		return nil, err
	}
	defer tr.Stop()
	r := &benchMode{Mode: "floor", Track: tr.Mechanism().String(), IntervalMS: benchMS(floorHarvest)}

	var (
		mu       sync.Mutex
		from, to time.Time // the window, once known
		herr     error
	)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		set := tr.NewSet()
		tick := time.NewTicker(floorHarvest)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			set.Clear()
			st, err := tr.Harvest(set)
			now := time.Now()
			mu.Lock()
			if err != nil {
				herr = err
				mu.Unlock()
				return
			}
			if !from.IsZero() && now.After(from) && (to.IsZero() || now.Before(to)) {
				r.Harvests++
				r.harvestTotal += st.Total
				r.HarvestPages += float64(set.Count())
			}
			mu.Unlock()
		}
	}()
	defer func() { close(stop); <-done }()
	if err := benchSleep(ctx, m, b.warmup()); err != nil {
		return nil, err
	}
	mu.Lock()
	from = time.Now()
	mu.Unlock()
	_, t1, err := b.window(ctx, m, r)
	mu.Lock()
	to = t1
	if herr != nil && err == nil {
		err = fmt.Errorf("harvest: %w", herr)
	}
	mu.Unlock()
	if err != nil {
		return nil, err
	}
	mu.Lock()
	if r.Harvests > 0 {
		r.HarvestMeanUS = benchUS(r.harvestTotal / time.Duration(r.Harvests))
		r.HarvestPages /= float64(r.Harvests)
	}
	mu.Unlock()
	r.RingFullExits = tr.RingFullExits()
	return r, nil
}

// measureReplicated replicates a fresh VM at interval to a backup in this
// process over loopback TCP and measures the epochs that start in the
// window: --mode-time, but at least two intervals (a short --mode-time
// would otherwise catch no epoch of a long interval, such as the 10k
// check's).
func (b *benchRun) measureReplicated(ctx context.Context, cfg testvm.Config, interval time.Duration) (*benchMode, error) {
	return b.measureReplicatedCopy(ctx, cfg, interval, 0)
}

// measureReplicatedCopy is measureReplicated with the engine's
// Config.CopyThreads set to copyThreads (0: the engine's default).
func (b *benchRun) measureReplicatedCopy(ctx context.Context, cfg testvm.Config, interval time.Duration, copyThreads int) (*benchMode, error) {
	m, ready, mech, err := b.bootTracked(ctx, cfg, interval)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	r := &benchMode{Mode: interval.String(), IntervalMS: benchMS(interval), Track: mech.String()}
	err = b.runReplicated(ctx, m, ready, benchRepl{interval: interval, mech: mech, copyThreads: copyThreads, warmup: b.warmup(),
		measure: func(ctx context.Context) (time.Time, time.Time, error) {
			return b.windowFor(ctx, m, r, max(b.modeTime, 2*interval))
		}}, r)
	if err != nil {
		return nil, err
	}
	// The floor of its CPU per page, in this process while the guest runs
	// on, as it did in the window.
	b.benchCPUPerPage(r, cfg.MemSize)
	return r, nil
}

// benchRepl is how runReplicated replicates a running VM and what it measures.
type benchRepl struct {
	interval time.Duration
	mech     dirtylog.Mechanism
	gates    []replicate.OutputGate // the engine's Config.Gates
	// copyThreads is the engine's Config.CopyThreads (0: its default).
	copyThreads int
	warmup      time.Duration // the least time since the guest was ready before the window
	// measure runs the window, once the warm-up is over, and returns its
	// bounds: the epochs whose pause starts between them are measured.
	measure func(ctx context.Context) (t0, t1 time.Time, err error)

	// The disk, if any: the engine's Config.Disk, the backup's image
	// (BackupConfig.NewSink) and Config.OnStreamSync.
	disk       *diskmirror.Mirror
	backupDisk diskmirror.Disk
	onDiskSync func(replicate.StreamSyncProgress)
	// onRun, if set, is called just before Primary.Run; onBackupEpoch with
	// every checkpoint the backup applies (BackupConfig.OnEpoch).
	onRun         func()
	onBackupEpoch func(epoch uint64)
	// onSync and onEpoch, if set, see the engine's Config.OnSync and
	// Config.OnEpoch reports too.
	onSync  func(replicate.SyncProgress)
	onEpoch func(*replicate.EpochStats)
	// setup bounds the warm-up (0: setupTimeout).
	setup time.Duration
}

// runReplicated replicates the running m at rp.interval to a backup in this
// process over loopback TCP (the backup never resumes a VM), warms up (the
// sync done, warmEpochs acknowledged, rp.warmup since ready), runs
// rp.measure, stops replication and fills r's epoch figures with the epochs
// that started in the window.
func (b *benchRun) runReplicated(ctx context.Context, m *testvm.Machine, ready time.Time, rp benchRepl, r *benchMode) error {
	interval, mech := rp.interval, rp.mech
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("listen for the backup: %w", err)
	}
	defer ln.Close()
	bcfg := replicate.BackupConfig{
		NewMemory: testvm.NewMemFile,
		// No failover in these modes: a loss is an error, reported below.
		Resume:           func(cp *replicate.Checkpoint) error { return cp.Memory.Close() },
		HeartbeatTimeout: benchHeartbeatTimeout,
		Log:              b.log.With("side", "backup"),
	}
	if rp.backupDisk != nil {
		bcfg.NewSink = diskmirror.NewSink(rp.backupDisk, diskmirror.ReplicaConfig{})
	}
	if f := rp.onBackupEpoch; f != nil {
		bcfg.OnEpoch = func(epoch uint64, _ int, _ uint64) { f(epoch) }
	}
	bk, err := replicate.NewBackup(bcfg)
	if err != nil {
		return err
	}
	var stream replicate.Stream
	if rp.disk != nil {
		if stream, err = diskmirror.NewSource(rp.disk, diskmirror.SourceConfig{}); err != nil {
			return err
		}
	}
	defer bk.Close()
	bctx, bcancel := context.WithCancel(context.Background())
	bdone := make(chan backupResult, 1)
	go func() {
		// One session (Handle, not Serve): a session the backup refuses
		// ends it instead of waiting for another primary.
		conn, err := ln.Accept()
		if err != nil {
			bdone <- backupResult{nil, err}
			return
		}
		fo, err := bk.Handle(bctx, conn)
		bdone <- backupResult{fo, err}
	}()
	served := false
	defer func() {
		bcancel()
		ln.Close()
		if !served {
			<-bdone
		}
	}()

	var (
		mu       sync.Mutex
		epochs   []replicate.EpochStats
		maxEpoch uint64
		synced   time.Time
		syncTook time.Duration
	)
	p, err := replicate.NewPrimary(replicate.Config{
		VM:               m,
		Interval:         interval,
		DirtyTrack:       mech,
		HeartbeatTimeout: benchHeartbeatTimeout,
		Gates:            rp.gates,
		CopyThreads:      rp.copyThreads,
		OnEpoch: func(s *replicate.EpochStats) {
			if rp.onEpoch != nil {
				rp.onEpoch(s)
			}
			mu.Lock()
			epochs = append(epochs, *s)
			maxEpoch = max(maxEpoch, s.Epoch)
			mu.Unlock()
		},
		OnSync: func(s replicate.SyncProgress) {
			if rp.onSync != nil {
				rp.onSync(s)
			}
			if s.Done {
				mu.Lock()
				synced, syncTook = time.Now(), s.Elapsed
				mu.Unlock()
			}
		},
		Stream:       stream,
		OnStreamSync: rp.onDiskSync,
		VMM:          vmmName,
		Log:          b.log.With("side", "primary"),
	})
	if err != nil {
		return err
	}
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return fmt.Errorf("connect to the backup: %w", err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	perr := make(chan error, 1)
	if rp.onRun != nil {
		rp.onRun()
	}
	go func() { perr <- p.Run(runCtx, conn) }()
	running := true
	defer func() {
		cancel()
		if running {
			<-perr
		}
	}()

	// Warm up: the sync done, a few epochs acknowledged, and at least the
	// warm-up since the guest was ready.
	limit := cmp.Or(rp.setup, setupTimeout)
	deadline := time.Now().Add(limit)
	for {
		mu.Lock()
		ok := !synced.IsZero()
		mu.Unlock()
		if ok && p.LastAcked() >= warmEpochs && time.Since(ready) >= rp.warmup {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not warmed up in %v: sync done %v, %d epochs acknowledged", limit, ok, p.LastAcked())
		}
		select {
		case err := <-perr:
			running = false
			return fmt.Errorf("replication stopped during the warm-up: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-m.Done():
			return benchStopped(m)
		case <-time.After(5 * time.Millisecond):
		}
	}
	t0, t1, err := rp.measure(ctx)
	if err != nil {
		return err
	}
	select {
	case err := <-perr:
		running = false
		return fmt.Errorf("replication stopped while measuring: %v", err)
	default:
	}
	cancel()
	running = false
	if err := <-perr; err != nil {
		return fmt.Errorf("replication: %w", err)
	}
	// The engine may report the last acknowledged epoch just after Run
	// returns (OnEpoch runs on its reader after the ack is counted).
	for wait := time.Now().Add(time.Second); ; {
		mu.Lock()
		got := maxEpoch
		mu.Unlock()
		if got >= p.LastAcked() || time.Now().After(wait) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case br := <-bdone:
		served = true
		switch {
		case br.fo != nil:
			return fmt.Errorf("the backup failed over (cause: %v)", br.fo.Cause)
		case errors.Is(br.err, replicate.ErrPrimaryStopped):
		default:
			// A protocol error here (the backup refusing how the session
			// ended) is a P5 regression, not noise: the primary says bye
			// only once every epoch it captured is acknowledged.
			return fmt.Errorf("backup: %v", br.err)
		}
	case <-time.After(benchHeartbeatTimeout + 5*time.Second):
		return errors.New("the backup did not see the primary stop")
	}

	mu.Lock()
	defer mu.Unlock()
	r.SyncSeconds = syncTook.Seconds()
	for _, s := range epochs {
		if !s.Start.Before(t0) && s.Start.Before(t1) {
			r.epochs = append(r.epochs, s)
			r.agg.Add(&s)
		}
	}
	slices.SortFunc(r.epochs, func(a, b replicate.EpochStats) int { return cmp.Compare(a.Epoch, b.Epoch) })
	a := &r.agg
	r.Epochs = a.Epochs
	if a.Epochs == 0 {
		return nil
	}
	r.PauseP50US, r.PauseP99US, r.PauseMaxUS = benchUS(a.Pause.Quantile(0.5)), benchUS(a.Pause.Quantile(0.99)), benchUS(a.Pause.Max())
	r.KickUS, r.HarvestUS, r.SaveUS = benchUS(a.MeanPart(epochstat.PartKick)), benchUS(a.MeanPart(epochstat.PartHarvest)), benchUS(a.MeanPart(epochstat.PartSave))
	r.CopyUS, r.StallUS, r.GatesUS, r.ResumeUS = benchUS(a.MeanPart(epochstat.PartCopy)), benchUS(a.MeanPart(epochstat.PartStall)), benchUS(a.MeanPart(epochstat.PartGates)), benchUS(a.MeanPart(epochstat.PartResume))
	r.WaitUS = benchUS(a.Wait / time.Duration(a.Epochs))
	r.DirtyPages = a.MeanDirty()
	r.RawKiB = float64(a.Raw) / float64(a.Epochs) / 1024
	r.WireKiB = float64(a.Wire) / float64(a.Epochs) / 1024
	r.WireRatio = a.Ratio()
	r.WireMBps = float64(a.Wire) / r.Seconds / 1e6
	r.AckP50US = benchUS(a.Ack.Quantile(0.5))
	r.Oversize = a.Oversize
	return nil
}

// benchSummarize10k compares the 10k check's pause p99 with the median of
// kick + harvest + save + copy over the same epochs (each epoch's sum).
func benchSummarize10k(r *benchMode) benchCheck10k {
	c := benchCheck10k{DirtyPages: r.DirtyPages, PauseP99US: r.PauseP99US}
	var base []time.Duration
	for _, s := range r.epochs {
		base = append(base, s.Kick+s.Harvest+s.Save+s.Copy)
	}
	if len(base) == 0 {
		return c
	}
	c.BaseP50US = benchUS(benchMedian(base))
	c.Ratio = benchRatio(c.PauseP99US, c.BaseP50US)
	return c
}

// benchMedian is the median of ds (the mean of the middle two for an even count); it sorts ds.
func benchMedian(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	n := len(ds)
	if n%2 == 1 {
		return ds[n/2]
	}
	return (ds[n/2-1] + ds[n/2]) / 2
}

// benchSetupTimeout is how long a guest of mem bytes may take to boot,
// sync and be acknowledged a few epochs: setupTimeout, longer for a guest
// that takes longer to sync at benchSetupRate.
func benchSetupTimeout(mem uint64) time.Duration {
	return max(setupTimeout, time.Duration(float64(mem)/benchSetupRate*float64(time.Second)))
}

// failoverTimeout is the failover backup's heartbeat timeout: the flag, or
// the engine's default at the failover primary's interval.
func (b *benchRun) failoverTimeout() time.Duration {
	if b.heartbeatTimeout != 0 {
		return b.heartbeatTimeout
	}
	return max(5*failoverInterval, replicate.MinHeartbeatTimeout)
}

// benchFailover kills --failovers primaries at each of --failover-sizes
// (skipping a size that does not fit in memory), freezes one at the first
// size measured, and kills one more at each size whose backup digests its
// replica first.
func (b *benchRun) benchFailover(ctx context.Context) (*benchFailoverResult, error) {
	exe := benchExecutable
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("find this program to run its primary command: %w", err)
		}
	}
	fo := &benchFailoverResult{Rate: b.rates[0], HeartbeatMS: benchMS(b.failoverTimeout())}
	// once runs one failover, keeps it and returns its total (0: failed).
	once := func(what string, mem uint64, sig syscall.Signal, verify bool) (time.Duration, error) {
		run, err := b.failoverOnce(ctx, exe, sig, mem, verify)
		if err != nil {
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			run.Error = err.Error()
			b.progressf("%s: %v", what, err)
		}
		fo.Runs = append(fo.Runs, run)
		if err != nil {
			return 0, nil
		}
		return time.Duration(run.TotalMS * float64(time.Millisecond)), nil
	}
	measured := 0
	for _, mem := range b.failoverSizes {
		sz := benchFailoverSize{Mem: mem}
		why, err := benchFits(mem)
		if err != nil {
			return nil, err
		}
		if why != "" {
			sz.Skipped = why
			b.progressf("failover at %s: skipped: %s", testvm.FormatSize(mem), why)
			fo.Sizes = append(fo.Sizes, sz)
			continue
		}
		var kills, detect, after []time.Duration
		for i := 0; i < b.failovers; i++ {
			what := fmt.Sprintf("failover %d/%d at %s: SIGKILL", i+1, b.failovers, testvm.FormatSize(mem))
			b.progressf("%s", what)
			d, err := once(what, mem, syscall.SIGKILL, false)
			if err != nil {
				return nil, err
			}
			if d > 0 {
				r := fo.Runs[len(fo.Runs)-1]
				kills = append(kills, d)
				detect = append(detect, time.Duration(r.DetectMS*float64(time.Millisecond)))
				after = append(after, time.Duration((r.TotalMS-r.DetectMS)*float64(time.Millisecond)))
			}
		}
		if len(kills) == 0 {
			return fo, fmt.Errorf("no failover succeeded at %s; the first: %s", testvm.FormatSize(mem), fo.Runs[len(fo.Runs)-b.failovers].Error)
		}
		sz.Kills = len(kills)
		sz.KillMaxMS = benchMS(slices.Max(kills))
		sz.KillP50MS = benchMS(benchMedian(kills))
		sz.DetectP50MS = benchMS(benchMedian(detect))
		sz.AfterP50MS = benchMS(benchMedian(after))
		if measured++; measured == 1 {
			fo.KillP50MS, fo.KillMaxMS = sz.KillP50MS, sz.KillMaxMS
			what := fmt.Sprintf("failover at %s: SIGSTOP (frozen host)", testvm.FormatSize(mem))
			b.progressf("%s", what)
			d, err := once(what, mem, syscall.SIGSTOP, false)
			if err != nil {
				return nil, err
			}
			fo.FrozenMS = benchMS(d)
		}
		what := fmt.Sprintf("failover at %s: SIGKILL, the backup digesting its replica first (--verify-replica)", testvm.FormatSize(mem))
		b.progressf("%s", what)
		d, err := once(what, mem, syscall.SIGKILL, true)
		if err != nil {
			return nil, err
		}
		if d > 0 {
			sz.VerifiedMS, sz.VerifiedDigestMS = benchMS(d), fo.Runs[len(fo.Runs)-1].VerifyMS
		}
		fo.Sizes = append(fo.Sizes, sz)
	}
	if first, last := fo.Sizes[0], fo.Sizes[len(fo.Sizes)-1]; len(fo.Sizes) > 1 && first.Kills > 0 && last.Kills > 0 {
		fo.SizeRatio = benchRatio(last.KillP50MS, first.KillP50MS)
		fo.AfterRatio = benchRatio(last.AfterP50MS, first.AfterP50MS)
	}
	return fo, nil
}

// outputBuffer keeps the first 64 KiB written to it, safe to read while a
// child process writes it: a child's output, for messages and tests.
type outputBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *outputBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if room := 64<<10 - l.buf.Len(); room > 0 {
		l.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (l *outputBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.TrimSpace(l.buf.String())
}

// benchResumed is what the failover backup's Resume did.
type benchResumed struct {
	called, started time.Time
	progress        chan time.Time // the guest's first progress (zero: none seen)
	m               *testvm.Machine
}

// failoverOnce runs a primary as a separate process against a backup in this
// process, sends it sig once the backup holds a few checkpoints, and times
// the failover: from the signal to the resumed guest's first progress.
func (b *benchRun) failoverOnce(ctx context.Context, exe string, sig syscall.Signal, mem uint64, verify bool) (run benchFailoverRun, err error) {
	run.Signal = map[syscall.Signal]string{syscall.SIGKILL: "SIGKILL", syscall.SIGSTOP: "SIGSTOP"}[sig]
	run.Mem, run.VerifyReplica = mem, verify
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return run, fmt.Errorf("listen for the primary: %w", err)
	}
	defer ln.Close()
	res := make(chan *benchResumed, 1)
	bk, err := replicate.NewBackup(replicate.BackupConfig{
		NewMemory: testvm.NewMemFile,
		Resume: func(cp *replicate.Checkpoint) error {
			rs := &benchResumed{called: time.Now(), progress: make(chan time.Time, 1)}
			m, err := testvm.Restore(cp.State, cp.Memory, testvm.RestoreOptions{})
			if err != nil {
				cp.Memory.Close()
				return err
			}
			it0 := m.Status(0).Iterations // exact: not started yet
			if err := m.Start(); err != nil {
				m.Close()
				return err
			}
			rs.started, rs.m = time.Now(), m
			go func() {
				limit := time.Now().Add(10 * time.Second)
				for time.Now().Before(limit) {
					if m.Status(0).Iterations > it0 {
						rs.progress <- time.Now()
						return
					}
					time.Sleep(50 * time.Microsecond)
				}
				rs.progress <- time.Time{}
			}()
			res <- rs
			return nil
		},
		HeartbeatTimeout: b.heartbeatTimeout,
		VerifyReplica:    verify,
		// The backup warns of the primary's loss: expected here.
		Log: slog.New(slog.NewTextHandler(b.stderr, &slog.HandlerOptions{Level: slog.LevelError})).With("side", "failover backup"),
	})
	if err != nil {
		return run, err
	}
	defer bk.Close()
	bctx, bcancel := context.WithCancel(context.Background())
	bdone := make(chan backupResult, 1)
	go func() {
		fo, err := bk.Serve(bctx, ln)
		bdone <- backupResult{fo, err}
	}()
	served := false
	defer func() {
		// Whatever happened: the backup is stopped, and a guest it resumed
		// is closed once its poller is done.
		bcancel()
		if !served {
			<-bdone
		}
		select {
		case rs := <-res:
			<-rs.progress
			rs.m.Close()
		default:
		}
	}()

	args := []string{"primary", "--backup", ln.Addr().String(), "--mem", strconv.FormatUint(mem, 10),
		"--vcpus", strconv.Itoa(b.vcpus), "--workload", "dirty", "--pattern", b.pattern.String(),
		"--rate", strconv.FormatUint(b.rates[0], 10), "--interval", failoverInterval.String(),
		"--dirty-track", b.mech.String(), "--quiet"}
	if b.heartbeatTimeout != 0 {
		args = append(args, "--heartbeat-timeout", b.heartbeatTimeout.String())
	}
	cmd := exec.Command(exe, args...)
	var out outputBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return run, fmt.Errorf("start the primary: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	alive := true
	defer func() {
		// Never leave the child behind, stopped or not.
		if alive {
			cmd.Process.Kill()
			<-exited
		}
	}()
	childErr := func(what string, werr error) error {
		return fmt.Errorf("%s: the primary exited (%v): %s", what, werr, out.String())
	}

	limit := benchSetupTimeout(mem)
	deadline := time.Now().Add(limit)
	for {
		if epoch, _ := bk.LastCheckpoint(); epoch >= failoverEpochs {
			break
		}
		if time.Now().After(deadline) {
			return run, fmt.Errorf("the backup holds no checkpoint %d after %v; primary: %s", failoverEpochs, limit, out.String())
		}
		select {
		case werr := <-exited:
			alive = false
			return run, childErr("before the failover", werr)
		case br := <-bdone:
			served = true
			return run, fmt.Errorf("the backup stopped before the primary was signalled: failover %v, %v; primary: %s", br.fo != nil, br.err, out.String())
		case <-ctx.Done():
			return run, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}

	t0 := time.Now()
	if err := cmd.Process.Signal(sig); err != nil {
		return run, fmt.Errorf("signal the primary: %w", err)
	}
	var br backupResult
	select {
	case br = <-bdone:
		served = true
	case <-time.After(b.failoverTimeout() + 30*time.Second):
		return run, errors.New("the backup did not fail over")
	case <-ctx.Done():
		return run, ctx.Err()
	}
	if sig == syscall.SIGSTOP {
		cmd.Process.Kill() // the frozen primary: never leave it behind
	}
	if br.err != nil {
		return run, fmt.Errorf("backup: %w", br.err)
	}
	if br.fo == nil {
		return run, errors.New("the backup returned without failing over")
	}
	rs := <-res
	tp := <-rs.progress
	rs.m.Close()
	if tp.IsZero() {
		return run, errors.New("the resumed guest made no progress in 10s")
	}
	run.Epoch = br.fo.Epoch
	run.DetectMS = benchMS(rs.called.Add(-br.fo.Verify).Sub(t0))
	run.VerifyMS = benchMS(br.fo.Verify)
	run.RestoreMS = benchMS(rs.started.Sub(rs.called))
	run.FirstMS = benchMS(tp.Sub(rs.started))
	run.TotalMS = benchMS(tp.Sub(t0))
	return run, nil
}

// goals compares the figures with the goals: honest lines, MET or NOT MET.
func (b *benchRun) goals(res *benchResults) []benchGoal {
	verdict := func(ok bool) string {
		if ok {
			return "MET"
		}
		return "NOT MET"
	}
	var out []benchGoal
	c := res.Check
	ok := c.Ratio > 0 && c.Ratio <= goalPauseRatio
	out = append(out, benchGoal{Met: ok, Text: fmt.Sprintf("pause p99 at 10k dirty pages (%.0f/epoch): %.2f ms = %.2fx kick+harvest+save+copy (goal <= %.1fx): %s",
		c.DirtyPages, c.PauseP99US/1e3, c.Ratio, goalPauseRatio, verdict(ok))})
	out = append(out, copyGoal(res.Copy, verdict))
	out = append(out, tailsGoal(res.Tails, verdict))
	for _, rr := range res.Rates {
		var at100 *benchMode
		for _, m := range rr.Modes {
			if m.IntervalMS == 100 && m.Mode != "floor" {
				at100 = m
			}
		}
		if at100 == nil {
			out = append(out, benchGoal{Text: fmt.Sprintf("guest at 100 ms, rate %s: not measured (100ms is not in --intervals): NOT MET", benchRateName(rr.Rate))})
			continue
		}
		ok := at100.VsFloor >= goalGuestVsFloor
		out = append(out, benchGoal{Met: ok, Text: fmt.Sprintf("guest at 100 ms, rate %s: %.2f of the floor (goal >= %.2f): %s",
			benchRateName(rr.Rate), at100.VsFloor, goalGuestVsFloor, verdict(ok))})
	}
	for i := range res.Rates {
		out = append(out, benchCPUGoal(&res.Rates[i], verdict))
	}
	if fo := res.Failover; fo != nil {
		hb := b.failoverTimeout()
		bound := goalFailoverExtra + hb
		ok := fo.KillP50MS > 0 && fo.KillP50MS <= benchMS(bound)
		first := fo.Sizes[0]
		for _, sz := range fo.Sizes {
			if sz.Skipped == "" {
				first = sz
				break
			}
		}
		if first.Skipped != "" {
			out = append(out, benchGoal{Text: fmt.Sprintf("failover at %s: not measured (skipped): NOT MET", testvm.FormatSize(first.Mem))})
		} else {
			out = append(out, benchGoal{Met: ok, Text: fmt.Sprintf("failover at %s: %.0f ms p50 (goal <= %.0f ms + heartbeat timeout %v = %.0f ms): %s",
				testvm.FormatSize(first.Mem), fo.KillP50MS, benchMS(goalFailoverExtra), hb, benchMS(bound), verdict(ok))})
		}
		if len(fo.Sizes) > 1 {
			out = append(out, failoverSizeGoal(fo, verdict))
		}
		if fo.FrozenMS > 0 {
			extra := fo.FrozenMS - benchMS(hb)
			ok := extra <= benchMS(goalFailoverExtra)
			out = append(out, benchGoal{Met: ok, Text: fmt.Sprintf("failover of a frozen primary: timeout %v + %.0f ms (goal <= %.0f ms + the timeout): %s",
				hb, extra, benchMS(goalFailoverExtra), verdict(ok))})
		} else if first.Skipped != "" {
			out = append(out, benchGoal{Text: "failover of a frozen primary: not measured (every size skipped): NOT MET"})
		} else {
			out = append(out, benchGoal{Text: "failover of a frozen primary: failed (see above): NOT MET"})
		}
	} else {
		out = append(out, benchGoal{Text: "failover: not measured (--failovers 0): NOT MET"})
	}
	if res.Sync != nil {
		out = append(out, syncGoals(res.Sync, verdict)...)
	} else {
		out = append(out, benchGoal{Text: "time to protected: not measured (--no-sync): NOT MET"})
	}
	if res.Net != nil {
		out = append(out, netGoals(res.Net, verdict)...)
	} else {
		out = append(out, benchGoal{Text: "echo added latency: not measured (--no-net): NOT MET"},
			benchGoal{Text: "main job's shape, hold time and transfer: not measured (--no-net): NOT MET"})
	}
	return out
}

// failoverSizeGoal compares the failover at the last of --failover-sizes
// with the first. What follows detection (verify, restore, first write)
// must not grow with memory: the same at both sizes (within
// goalFailoverSame, or goalFailoverSlack for times too short for a ratio)
// and at most goalFailoverAfter at each. Detection is what the heartbeat
// timeout or the kernel decides (a killed process's connection closes once
// its memory is torn down), so it is shown, not judged.
func failoverSizeGoal(fo *benchFailoverResult, verdict func(bool) string) benchGoal {
	first, last := fo.Sizes[0], fo.Sizes[len(fo.Sizes)-1]
	name := fmt.Sprintf("failover at %s vs %s", testvm.FormatSize(last.Mem), testvm.FormatSize(first.Mem))
	goal := fmt.Sprintf("(goal after detection: the same at both, within %.0f%% or %.0f ms, and <= %.0f ms)",
		100*(goalFailoverSame-1), benchMS(goalFailoverSlack), benchMS(goalFailoverAfter))
	if fo.SizeRatio == 0 {
		return benchGoal{Text: fmt.Sprintf("%s: not measured (a size was skipped or failed) %s: NOT MET", name, goal)}
	}
	same := last.AfterP50MS <= max(goalFailoverSame*first.AfterP50MS, first.AfterP50MS+benchMS(goalFailoverSlack))
	ok := same && last.AfterP50MS <= benchMS(goalFailoverAfter) && first.AfterP50MS <= benchMS(goalFailoverAfter)
	return benchGoal{Met: ok, Text: fmt.Sprintf("%s: p50 %.0f ms / %.0f ms = %.2fx (detection %.0f ms / %.0f ms), after detection %.1f ms / %.1f ms = %.2fx %s: %s",
		name, last.KillP50MS, first.KillP50MS, fo.SizeRatio, last.DetectP50MS, first.DetectP50MS,
		last.AfterP50MS, first.AfterP50MS, fo.AfterRatio, goal, verdict(ok))}
}

// benchTable prints rows as an aligned Markdown table; columns from the second on
// are right-aligned.
func benchTable(w io.Writer, header []string, rows [][]string) {
	width := make([]int, len(header))
	for _, row := range append([][]string{header}, rows...) {
		for i, c := range row {
			width[i] = max(width[i], len([]rune(c)), 3)
		}
	}
	line := func(cells []string) {
		var sb strings.Builder
		sb.WriteString("|")
		for i, c := range cells {
			pad := strings.Repeat(" ", width[i]-len([]rune(c)))
			if i == 0 {
				sb.WriteString(" " + c + pad + " |")
			} else {
				sb.WriteString(" " + pad + c + " |")
			}
		}
		fmt.Fprintln(w, sb.String())
	}
	line(header)
	sep := make([]string, len(header))
	for i := range sep {
		sep[i] = strings.Repeat("-", width[i])
		if i > 0 {
			sep[i] = strings.Repeat("-", width[i]-1) + ":"
		}
	}
	line(sep)
	for _, r := range rows {
		line(r)
	}
}

// benchRateHeader is the per-rate table's header.
var benchRateHeader = []string{"mode", "track", "guest writes/s", "vs floor", "vs none", "epochs", "pause p50", "p99",
	"kick", "harvest", "save", "copy", "stall", "resume", "dirty pages/epoch", "raw KiB/epoch", "wire KiB/epoch",
	"wire/raw", "wire MB/s", "ack p50", "wait"}

func benchDur(x float64) string { return dur(time.Duration(x * float64(time.Microsecond))) }

// benchModeRow is one mode's row of the per-rate table.
func benchModeRow(m *benchMode) []string {
	name := m.Mode
	switch m.Mode {
	case "none", "floor":
	default:
		name = "replicated " + m.Mode
	}
	row := []string{name, m.Track, si(m.GuestRate), fmt.Sprintf("%.2f", m.VsFloor), fmt.Sprintf("%.2f", m.VsNone)}
	switch m.Mode {
	case "none":
		return append(row, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-")
	case "floor":
		// The floor's harvests: their count, mean time and pages.
		return append(row, fmt.Sprintf("(%d)", m.Harvests), "-", "-", "-", benchDur(m.HarvestMeanUS), "-", "-", "-", "-",
			fmt.Sprintf("%.0f", m.HarvestPages), "-", "-", "-", "-", "-", "-")
	}
	if m.Epochs == 0 {
		return append(row, "0", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-")
	}
	return append(row, strconv.FormatUint(m.Epochs, 10), benchDur(m.PauseP50US), benchDur(m.PauseP99US),
		benchDur(m.KickUS), benchDur(m.HarvestUS), benchDur(m.SaveUS), benchDur(m.CopyUS), benchDur(m.StallUS), benchDur(m.ResumeUS),
		fmt.Sprintf("%.0f", m.DirtyPages), fmt.Sprintf("%.0f", m.RawKiB), fmt.Sprintf("%.0f", m.WireKiB),
		fmt.Sprintf("%.3f", m.WireRatio), fmt.Sprintf("%.1f", m.WireMBps), benchDur(m.AckP50US), benchDur(m.WaitUS))
}

func benchPrintRate(w io.Writer, rr *benchRate) {
	fmt.Fprintf(w, "Rate %s per vCPU:\n\n", benchRateName(rr.Rate))
	var rows [][]string
	for _, m := range rr.Modes {
		rows = append(rows, benchModeRow(m))
	}
	benchTable(w, benchRateHeader, rows)
	benchPrintCPU(w, rr.Modes)
}

func benchPrint10k(w io.Writer, cfg testvm.Config, m *benchMode, c benchCheck10k) {
	fmt.Fprintf(w, "10k check: seq over %d pages, full speed, %v, %s, 1 vCPU, %d epochs:\n\n", cfg.WorkingSet, check10kInterval,
		testvm.FormatSize(cfg.MemSize), m.Epochs)
	benchTable(w, []string{"dirty pages/epoch", "pause p50", "pause p99", "kick+harvest+save+copy p50", "p99 / (k+h+s+c)", "kick", "harvest", "save", "copy", "stall", "resume", "guest writes/s"},
		[][]string{{fmt.Sprintf("%.0f", c.DirtyPages), benchDur(m.PauseP50US), benchDur(c.PauseP99US), benchDur(c.BaseP50US), fmt.Sprintf("%.2f", c.Ratio),
			benchDur(m.KickUS), benchDur(m.HarvestUS), benchDur(m.SaveUS), benchDur(m.CopyUS), benchDur(m.StallUS), benchDur(m.ResumeUS), si(m.GuestRate)}})
	if m.CopyPageUS > 0 {
		fmt.Fprintf(w, "\nengine CPU per page: primary %s (%.2fx a plain copy of %d scattered pages, %s), backup %s (%.2fx)\n",
			benchUSf(m.CPUPageUS), m.CPUVsCopy, m.CopyPages, benchUSf(m.CopyPageUS), benchUSf(m.BackupCPUPageUS), m.BackupVsCopy)
	}
}

func benchPrintFailover(w io.Writer, fo *benchFailoverResult) {
	fmt.Fprintf(w, "Failover: primary process at rate %s, interval %v, backup heartbeat timeout %v:\n\n", benchRateName(fo.Rate),
		failoverInterval, time.Duration(fo.HeartbeatMS*float64(time.Millisecond)))
	var rows [][]string
	for i, r := range fo.Runs {
		sig := r.Signal
		if r.VerifyReplica {
			sig += ", verify"
		}
		if r.Error != "" {
			rows = append(rows, []string{strconv.Itoa(i + 1), testvm.FormatSize(r.Mem), sig, "-", "-", "-", "-", "-", "-", "FAILED: " + r.Error})
			continue
		}
		f := func(x float64) string { return fmt.Sprintf("%.1f", x) }
		rows = append(rows, []string{strconv.Itoa(i + 1), testvm.FormatSize(r.Mem), sig, strconv.FormatUint(r.Epoch, 10), f(r.DetectMS), f(r.VerifyMS),
			f(r.RestoreMS), f(r.FirstMS), f(r.TotalMS - r.DetectMS), f(r.TotalMS)})
	}
	benchTable(w, []string{"run", "mem", "signal", "epoch", "detect ms", "verify ms", "restore ms", "first write ms", "after detect ms", "total ms"}, rows)
	fmt.Fprintln(w)
	frozen := fo.FrozenMS > 0
	for _, sz := range fo.Sizes {
		if sz.Skipped != "" {
			fmt.Fprintf(w, "failover at %s: skipped: %s\n", testvm.FormatSize(sz.Mem), sz.Skipped)
			continue
		}
		fmt.Fprintf(w, "failover (SIGKILL) at %s: p50 %.0f ms, max %.0f ms over %d runs; p50 detection %.1f ms, after it %.1f ms",
			testvm.FormatSize(sz.Mem), sz.KillP50MS, sz.KillMaxMS, sz.Kills, sz.DetectP50MS, sz.AfterP50MS)
		if frozen {
			hb := time.Duration(fo.HeartbeatMS * float64(time.Millisecond))
			fmt.Fprintf(w, "; frozen (SIGSTOP): timeout %v + %.0f ms", hb, fo.FrozenMS-fo.HeartbeatMS)
			frozen = false
		}
		if sz.VerifiedMS > 0 {
			fmt.Fprintf(w, "; with --verify-replica %.0f ms (digest %.1f ms)", sz.VerifiedMS, sz.VerifiedDigestMS)
		}
		fmt.Fprintln(w)
	}
	if fo.SizeRatio > 0 {
		first, last := fo.Sizes[0], fo.Sizes[len(fo.Sizes)-1]
		fmt.Fprintf(w, "failover %s / %s: p50 %.0f ms / %.0f ms = %.2fx; detection %.1f ms / %.1f ms; after detection %.1f ms / %.1f ms = %.2fx\n",
			testvm.FormatSize(last.Mem), testvm.FormatSize(first.Mem), last.KillP50MS, first.KillP50MS, fo.SizeRatio,
			last.DetectP50MS, first.DetectP50MS, last.AfterP50MS, first.AfterP50MS, fo.AfterRatio)
	}
}
