package replicate

import (
	"errors"
	"fmt"
	"time"
)

// A planned migration is a session that ends with a switchover instead of
// a bye: Handover asks Run to make its next pause the last. The VM stays
// paused after it; that final epoch is sent and acknowledged like any other
// (its output is released on the ack: the backup holds it), then the
// primary sends handover, the backup resumes the checkpoint and answers
// resumed, and Run returns nil: the VM runs on the backup, and the caller
// stops its own, paused, copy. Downtime is from the final pause to the
// resumed message, which is later than the backup's first guest
// instruction by one trip over the link.
//
// If the backup refuses or dies before the handover was sent (a reject, or
// the connection closes), it does not run the VM: Run resumes the VM here
// and ends as a lost backup does (the VM runs on unprotected), with a
// *HandoverError naming the cause; so it does when the backup rejects the
// handover itself. Once the handover is sent, a connection that closes or
// falls silent may have lost the backup's answer (it heartbeats while it
// restores): the VM may run there, the primary cannot tell, so it leaves
// its copy paused and Run returns a *HandoverError with Unconfirmed set.

// Handover is what a planned switchover did and how long it took.
type Handover struct {
	Epoch      uint64        // the final epoch, which the backup resumed
	Pages      int           // its dirty pages
	Paused     time.Time     // the final pause began
	Pause      time.Duration // the final pause (the VM stays stopped after it)
	Acked      time.Duration // from the final pause to its ack
	Downtime   time.Duration // from the final pause to the backup's word that the VM runs there
	SessionRun time.Duration // from Run's start to the handover's end: the migration's total time
}

// HandoverError is Run's error when a handover did not complete.
type HandoverError struct {
	Epoch uint64
	Cause error
	// Unconfirmed: the backup fell silent after the handover; the VM here
	// stays paused (it may run there). Otherwise the backup refused or
	// died, and the VM runs on here, unprotected.
	Unconfirmed bool
}

func (e *HandoverError) Error() string {
	if e.Unconfirmed {
		return fmt.Sprintf("handover of epoch %d unconfirmed: %v (the VM stays paused here: it may run on the backup)", e.Epoch, e.Cause)
	}
	return fmt.Sprintf("handover of epoch %d failed: %v (the VM runs on here)", e.Epoch, e.Cause)
}

func (e *HandoverError) Unwrap() error { return e.Cause }

// Handover asks Run, once its initial sync is over, to end the session with
// a switchover (see above). It returns at once; Run reports the outcome,
// and HandedOver the record. It refuses, and the session goes on, for a
// fenced VM (its lease would have to pass to the backup) and, once the
// session's version is known, for a backup older than version 4.
func (p *Primary) Handover() error {
	if p.cfg.Lease != nil {
		return errors.New("a handover of a fenced VM is not supported: its lease would have to pass to the backup")
	}
	if v := p.sessionVersion.Load(); v != 0 && v < 4 {
		return fmt.Errorf("the backup speaks protocol version %d, which has no handover (version 4 has)", v)
	}
	p.hoOnce.Do(func() { close(p.hoReq) })
	return nil
}

// errStopped: the epoch loop's context ended.
var errStopped = errors.New("stopped")

// HandedOver is the record of a completed handover (nil before, or if it
// did not complete). Read it once Run returned.
func (p *Primary) HandedOver() *Handover { return p.handedOver }

// A handover converges before its final pause, as QEMU's migration
// iterates until what is left fits its downtime limit: each round
// acknowledges every epoch in flight (so the next one queues behind
// nothing), then checkpoints at once, so that it holds only what the
// guest dirtied during the previous round's pause and ack, which shrinks
// while the link outruns the guest. The final pause comes when the last
// round held at most convergePages pages, stopped shrinking by a quarter,
// or after maxConvergeRounds rounds; it then holds what the guest dirtied
// during that round's ack alone.
const (
	convergePages     = 64
	maxConvergeRounds = 8
)

type convergence struct {
	rounds int
	pages  int // the last round's dirty pages
}

// converged reports whether the next pause is the final one, last being
// the epoch just acknowledged, and counts a round if not.
func (c *convergence) converged(last *epochJob) bool {
	n := 0
	if last != nil {
		n = last.stats.DirtyPages
	}
	done := c.rounds >= maxConvergeRounds || n <= convergePages || (c.rounds > 0 && 4*n > 3*c.pages)
	if !done {
		c.rounds++
		c.pages = n
	}
	return done
}

// errFinal ends the epoch loop after the final pause of a handover.
var errFinal = errors.New("final pause of a handover")

// handover runs after the final pause (epoch final, the VM paused): wait
// for its ack, send handover, wait for resumed.
func (p *Primary) handover(final uint64, st *EpochStats, t0 time.Time) error {
	// resume gives up: the VM runs on here, unprotected (Run's error is
	// then a *HandoverError around what unprotected returns).
	resume := func(cause error) error {
		if rerr := p.cfg.VM.Resume(); rerr != nil {
			return &HandoverError{Epoch: final, Cause: errors.Join(cause, vmFailure{fmt.Errorf("resume VM: %w", rerr)})}
		}
		p.cfg.Log.Error("HANDOVER FAILED: the VM runs on here", "epoch", final, "cause", cause)
		return &HandoverError{Epoch: final, Cause: p.unprotected(cause)}
	}
	tick := time.NewTicker(p.cfg.HeartbeatTimeout / 8)
	defer tick.Stop()
	p.backupProgressed()
	for p.lastAcked.Load() < final {
		select {
		case <-p.sess.done:
			return resume(p.sess.cause())
		case <-p.finalAcked: // the reader's word, at once: this wait is downtime
		case <-tick.C:
		}
		if p.lastAcked.Load() < final && !p.backupWorking() {
			return resume(fmt.Errorf("epoch %d not acknowledged: the backup showed no progress for %v", final, p.cfg.HeartbeatTimeout))
		}
	}
	acked := time.Since(st.Start)
	if !p.sess.fire(evBye, nil) { // aborted or ended meanwhile
		return resume(p.sess.cause())
	}
	unconfirmed := func(cause error) error {
		p.fail(cause)
		p.cfg.Log.Error("HANDOVER UNCONFIRMED: the VM stays paused here; it may run on the backup", "epoch", final, "cause", cause)
		return &HandoverError{Epoch: final, Unconfirmed: true, Cause: cause}
	}
	if err := p.writeMsg(encodeMsg(nil, MsgHandover, final, nil)); err != nil {
		return unconfirmed(fmt.Errorf("send handover: %w", err)) // some of it may have gone
	}
	select {
	case <-p.resumed:
	case <-p.sess.done:
		// The backup closes the link right after its answer, and the
		// reader may have seen both by now: the answer counts.
		select {
		case <-p.resumed: // confirmed
		default:
			// Once the backup has the handover, only its reject says it
			// does not run the VM: a link that closes or falls silent (the
			// backup heartbeats while it restores) may have lost its answer.
			cause := p.sess.cause()
			if _, ok := errors.AsType[*backupRejected](cause); ok {
				return resume(cause)
			}
			return unconfirmed(cause)
		}
	case <-time.After(p.cfg.HeartbeatTimeout + handoverRestore):
		return unconfirmed(fmt.Errorf("no answer within %v", p.cfg.HeartbeatTimeout+handoverRestore))
	}
	now := time.Now()
	p.handedOver = &Handover{Epoch: final, Pages: st.DirtyPages, Paused: st.Start, Pause: st.Pause, Acked: acked,
		Downtime: now.Sub(st.Start), SessionRun: now.Sub(t0)}
	p.fail(errors.New("handed over"))
	p.cfg.Log.Info("handed over", "epoch", final, "downtime", p.handedOver.Downtime)
	return nil
}

// handoverRestore is how long, beyond the heartbeat timeout, a backup may
// take to restore the VM before it answers a handover.
const handoverRestore = 10 * time.Second
