package replicate_test

import (
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
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

// A primary whose connection is reset is lost to the backup with the reset
// as the cause, wrapped all the way: the failover's Cause matches
// ECONNRESET.
func TestPrimaryLostWrapsTheReset(t *testing.T) {
	pair := replicatetest.NewUnstartedPair(t, replicate.Config{VM: newToyVM(8 << 20), Interval: 20 * time.Millisecond},
		replicate.BackupConfig{Resume: func(cp *replicate.Checkpoint) error { return cp.Memory.Close() }})
	var tcp *net.TCPConn
	pair.Link = func(c net.Conn) net.Conn { tcp = c.(*net.TCPConn); return c }
	pair.Start()
	pair.WaitAcked(2)
	tcp.SetLinger(0) // close with a reset
	tcp.Close()
	fo, err := pair.BackupResult()
	if err != nil {
		t.Fatalf("failover: %v", err)
	}
	if !errors.Is(fo.Cause, syscall.ECONNRESET) {
		t.Fatalf("failover cause %q does not match ECONNRESET", fo.Cause)
	}
	t.Logf("cause: %v", fo.Cause)
}
