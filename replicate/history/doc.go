// Package history is a store of restorable points: checkpoints a backup
// applied, each kept whole (machine state, memory, disk) and restorable on
// its own, with bounded work and nothing of any other point read.
//
// # Layout
//
// A store is a directory of append-only pack files and one index, a bbolt
// database (index.db). bbolt, not pebble: the index is small (an entry per
// distinct blob, one per point), read far more than written, written by
// one process in whole transactions that must be atomic and durable at
// commit, and bbolt gives exactly that (copy-on-write B+tree, one fsync per
// commit, no compaction of its own to schedule beside ours); pebble's LSM
// would buy write throughput this store does not need (each point is one
// transaction) at the cost of background compactions and a larger
// dependency.
//
//   - Blobs (pack.go): a page, a disk block, a tree node or a machine
//     state, addressed by the SHA-256 of its content and stored once,
//     LZ4-compressed when that saves an eighth, framed with a CRC32C. Zero
//     pages are never stored.
//   - Trees (tree.go): a point's memory and its disk are trees of hashes
//     with 64 children per node; a node of zero children is not stored.
//     Points that share a region share its subtree, so a point costs its
//     changed pages and the nodes above them. No point refers to another:
//     deleting any point damages none.
//   - The index (store.go): blob hash to pack location, pack to the length
//     synced before the index named it, point number to its record (epoch,
//     wall time, session, memory digest, roots). Every entry carries a
//     CRC32C of its key and value.
//
// # Crashes and damage
//
// Add writes a point's new blobs to the current pack, syncs it, and only
// then commits the index transaction that names them and the point. So a
// point listed has all it needs on disk, whatever moment a crash came. Open
// cuts a pack's bytes past its synced length (a torn tail), reports a pack
// shorter than that (damage; the points that need its end are refused),
// and removes a pack no commit ever named. A blob is checked when it is
// read (CRC, then the hash of its content), an index entry by its CRC, and
// a restored point's memory against the checkpoint's digest
// (replicate.DigestMemory): what does not check is refused with
// ErrCorrupt, naming the pack and offset or the index entry, and the
// points that do not need it still restore.
//
// # Garbage collection
//
// GC marks every point's trees while Add goes on (whatever an Add uses
// meanwhile counts as live), then, holding Add for the sweep and the
// rewrite, drops the index entries of dead blobs and rewrites each pack
// less than half live:
// its live blobs copied to the current pack and synced, the index moved in
// one transaction, then the old pack removed.
//
// # Retention
//
// A Policy (policy.go) says how often a point is taken and which to keep as
// they age: tiers such as every point for 10 s, one per second for 10
// minutes, one per minute for a day, with presets by kind of VM.
package history
