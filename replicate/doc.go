// Package replicate is repagent's checkpoint engine: it keeps an exact copy of
// a running VM on a backup host, taken many times a second, and resumes the VM
// there when the primary host dies (Remus-style continuous checkpointing).
//
// It knows VMs only through interfaces it defines: a VMM implements VM on
// the primary (testvm.Machine does; so does the toy VMM of the package
// example, with no KVM at all), gives the backup a way to make replica memory
// and to resume a Checkpoint, and output devices implement OutputGate. A
// device whose contents must travel with the memory implements Stream on the
// primary and Sink on the backup: diskmirror does, so a VMM that writes its
// disk through a diskmirror.Mirror (Config.Stream: diskmirror.NewSource) has
// the disk replicated in the same epochs as the memory (see "Streams" below
// and the package's disk example). The engine knows no disk: a stream's
// bytes are opaque to it.
//
// # Where things are
//
//   - The epoch loop: Primary.epochLoop in primary.go (one pause after
//     another), with the pause's capture in capture.go (lazy capture in
//     lazy.go, auto's guest-cost budget in lazyguest.go), the initial sync
//     and its throttle in converge.go, compressing and sending in sender.go.
//   - The wire format: wire.go, which opens with the session diagram and the
//     backup receiver's table, and holds every payload's encoder and decoder.
//   - The session states: session.go, both sides' (the primary's session from
//     running to unprotected, with its transition table; the backup
//     receiver's states and the messages each accepts).
//   - The backup: serve.go (Serve's accept loop, handshakes with a whole
//     deadline, TLS, at most a few at once, sessions that end before a
//     checkpoint not ending it), backup.go (Handle, staging, apply,
//     failover).
//   - Fencing: lease.go (the primary's rules with a Lease: release only
//     while it is valid, the standby record, fencing on its loss); the
//     backup's side is BackupConfig.Claim, and Serve takes a primary that
//     reconnects while a failover waits to own the VM.
//   - The contracts a VMM and its devices implement: contract.go; the
//     typed errors a caller decides on: errors.go.
//
// # Epochs
//
// A Primary first syncs memory while the guest runs: round 0 sends every page,
// each later round the pages dirtied during the one before, until a round
// leaves at most Config.PrecopyThreshold pages or stops shrinking the set.
// Then, every Config.Interval, one epoch:
//
//  1. Pause every vCPU (VM.Pause).
//  2. Harvest the dirty set (dirtylog.Source: KVM's log plus the VMM's own
//     writes; the pages left over from the sync join the first one).
//  3. Save the machine state (VM.Save).
//  4. Open epoch N+1 on every OutputGate (and the stream): output from
//     now on is N+1's.
//  5. Copy the dirty pages into staging (eager snapshot), on the pausing
//     goroutine and on up to Config.CopyThreads-1 helpers, which take
//     chunks of it if they get a CPU in time (capture.go). With
//     Config.Capture lazy (or auto, run by run from costs measured on the
//     host), write-protect the dirty runs with userfaultfd instead; they
//     are copied behind the running guest, a write to a page not yet copied
//     having it copied first, and the epoch is sent once all are (lazy.go).
//     Auto also keeps what lazy capture costs the guest outside the pause,
//     measured on its vCPU threads, within a budget (lazyguest.go).
//  6. Resume the vCPUs. Steps 1-6 are the pause the guest sees. Then, with
//     a VM that names its vCPU threads (VCPUThreads), read their time
//     outside guest mode since the last resume (EpochStats.VCPUHost).
//  7. While the guest runs, in Config.Workers goroutines (sender.go): find
//     zero pages by a word scan, CRC32C each page once, LZ4 it where the
//     compression policy says it has been paying (compress.go; a region of
//     2 MiB whose pages do not shrink below 97% goes raw, and is probed again
//     later), and send the batches in order with vectored writes straight
//     from staging; then the epoch's stream part (with a stream), then the
//     state, then an end record with a checksum of the epoch's headers and
//     page entries and the memory digest after the epoch.
//  8. On the backup's ack of N: commit N on every gate (its output is
//     released) and report the epoch's EpochStats.
//
// Epochs pipeline, one deep: the guest runs N+1 while N is on the wire, and
// the pause that ends N+1 waits until the sender is done with N, so at most
// one captured epoch waits unsent. When the link (or the backup) is slower
// than the guest dirties memory, epochs grow longer instead of queueing
// (EpochStats.Wait; the guest runs on meanwhile), and the output they hold
// waits no longer than the link makes it. At most Config.MaxInFlight epochs
// are captured and not yet acknowledged. Staging is a ring of
// Config.StagingBytes, freed as epochs are sent; a pause whose pages do not
// fit waits, paused, for room (EpochStats.Stall), and an epoch larger than
// all of staging is sent from guest memory during its pause (stop-and-copy,
// EpochStats.Oversize). Nothing grows without bound.
//
// The initial sync ends by itself when a round leaves at most
// Config.PrecopyThreshold pages (converged), leaves as many as the round
// before (the guest dirties memory as fast as it is sent), or after
// Config.MaxPrecopyRounds; the first checkpoint's pause then copies what is
// left (stop-and-copy into staging). SyncProgress.End says which.
//
// # What a page costs
//
// EpochStats.CPU and BackupCPU are the engine's CPU time on an epoch, primary
// side (the pause's work, the copy helpers, the workers, the sender) and
// backup side (reading the epoch, checking and decoding it, applying it; the
// backup sends its running total in every ack). Both are read from per-thread
// CPU clocks around the work itself, not its waits (internal/cpuclock); the
// vCPUs' threads and the disk stream are not in them.
//
// # The memory digest
//
// Both sides keep a CRC32C per page and a 64-bit digest of all of memory that
// an epoch updates in time proportional to its pages (see digest.go). The
// primary puts the digest in each end record; the backup checks it before it
// acks and returns its own in the ack, which the primary checks too. With
// Config.AuditEvery, the primary also digests all of guest memory in the pause
// and stops if the two differ: dirty tracking missed a page. The backup
// checks every page against the CRC in its entry as it arrives, and every
// epoch against its checksum, page count and the primary's digest, before it
// acks and applies it, so a replica is known to equal, bit for bit, the
// primary's memory at the checkpoint's epoch boundary. With
// BackupConfig.VerifyReplica it also digests the whole replica before
// resuming it (the failover then grows with memory).
//
// # The wire protocol
//
// One TCP connection per session carries framed messages: a 16-byte header
// (type, flags, length, epoch), then a payload. The wire format is
// documented in one place, wire.go: the session diagram, the backup
// receiver's states and which message each accepts, every payload byte by
// byte, the versions spoken (this is version 4; versions 2 and 3 are
// accepted too),
// and how payloads lie in staging on each side. Anything that does not
// decode or breaks the order is a protocol error (ErrProtocol): the backup
// sends reject, ends the session and keeps its last good checkpoint; it
// never applies part of an epoch (save a stream's sync messages, see
// "Streams").
//
// # Streams
//
// With Config.Stream, a device's contents travel with the memory; the
// backup makes the stream's Sink with BackupConfig.NewSink, and a session
// whose two sides disagree (a stream and no sink, or a sink refusing the
// stream's size) is refused at hello, with nothing written. The disk
// (diskmirror.Source and diskmirror.NewSink) is the stream this project has:
// the VMM writes its disk through a diskmirror.Mirror, which writes the
// local image at once and logs each write under the open epoch. A session
// with a disk:
//
//	primary                                   backup
//	   |---- hello (stream size, block size) -->|  NewSink (size checked)
//	   |<--- welcome, stream-reply ... ---------|  hash the backup image
//	   |---- stream-sync(0) ... --------------->|  precopy: the blocks that
//	   |                                        |  differ, then the blocks the
//	   |                                        |  guest wrote meanwhile
//	   |---- pages(0) ... end(0) -------------->|  memory's sync
//	   |---- stream-sync(0) ... --------------->|  catch-up: blocks written
//	   |     (pause 1: stream opens epoch 2)    |  during memory's sync
//	   |---- pages(1) stream-sync(1) state end >|  residual: blocks still
//	   |                                        |  dirty at pause 1, as then
//	   |---- pages(2) stream(2)... state end -->|  epoch 2's writes, verified
//	   |<--- ack(2) ----------------------------|  then applied with memory
//
// The stream's epochs are the engine's, but its first one opens at the
// first pause (Open(2)): what it holds before belongs to the sync, and the
// first checkpoint carries what the sync left (SyncResidual) instead of an
// epoch's part. Sync messages are applied when they arrive, each verified
// whole by the sink, those of the first checkpoint too: the one exception
// to "never part of an epoch", and a harmless one, since until the first
// checkpoint is complete there is nothing to resume (ErrNoCheckpoint) and a
// new session syncs again; every later checkpoint carries its epoch's whole
// part before its state, under the epoch's checksum, and the backup commits
// it (a disk: the writes in order, then fsync) right after the memory of
// the same epoch, once the epoch is verified and acknowledged. A
// checkpoint's memory and stream are therefore one: the replica and the
// backup image always hold the same epoch, and a checkpoint without its
// part, with a part that does not verify (a disk's record checksum, a write
// past the end, another epoch's part), or with stream data after its state
// is a protocol error, and nothing of it is applied. At failover the sink
// holds the checkpoint resumed (Failover.Stream), and the VMM's Resume
// opens the disk.
//
// The guest's flushes and FUA writes are honoured on the primary's image
// (diskmirror.Mirror.Sync); on the backup every applied epoch is made
// durable. A disk write is not output the world sees, so the mirror holds
// nothing back: it only keeps each epoch's writes until the backup has them.
//
// # Failover
//
// The backup deems the primary lost when the connection ends (EOF, reset,
// a stream cut inside a message) or nothing arrives for the heartbeat timeout
// (BackupConfig.HeartbeatTimeout; by default 5 intervals, at least
// MinHeartbeatTimeout). It then drops the epoch in progress (complete epochs
// are applied as soon as they are verified, so none is pending), with
// BackupConfig.VerifyReplica digests the replica against its checkpoint
// (ErrReplicaCorrupt if they differ), and calls
// BackupConfig.Resume with the Checkpoint: the state and the replica file,
// which the VMM maps directly (testvm.Restore does), without a copy. With a
// stream, the backup first brings its sink to the checkpoint's epoch
// (Sink.Failover: nothing later is applied). A primary
// lost before its first checkpoint leaves nothing to resume (ErrNoCheckpoint:
// Handle returns it, Serve waits for the next primary unless
// BackupConfig.Once); one that said bye, nothing to fail over
// (ErrPrimaryStopped).
//
// The replica is always the last checkpoint the backup acknowledged, or one
// past the last ack the primary received (the ack was lost with the primary).
// Either way no output was released for a later epoch, so what the outside
// world saw never runs ahead of the resumed guest.
//
// Only the current session's checkpoint is ever resumed. When the backup
// refuses a session, the primary goes on unprotected and releases its output,
// so an older replica may be behind what the world has seen; a new session
// starts a new replica.
//
// The primary deems the backup lost on the same signs. It keeps the guest
// running, releases the gates (OutputGate.Release: output flows,
// unprotected), logs it loudly, and Run returns a *BackupLostError (it wraps
// ErrBackupLost and the cause, down to the errno). When replication fails on the primary while the link works
// (its VM, a gate, an audit, a replica whose digest diverged), the primary
// sends reject and half-closes: the backup ends the session without failing
// over, since the VM goes on (or failed) on the primary. Only silence or a
// dead connection makes a failover. When it was the VM itself that failed
// (its pause, save or resume), the gates first discard the output of the
// epochs after the last ack (OutputGate.Discard): no one will run on from
// the state that produced it.
//
// Output before replication is not held: the gates see their first Open when
// Run starts, so what the guest sends before (while nothing protects it)
// flows, and epoch 1 holds what it sends from then on, through the initial
// sync, until the first checkpoint is acknowledged.
//
// Without a lease, a partition between two live hosts makes both sides
// think the other dead: the primary releases its output and runs on, the
// backup resumes a second copy. With Config.Lease and BackupConfig.Claim
// (protect.Fence: the VM's owner key in etcd), the primary releases output
// only while its lease is valid and fences the VM when it cannot know it
// is, and the backup resumes only once it owns the VM and the standby
// record names its session; the rules are in lease.go. A fenced primary
// ends its session as a dead one would, so the backup takes over once it
// owns the VM; Run returns a *FencedError (ErrFenced).
//
// Both sides measure silence, not transfer time: every read pushes the read
// deadline out, and a write that moves no byte for the heartbeat timeout
// fails only if the peer, too, showed no progress in that time (acks, or
// heartbeats whose progress count moved). A slow link that keeps moving
// bytes is alive, and so is a full one whose far end is busy applying a
// large epoch: a busy link is never taken for a dead peer.
package replicate
