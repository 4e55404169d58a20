package replicate

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Fencing: a primary that may be cut off from its backup releases nothing
// it cannot prove the backup could take back.
//
// Without a lease, a primary that loses its backup releases the output it
// held and runs on: right when the backup is dead, a split brain when only
// the link is, since the backup then resumes a second copy. With a lease
// (Config.Lease: the VM's owner key in etcd, replicate/fence), the engine
// keeps three rules:
//
//  1. Output of an epoch (network frames, disk commits: every gate's Commit)
//     is released only while the lease is known valid. A backup takes over
//     only once the lease has expired, so nothing is released after it
//     resumed.
//  2. Before a session releases anything, the lease records that session's
//     backup as the VM's standby (Lease.SetStandby). A backup resumes only
//     the session the record names: a backup with a replica of an older
//     session never resumes it.
//  3. Output held when the backup is lost is released only after the record
//     says that no backup holds the VM (SetStandby with a zero session):
//     from then on no backup resumes an older checkpoint than what clients
//     saw. If that cannot be written (etcd unreachable too), the output
//     stays held.
//
// When the lease is lost (Lease.Lost closes), or a rule cannot be kept, the
// engine fences: it releases nothing more, ends the session as a lost link
// would (so a backup that hears of it takes over once it owns the VM),
// pauses the VM, and Run returns a *FencedError.

// Lease is the primary's ownership of its VM in a coordination service both
// hosts trust (replicate/fence.Owner implements it). See "Fencing" above.
type Lease interface {
	// Valid reports whether the lease is known valid now, with a margin for
	// the time it takes to act on it.
	Valid() bool
	// Lost is closed once the lease can no longer be known valid.
	Lost() <-chan struct{}
	// Cause is why Lost closed (nil before).
	Cause() error
	// SetStandby records, under the lease, which backup session holds the
	// VM's state: session, or none for a zero one. It returns an error
	// unless the record is known written while the lease was valid.
	SetStandby(ctx context.Context, session SessionID) error
}

// checkLease refuses to start a session without a valid lease.
func (p *Primary) checkLease() error {
	if l := p.cfg.Lease; l != nil && !l.Valid() {
		return fmt.Errorf("%w: the VM's lease is not valid at the start of replication (%v)", ErrFenced, leaseCause(l))
	}
	return nil
}

// watchLease fences the VM when its lease is lost, until the session ends.
// Run calls it once the connection is set up, and ends the session however
// it returns from then on, so the watch never outlives it.
func (p *Primary) watchLease() {
	l := p.cfg.Lease
	if l == nil {
		return
	}
	go func() {
		select {
		case <-l.Lost():
			p.fence(fmt.Errorf("lease lost: %w", leaseCause(l)))
		case <-p.sess.done:
			// Lost after the session ended is checked where output would
			// be released (releaseGates), and by the embedder while the VM
			// runs unprotected.
		}
	}()
}

// leaseCause is why l is not valid: its Cause, or that its validity ran
// out (Valid turns false a moment before Lost closes).
func leaseCause(l Lease) error {
	if err := l.Cause(); err != nil {
		return err
	}
	return errors.New("lease validity ran out")
}

// leaseWait bounds a standby record's write.
func (p *Primary) leaseWait() time.Duration { return p.cfg.HeartbeatTimeout / 2 }

// commit releases the output of every epoch up to n (the backup
// acknowledged n), if the lease allows it (rules 1 and 2). It runs on the
// reader's goroutine.
func (p *Primary) commit(n uint64) error {
	l := p.cfg.Lease
	if l != nil && !p.standbySet {
		if !l.Valid() {
			p.fence(fmt.Errorf("lease not valid at the ack of epoch %d", n))
			return nil
		}
		err := p.recordStandby(p.Session())
		if err != nil {
			// Nothing is released yet; the next ack tries again.
			p.cfg.Log.Warn("record this session's backup as the VM's standby: output held", "epoch", n, "err", err)
			return nil
		}
		p.standbySet = true
	}
	p.gmu.RLock()
	if p.fenced != nil || p.sess.state() == sessUnprotected {
		p.gmu.RUnlock()
		return nil
	}
	if l != nil && !l.Valid() {
		p.gmu.RUnlock()
		p.fence(fmt.Errorf("lease not valid at the ack of epoch %d", n))
		return nil
	}
	defer p.gmu.RUnlock()
	for _, g := range p.gates {
		if err := g.Commit(n); err != nil {
			return fmt.Errorf("output gate: %w", err)
		}
	}
	p.lastCommit.Store(n)
	p.lastCommitAt.Store(time.Now().UnixNano())
	return nil
}

// clearStandby records, before held output is released because the session
// ended, that no backup holds the VM (rule 3). Without a lease it does
// nothing.
func (p *Primary) clearStandby() error {
	l := p.cfg.Lease
	if l == nil {
		return nil
	}
	if err := p.recordStandby(SessionID{}); err != nil {
		return fmt.Errorf("cannot record that no backup holds the VM, so its held output stays held: %w", err)
	}
	return nil
}

// errStandbyCleared refuses a session's standby once "none" was recorded.
var errStandbyCleared = errors.New("the session ended: no backup holds the VM")

// recordStandby writes the standby record, one write at a time: once "none"
// was recorded (the session ended, its held output about to be released),
// a late write of the session's own, from an ack still being read, could
// make a stale replica resumable, and is refused.
func (p *Primary) recordStandby(session SessionID) error {
	p.smu.Lock()
	defer p.smu.Unlock()
	if !session.IsZero() && (p.standbyCleared || p.sess.state() != sessRunning) {
		return errStandbyCleared
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.leaseWait())
	defer cancel()
	if err := p.cfg.Lease.SetStandby(ctx, session); err != nil {
		return err
	}
	if session.IsZero() {
		p.standbyCleared = true
	}
	return nil
}

// fence releases nothing from now on and ends the session. The first cause
// stands. It does nothing once the gates were released: the VM then runs
// unprotected, and its embedder fences it on the lease's loss.
func (p *Primary) fence(cause error) {
	p.gmu.Lock()
	p.fenceLocked(cause)
	p.gmu.Unlock()
	p.fail(p.fencedErr())
}

// fenceLocked is fence's first half, with gmu held.
func (p *Primary) fenceLocked(cause error) {
	if p.fenced != nil || p.sess.state() == sessUnprotected {
		return
	}
	f := &FencedError{Cause: cause, LastCommitted: p.lastCommit.Load(), At: time.Now()}
	if ns := p.lastCommitAt.Load(); ns != 0 {
		f.LastRelease = time.Unix(0, ns)
	}
	p.fenced = f
	p.cfg.Log.Error("FENCED: releasing no more output; the VM will be paused", "cause", cause, "last-released-epoch", f.LastCommitted)
}

// fencedErr is the fence's error, nil if the engine did not fence.
func (p *Primary) fencedErr() error {
	p.gmu.RLock()
	defer p.gmu.RUnlock()
	if p.fenced == nil {
		return nil
	}
	return p.fenced
}

// pauseFenced pauses a fenced VM at the end of Run and returns the fence's
// error, or err if the engine did not fence.
func (p *Primary) pauseFenced(err error) error {
	f := p.fencedErr()
	if f == nil {
		return err
	}
	if perr := p.cfg.VM.Pause(); perr != nil {
		return errors.Join(f, fmt.Errorf("pause the fenced VM: %w", perr))
	}
	return f
}
