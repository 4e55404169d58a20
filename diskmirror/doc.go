// Package diskmirror mirrors a VM's disk to the backup, epoch by epoch, so
// that the backup's image always equals the primary's at the last committed
// epoch (property P4), and brings the backup's image up to date before the
// first epoch while the guest runs (the initial sync). It is the
// transport-independent core: it produces and consumes byte streams, and a
// transport carries them. repagent's engine (package replicate) is that
// transport: Source makes a Mirror the engine's device stream
// (replicate.Config.Stream) and NewSink makes a Replica its sink on the
// backup (replicate.BackupConfig.NewSink); the engine carries each epoch's
// stream inside its own epoch, so memory and disk commit together.
//
// # The primary: Mirror
//
// A Mirror sits on the VMM's disk write path with an io.WriterAt-style API
// (any VMM can use it: WriteAt, WriteAtFUA, Sync, ReadAt). Each write goes to
// the local image at once, and is logged as a write record under the open
// epoch; writes are serialized, so the log's order is the image's. Sync is
// the guest's flush (fsync of the local image) and WriteAtFUA a write with
// forced unit access (write, then fsync): both are honoured on the primary;
// the backup makes every epoch durable when it applies it, so neither needs
// a record. Mirror implements replicate.OutputGate:
//
//   - Open(n), in the engine's pause: ends epoch n-1 (its end record is
//     written) and starts n. Epochs open in order.
//   - Epoch(n): the transport takes closed epoch n's encoded stream.
//   - Commit(n), on the backup's ack (may run while Open does): frees the
//     records of every epoch up to n.
//   - Discard(n): drops the epochs after n; Release: drops everything and
//     stops logging (the VM runs unprotected).
//
// A write beyond the end of the image is refused with ErrRange and writes
// nothing. A write the log cannot keep (its spill file fails) is reported to
// the caller and makes Epoch fail for that epoch: never dropped silently.
//
// # The backup: Replica
//
// A Replica is made over the backup image for the size the primary declares
// (another size: ErrImageSize, nothing written). Receive reads epoch n's
// stream and verifies all of it (format, epoch n is the one after the last,
// every record inside the image, every checksum, the end record, nothing
// after it) before keeping it pending; a stream that fails is dropped whole,
// with an error naming the problem, and the image is untouched. Commit(n)
// applies the pending epochs up to n in order, each in the order its writes
// were made (overlapping writes land as on the primary), re-checking the
// checksums as it reads them back, then fsyncs the image. Failover(n)
// applies every epoch up to n, the last acknowledged, discards the rest, and
// closes the Replica.
//
// # Epoch and sync streams
//
// Version 1; every integer little-endian. A stream is a 32-byte header, the
// write records, and an end record:
//
//	stream header
//	0   magic      "DISKMIRR"
//	8   version    uint16 (1; a reader accepts MinVersion to Version)
//	10  kind       uint16 (1 epoch, 2 sync, 3 hash list; 0 invalid)
//	12  blockSize  uint32 (sync and hash list; 0 in an epoch stream)
//	16  imageSize  uint64 (must equal the reader's image size)
//	24  epoch      uint64 (epoch stream: n >= 1; others 0)
//
//	record header (32 bytes), then length bytes of data for a write
//	0   type       uint16 (1 write, 2 end; 0 invalid)
//	2   flags      uint16 (0)
//	4   length     uint32 write: data bytes, 1 to MaxRecordData (1 MiB)
//	                      end: number of write records
//	8   epoch      uint64 (the stream's)
//	16  offset     uint64 write: byte offset, offset+length <= imageSize
//	                      end: total data bytes of the writes
//	24  crc        uint32 write: CRC32C of the data
//	                      end: CRC32C of every stream byte before the end
//	                      record (stream header included)
//	28  reserved   uint32 (0)
//
// The format is canonical: a stream that decodes re-encodes to the same
// bytes (the fuzz tests check it). A write longer than MaxRecordData is split
// into consecutive records. A sync stream is the same with kind 2, epoch 0,
// and records that are each one whole block (aligned; the last block of the
// image may be short). The decoders (DecodeEpoch, DecodeSync, DecodeHashes,
// and Replica.Receive, which streams) return an error wrapping ErrFormat (and
// ErrRange, ErrImageSize or ErrEpoch where that is the problem) and no
// result.
//
// # The initial sync
//
// Before the first epoch, while the guest runs:
//
//	primary                                   backup
//	                                            Replica.Hashes(block)
//	   |<--- hash list (kind 3) -----------------|  EncodeHashes
//	   |  DecodeHashes; Precopy:                 |
//	   |    StartSync (track dirty blocks)       |
//	   |    HashImage(local), DiffBlocks         |
//	   |---- sync streams: differing blocks ---->|  ApplySync (verified, then
//	   |---- sync streams: blocks written ------>|  applied at once)
//	   |       during the last round (repeat)    |
//	   |  (other work: the engine syncs memory)  |
//	   |  CatchUp: rounds of the blocks written  |
//	   |---- sync streams ---------------------->|  ApplySync
//	   |  engine's pause: Open(1) ends the sync; |
//	   |  the blocks still dirty are the residual|
//	   |---- SendResidual: sync streams -------->|  ApplySync
//	   |---- epoch 1, 2, ... ------------------->|  Receive, Commit
//
// A hash list is the stream header (kind 3), one 16-byte hash per block, and
// a CRC32C of all that. A block's hash is the first 128 bits of its SHA-256:
// the guest chooses the primary's bytes, so a CRC (linear, forgeable) could
// let it make a block that matches a stale backup block and is never sent;
// truncated SHA-256 is collision-resistant for this use (2^64 work) and fast
// with SHA-NI, and all-zero blocks (sparse images) are recognised without
// hashing. The default block is 1 MiB (DefaultBlockSize): a hash list of
// 16 KiB per GiB, at the cost of resending a MiB for a small write during the
// sync; blocks are 4 KiB to 1 MiB, at most MaxBlocks per image.
//
// Writes made during the sync mark their blocks dirty; each round sends the
// blocks dirtied during the one before, until at most SyncConfig.Threshold
// remain, the set stops shrinking, or SyncConfig.MaxRounds. A block read
// while the guest writes it may be torn, but the write marked it dirty, so a
// later round resends it. The blocks still dirty at the first Open are the
// residual: they must reach the backup as they were at that Open (epoch 1's
// writes go on top of them, and the writes of later epochs must not leak
// into them). A write to a residual block not yet sent therefore first saves
// the block's old contents (copy before write, into a spool under the
// Mirror's memory budget), and SendResidual sends the saved or the unchanged
// block.
// ApplySync is refused once an epoch has been committed.
//
// # Bounds
//
// Both sides spill rather than block the guest or drop anything: the records
// of all epochs held (Mirror: open and not yet committed; Replica: received
// and not yet committed) share a memory budget (Config.MemoryLimit,
// ReplicaConfig.MemoryLimit; DefaultMemoryLimit, 64 MiB), taken in 256 KiB
// chunks; past it an epoch's further records go to its own spill file in
// SpillDir, unlinked as soon as it is made, so a crash leaves nothing
// behind. The residual's saved blocks share the budget the same way. Memory
// therefore never exceeds the limit (plus one record buffer of at most 1 MiB
// per decoder); the spill files are bounded by the disk, and a spill that
// fails is an error, never a drop. Back-pressure on the guest is the engine's: it bounds the epochs in
// flight (replicate's MaxInFlight), which bounds what the Mirror holds.
// A sync stream is verified whole before it is applied, so the transport
// sends sync data in batches (SyncConfig.Batch, 4 MiB by default).
//
// # What the transport must do
//
// (replicate does all of this; a VMM with its own transport would too.)
//
//   - Send the image size to the backup first; make the Replica with it.
//   - Run the initial sync as above (after long work between Precopy and the
//     first Open, CatchUp, so the residual stays small); deliver every sync
//     stream, residual included, before the first epoch's stream is
//     committed.
//   - After Open(n+1), take Epoch(n) and deliver it whole to Replica.Receive,
//     every epoch, in order (an epoch without writes is a stream too: it
//     keeps the numbering checkable). It is simplest to send it inside the
//     engine's epoch n, so the engine's end record and ack cover it.
//   - Call Replica.Commit(n) when the backup commits epoch n (its memory is
//     applied), Mirror.Commit(n) on the ack; on the primary's loss, call
//     Replica.Failover with the last epoch the backup acknowledged before
//     resuming the VM.
//   - Keep an Epoch reader only until the epoch is committed or discarded.
package diskmirror
