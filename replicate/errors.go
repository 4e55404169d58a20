package replicate

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
