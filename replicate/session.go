package replicate

import "sync"

// This file holds the states of a session on both sides: the primary's, from
// running to its end (sessState), and the backup's receiver, which takes each
// message of the primary's only in the states wire.go's table lists
// (recvState).

// The primary's session with its backup is a state machine. Whoever ends
// the session (the epoch loop, the sender, the reader, the heartbeat, Run's
// own end) fires an event; the table below says what the event does in each
// state, and an event the table does not list does nothing, so the first
// reason to end a session is the one that stands.
//
//	running ──abort(reason)──► stopping ──end──► ended ──release──► unprotected
//	 │  └──────────bye───────────┘                  ▲
//	 └──────────────────end(err)────────────────────┘
//
// The states:
//
//   - running: epochs are captured, sent and acknowledged; the gates hold
//     each epoch's output until its ack.
//   - stopping: this side is ending the session while the link works. After
//     abort the backup was sent a reject with the reason (a failed VM, gate
//     or audit, a replica that diverged, a backup that broke the protocol),
//     so it does not fail over to a VM that goes on running here; after bye
//     every epoch was acknowledged and the backup was told the primary stops
//     on purpose. Either way the connection is half-closed and the reader
//     waits for the backup to hang up.
//   - ended: the session is over and the connection closed. Its error is
//     the abort's reason if there was one, else the first end's: the link
//     failed or went silent (the backup is lost), the backup rejected the
//     session, or the primary stopped replication.
//   - unprotected: the gates were released (Release): output passes
//     unheld, and no gate is opened, committed or discarded again.
//
// Run's result follows from the state: a session aborted by this side is
// "replication stopped: reason"; one that ended without an abort or bye
// lost its backup (*BackupLostError); one that said bye ended on purpose.
type sessState uint8

const (
	sessNone        sessState = iota // not a state: the table's "no transition"
	sessRunning                      // replicating
	sessStopping                     // abort or bye sent, waiting for the backup to hang up
	sessEnded                        // over, with its error
	sessUnprotected                  // over, and the gates released
)

var sessStateNames = [...]string{"none", "running", "stopping", "ended", "unprotected"}

func (s sessState) String() string { return sessStateNames[s] }

// sessEvent is what happens to a session.
type sessEvent uint8

const (
	evAbort   sessEvent = iota // this side ends the session while the link works: send a reject
	evBye                      // this side ends the session on purpose, every epoch acknowledged: send bye
	evEnd                      // the session is over: close the connection
	evRelease                  // release the gates
	sessEvents
)

var sessEventNames = [...]string{"abort", "bye", "end", "release"}

func (e sessEvent) String() string { return sessEventNames[e] }

// sessNext is the transition table: the state an event leads to from each
// state, sessNone where the event does nothing.
var sessNext = [...][sessEvents]sessState{
	sessRunning:     {evAbort: sessStopping, evBye: sessStopping, evEnd: sessEnded},
	sessStopping:    {evEnd: sessEnded},
	sessEnded:       {evRelease: sessUnprotected},
	sessUnprotected: {},
}

// primarySession is one primary session's state, its error and a channel closed
// when it ends. The zero value is not usable: see newSession.
type primarySession struct {
	mu       sync.Mutex
	st       sessState
	abortErr error // the reason of the abort that was taken, if any
	err      error // why the session ended, set before done is closed
	done     chan struct{}
}

func newPrimarySession() *primarySession {
	return &primarySession{st: sessRunning, done: make(chan struct{})}
}

// fire applies ev and reports whether the table took it. err is the reason,
// for evAbort and evEnd; an end after an abort keeps the abort's reason.
// The caller does what a taken event means (send the reject or the bye,
// close the connection, release the gates), and only then.
func (s *primarySession) fire(ev sessEvent, err error) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	next := sessNext[s.st][ev]
	if next == sessNone {
		return false
	}
	switch ev {
	case evAbort:
		s.abortErr = err
	case evEnd:
		if s.abortErr != nil {
			err = s.abortErr
		}
		s.err = err
		close(s.done)
	}
	s.st = next
	return true
}

// state is the session's state now.
func (s *primarySession) state() sessState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st
}

// ended reports whether the session is over.
func (s *primarySession) ended() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// cause is why the session ended (nil while it has not).
func (s *primarySession) cause() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// aborted is the reason this side aborted the session, nil if it did not.
func (s *primarySession) aborted() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.abortErr
}

// recvState is where a backup's session is in the protocol: the states and
// the messages legal in each are wire.go's table ("The backup's receiver").
type recvState uint8

const (
	awaitHello recvState = iota // nothing yet
	syncRound                   // the initial sync, epoch 0
	ckptData                    // checkpoint N before its state
	ckptState                   // checkpoint N after its state
	closed                      // the session ended
)

var recvStateNames = [...]string{"await-hello", "sync-round", "checkpoint-data", "checkpoint-state", "closed"}

func (st recvState) String() string { return recvStateNames[st] }

// msgSet is a set of message types, a bit per type.
type msgSet uint32

func msgs(ts ...MsgType) msgSet {
	var m msgSet
	for _, t := range ts {
		m |= 1 << t
	}
	return m
}

// recvAccepts is the message types legal from the primary in each state;
// the conditions beside the table in wire.go are checked by admit and the
// handlers.
var recvAccepts = [...]msgSet{
	awaitHello: msgs(MsgHello),
	syncRound:  msgs(MsgPages, MsgStreamSync, MsgEnd, MsgHeartbeat, MsgBye, MsgReject),
	ckptData:   msgs(MsgPages, MsgStreamSync, MsgStreamEpoch, MsgState, MsgEnd, MsgHeartbeat, MsgBye, MsgHandover, MsgReject),
	ckptState:  msgs(MsgPages, MsgEnd, MsgHeartbeat, MsgReject),
	closed:     0,
}

// accepts reports whether a message of type t is legal in st.
func (st recvState) accepts(t MsgType) bool { return t < msgTypes && recvAccepts[st]&(1<<t) != 0 }

// isData reports whether t carries part of an epoch (and so its epoch).
func isData(t MsgType) bool {
	return msgs(MsgPages, MsgStreamSync, MsgStreamEpoch, MsgState, MsgEnd)&(1<<t) != 0
}
