package replicate_test

import (
	"errors"
	"fmt"
	"syscall"
	"testing"

	"github.com/repagent/repagent/replicate"
)

// TestBackupLostErrorWraps: a lost backup matches ErrBackupLost and its
// cause, all the way down to the errno.
func TestBackupLostErrorWraps(t *testing.T) {
	cause := fmt.Errorf("read from backup: %w", syscall.ECONNRESET)
	var err error = fmt.Errorf("run: %w", &replicate.BackupLostError{Cause: cause})
	if !errors.Is(err, replicate.ErrBackupLost) || !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("%v: Is(ErrBackupLost) %v, Is(ECONNRESET) %v", err, errors.Is(err, replicate.ErrBackupLost), errors.Is(err, syscall.ECONNRESET))
	}
	lost, ok := errors.AsType[*replicate.BackupLostError](err)
	if !ok || lost.Cause != cause {
		t.Fatalf("AsType: %v %v", lost, ok)
	}
	if want := "run: backup lost: the VM runs unprotected: read from backup: connection reset by peer"; err.Error() != want {
		t.Errorf("text %q, want %q", err, want)
	}
	if errors.Is(cause, replicate.ErrBackupLost) {
		t.Error("the cause alone matches ErrBackupLost")
	}
}
