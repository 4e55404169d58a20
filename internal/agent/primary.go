package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/repagent/repagent/replicate"
)

// Run builds and starts the VM, connects to the backup and replicates until
// the duration is over or ctx ends, then summarizes. A lost backup is not an
// error: the guest survived.
func (o *PrimaryJob) Run(ctx context.Context, stopSignals func(), stdout, stderr io.Writer) (err error) {
	r, err := newReplicator("repagent primary", o.Repl, o.Guest, stdout, stderr, o.Fault)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := r.close(); cerr != nil && err == nil {
			err = cerr
		}
	}()
	if o.Fencing != nil {
		if r.fencer, err = newFencer(o.Fencing, r.log); err != nil {
			return err
		}
		defer r.fencer.close() // after r.close, which releases the VM
		r.redial = func(ctx context.Context) (net.Conn, error) { return dialBackup(ctx, o.Backup, time.Second) }
	}
	stopMetrics, err := serveMetrics(ctx, o.Repl.Metrics, stdout, r.metrics)
	if err != nil {
		return err
	}
	defer stopMetrics()
	if err := r.start(ctx); err != nil {
		return err
	}
	r.migrate, r.switchoverAfter = o.Migrate, o.SwitchoverAfter
	conn, err := dialBackup(ctx, o.Backup, o.ConnectTimeout)
	if err != nil {
		if ctx.Err() != nil {
			return nil // stopped before there was anything to replicate
		}
		if o.Migrate {
			return r.migrationFailed(ctx, stopSignals, err)
		}
		return err
	}
	lost, err := r.protect(ctx, conn, stopSignals)
	if err != nil {
		return r.diskHint(err)
	}
	if ho := r.p.HandedOver(); ho != nil {
		return r.migrated(stdout, ho)
	}
	if err := r.finish(stdout, lost); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "verification passed")
	if o.Migrate {
		cause := errors.New("stopped before the switchover (--duration or a signal)")
		switch {
		case lost != nil:
			cause = lostCause(lost)
		case r.handoverErr != nil:
			cause = r.handoverErr
		}
		return &MigrationError{Cause: cause}
	}
	return nil
}

// MigrationError is the migrate command's error when the VM was not moved:
// the destination refused, died or could not be reached, and the VM ran on
// here (and was verified) until --duration or Ctrl-C. Exit code
// ExitMigrationFailed.
type MigrationError struct{ Cause error }

func (e *MigrationError) Error() string {
	return fmt.Sprintf("migration failed: %v (the VM ran on here)", e.Cause)
}

func (e *MigrationError) Unwrap() error { return e.Cause }

// Exit codes of the migrate command beyond 0, 1 and 2.
const (
	ExitMigrationFailed = 5 // not moved: the VM ran on here
	ExitUnconfirmed     = 6 // handed over, never confirmed: the VM is paused here, and may run there
)

// migrated reports a completed migration, the way QEMU's query-migrate
// does (total time, downtime), and verifies the guest as it stopped here:
// the destination resumed exactly this state.
//
//	migrated: epoch=E pages=N total=T ms downtime=D ms (final pause P ms, acknowledged A ms)
func (r *replicator) migrated(w io.Writer, ho *replicate.Handover) error {
	fmt.Fprintf(w, "migrated: epoch=%d pages=%d total=%.1f ms downtime=%.1f ms (final pause %.2f ms, acknowledged %.2f ms) paused-at=%d\n",
		ho.Epoch, ho.Pages, msf(ho.SessionRun), msf(ho.Downtime), msf(ho.Pause), msf(ho.Acked), ho.Paused.UnixNano())
	d := time.Since(r.t0)
	r.summary(w, d, nil)
	if err := summarize(w, r.m, r.first, d); err != nil {
		return err
	}
	fmt.Fprintln(w, "verification passed")
	return nil
}

func msf(d time.Duration) float64 { return float64(d) / 1e6 }

// migrationFailed runs the VM on here, unprotected, after the destination
// could not be reached, until --duration or ctx's end, then verifies it.
func (r *replicator) migrationFailed(ctx context.Context, stopSignals func(), cause error) error {
	fmt.Fprintf(r.stderr, "%s: migration failed: %v: the VM runs on here\n", r.name, cause)
	r.t0, r.first = time.Now(), totals(r.m)
	vo := &VMJob{Duration: r.o.Duration, Quiet: r.o.Quiet}
	if err := vo.watch(ctx, r.m, r.t0, r.stdout); err != nil {
		return err
	}
	stopSignals()
	if err := r.m.Pause(); err != nil {
		return err
	}
	if err := summarize(r.stdout, r.m, r.first, time.Since(r.t0)); err != nil {
		return err
	}
	fmt.Fprintln(r.stdout, "verification passed")
	return &MigrationError{Cause: cause}
}

// diskHint adds to a backup's refusal that is about the disk what the user
// can do about it, in terms of flags: the engine names its own API.
func (r *replicator) diskHint(err error) error {
	var refused *replicate.RefusedError
	if !errors.As(err, &refused) || !strings.Contains(refused.Reason, "disk") {
		return err
	}
	if r.mirror != nil {
		return fmt.Errorf("%w (this primary mirrors --disk %s, %d bytes: the backup needs --disk with an image of exactly that size)", err, r.o.Disk, r.mirror.Size())
	}
	return fmt.Errorf("%w (this primary has no --disk: give it one, or drop the backup's --disk)", err)
}
