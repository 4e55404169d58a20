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

// A backup serves a primary of an older protocol version still spoken (2
// or 3), and a primary a backup of one, end to end: the sync, checkpoints
// (with a disk's stream, in some cases), acks, heartbeats, and a failover
// whose replica (and disk) is exactly what its saved count implies. The
// older side is the real engine narrowed to that version, so every message
// of the session is in its encoding on both sides. Two of this build speak
// the current version.
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
		{"version-3 primary, this backup", [2]uint32{2, 3}, [2]uint32{}, false, 3},
		{"version-3 primary with a disk, this backup", [2]uint32{3, 3}, [2]uint32{}, true, 3},
		{"this primary, a version-3 backup", [2]uint32{}, [2]uint32{2, 3}, false, 3},
		{"this primary, a version-3 backup, with a disk", [2]uint32{}, [2]uint32{3, 3}, true, 3},
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

// The session ID the backup chose in its version-4 welcome is the one the
// primary reports and the one the failover's Checkpoint carries; a session
// of version 3 (either side narrowed to it) or 2 names none, on both sides.
func TestSessionAtFailover(t *testing.T) {
	tests := []struct {
		name            string
		primary, backup [2]uint32
		wantVersion     uint32
	}{
		{"both of this build", [2]uint32{}, [2]uint32{}, 4},
		{"a primary narrowed to version 3", [2]uint32{2, 3}, [2]uint32{}, 3},
		{"a backup narrowed to version 3", [2]uint32{}, [2]uint32{2, 3}, 3},
		{"a primary narrowed to version 2", [2]uint32{2, 2}, [2]uint32{}, 2},
	}
	var seen []replicate.SessionID
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runVersions(t, tt.primary, tt.backup, false, 3)
			if r.version != tt.wantVersion {
				t.Fatalf("the session spoke version %d, want %d", r.version, tt.wantVersion)
			}
			if r.failover == nil || r.resumeErr != nil {
				t.Fatalf("failover %+v (backup: %v), resumed replica: %v", r.failover, r.backupErr, r.resumeErr)
			}
			if r.resumed != r.session {
				t.Errorf("the checkpoint resumed names session %v, the primary's session is %v", r.resumed, r.session)
			}
			if named := tt.wantVersion >= 4; r.session.IsZero() == named {
				t.Errorf("version %d session with ID %v (named: want %v)", r.version, r.session, named)
			}
			if !r.session.IsZero() {
				if s := r.session.String(); len(s) != 32 || strings.ToLower(s) != s {
					t.Errorf("session ID %q, want 32 lower-case hex digits", s)
				}
				seen = append(seen, r.session)
			}
		})
	}
	// Another session of this build gets another ID.
	r := runVersions(t, [2]uint32{}, [2]uint32{}, false, 1)
	if r.session.IsZero() || r.session != r.resumed {
		t.Fatalf("second session: primary %v, checkpoint %v", r.session, r.resumed)
	}
	for _, id := range seen {
		if id == r.session {
			t.Errorf("two sessions share ID %v", id)
		}
	}
}

// A peer of a version neither side speaks is told so, naming both ranges.
func TestOtherVersionRefused(t *testing.T) {
	tests := []struct {
		name            string
		primary, backup [2]uint32
		wantReason      string
	}{
		{"version-1 primary", [2]uint32{1, 1}, [2]uint32{}, "protocol version: primary speaks 1..1, this backup 2..4"},
		{"version-3-only primary, version-2 backup", [2]uint32{3, 3}, [2]uint32{2, 2}, "primary speaks 3..3, this backup 2..2"},
		{"version-4-only primary, version-3 backup", [2]uint32{4, 4}, [2]uint32{2, 3}, "primary speaks 4..4, this backup 2..3"},
		{"a primary of a future version only", [2]uint32{5, 9}, [2]uint32{}, "primary speaks 5..9, this backup 2..4"},
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
	session    replicate.SessionID // the primary's Session() once Run returned
	resumed    replicate.SessionID // the Session of the Checkpoint handed to Resume
	refused    error               // Run's error when the backup refused the hello
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
			r.resumed = cp.Session
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
	r.session = pair.Primary.Session()
	return r
}
