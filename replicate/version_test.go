package replicate_test

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
)

// A backup serves a primary of the previous protocol version, and a primary
// a backup of the previous version, end to end: the sync, checkpoints (with
// a disk's stream, in one case), acks, heartbeats, and a failover whose
// replica (and disk) is exactly what its saved count implies. The older
// side is the real engine narrowed to version 2, so every message of the
// session is in version 2's encoding on both sides.
func TestPreviousVersionServed(t *testing.T) {
	tests := []struct {
		name            string
		primary, backup [2]uint32 // the versions each speaks; zero: all this build speaks
		disk            bool
		wantVersion     uint32
	}{
		{"version-2 primary, this backup", [2]uint32{2, 2}, [2]uint32{}, false, 2},
		{"version-2 primary with a disk, this backup", [2]uint32{2, 2}, [2]uint32{}, true, 2},
		{"this primary, a version-2 backup", [2]uint32{}, [2]uint32{2, 2}, false, 2},
		{"this primary, a version-2 backup, with a disk", [2]uint32{}, [2]uint32{2, 2}, true, 2},
		{"both of this build", [2]uint32{}, [2]uint32{}, false, replicate.Version},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runVersions(t, tt.primary, tt.backup, tt.disk, 5)
			if r.refused != nil {
				t.Fatalf("refused: %v", r.refused)
			}
			if r.version != tt.wantVersion {
				t.Errorf("the session spoke version %d, want %d", r.version, tt.wantVersion)
			}
			if !errors.Is(r.primaryErr, replicate.ErrBackupLost) {
				t.Errorf("primary: %v, want ErrBackupLost", r.primaryErr)
			}
			if r.backupErr != nil {
				t.Fatalf("backup: %v", r.backupErr)
			}
			if r.failover == nil || r.failover.Epoch < 5 || !r.failover.Verified || r.failover.Stream != tt.disk {
				t.Fatalf("failover %+v, want one verified at epoch 5 or later (stream %v)", r.failover, tt.disk)
			}
			if r.resumeErr != nil {
				t.Fatalf("resumed replica: %v", r.resumeErr)
			}
		})
	}
}

// A peer of a version neither side speaks is told so, naming both ranges.
func TestOtherVersionRefused(t *testing.T) {
	tests := []struct {
		name            string
		primary, backup [2]uint32
		wantReason      string
	}{
		{"version-1 primary", [2]uint32{1, 1}, [2]uint32{}, "protocol version: primary speaks 1..1, this backup 2..3"},
		{"version-3-only primary, version-2 backup", [2]uint32{3, 3}, [2]uint32{2, 2}, "primary speaks 3..3, this backup 2..2"},
		{"a primary of a future version only", [2]uint32{4, 9}, [2]uint32{}, "primary speaks 4..9, this backup 2..3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runVersions(t, tt.primary, tt.backup, false, 0)
			var re *replicate.RefusedError
			if !errors.As(r.refused, &re) || !strings.Contains(re.Reason, tt.wantReason) {
				t.Fatalf("primary: %v, want a refusal saying %q", r.refused, tt.wantReason)
			}
			if !errors.Is(r.backupErr, replicate.ErrProtocol) || !strings.Contains(r.backupErr.Error(), tt.wantReason) {
				t.Errorf("backup: %v, want a protocol error saying %q", r.backupErr, tt.wantReason)
			}
		})
	}
}

type versionRun struct {
	version    uint32
	refused    error // Run's error when the backup refused the hello
	primaryErr error
	backupErr  error
	failover   *replicate.Failover
	resumeErr  error
}

// runVersions runs the toy VM's primary speaking pv against a backup
// speaking bv over TCP until acked epochs are acknowledged, then cuts the
// link (the primary's host dies) and lets the backup fail over. With acked
// 0 it returns what the hello came to.
func runVersions(t *testing.T, pv, bv [2]uint32, disk bool, acked uint64) versionRun {
	t.Helper()
	vm := newToyVM(1 << 20)
	var mirror *diskmirror.Mirror
	var bimg *os.File
	if disk {
		const size = 1 << 20
		img := func(name string) *os.File {
			f, err := os.Create(filepath.Join(t.TempDir(), name))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { f.Close() })
			if err := f.Truncate(size); err != nil {
				t.Fatal(err)
			}
			return f
		}
		var err error
		mirror, err = diskmirror.NewMirror(img("primary.img"), diskmirror.Config{SpillDir: t.TempDir()})
		if err != nil {
			t.Fatal(err)
		}
		bimg = img("backup.img")
		vm.disk = mirror
	}
	vm.start()
	defer vm.close()

	var r versionRun
	bcfg := replicate.BackupConfig{
		VerifyReplica: true,
		Resume: func(cp *replicate.Checkpoint) error {
			defer cp.Memory.Close()
			r.resumeErr = checkToyReplica(cp)
			if r.resumeErr == nil && bimg != nil {
				r.resumeErr = checkToyDisk(binary.LittleEndian.Uint64(cp.State), bimg, mirror.Size())
			}
			return nil
		},
	}
	if bimg != nil {
		bcfg.NewSink = diskmirror.NewSink(bimg, diskmirror.ReplicaConfig{})
	}
	cfg := replicate.Config{VM: vm, Interval: 10 * time.Millisecond}
	if mirror != nil {
		src, err := diskmirror.NewSource(mirror, diskmirror.SourceConfig{})
		if err != nil {
			t.Fatal(err)
		}
		cfg.Stream = src
	}
	pair := replicatetest.NewUnstartedPair(t, cfg, bcfg)
	if bv != [2]uint32{} {
		replicate.BackupSpeaks(pair.Backup, bv[0], bv[1])
	}
	if pv != [2]uint32{} {
		replicate.PrimarySpeaks(pair.Primary, pv[0], pv[1])
	}
	pair.Timeout = 30 * time.Second
	pair.Start()
	if acked == 0 {
		r.refused = pair.PrimaryErr()
		_, r.backupErr = pair.BackupResult()
		return r
	}
	// A refusal here fails the test in WaitAcked, with the primary's error.
	pair.WaitAcked(acked)
	pair.KillPrimary() // the primary's host dies
	r.primaryErr = pair.PrimaryErr()
	r.failover, r.backupErr = pair.BackupResult()
	r.version = replicate.SessionVersion(pair.Primary)
	return r
}
