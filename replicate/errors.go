package replicate

import (
	"errors"
	"fmt"
	"time"
)

// The errors a caller of the engine decides on. Every cause is wrapped with
// %w, so errors.Is and errors.As see through to the errno or the reason.

// ErrProtocol is returned (wrapped, naming the problem) for anything on the
// wire that does not decode or breaks the protocol's rules: the side that
// sees it drops the session and keeps its last good checkpoint.
var ErrProtocol = errors.New("replication protocol error")

// ErrBackupLost is matched (errors.Is) by what Primary.Run returns when the
// backup stopped answering, closed the connection or ended the session after
// it began. The guest keeps running, unprotected; the output gates were
// released. The error is a *BackupLostError, with the cause. A session the
// backup refuses at hello is a *RefusedError.
var ErrBackupLost = errors.New("backup lost: the VM runs unprotected")

// BackupLostError is what Primary.Run returns when the backup was lost after
// the session began: Cause is why (the link's error, such as a reset or a
// timeout, or the reason the backup gave). It matches ErrBackupLost
// (errors.Is) and unwraps to Cause, so errors.Is(err, syscall.ECONNRESET)
// sees through it.
type BackupLostError struct {
	Cause error
}

func (e *BackupLostError) Error() string { return ErrBackupLost.Error() + ": " + e.Cause.Error() }

// Is reports whether target is ErrBackupLost.
func (e *BackupLostError) Is(target error) bool { return target == ErrBackupLost }

// Unwrap returns the cause.
func (e *BackupLostError) Unwrap() error { return e.Cause }

// RefusedError is a backup's refusal of a session, with the reason it gave
// (its VM shape, version, stream or memory limit). Run returns it (errors.As)
// when the backup rejects the hello or the stream's set-up.
type RefusedError struct {
	Reason string
}

func (e *RefusedError) Error() string { return "backup refused the session: " + e.Reason }

// Errors a Backup returns.
var (
	// ErrPrimaryStopped: the primary ended the session on purpose (it said
	// bye, or that its VM stopped). There is nothing to fail over.
	ErrPrimaryStopped = errors.New("primary stopped replication")
	// ErrNoCheckpoint: the primary was lost before the first checkpoint of its
	// session completed, so there is no VM state to resume.
	ErrNoCheckpoint = errors.New("primary lost before its first checkpoint: nothing to resume")
	// ErrReplicaCorrupt: at failover the replica's memory does not match the
	// digest of its checkpoint; it is not resumed.
	ErrReplicaCorrupt = errors.New("replica memory does not match its checkpoint")
)

// ErrLazyUnsupported is wrapped by the error of a primary asked for lazy
// capture where it cannot have it: userfaultfd missing or refused, or a VM
// without WriteGuard. CaptureAuto falls back to eager instead, with a note
// in the log.
var ErrLazyUnsupported = errors.New("lazy capture not supported")

// ErrFenced is matched (errors.Is) by what Primary.Run returns when the
// VM's lease (Config.Lease) was lost: the engine stopped releasing output
// and paused the VM. The error is a *FencedError.
var ErrFenced = errors.New("fenced: this host no longer knows it owns the VM")

// FencedError is what Primary.Run returns when it fenced the VM: Cause is
// why the lease was lost (its Lost closed, a renewal lapsed, or the standby
// could not be recorded), LastCommitted the last epoch whose output was
// released, and At the moment from which no output was released any more.
type FencedError struct {
	Cause         error
	LastCommitted uint64
	LastRelease   time.Time // when LastCommitted's output was released (zero: none was)
	At            time.Time
}

func (e *FencedError) Error() string {
	return fmt.Sprintf("%v: %v (output of the epochs after %d held, never released; VM paused)", ErrFenced, e.Cause, e.LastCommitted)
}

// Is reports whether target is ErrFenced.
func (e *FencedError) Is(target error) bool { return target == ErrFenced }

// Unwrap returns the cause.
func (e *FencedError) Unwrap() error { return e.Cause }
