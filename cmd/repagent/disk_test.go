package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/internal/procout"
	"github.com/repagent/repagent/testvm"
)

var (
	diskVerifiedRE = regexp.MustCompile(`(?m)^disk verified at epoch (\d+): (\d+) blocks, (\d+) written, newest version (\d+), guest writes (\d+), batch in flight (\d+) completed (\d+) pending \([\d.]+ ms\)$`)
	resumedDiskRE  = regexp.MustCompile(`(?m)^resumed disk writes=(\d+) reads=(\d+) flushes=(\d+) errors=(\d+)$`)
	diskWorkloadRE = regexp.MustCompile(`(?m)^  disk workload: (\d+) block writes, (\d+) verified reads, (\d+) flushes, (\d+) errors$`)
	diskFinalRE    = regexp.MustCompile(`(?m)^  disk verified: (\d+) blocks, (\d+) written, `)
	diskPrecopyRE  = regexp.MustCompile(`(?m)^disk sync precopy: (\d+) blocks, (\d+) identical, (\d+) sent, `)
	diskProgressRE = regexp.MustCompile(`(?m)^ +\d+\.\ds  disk +\S+ block writes/s  total \S+  verified reads (\d+)  errors (\d+)  vcpus 1$`)
)

// makeImage creates a sparse image of size bytes.
func makeImage(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func TestDiskOptions(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.img")
	makeImage(t, good, 64<<20)
	odd := filepath.Join(dir, "odd.img")
	makeImage(t, odd, 64<<20+512)
	empty := filepath.Join(dir, "empty.img")
	makeImage(t, empty, 0)
	missing := filepath.Join(dir, "missing.img")
	big := filepath.Join(dir, "big.img") // sparse
	makeImage(t, big, 1<<30)

	// The flags that work.
	o, err := parsePrimaryArgs([]string{"--backup", "h:1", "--disk", good, "--workload", "disk", "--mem", "64M"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if o.Guest.Disk == nil || o.Guest.Disk.Blocks != 64<<20/testvm.DiskBlockSize || o.Guest.Workload != testvm.Disk || o.Repl.Disk != good {
		t.Errorf("primary --disk: disk %+v, workload %v, path %q", o.Guest.Disk, o.Guest.Workload, o.Repl.Disk)
	}
	if o, err := parsePrimaryArgs([]string{"--backup", "h:1", "--disk", good}, ""); err != nil || o.Guest.Disk == nil || o.Guest.Workload != testvm.Dirty {
		t.Errorf("primary --disk with the dirty workload: %v, %+v", err, o)
	}
	if o, err := parsePrimaryArgs([]string{"--backup", "h:1"}, ""); err != nil || o.Guest.Disk != nil || o.Repl.Disk != "" {
		t.Errorf("primary without --disk: %v, %+v", err, o)
	}
	v, err := parseVMArgs([]string{"--disk", good, "--workload", "disk"})
	if err != nil || v.Guest.Disk == nil || v.Guest.Disk.Blocks != 16384 || v.Disk != good || !v.Changed["disk"] {
		t.Errorf("vm --disk: %v, %+v", err, v)
	}
	b, err := parseBackupArgs([]string{"--listen", "127.0.0.1:1", "--disk", good}, "", "")
	if err != nil || b.Disk != good {
		t.Errorf("backup --disk: %v, %+v", err, b)
	}
	j, err := parseJobArgs(nil)
	if err != nil || !j.Disk || j.Guest.Disk == nil || j.Guest.Disk.Blocks != agent.JobDiskSize/testvm.DiskBlockSize {
		t.Errorf("job: %v, disk %v %+v", err, j.Disk, j.Guest.Disk)
	}
	if j, err := parseJobArgs([]string{"--no-disk"}); err != nil || j.Disk || j.Guest.Disk != nil {
		t.Errorf("job --no-disk: %v, disk %v %+v", err, j.Disk, j.Guest.Disk)
	}
	if j, err := parseJobArgs([]string{"--workload", "disk", "--no-net"}); err != nil || j.Guest.Workload != testvm.Disk || j.Guest.Disk == nil {
		t.Errorf("job --workload disk: %v, %+v", err, j)
	}

	notMultiple := fmt.Sprintf("--disk %s: size %d bytes is not a whole number of 4KiB blocks", odd, 64<<20+512)
	for _, tc := range []struct {
		name string
		cmd  string
		args []string
		want string
	}{
		{"primary missing", "primary", []string{"--backup", "h:1", "--disk", missing}, "--disk " + missing + ": no such file (make an image first, e.g. truncate -s 64M"},
		{"primary not a multiple", "primary", []string{"--backup", "h:1", "--disk", odd}, notMultiple},
		{"primary empty", "primary", []string{"--backup", "h:1", "--disk", empty}, "size 0 bytes is not a whole number of 4KiB blocks"},
		{"primary directory", "primary", []string{"--backup", "h:1", "--disk", dir}, "not a regular file"},
		{"primary disk workload without disk", "primary", []string{"--backup", "h:1", "--workload", "disk"}, "--workload disk needs a block device: give --disk"},
		{"vm missing", "vm", []string{"--disk", missing}, "no such file"},
		{"vm not a multiple", "vm", []string{"--disk", odd, "--workload", "disk"}, notMultiple},
		{"vm disk workload without disk", "vm", []string{"--workload", "disk"}, "--workload disk needs a block device"},
		{"vm table too large", "vm", []string{"--disk", big, "--workload", "disk", "--mem", "8M", "--vcpus", "4"}, "disk working set of 262144 blocks needs a 2MiB version table"},
		{"backup missing", "backup", []string{"--listen", "127.0.0.1:1", "--disk", missing}, "no such file"},
		{"backup not a multiple", "backup", []string{"--listen", "127.0.0.1:1", "--disk", odd}, notMultiple},
		{"job disk workload without disk", "", []string{"--workload", "disk", "--no-disk"}, "--no-disk: the disk workload needs the job's disk"},
		{"job has no --disk", "", []string{"--disk", good}, "unknown flag: --disk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prefix := "repagent: "
			args := tc.args
			if tc.cmd != "" {
				prefix = "repagent " + tc.cmd + ": "
				args = append([]string{tc.cmd}, args...)
			}
			checkUsageError(t, run, prefix, args, tc.want)
		})
	}
}

// TestSweepJobDisks checks that the job removes the image directories of
// runs that were killed, and only those.
func TestSweepJobDisks(t *testing.T) {
	tmp := t.TempDir()
	// A PID no process has: above the largest the kernel hands out.
	dead := 1 << 23
	if b, err := os.ReadFile("/proc/sys/kernel/pid_max"); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			dead = n + 1
		}
	}
	stale := filepath.Join(tmp, fmt.Sprintf("%s%d-123", agent.JobDiskPrefix, dead))
	live := filepath.Join(tmp, fmt.Sprintf("%s%d-456", agent.JobDiskPrefix, os.Getppid()))
	mine := filepath.Join(tmp, fmt.Sprintf("%s%d-789", agent.JobDiskPrefix, os.Getpid()))
	file := filepath.Join(tmp, fmt.Sprintf("%s%d-000", agent.JobDiskPrefix, dead)) // not a directory
	other := filepath.Join(tmp, "repagent-disk")                                   // no PID
	for _, d := range []string{stale, live, mine} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
		makeImage(t, filepath.Join(d, "primary.img"), 1<<20)
	}
	makeImage(t, file, 0)
	makeImage(t, other, 0)
	agent.SweepJobDisks(tmp)
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the images of a dead run are still there: %v", err)
	}
	for _, p := range []string{live, mine, file, other} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s was removed: %v", p, err)
		}
	}
}

// atoi parses a decimal the regexps matched.
func atoi(s string) uint64 {
	n, _ := strconv.ParseUint(s, 10, 64)
	return n
}

// TestJobDisk runs the main job with the disk workload and checks that the
// disk is mirrored and verified, and that the job leaves no image behind
// (and removes the images a killed run left).
func TestJobDisk(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	tmp := t.TempDir()
	// A killed run's images: the PID is above any the kernel hands out.
	stale := filepath.Join(tmp, fmt.Sprintf("%s%d-1", agent.JobDiskPrefix, 1<<30))
	if err := os.Mkdir(stale, 0o700); err != nil {
		t.Fatal(err)
	}
	stats := filepath.Join(t.TempDir(), "stats.jsonl")
	cmd := exec.Command(bin, "--workload", "disk", "--no-net", "--interval", "50ms", "--duration", "3s", "--mem", "64M",
		"--heartbeat-timeout", "5s", "--stats", stats)
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	outb, err := cmd.CombinedOutput()
	out := string(outb)
	if err != nil {
		t.Fatalf("job: %v\n%s", err, out)
	}
	ents, _ := os.ReadDir(tmp)
	for _, e := range ents {
		t.Errorf("left in TMPDIR after the job: %s", e.Name())
	}
	m := regexp.MustCompile(`(?m)^disk: 64MiB, primary image (\S+), backup image (\S+) \(removed at exit\)$`).FindStringSubmatch(out)
	if m == nil || !strings.HasPrefix(m[1], tmp+"/") {
		t.Fatalf("no disk line with images in TMPDIR:\n%s", out)
	}
	if !statusLineDiskRE.MatchString(out) {
		t.Errorf("no status line with disk figures:\n%s", out)
	}
	var mirrored uint64
	for _, s := range statusLineDiskRE.FindAllStringSubmatch(out, -1) {
		if s[1] != "0" {
			mirrored++
		}
	}
	if mirrored == 0 {
		t.Errorf("no status line shows disk writes mirrored:\n%s", out)
	}
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^  disk sync precopy: 64 blocks, \d+ identical, \d+ sent, \S+ \(wire \S+\), \d+ rounds?, \S+`),
		regexp.MustCompile(`(?m)^  disk sync catch-up: \d+ sent, `),
		regexp.MustCompile(`(?m)^  disk sync residual: \d+ sent, `),
		regexp.MustCompile(`(?m)^  disk sync total: 3 phases, \d+ blocks sent, `),
		regexp.MustCompile(`(?m)^  disk verified: 16384 blocks, 16384 written, `),
		regexp.MustCompile(`(?m)^  backup: disk image at epoch \d+ verified against the replica's records: 16384 blocks, `),
		regexp.MustCompile(`(?m)^verification passed$`),
	} {
		if !want.MatchString(out) {
			t.Errorf("output lacks %v:\n%s", want, out)
		}
	}
	// The summary's total is the stats file's sum.
	dm := regexp.MustCompile(`(?m)^  disk mirrored: (\d+) writes, `).FindStringSubmatch(out)
	if dm == nil {
		t.Fatalf("no disk mirrored line:\n%s", out)
	}
	b, err := os.ReadFile(stats)
	if err != nil {
		t.Fatal(err)
	}
	var sum uint64
	for _, l := range regexp.MustCompile(`"stream_records":(\d+)`).FindAllStringSubmatch(string(b), -1) {
		sum += atoi(l[1])
	}
	if sum == 0 || sum != atoi(dm[1]) {
		t.Errorf("the stats file's stream_records sum to %d, the summary's disk writes are %s", sum, dm[1])
	}
	if !bytes.Contains(b, []byte(`"stream_bytes":`)) || !bytes.Contains(b, []byte(`"stream_wire_bytes":`)) {
		t.Errorf("stats file lacks stream_bytes or stream_wire_bytes")
	}
}

// statusLineDiskRE matches a status line of a primary with a mirrored disk.
var statusLineDiskRE = regexp.MustCompile(`(?m)^ +\d+\.\ds  [\d.]+ epochs/s  .*  guest \S+ (?:block )?writes/s  disk (\S+) writes/s \S+/s`)

// TestVMDisk runs the disk workload in the vm command, saves it, and
// restores it over the same image: the restored guest goes on with its disk
// and verifies it.
func TestVMDisk(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	dir := t.TempDir()
	img, snap := filepath.Join(dir, "disk.img"), filepath.Join(dir, "snap")
	makeImage(t, img, 8<<20)
	out, code := runBin(t, bin, "vm", "--workload", "disk", "--disk", img, "--mem", "32M", "--duration", "1s", "--save", snap)
	if code != 0 || !diskFinalRE.MatchString(out) || !strings.Contains(out, "saved snapshot") {
		t.Fatalf("vm --disk --save: exit %d:\n%s", code, out)
	}
	saved := atoi(diskWorkloadRE.FindStringSubmatch(out)[1])
	out, code = runBin(t, bin, "vm", "--restore", snap, "--duration", "1s")
	if code != 2 || !strings.Contains(out, "the snapshot's guest has a disk of 2048 blocks: give --disk") {
		t.Errorf("vm --restore without --disk: exit %d, want 2 and a message:\n%s", code, out)
	}
	out, code = runBin(t, bin, "vm", "--restore", snap, "--disk", img, "--duration", "1s")
	m := diskWorkloadRE.FindStringSubmatch(out)
	if code != 0 || m == nil || !diskFinalRE.MatchString(out) {
		t.Fatalf("vm --restore --disk: exit %d:\n%s", code, out)
	}
	if atoi(m[1]) <= saved || m[4] != "0" {
		t.Errorf("restored guest: %s; saved at %d block writes", m[0], saved)
	}
}

// TestDiskRefusedE2E checks the disk's handshake with two real processes: a
// backup image of another size, a backup without --disk, and a backup with
// --disk against a primary without one are refused; the primary exits 1
// saying why, and the backup image is left byte for byte as it was.
func TestDiskRefusedE2E(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	dir := t.TempDir()
	pimg, small := filepath.Join(dir, "primary.img"), filepath.Join(dir, "small.img")
	makeImage(t, pimg, 16<<20)
	junk := make([]byte, 8<<20)
	rand.NewChaCha8([32]byte{1}).Read(junk)
	if err := os.WriteFile(small, junk, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name                    string
		backupArgs, primaryArgs []string
		want                    []string
	}{
		{"size mismatch", []string{"--disk", small}, []string{"--disk", pimg, "--workload", "disk"},
			[]string{"backup refused the session", "image size mismatch", "16777216", "8388608", "the backup needs --disk with an image of exactly that size"}},
		{"backup without disk", nil, []string{"--disk", pimg},
			[]string{"backup refused the session", "the primary replicates a device stream of 16777216 bytes (a disk), and this backup has no sink"}},
		{"primary without disk", []string{"--disk", small}, nil,
			[]string{"backup refused the session", "this backup has a sink for a device stream (a disk), and the primary replicates none", "this primary has no --disk"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			_, _, berr, addr := startBackup(ctx, t, bin, tc.backupArgs...)
			args := append([]string{"primary", "--backup", addr, "--mem", "32M", "--duration", "5s", "--heartbeat-timeout", "5s"}, tc.primaryArgs...)
			out, code := runBin(t, bin, args...)
			if code != 1 {
				t.Errorf("primary: exit %d, want 1:\n%s\nbackup:\n%s", code, out, berr.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("primary's output lacks %q:\n%s", w, out)
				}
			}
			got, err := os.ReadFile(small)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, junk) {
				t.Errorf("the backup image changed")
			}
		})
	}
}

// P4 with two real agent processes over TCP: the guest runs the disk
// workload on a --disk image, the primary is SIGKILLed at random moments,
// and each time the backup must resume with its image exactly the disk of
// the checkpoint it resumes, and the resumed guest's own reads of its disk
// must verify. Most kills come at a random time after the first
// acknowledged epoch; four come from the primary's fault hooks, at random
// places in the run of kills: in the memory sync (after the disk's
// pre-copy: nothing to resume, a half-synced image left for the next run),
// after writing epoch 1 (the disk sync's residual), while sending epoch 2
// and in the pause of epoch 3.
//
// The backup image is reused from kill to kill: each run starts with the
// previous run's contents (the disk a resumed guest wrote, or a sync cut
// short), with junk written over a few places, and the initial sync must
// make it the primary's. The evidence, per kill:
//   - the primary's disk pre-copy counts as identical no block the junk hit;
//   - the backup checks its whole image (the working set is the whole disk)
//     against the guest's records in the checkpoint's memory before it
//     resumes ("disk verified at epoch N", N the epoch resumed): every block
//     holds exactly the version the guest's table says, the blocks of the
//     batch in flight as far as the device had taken it;
//   - the epoch is no older than the primary's last acknowledged one, and
//     where the primary recorded it, the guest's count of block writes is
//     the one resumed;
//   - the resumed guest goes on reading blocks back and checking them (more
//     verified reads, no error) and the image is verified again at the end.
//
// REPAGENT_DISKKILL_SEED replays a run.
func TestKillPrimaryDisk(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	bin := buildRepagent(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("REPAGENT_DISKKILL_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("REPAGENT_DISKKILL_SEED: %v", err)
		}
	}
	t.Logf("seed %d (REPAGENT_DISKKILL_SEED=%d replays it)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0))

	dir := t.TempDir()
	pimg, bimg := filepath.Join(dir, "primary.img"), filepath.Join(dir, "backup.img")
	const size = 16 << 20
	makeImage(t, pimg, size)
	makeImage(t, bimg, size)
	const kills = 14
	faults := map[int]diskKill{}
	for _, f := range []diskKill{{fault: "sync:0"}, {fault: "sent:1", atMost: 1}, {fault: "send:2", atMost: 1}, {fault: "pause:3", atMost: 2}} {
		i := rng.IntN(kills)
		for faults[i].fault != "" {
			i = rng.IntN(kills)
		}
		faults[i] = f
	}
	resumed, ran := 0, 0
	for i := range kills {
		c := faults[i]
		c.interval = []string{"10ms", "20ms", "50ms"}[rng.IntN(3)]
		c.rate = []uint64{0, 0, 20000}[rng.IntN(3)]
		c.after = time.Duration(rng.Int64N(int64(1500 * time.Millisecond)))
		c.junk = junkImage(t, bimg, size, rng)
		c.capture = []string{"eager", "lazy", "auto"}[i%3] // the device's DMA into guest memory races lazy capture
		c.tls = i%2 == 1
		name := fmt.Sprintf("kill%d-%s", i, c.capture)
		if c.tls {
			name += "-tls"
		}
		t.Run(name, func(t *testing.T) {
			ran++
			if c.run(t, bin, pimg, bimg) {
				resumed++
			}
		})
		if t.Failed() {
			return
		}
		if fi, err := os.Stat(bimg); err != nil || fi.Size() != size {
			t.Fatalf("backup image after kill %d: %v, size %d", i, err, fi.Size())
		}
	}
	if ran < kills {
		return // -run picked some kills only
	}
	// The kill in the sync never resumes; the three other faults, at
	// epochs 1 to 3, may not: on a loaded host epoch 1 may not have left
	// the dead primary's socket yet (each such kill was checked above: no
	// checkpoint on the backup, no ack on the primary). The timed kills,
	// from the first ack on, always resume.
	if resumed < kills-4 {
		t.Fatalf("%d of %d kills ended in a resumed guest, want at least %d", resumed, kills, kills-4)
	}
	t.Logf("%d kills, %d resumed", kills, resumed)
}

// junkImage writes random bytes over a few random places of the image and
// returns the sync blocks (1 MiB, the default) they hit.
func junkImage(t *testing.T, path string, size int64, rng *rand.Rand) map[int64]bool {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	hit := map[int64]bool{}
	for range 1 + rng.IntN(6) {
		n := 1 + rng.Int64N(64<<10)
		off := rng.Int64N(size - n)
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32()) | 1 // never a zero byte: junk is never a block's content
		}
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		for blk := off >> 20; blk <= (off+n-1)>>20; blk++ {
			hit[blk] = true
		}
	}
	return hit
}

// diskKill is one kill of a primary that runs the disk workload.
type diskKill struct {
	interval string
	rate     uint64
	after    time.Duration  // after the first acknowledged epoch
	fault    string         // REPAGENT_FAULT for the primary instead
	atMost   uint64         // with fault: the newest epoch the backup may resume
	junk     map[int64]bool // the sync blocks of the backup image junk hit
	capture  string         // the primary's --capture
	tls      bool           // replicate over TLS (labTLSArgs)
}

// run kills a primary as the case says and checks the failover. It reports
// whether a guest was resumed.
func (c diskKill) run(t *testing.T, bin, pimg, bimg string) bool {
	stats := filepath.Join(t.TempDir(), "stats.jsonl")
	addr := freeAddr(t)
	var backupTLS, primaryTLS []string
	if c.tls {
		backupTLS, primaryTLS = labTLSArgs(t)
	}
	backup := exec.Command(bin, append([]string{"backup", "--listen", addr, "--disk", bimg, "--run-after-failover", "1s", "--heartbeat-timeout", "5s",
		"--verify-replica", "--once"}, backupTLS...)...)
	bout := &procout.Buffer{}
	backup.Stdout, backup.Stderr = bout, bout
	if err := backup.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { backup.Process.Kill(); backup.Wait() }()

	primary := exec.Command(bin, append([]string{"primary", "--backup", addr, "--disk", pimg, "--workload", "disk", "--mem", "32M",
		"--interval", c.interval, "--rate", strconv.FormatUint(c.rate, 10), "--stats", stats, "--heartbeat-timeout", "5s",
		"--capture", c.capture, "--capture-calibration", "1ms"}, primaryTLS...)...) // auto lazy by the kill
	primary.Env = os.Environ()
	if c.fault != "" {
		primary.Env = append(primary.Env, "REPAGENT_FAULT="+c.fault)
	}
	pout := &procout.Buffer{}
	primary.Stdout, primary.Stderr = pout, pout
	if err := primary.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { primary.Process.Kill(); primary.Wait() }()
	report := func() string { return "primary:\n" + pout.String() + "\nbackup:\n" + bout.String() }

	if c.fault == "" {
		waitFor(t, 30*time.Second, "first acknowledged epoch", func() bool { return len(readStats(t, stats)) > 0 })
		time.Sleep(c.after)
		primary.Process.Signal(syscall.SIGKILL)
	}
	perr := waitProcess(t, primary, 60*time.Second, "primary", report)
	if ws, ok := perr.(*exec.ExitError); !ok || ws.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("primary did not die by SIGKILL (%v):\n%s", perr, report())
	}
	berr := waitProcess(t, backup, 60*time.Second, "backup", report)
	out := bout.String()

	// The pre-copy found every block the junk hit different.
	pm := diskPrecopyRE.FindStringSubmatch(pout.String())
	if pm == nil {
		t.Fatalf("primary printed no disk pre-copy line:\n%s", report())
	}
	if blocks, identical := atoi(pm[1]), atoi(pm[2]); blocks != 16 || identical > blocks-uint64(len(c.junk)) {
		t.Fatalf("disk pre-copy: %s, but junk hit %d blocks of the backup image:\n%s", pm[0], len(c.junk), report())
	}

	acked := readStats(t, stats)
	noCheckpoint := exitCode(berr) == exitNoCheckpoint && strings.Contains(out, "primary lost before its first checkpoint") && !failoverRE.MatchString(out)
	if strings.HasPrefix(c.fault, "sync:") {
		if !noCheckpoint || len(acked) != 0 {
			t.Fatalf("backup after a kill in the initial sync: exit %d, want %d and no failover:\n%s", exitCode(berr), exitNoCheckpoint, report())
		}
		t.Logf("killed in the initial sync (%s): nothing resumed; the image keeps a partial sync", c.fault)
		return false
	}
	if noCheckpoint && len(acked) == 0 && c.fault != "" {
		t.Logf("killed at %s before the first checkpoint reached the backup: nothing resumed", c.fault)
		return false
	}
	if berr != nil {
		t.Fatalf("backup: %v\n%s", berr, report())
	}
	fm := failoverRE.FindStringSubmatch(out)
	dv := diskVerifiedRE.FindStringSubmatch(out)
	rd := resumedDiskRE.FindStringSubmatch(out)
	if fm == nil || fm[3] != "true" || dv == nil || rd == nil {
		t.Fatalf("backup did not resume a verified replica with a verified disk:\n%s", report())
	}
	epoch := atoi(fm[1])
	if atoi(dv[1]) != epoch || atoi(dv[2]) != 4096 {
		t.Fatalf("disk verified line %q for a failover to epoch %d, want all 4096 blocks of that epoch", dv[0], epoch)
	}
	vcpus := resumedVCPUs(t, out)
	if atoi(dv[5]) != vcpus[0].Iterations || atoi(rd[1]) != vcpus[0].Iterations || rd[4] != "0" {
		t.Fatalf("resumed %+v, %q, %q: the guest's writes disagree, or it had errors", vcpus[0], dv[0], rd[0])
	}
	var last uint64
	if len(acked) > 0 {
		last = acked[len(acked)-1].Epoch
	}
	if epoch < last || epoch > last+4 || (c.atMost != 0 && epoch > c.atMost) {
		t.Fatalf("backup resumed epoch %d; the primary's last acknowledged epoch is %d (kill at %q)", epoch, last, c.fault)
	}
	for _, l := range acked {
		if l.Epoch == epoch && (l.Digest != fm[2] || len(l.Note) != 1 || l.Note[0] != vcpus[0]) {
			t.Fatalf("epoch %d: backup resumed digest %s %+v, the primary recorded %s %+v", epoch, fm[2], vcpus[0], l.Digest, l.Note)
		}
	}

	// The resumed guest read its disk back and found what it wrote, and the
	// image verifies again after it ran on.
	wm := diskWorkloadRE.FindStringSubmatch(out)
	// procout.Buffer trims the last newline.
	if wm == nil || !diskFinalRE.MatchString(out) || !strings.Contains(out+"\n", "\nverification passed\n") {
		t.Fatalf("the resumed guest's disk did not verify:\n%s", report())
	}
	if atoi(wm[2]) <= atoi(rd[2]) || wm[4] != "0" || atoi(wm[1]) <= atoi(rd[1]) {
		t.Fatalf("resumed guest: %q at the checkpoint, %q at the end: want more writes and verified reads, no error", rd[0], wm[0])
	}
	for _, p := range diskProgressRE.FindAllStringSubmatch(out, -1) {
		if p[2] != "0" {
			t.Fatalf("progress line with disk errors: %s", p[0])
		}
	}
	when := fmt.Sprintf("%v after the first ack", c.after.Round(time.Millisecond))
	if c.fault != "" {
		when = "at " + c.fault
	}
	t.Logf("interval %s rate %d: killed %s; resumed epoch %d (last ack %d), %d block writes; %d verified reads after failover; junk in %d blocks, %s",
		c.interval, c.rate, when, epoch, last, vcpus[0].Iterations, atoi(wm[2])-atoi(rd[2]), len(c.junk), strings.TrimSuffix(pm[0], ", "))
	return true
}
