package main

// The bench's disk section: what mirroring the disk costs the guest's block
// writes, and what the initial disk sync costs. The guest's disk runs on a
// plain image file, through a diskmirror.Mirror whose epochs go nowhere (the
// interposer's own cost), and through a Mirror replicated by the engine to a
// backup in this process over loopback TCP (the backup's image on this
// machine's disk, and once in memory), side by side in one run. Then a
// large image is synced to backup images that already hold none, half or all
// of its blocks, against two baselines from the same run: hashing the image,
// and a plain copy of it over loopback TCP.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// Fixed settings of the disk section.
const (
	diskMaxMem         = 64 << 20              // the disk guests' memory: --mem, at most this
	diskSyncInterval   = 20 * time.Millisecond // the sync cases' checkpoint interval
	diskSyncBlock      = diskmirror.DefaultBlockSize
	diskFillChunk      = 4 << 20 // bytes per write when making an image
	diskCopyChunk      = 1 << 20 // bytes per read and write of the plain copy
	minDiskSize        = 1 << 20
	minDiskSyncSize    = 2 * diskSyncBlock
	diskPrimarySeed    = 1 // the images' random contents
	diskHalfSeed       = 2
	diskDifferentSeed  = 3
	diskThroughputSeed = 4
)

// benchDiskResult is the disk section's figures.
type benchDiskResult struct {
	MemSize    uint64           `json:"mem"`
	ImageSize  uint64           `json:"image_size"`
	Throughput []*benchDiskMode `json:"throughput"`
	Sync       benchDiskSyncAll `json:"sync"`
}

// benchDiskMode is one mode of the throughput measurement. Durations in
// microseconds.
type benchDiskMode struct {
	Mode       string  `json:"mode"` // plain, mirror, or the interval
	IntervalMS float64 `json:"interval_ms,omitempty"`
	// BackupInMemory: the backup's image is a memfd (its fsync does
	// nothing), not a file on the disk the primary's image is on.
	BackupInMemory bool    `json:"backup_in_memory,omitempty"`
	Track          string  `json:"dirty_track,omitempty"`
	Seconds        float64 `json:"seconds"`
	Writes         uint64  `json:"guest_block_writes"`
	WritesPerS     float64 `json:"guest_block_writes_per_s"`
	MiBPerS        float64 `json:"guest_mib_per_s"`
	VsPlain        float64 `json:"vs_plain"`
	Flushes        uint64  `json:"flushes"` // flush requests and FUA writes the device executed: each an fsync of the image
	FlushesPerS    float64 `json:"flushes_per_s"`
	FsyncUS        float64 `json:"fsync_mean_us"` // the image's fsyncs in the window
	FsyncShare     float64 `json:"fsync_share"`   // the part of the window spent in them
	// The backup image's fsyncs in the window (replicated modes): one per
	// epoch committed.
	BackupFsyncs  uint64  `json:"backup_fsyncs,omitempty"`
	BackupFsyncUS float64 `json:"backup_fsync_mean_us,omitempty"`
	Verified      uint64  `json:"blocks_verified"` // blocks VerifyDisk checked after the window

	// The mirror's epochs (mirror and replicated modes) in the window.
	Epochs          uint64  `json:"epochs,omitempty"`
	DiskWritesEpoch float64 `json:"disk_records_per_epoch,omitempty"`
	DiskKiBEpoch    float64 `json:"disk_kib_per_epoch,omitempty"`
	DiskWireMBps    float64 `json:"disk_wire_mb_per_s,omitempty"`
	// The replicated modes' epochs.
	PauseP50US float64 `json:"pause_p50_us,omitempty"`
	PauseP99US float64 `json:"pause_p99_us,omitempty"`
	WireMBps   float64 `json:"wire_mb_per_s,omitempty"`
	AckP50US   float64 `json:"ack_p50_us,omitempty"`
	AckP99US   float64 `json:"ack_p99_us,omitempty"`
	WaitUS     float64 `json:"wait_mean_us,omitempty"`
}

// benchDiskSyncAll is the initial sync measurement: the baselines and the
// cases.
type benchDiskSyncAll struct {
	ImageSize uint64 `json:"image_size"`
	Block     int    `json:"block"`
	MemSize   uint64 `json:"mem"`
	// HashSecs is diskmirror.HashImage over the primary image.
	HashSecs float64 `json:"hash_s"`
	HashMBps float64 `json:"hash_mb_per_s"`
	// CopySecs is the plain copy of the image over loopback TCP into the
	// backup image (no hashing, no format, no fsync).
	CopySecs float64          `json:"copy_s"`
	CopyMBps float64          `json:"copy_mb_per_s"`
	Cases    []*benchDiskSync `json:"cases"`
}

// benchDiskSync is one case of the initial sync. Times are from the
// primary's Run, in seconds.
type benchDiskSync struct {
	IdenticalPct int     `json:"identical_percent"`
	Blocks       int     `json:"blocks"`
	Identical    int     `json:"identical_blocks"` // the backup held them: not sent
	Sent         int     `json:"sent_blocks"`      // in the pre-copy
	Bytes        int64   `json:"sent_bytes"`       // their data
	WireBytes    uint64  `json:"wire_bytes"`       // the pre-copy's messages
	Later        int     `json:"later_blocks"`     // sent by the catch-up and the residual
	HashWait     float64 `json:"hash_wait_s"`      // Run to the pre-copy's start: hello, the backup hashing its image, the hash list
	Precopy      float64 `json:"precopy_s"`        // the pre-copy: hashing the primary image, sending the blocks that differ
	WireMBps     float64 `json:"precopy_wire_mb_per_s"`
	DiskSync     float64 `json:"disk_sync_s"` // Run to the pre-copy's end
	VsCopy       float64 `json:"vs_copy"`     // DiskSync over the plain copy's time
	MemSync      float64 `json:"memory_sync_s"`
	First        float64 `json:"first_checkpoint_s"` // Run to the backup applying checkpoint 1
	Durable      float64 `json:"durable_s"`          // Run to the backup committing epoch 2: its image fsynced
	BackupFsync  float64 `json:"backup_fsync_max_s"` // the backup image's longest fsync: the first commit's, which writes the synced blocks back
}

// diskMem is the disk guests' memory size.
func (b *benchRun) diskMem() uint64 { return min(b.mem, diskMaxMem) }

// diskBlocks is the throughput image's size in device blocks.
func (b *benchRun) diskBlocks() uint64 { return b.diskSize / testvm.DiskBlockSize }

// diskGuestConfig is a 1-vCPU test VM running the disk workload over the
// whole throughput image, through io.
func (b *benchRun) diskGuestConfig(io testvm.DiskBackend) testvm.Config {
	return testvm.Config{MemSize: b.diskMem(), VCPUs: 1, Workload: testvm.Disk, Pattern: testvm.Random, Seed: 1,
		Disk: &testvm.DiskConfig{Blocks: b.diskBlocks()}, DiskIO: io}
}

// checkDiskSizes checks the disk section's sizes (parseBenchArgs).
func checkDiskSizes(mem, size, syncSize uint64) error {
	if size < minDiskSize || size%testvm.DiskBlockSize != 0 {
		return usagef("--disk-size %s: want a multiple of %s, at least %s", testvm.FormatSize(size),
			testvm.FormatSize(testvm.DiskBlockSize), testvm.FormatSize(minDiskSize))
	}
	if syncSize < minDiskSyncSize || syncSize%diskSyncBlock != 0 {
		return usagef("--disk-sync-size %s: want a multiple of %s, at least %s", testvm.FormatSize(syncSize),
			testvm.FormatSize(diskSyncBlock), testvm.FormatSize(minDiskSyncSize))
	}
	for _, c := range []struct {
		flag string
		size uint64
		wl   testvm.Workload
	}{{"--disk-size", size, testvm.Disk}, {"--disk-sync-size", syncSize, testvm.Idle}} {
		cfg := testvm.Config{MemSize: min(mem, diskMaxMem), VCPUs: 1, Workload: c.wl, Disk: &testvm.DiskConfig{Blocks: c.size / testvm.DiskBlockSize}}
		if err := cfg.Validate(); err != nil {
			return usagef("%s %s with --mem %s: %w", c.flag, testvm.FormatSize(c.size), testvm.FormatSize(mem), err)
		}
	}
	return nil
}

// benchDisk measures the disk section in a temporary directory, removed
// after it, also on an error or an interrupt.
func (b *benchRun) benchDisk(ctx context.Context) (_ *benchDiskResult, err error) {
	dir, err := os.MkdirTemp("", "repagent-bench-disk-")
	if err != nil {
		return nil, fmt.Errorf("make a directory for the images: %w", err)
	}
	defer func() {
		if rerr := os.RemoveAll(dir); rerr != nil && err == nil {
			err = fmt.Errorf("remove the images: %w", rerr)
		}
	}()
	res := &benchDiskResult{MemSize: b.diskMem(), ImageSize: b.diskSize}
	if res.Throughput, err = b.diskThroughput(ctx, dir); err != nil {
		return nil, err
	}
	if res.Sync, err = b.diskSyncCases(ctx, dir); err != nil {
		return nil, err
	}
	return res, nil
}

// diskImage makes (or opens and truncates) the file at path and fills it
// with size bytes from a random generator seeded with seed, then fsyncs it.
func diskImage(path string, size uint64, seed uint64) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("make disk image: %w", err)
	}
	if err := fillImage(f, size, func(int64) bool { return true }, seed); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// fillImage overwrites with random bytes (seeded with seed) every block of
// diskSyncBlock bytes of f's first size bytes for which pick says so, then
// fsyncs f.
func fillImage(f *os.File, size uint64, pick func(block int64) bool, seed uint64) error {
	rng := rand.NewChaCha8([32]byte{0: byte(seed), 1: byte(seed >> 8), 31: 'd'})
	buf := make([]byte, diskFillChunk)
	for off := int64(0); off < int64(size); {
		n := min(int64(len(buf)), int64(size)-off)
		p := buf[:n]
		rng.Read(p) // the same bytes whatever pick says: a block's contents depend only on seed and offset
		for k := int64(0); k < n; {
			blk := (off + k) / diskSyncBlock
			end := min(n, (blk+1)*diskSyncBlock-off)
			if pick(blk) {
				if _, err := f.WriteAt(p[k:end], off+k); err != nil {
					return fmt.Errorf("write disk image %s: %w", f.Name(), err)
				}
			}
			k = end
		}
		off += n
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync disk image %s: %w", f.Name(), err)
	}
	return nil
}

// copyImage copies src's first size bytes to dst and fsyncs dst.
func copyImage(dst, src *os.File, size uint64) error {
	buf := make([]byte, diskFillChunk)
	for off := int64(0); off < int64(size); {
		n, err := src.ReadAt(buf[:min(int64(len(buf)), int64(size)-off)], off)
		if n == 0 {
			return fmt.Errorf("copy disk image %s: %w", src.Name(), cmp.Or(err, io.ErrUnexpectedEOF))
		}
		if _, err := dst.WriteAt(buf[:n], off); err != nil {
			return fmt.Errorf("copy disk image to %s: %w", dst.Name(), err)
		}
		off += int64(n)
	}
	if err := dst.Sync(); err != nil {
		return fmt.Errorf("sync disk image %s: %w", dst.Name(), err)
	}
	return nil
}

// diskThroughput measures the disk workload's writes on the plain image,
// through a Mirror alone, and replicated at each of --intervals. Every mode
// runs on a fresh VM over the same image file (random contents, every block
// allocated, all of it in the page cache, fsynced before the mode).
func (b *benchRun) diskThroughput(ctx context.Context, dir string) ([]*benchDiskMode, error) {
	b.progressf("disk: making the %s image", testvm.FormatSize(b.diskSize))
	img, err := diskImage(filepath.Join(dir, "throughput.img"), b.diskSize, diskThroughputSeed)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	bimg, err := os.OpenFile(filepath.Join(dir, "throughput-backup.img"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("make the backup disk image: %w", err)
	}
	defer bimg.Close()

	var out []*benchDiskMode
	b.progressf("disk: write throughput, plain image")
	plain, err := b.diskMode(ctx, img, nil, 0, false)
	if err != nil {
		return nil, fmt.Errorf("disk throughput, plain image: %w", err)
	}
	b.progressf("disk: write throughput, mirror without a backup")
	mir, err := b.diskMode(ctx, img, nil, -1, false)
	if err != nil {
		return nil, fmt.Errorf("disk throughput, mirror: %w", err)
	}
	out = append(out, plain, mir)
	for _, iv := range b.intervals {
		b.progressf("disk: write throughput, replicated at %v", iv)
		m, err := b.diskMode(ctx, img, bimg, iv, false)
		if err != nil {
			return nil, fmt.Errorf("disk throughput, replicated at %v: %w", iv, err)
		}
		out = append(out, m)
	}
	// The backup's image shares this machine's disk with the primary's:
	// the same replication with the backup's image in memory tells what
	// that costs.
	iv := b.intervals[0]
	b.progressf("disk: write throughput, replicated at %v, the backup's image in memory", iv)
	mem, err := testvm.NewMemFile(b.diskSize)
	if err != nil {
		return nil, fmt.Errorf("make the in-memory backup disk image: %w", err)
	}
	defer mem.Close()
	m, err := b.diskMode(ctx, img, mem, iv, true)
	if err != nil {
		return nil, fmt.Errorf("disk throughput, replicated at %v, backup image in memory: %w", iv, err)
	}
	out = append(out, m)
	for _, m := range out {
		m.VsPlain = benchRatio(m.WritesPerS, plain.WritesPerS)
	}
	return out, nil
}

// diskMode measures one throughput mode on img: plain for interval 0, a
// Mirror alone for -1, else a Mirror replicated at interval to a backup whose
// image, bimg (a memfd when inMemory), starts as a copy of img.
func (b *benchRun) diskMode(ctx context.Context, img, bimg *os.File, interval time.Duration, inMemory bool) (*benchDiskMode, error) {
	if err := img.Sync(); err != nil { // the previous mode's writes: not this mode's to flush
		return nil, fmt.Errorf("sync disk image: %w", err)
	}
	r := &benchDiskMode{Mode: "plain"}
	local := &timedDisk{f: img, size: int64(b.diskSize)}
	var backend testvm.DiskBackend = local
	var mir *diskmirror.Mirror
	if interval != 0 {
		var err error
		if mir, err = diskmirror.NewMirror(local, diskmirror.Config{}); err != nil {
			return nil, err
		}
		backend = mir
	}
	var backup *timedDisk
	if interval > 0 {
		if err := bimg.Truncate(0); err != nil {
			return nil, fmt.Errorf("truncate the backup disk image: %w", err)
		}
		if err := copyImage(bimg, img, b.diskSize); err != nil {
			return nil, err
		}
		backup = &timedDisk{f: bimg, size: int64(b.diskSize)}
	}
	cfg := b.diskGuestConfig(backend)
	if interval > 0 {
		r.Mode, r.IntervalMS, r.BackupInMemory = interval.String(), benchMS(interval), inMemory
		m, ready, mech, err := b.bootTracked(ctx, cfg, interval)
		if err != nil {
			return nil, err
		}
		defer m.Close()
		rm := &benchMode{Mode: r.Mode, IntervalMS: r.IntervalMS, Track: mech.String()}
		err = b.runReplicated(ctx, m, ready, benchRepl{interval: interval, mech: mech, warmup: b.warmup(),
			disk: mir, backupDisk: backup,
			measure: func(ctx context.Context) (time.Time, time.Time, error) {
				if err := b.diskSweep(ctx, m); err != nil {
					return time.Time{}, time.Time{}, err
				}
				return b.diskWindow(ctx, m, r, local, backup)
			}}, rm)
		if err != nil {
			return nil, err
		}
		r.Track = rm.Track
		benchDiskEpochs(r, rm)
		if err := b.diskVerify(m, r); err != nil {
			return nil, err
		}
		return r, nil
	}

	m, _, err := benchBoot(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	var me *mirrorEpochs
	if mir != nil {
		// Epochs as long as the first replicated mode's.
		r.Mode, r.IntervalMS = "mirror", benchMS(b.intervals[0])
		me = startMirrorEpochs(mir, b.intervals[0])
		defer me.stop()
	}
	if err := benchSleep(ctx, m, b.warmup()); err != nil {
		return nil, err
	}
	if err := b.diskSweep(ctx, m); err != nil {
		return nil, err
	}
	if me != nil {
		me.open(time.Now())
	}
	_, t1, err := b.diskWindow(ctx, m, r, local, nil)
	if err != nil {
		return nil, err
	}
	if me != nil {
		if err := me.close(t1, r); err != nil {
			return nil, err
		}
	}
	if err := b.diskVerify(m, r); err != nil {
		return nil, err
	}
	return r, nil
}

// mirrorEpochs does the engine's part for a Mirror without the engine: it
// opens an epoch every interval (without pausing the guest), takes
// the closed one's stream whole, as the transport would, and commits it. It
// keeps the epochs that close inside the window.
type mirrorEpochs struct {
	mir      *diskmirror.Mirror
	interval time.Duration
	quit     chan struct{}
	done     chan struct{}

	mu       sync.Mutex
	from, to time.Time // the window, once known
	closed   []mirrorEpoch
	err      error
}

// mirrorEpoch is an epoch the mirror closed: when, and its summary.
type mirrorEpoch struct {
	at  time.Time
	sum diskmirror.Summary
}

func startMirrorEpochs(mir *diskmirror.Mirror, interval time.Duration) *mirrorEpochs {
	e := &mirrorEpochs{mir: mir, interval: interval, quit: make(chan struct{}), done: make(chan struct{})}
	go e.run()
	return e
}

func (e *mirrorEpochs) run() {
	defer close(e.done)
	tick := time.NewTicker(e.interval)
	defer tick.Stop()
	for n := uint64(1); ; n++ {
		err := e.mir.Open(n)
		now := time.Now()
		if err == nil && n > 1 {
			var rd io.Reader
			var sum diskmirror.Summary
			if rd, sum, err = e.mir.Epoch(n - 1); err == nil {
				if _, err = io.Copy(io.Discard, rd); err == nil {
					err = e.mir.Commit(n - 1)
				}
			}
			e.mu.Lock()
			if !e.from.IsZero() && now.After(e.from) && (e.to.IsZero() || now.Before(e.to)) {
				e.closed = append(e.closed, mirrorEpoch{at: now, sum: sum})
			}
			e.mu.Unlock()
		}
		if err != nil {
			e.mu.Lock()
			e.err = err
			e.mu.Unlock()
			return
		}
		select {
		case <-e.quit:
			return
		case <-tick.C:
		}
	}
}

// open opens the window at t0.
func (e *mirrorEpochs) open(t0 time.Time) {
	e.mu.Lock()
	e.from = t0
	e.mu.Unlock()
}

// close closes the window at t1 and fills r's epoch figures. The first
// epoch closed in the window ran partly before it: as for the replicated
// modes (benchDiskEpochs), the figures are over the epochs after it.
func (e *mirrorEpochs) close(t1 time.Time, r *benchDiskMode) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.to = t1
	if e.err != nil {
		return fmt.Errorf("mirror epochs: %w", e.err)
	}
	if len(e.closed) < 2 {
		return nil
	}
	eps := e.closed[1:]
	var records, bytes, encoded int64
	for _, x := range eps {
		records += int64(x.sum.Writes)
		bytes += x.sum.Bytes
		encoded += x.sum.Encoded
	}
	n := float64(len(eps))
	r.Epochs = uint64(len(eps))
	r.DiskWritesEpoch = float64(records) / n
	r.DiskKiBEpoch = float64(bytes) / n / 1024
	r.DiskWireMBps = float64(encoded) / eps[len(eps)-1].at.Sub(e.closed[0].at).Seconds() / 1e6
	return nil
}

func (e *mirrorEpochs) stop() {
	close(e.quit)
	<-e.done
}

// timedDisk is a disk image that times its fsyncs. It is the backend of
// every throughput mode (so all pay its two clock reads per fsync), and the
// backup's image.
type timedDisk struct {
	f      *os.File
	size   int64
	syncs  atomic.Uint64
	syncNS atomic.Int64
	maxNS  atomic.Int64 // the longest fsync
}

func (d *timedDisk) ReadAt(p []byte, off int64) (int, error)  { return d.f.ReadAt(p, off) }
func (d *timedDisk) WriteAt(p []byte, off int64) (int, error) { return d.f.WriteAt(p, off) }
func (d *timedDisk) Size() int64                              { return d.size }

func (d *timedDisk) Sync() error {
	t0 := time.Now()
	err := d.f.Sync()
	took := int64(time.Since(t0))
	d.syncNS.Add(took)
	d.syncs.Add(1)
	for {
		if m := d.maxNS.Load(); took <= m || d.maxNS.CompareAndSwap(m, took) {
			return err
		}
	}
}

// fsyncs returns the fsyncs so far and their total time.
func (d *timedDisk) fsyncs() (uint64, time.Duration) {
	if d == nil {
		return 0, 0
	}
	return d.syncs.Load(), time.Duration(d.syncNS.Load())
}

// diskSweep waits for the disk workload's first sweep (sequential, over the
// whole working set) to end: every mode measures the random writes after it.
func (b *benchRun) diskSweep(ctx context.Context, m *testvm.Machine) error {
	ws := b.diskBlocks()
	deadline := time.Now().Add(setupTimeout)
	for {
		st := m.Status(0)
		if st.DiskErrors != 0 {
			return fmt.Errorf("the guest's disk workload failed: block %d, status %d", st.DiskBadBlock-1, st.DiskBadStatus)
		}
		if st.DiskWrites >= ws {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the guest's first sweep of %d blocks did not end in %v (%d blocks written)", ws, setupTimeout, st.DiskWrites)
		}
		if err := benchSleep(ctx, m, 10*time.Millisecond); err != nil {
			return err
		}
	}
}

// diskWindow measures the guest's block writes over --mode-time, and the
// fsyncs of the image (local) and of the backup's (nil: none).
func (b *benchRun) diskWindow(ctx context.Context, m *testvm.Machine, r *benchDiskMode, local, backup *timedDisk) (t0, t1 time.Time, err error) {
	n0, s0 := local.fsyncs()
	bn0, bs0 := backup.fsyncs()
	w0, d0, t0 := m.Status(0).DiskWrites, m.DiskStats(), time.Now()
	if err := benchSleep(ctx, m, b.modeTime); err != nil {
		return t0, t0, err
	}
	w1, d1, t1 := m.Status(0).DiskWrites, m.DiskStats(), time.Now()
	n1, s1 := local.fsyncs()
	bn1, bs1 := backup.fsyncs()
	r.Seconds = t1.Sub(t0).Seconds()
	if n1 > n0 {
		r.FsyncUS = benchUS((s1 - s0) / time.Duration(n1-n0))
	}
	r.FsyncShare = (s1 - s0).Seconds() / r.Seconds
	if r.BackupFsyncs = bn1 - bn0; r.BackupFsyncs > 0 {
		r.BackupFsyncUS = benchUS((bs1 - bs0) / time.Duration(r.BackupFsyncs))
	}
	r.Writes = w1 - w0
	r.WritesPerS = float64(r.Writes) / r.Seconds
	r.MiBPerS = r.WritesPerS * testvm.DiskBlockSize / (1 << 20)
	r.Flushes = d1.Flushes + d1.FUAWrites - d0.Flushes - d0.FUAWrites
	r.FlushesPerS = float64(r.Flushes) / r.Seconds
	if d1.IOErrors != d0.IOErrors || d1.BadRequests != d0.BadRequests {
		return t0, t1, fmt.Errorf("the block device failed %d requests and refused %d in the window",
			d1.IOErrors-d0.IOErrors, d1.BadRequests-d0.BadRequests)
	}
	return t0, t1, nil
}

// diskVerify pauses the guest and checks its image against its record of
// every block it wrote: the measured writes all landed.
func (b *benchRun) diskVerify(m *testvm.Machine, r *benchDiskMode) error {
	if err := m.Pause(); err != nil {
		return err
	}
	rep, err := m.VerifyDisk()
	if err != nil {
		return fmt.Errorf("verify the guest's disk: %w", err)
	}
	r.Verified = rep.Written
	return nil
}

// benchDiskEpochs fills r's epoch figures from the replicated mode's epochs
// in the window (sorted). The first of them ran partly before the window
// (its pause started in it): the disk figures leave it out, and are over the
// writes of the epochs after it, which the guest made between the first's
// pause and the last's.
func benchDiskEpochs(r *benchDiskMode, rm *benchMode) {
	r.PauseP50US, r.PauseP99US, r.WaitUS = rm.PauseP50US, rm.PauseP99US, rm.WaitUS
	if len(rm.epochs) < 2 {
		return
	}
	eps := rm.epochs[1:]
	var writes, bytes, wire, all uint64
	var ack hist
	for _, s := range eps {
		writes += uint64(s.StreamRecords)
		bytes += s.StreamBytes
		wire += s.StreamWireBytes
		all += s.WireBytes
		ack.Add(s.AckLatency)
	}
	n := float64(len(eps))
	span := eps[len(eps)-1].Start.Sub(rm.epochs[0].Start).Seconds()
	r.Epochs = uint64(len(eps))
	r.DiskWritesEpoch, r.DiskKiBEpoch = float64(writes)/n, float64(bytes)/n/1024
	r.DiskWireMBps, r.WireMBps = float64(wire)/span/1e6, float64(all)/span/1e6
	r.AckP50US, r.AckP99US = benchUS(ack.Quantile(0.5)), benchUS(ack.Quantile(0.99))
}

// diskSyncCases measures the baselines, then the initial sync to a backup
// image that holds all, half and none of the primary image's blocks.
func (b *benchRun) diskSyncCases(ctx context.Context, dir string) (benchDiskSyncAll, error) {
	size := b.diskSyncSize
	all := benchDiskSyncAll{ImageSize: size, Block: diskSyncBlock, MemSize: b.diskMem()}
	b.progressf("disk sync: making the %s primary image", testvm.FormatSize(size))
	img, err := diskImage(filepath.Join(dir, "sync-primary.img"), size, diskPrimarySeed)
	if err != nil {
		return all, err
	}
	defer img.Close()
	bimg, err := os.OpenFile(filepath.Join(dir, "sync-backup.img"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return all, fmt.Errorf("make the backup disk image: %w", err)
	}
	defer bimg.Close()

	// The baselines run beside an idle guest like the cases' (the test
	// guest never halts: its vCPU takes a core, in the cases too).
	idle, _, err := benchBoot(ctx, testvm.Config{MemSize: b.diskMem(), VCPUs: 1, Workload: testvm.Idle, Seed: 1})
	if err != nil {
		return all, err
	}
	b.progressf("disk sync: hashing the primary image (baseline)")
	t0 := time.Now()
	want, err := diskmirror.HashImage(img, int64(size), diskSyncBlock)
	if err != nil {
		idle.Close()
		return all, err
	}
	took := time.Since(t0)
	all.HashSecs, all.HashMBps = took.Seconds(), float64(size)/took.Seconds()/1e6
	b.progressf("disk sync: plain copy over loopback TCP (baseline)")
	took, err = plainCopy(ctx, bimg, img, size)
	idle.Close()
	if err != nil {
		return all, fmt.Errorf("plain copy: %w", err)
	}
	all.CopySecs, all.CopyMBps = took.Seconds(), float64(size)/took.Seconds()/1e6
	if err := bimg.Sync(); err != nil {
		return all, fmt.Errorf("sync disk image %s: %w", bimg.Name(), err)
	}

	// The copy made the backup image identical. Each case replaces blocks
	// of it, and leaves it equal to the primary's again (checked).
	for _, c := range []struct {
		pct  int
		seed uint64
		pick func(int64) bool
	}{
		{100, 0, nil},
		{50, diskHalfSeed, func(blk int64) bool { return blk%2 == 1 }},
		{0, diskDifferentSeed, func(int64) bool { return true }},
	} {
		if c.pick != nil {
			b.progressf("disk sync: making the backup image %d%% identical", c.pct)
			if err := fillImage(bimg, size, c.pick, c.seed); err != nil {
				return all, err
			}
		}
		b.progressf("disk sync: %d%% identical", c.pct)
		s, err := b.diskSyncCase(ctx, img, bimg, c.pct)
		if err != nil {
			return all, fmt.Errorf("disk sync, %d%% identical: %w", c.pct, err)
		}
		s.VsCopy = benchRatio(s.DiskSync, all.CopySecs)
		got, err := diskmirror.HashImage(bimg, int64(size), diskSyncBlock)
		if err != nil {
			return all, err
		}
		if !slices.Equal(got, want) {
			return all, fmt.Errorf("disk sync, %d%% identical: the backup image differs from the primary's after the sync", c.pct)
		}
		all.Cases = append(all.Cases, s)
	}
	slices.Reverse(all.Cases) // 0, 50, 100
	return all, nil
}

// plainCopy copies src's first size bytes over loopback TCP into dst, in
// diskCopyChunk reads and writes on both sides, and times it: what sending
// the whole image costs without hashing or format.
func plainCopy(ctx context.Context, dst, src *os.File, size uint64) (time.Duration, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("listen: %w", err)
	}
	defer ln.Close()
	recv := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			recv <- err
			return
		}
		defer conn.Close()
		buf := make([]byte, diskCopyChunk)
		for off := int64(0); off < int64(size); {
			n, err := io.ReadFull(conn, buf[:min(int64(len(buf)), int64(size)-off)])
			if err != nil {
				recv <- fmt.Errorf("receive at %d: %w", off, err)
				return
			}
			if _, err := dst.WriteAt(buf[:n], off); err != nil {
				recv <- fmt.Errorf("write %s: %w", dst.Name(), err)
				return
			}
			off += int64(n)
		}
		recv <- nil
	}()
	t0 := time.Now()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return 0, fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	// Unblock both sides on an interrupt.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	buf := make([]byte, diskCopyChunk)
	for off := int64(0); off < int64(size); {
		n, err := src.ReadAt(buf[:min(int64(len(buf)), int64(size)-off)], off)
		if n == 0 {
			return 0, fmt.Errorf("read %s: %w", src.Name(), cmp.Or(err, io.ErrUnexpectedEOF))
		}
		if _, err := conn.Write(buf[:n]); err != nil {
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			return 0, fmt.Errorf("send: %w", err)
		}
		off += int64(n)
	}
	if err := <-recv; err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

// diskSyncCase replicates an idle guest whose disk is img (through a Mirror)
// to a backup whose image is bimg, at diskSyncInterval, until the backup has
// committed epoch 2 (the first commit of disk writes, which fsyncs its
// image), and times the sync.
func (b *benchRun) diskSyncCase(ctx context.Context, img, bimg *os.File, pct int) (*benchDiskSync, error) {
	size := b.diskSyncSize
	mir, err := diskmirror.NewMirror(img, diskmirror.Config{})
	if err != nil {
		return nil, err
	}
	cfg := testvm.Config{MemSize: b.diskMem(), VCPUs: 1, Workload: testvm.Idle, Seed: 1,
		Disk: &testvm.DiskConfig{Blocks: size / testvm.DiskBlockSize}, DiskIO: mir}
	backup := &timedDisk{f: bimg, size: int64(size)}
	m, ready, mech, err := b.bootTracked(ctx, cfg, diskSyncInterval)
	if err != nil {
		return nil, err
	}
	defer m.Close()

	s := &benchDiskSync{IdenticalPct: pct}
	var (
		mu                  sync.Mutex
		run, first, durable time.Time
		precopyAt           time.Time
		precopy             *replicate.StreamSyncProgress
		later               int
		phases              []string
		durableCh           = make(chan struct{})
		durableOnce         sync.Once
		precopyTook         time.Duration
	)
	rm := &benchMode{Mode: diskSyncInterval.String(), IntervalMS: benchMS(diskSyncInterval), Track: mech.String()}
	err = b.runReplicated(ctx, m, ready, benchRepl{interval: diskSyncInterval, mech: mech, warmup: 0,
		disk: mir, backupDisk: backup,
		onRun: func() {
			mu.Lock()
			run = time.Now()
			mu.Unlock()
		},
		onDiskSync: func(p replicate.StreamSyncProgress) {
			now := time.Now()
			mu.Lock()
			defer mu.Unlock()
			phases = append(phases, p.Phase.String())
			if p.Phase == replicate.SyncPrecopy {
				precopy, precopyAt, precopyTook = &p, now, p.Took
				return
			}
			later += p.Sent
		},
		onBackupEpoch: func(epoch uint64) {
			now := time.Now()
			mu.Lock()
			defer mu.Unlock()
			switch epoch {
			case 1:
				first = now
			case 2:
				durable = now
				durableOnce.Do(func() { close(durableCh) })
			}
		},
		measure: func(ctx context.Context) (time.Time, time.Time, error) {
			now := time.Now()
			select {
			case <-durableCh:
			case <-ctx.Done():
				return now, now, ctx.Err()
			case <-time.After(setupTimeout):
				return now, now, errors.New("the backup did not commit epoch 2")
			}
			return now, now, nil
		}}, rm)
	if err != nil {
		return nil, err
	}
	mu.Lock()
	defer mu.Unlock()
	if precopy == nil || first.IsZero() || durable.IsZero() {
		return nil, fmt.Errorf("the sync was not reported whole: phases %v, first checkpoint %v, epoch 2 committed %v",
			phases, !first.IsZero(), !durable.IsZero())
	}
	p := precopy
	s.Blocks, s.Identical, s.Sent, s.Bytes, s.WireBytes, s.Later = p.Units, p.Unchanged, p.Sent, p.Bytes, p.WireBytes, later
	if want := p.Units * pct / 100; s.Identical != want {
		return nil, fmt.Errorf("the backup held %d of %d blocks, the bench made %d identical", s.Identical, p.Units, want)
	}
	s.Precopy = precopyTook.Seconds()
	s.DiskSync = precopyAt.Sub(run).Seconds()
	s.HashWait = s.DiskSync - s.Precopy
	s.WireMBps = float64(s.WireBytes) / s.Precopy / 1e6
	s.MemSync = rm.SyncSeconds
	s.First = first.Sub(run).Seconds()
	s.Durable = durable.Sub(run).Seconds()
	s.BackupFsync = time.Duration(backup.maxNS.Load()).Seconds()
	return s, nil
}

// benchPrintDisk prints the disk section's tables.
func benchPrintDisk(w io.Writer, dr *benchDiskResult, modeTime, warmup time.Duration) {
	fmt.Fprintf(w, "Disk write throughput: disk workload (random 4KiB block writes, 32 per batch, a FUA write every 8 batches, a flush every 256 writes), "+
		"%s image, 1 vCPU, %s; each mode %v after the first sweep and a %v warm-up:\n\n",
		testvm.FormatSize(dr.ImageSize), testvm.FormatSize(dr.MemSize), modeTime, warmup.Round(time.Millisecond))
	var rows [][]string
	for _, m := range dr.Throughput {
		name := m.Mode
		switch m.Mode {
		case "plain":
			name = "plain image"
		case "mirror":
			name = "mirror, no backup"
		default:
			name = "replicated " + m.Mode
			if m.BackupInMemory {
				name += ", backup in RAM"
			}
		}
		row := []string{name, cmp.Or(m.Track, "-"), si(m.WritesPerS), fmt.Sprintf("%.1f", m.MiBPerS), fmt.Sprintf("%.2f", m.VsPlain),
			si(m.FlushesPerS), benchDur(m.FsyncUS), fmt.Sprintf("%.0f%%", 100*m.FsyncShare), strconv.FormatUint(m.Verified, 10)}
		if m.Mode == "plain" {
			rows = append(rows, append(row, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-"))
			continue
		}
		row = append(row, strconv.FormatUint(m.Epochs, 10), fmt.Sprintf("%.0f", m.DiskWritesEpoch), fmt.Sprintf("%.0f", m.DiskKiBEpoch),
			fmt.Sprintf("%.1f", m.DiskWireMBps))
		if m.Mode == "mirror" {
			rows = append(rows, append(row, "-", "-", "-", "-", "-", "-"))
			continue
		}
		rows = append(rows, append(row, benchDur(m.PauseP50US), benchDur(m.PauseP99US), fmt.Sprintf("%.1f", m.WireMBps),
			benchDur(m.AckP50US), benchDur(m.WaitUS), benchDur(m.BackupFsyncUS)))
	}
	benchTable(w, []string{"mode", "track", "block writes/s", "MiB/s", "vs plain", "fsyncs/s", "fsync mean", "in fsync", "verified", "epochs",
		"disk writes/epoch", "disk KiB/epoch", "disk wire MB/s", "pause p50", "pause p99", "wire MB/s", "ack p50", "wait", "backup fsync"}, rows)

	sa := &dr.Sync
	fmt.Fprintf(w, "\nInitial disk sync: %s image of random blocks, %s sync blocks, idle 1-vCPU guest (%s), interval %v, over loopback TCP.\n",
		testvm.FormatSize(sa.ImageSize), testvm.FormatSize(uint64(sa.Block)), testvm.FormatSize(sa.MemSize), diskSyncInterval)
	fmt.Fprintf(w, "Baselines: hashing the image %s (%.0f MB/s); a plain copy over loopback TCP %s (%.0f MB/s).\n\n",
		dur(secs(sa.HashSecs)), sa.HashMBps, dur(secs(sa.CopySecs)), sa.CopyMBps)
	rows = nil
	for _, c := range sa.Cases {
		rows = append(rows, []string{fmt.Sprintf("%d%%", c.IdenticalPct), strconv.Itoa(c.Blocks), strconv.Itoa(c.Identical),
			strconv.Itoa(c.Sent), fmt.Sprintf("%.1f", float64(c.WireBytes)/(1<<20)), dur(secs(c.HashWait)), dur(secs(c.Precopy)),
			fmt.Sprintf("%.0f", c.WireMBps), dur(secs(c.DiskSync)), fmt.Sprintf("%.2f", c.VsCopy), strconv.Itoa(c.Later),
			dur(secs(c.MemSync)), dur(secs(c.First)), dur(secs(c.Durable)), dur(secs(c.BackupFsync))})
	}
	benchTable(w, []string{"identical", "blocks", "held", "sent", "wire MiB", "hash wait", "precopy", "precopy MB/s",
		"disk sync", "vs copy", "later", "memory sync", "first checkpoint", "durable", "backup fsync"}, rows)
}

func secs(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
