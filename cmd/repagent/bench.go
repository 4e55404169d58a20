package main

// The bench command's flags, help and exit codes; internal/bench measures.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/internal/bench"
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

// benchOptions is what the bench command was asked to do: the measurements,
// and where to write their results as JSON.
type benchOptions struct {
	bench.Options
	json string
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
	migrateSizes                string
	noSync, noCapture, noLink   bool
	noFence                     bool
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
	fs.StringVar(&f.migrateSizes, "migrate-sizes", "256M,1G",
		"comma-separated guest memory `sizes` the migration section moves with repagent migrate, each at 20000 writes/s and at full speed (\"\": no migration section; a size that does not fit in free memory is skipped)")
	fs.BoolVar(&f.noCapture, "no-capture", false, "skip the capture section (eager, lazy and auto capture side by side)")
	fs.BoolVar(&f.noLink, "no-link", false, "skip the link section (plaintext and TLS side by side)")
	fs.BoolVar(&f.noFence, "no-fence", false, "skip the fenced failover section (a primary fenced through etcd, killed and frozen; it needs etcd-server)")
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
	fs.IntVar(&f.echoRate, "echo-rate", 200, fmt.Sprintf("the network section's echo requests per second, 1 to %d", bench.MaxEchoRate))
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
	o := &benchOptions{Options: bench.Options{VCPUs: f.vcpus, ModeTime: f.modeTime, Failovers: f.failovers,
		HeartbeatTimeout: f.heartbeatTimeout, Net: !f.noNet, Disk: !f.noDisk, Capture: !f.noCapture, Link: !f.noLink, Fence: !f.noFence, EchoRate: f.echoRate, StreamRate: f.streamRate,
		Quiet: f.quiet, VMM: agent.VMMName}, json: f.json}
	var err error
	if o.Mem, err = parseSize(f.mem); err != nil {
		return nil, usagef("--mem: %w", err)
	}
	if f.vcpus < 1 || f.vcpus > testvm.MaxVCPUs {
		return nil, usagef("--vcpus %d: want 1 to %d", f.vcpus, testvm.MaxVCPUs)
	}
	if o.Pattern, err = testvm.ParsePattern(f.pattern); err != nil {
		return nil, usagef("--pattern: %w", err)
	}
	if err := (testvm.Config{MemSize: o.Mem, VCPUs: o.VCPUs, Workload: testvm.Dirty, Pattern: o.Pattern}).Validate(); err != nil {
		return nil, usagef("--mem %s, --vcpus %d: %w", f.mem, f.vcpus, err)
	}
	if o.DiskSize, err = parseSize(f.diskSize); err != nil {
		return nil, usagef("--disk-size: %w", err)
	}
	if o.DiskSyncSize, err = parseSize(f.diskSyncSize); err != nil {
		return nil, usagef("--disk-sync-size: %w", err)
	}
	if err := bench.CheckDiskSizes(o.Mem, o.DiskSize, o.DiskSyncSize); err != nil {
		return nil, usagef("%w", err)
	}
	if o.Rates, err = parseRates(f.rates); err != nil {
		return nil, err
	}
	if o.Intervals, err = parseIntervals(f.intervals); err != nil {
		return nil, err
	}
	if f.modeTime < 100*time.Millisecond {
		return nil, usagef("--mode-time %v: want at least 100ms", f.modeTime)
	}
	if f.failovers < 0 {
		return nil, usagef("--failovers %d: must not be negative", f.failovers)
	}
	if o.FailoverSizes, err = parseGuestSizes("--failover-sizes", f.failoverSizes, o.VCPUs); err != nil {
		return nil, err
	}
	o.Sync = !f.noSync
	if f.migrateSizes != "" {
		if o.MigrateSizes, err = parseGuestSizes("--migrate-sizes", f.migrateSizes, o.VCPUs); err != nil {
			return nil, err
		}
	}
	if o.SyncSizes, err = parseGuestSizes("--sync-sizes", f.syncSizes, bench.SyncVCPUs); err != nil {
		return nil, err
	}
	if f.echoRate < 1 || f.echoRate > bench.MaxEchoRate {
		return nil, usagef("--echo-rate %d: want 1 to %d requests per second", f.echoRate, bench.MaxEchoRate)
	}
	if f.streamRate == 0 {
		return nil, usagef("--stream-rate 0: want at least 1 datagram per second")
	}
	if o.DirtyTrack, err = dirtylog.ParseMechanism(f.dirtyTrack); err != nil {
		return nil, usagef("--dirty-track: %w", err)
	}
	// The failover primary's heartbeat period is its interval, at most 100ms.
	if hb := min(bench.FailoverInterval, 100*time.Millisecond); f.heartbeatTimeout != 0 && f.heartbeatTimeout < 2*hb {
		return nil, usagef("--heartbeat-timeout %v: want 0 (the default) or at least %v (two heartbeats at the failover's %v interval)",
			f.heartbeatTimeout, 2*hb, bench.FailoverInterval)
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

// run runs the bench, its progress and the engine's warnings on stderr, and
// writes the results to the --json file.
func (o *benchOptions) run(ctx context.Context, stdout, stderr io.Writer) error {
	bo := o.Options
	bo.Log = agent.NewLogger(stderr, true)
	res, err := bench.Run(ctx, bo, stdout, stderr)
	if err != nil || o.json == "" {
		return err
	}
	j, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(o.json, append(j, '\n'), 0o644); err != nil {
		return fmt.Errorf("write --json file: %w", err)
	}
	return nil
}
