package replicate

import (
	"io"
	"time"
)

// A Stream is a device whose contents travel with the VM's memory, inside
// its checkpoints: a disk mirrored to the backup is one (diskmirror.Source
// implements it). The engine does not know what the bytes mean. It sends
// the stream's initial sync between its own, carries each epoch's part
// inside the checkpoint under the epoch's checksum, ordered with the memory
// and the machine state, and the backup's Sink gives them meaning.
//
// The engine drives a Stream as an OutputGate (Open in the pause, Commit on
// the ack, Discard, Release) and, for one session, in this order:
//
//	Info, ReplySize           the hello describes the stream
//	Attach                    the backup's sink answered (e.g. its image's hashes)
//	Sync(SyncPrecopy)         before the memory's initial sync: the bulk
//	Sync(SyncCatchUp)         after it: what changed meanwhile
//	Open(2)                   in the first checkpoint's pause
//	Sync(SyncResidual)        inside checkpoint 1: what was left at its pause
//	Epoch(n), n ≥ 2           inside checkpoint n: what epoch n wrote
//
// Output the stream holds for epoch 1 (before Open(2)) belongs to the sync:
// the stream must not hold it back. Each sync message is at most
// MaxStreamMessage bytes; an epoch's part may be of any length (the engine
// sends it in pieces).
type Stream interface {
	OutputGate
	// Info describes the stream for the hello; Size is not 0.
	Info() StreamInfo
	// ReplySize is the length of the sink's reply the stream expects for
	// info, which the engine reads before Attach; 0 for none.
	ReplySize() int64
	// Attach takes the backup sink's reply. An error means the reply is
	// malformed: the session ends with a protocol error.
	Attach(reply []byte) error
	// Sync runs one phase of the initial sync, passing each message to send,
	// and reports it.
	Sync(phase SyncPhase, send func(msg []byte) error) (StreamSync, error)
	// Epoch returns epoch n's part, to be read to its end, and what it holds.
	// The engine calls it once per epoch, after the pause that closed n.
	Epoch(n uint64) (io.Reader, StreamEpoch, error)
}

// StreamInfo is what the hello says of a Stream: a device of Size bytes
// synced in blocks of Block bytes. Both are 0 for a session without one.
type StreamInfo struct {
	Size  int64
	Block uint32
}

// SyncPhase names a phase of a Stream's initial sync.
type SyncPhase int

const (
	SyncPrecopy  SyncPhase = iota // the bulk, before the memory's sync
	SyncCatchUp                   // what changed during the memory's sync
	SyncResidual                  // inside checkpoint 1: what was still changed at its pause
)

var syncPhaseNames = [...]string{"precopy", "catch-up", "residual"}

func (p SyncPhase) String() string {
	if p >= 0 && int(p) < len(syncPhaseNames) {
		return syncPhaseNames[p]
	}
	return "unknown"
}

// MaxStreamMessage is the most bytes in one sync message of a Stream (the
// backup's sink applies each whole): a message's payload limit.
const MaxStreamMessage = MaxPayload

// StreamSync reports a phase of a Stream's sync in the stream's units (a
// disk's blocks).
type StreamSync struct {
	// Units is the device's size in units; Unchanged, how many the backup
	// already held (the precopy phase skips them).
	Units, Unchanged int
	// Rounds is the rounds the phase sent.
	Rounds int
	// Sent is the units sent; Bytes, their data; Encoded, the messages'
	// bytes; Messages, how many.
	Sent     int
	Bytes    int64
	Encoded  int64
	Messages int
	// Left is the units still to send after the phase.
	Left int
}

// StreamEpoch is what an epoch's part of a Stream holds: Records (a disk's
// writes) of Bytes of data, encoded in Encoded bytes (the reader's length).
type StreamEpoch struct {
	Records int
	Bytes   int64
	Encoded int64
}

// StreamSyncProgress reports a phase of the stream's sync to
// Config.OnStreamSync.
type StreamSyncProgress struct {
	Phase SyncPhase
	StreamSync
	// WireBytes is the phase's messages on the wire, headers included.
	WireBytes uint64
	// Took is the phase's time on the primary.
	Took time.Duration
}

// A Sink is the backup's half of a Stream: it keeps the device (a disk
// image) equal to the primary's at the checkpoint the replica holds. The
// session's goroutine calls it, in the order of the Stream's; Receive runs
// on a goroutine of its own while the epoch's part arrives, and returns
// before anything else is called.
//
// An error of a Sink that wraps ErrProtocol means the primary's data is at
// fault (malformed, out of order): the session ends with a protocol error.
// Any other error is the backup's own (an I/O error on its device).
type Sink interface {
	// Reply is the answer to the hello that the primary's Attach takes, of
	// the Stream's ReplySize bytes. The backup sends heartbeats while it is
	// computed.
	Reply() ([]byte, error)
	// ApplySync applies one sync message at once: before the first
	// checkpoint the replica holds none, and checkpoint 1's residual must be
	// in place before epoch 2's part.
	ApplySync(msg []byte) error
	// Receive reads epoch n's part (n ≥ 2) to its end, verifying and keeping
	// it, and returns the epoch it says it carries. It applies nothing yet.
	Receive(r io.Reader) (epoch uint64, err error)
	// Commit applies every epoch received up to n: checkpoint n is complete.
	Commit(n uint64) error
	// Failover brings the device to checkpoint n, the one resumed, drops
	// anything later, and makes it durable.
	Failover(n uint64) error
	// Close drops every epoch received and not committed.
	Close() error
}

// NewSink makes the backup's Sink for a session whose primary sends the
// stream info describes. An error refuses the session with its text.
type NewSink func(info StreamInfo) (Sink, error)
