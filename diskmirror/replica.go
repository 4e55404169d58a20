package diskmirror

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// ErrClosed is returned by a Replica's methods after Failover or Close.
var ErrClosed = errors.New("diskmirror: replica closed")

// ReplicaConfig configures a Replica.
type ReplicaConfig struct {
	// MemoryLimit bounds the memory held for pending (received, not yet
	// committed) epochs, together. Past it, an epoch's records go to a spill
	// file in SpillDir; nothing is dropped. 0 means DefaultMemoryLimit.
	MemoryLimit int64
	// SpillDir is where spill files are made (and unlinked at once); "" means
	// os.TempDir().
	SpillDir string
	// FirstEpoch is the first epoch Receive expects; 0 means 1 (the engine's
	// first checkpoint).
	FirstEpoch uint64
}

// Replica is the backup side: it keeps the backup image equal to the
// primary's image at the last committed epoch. Receive verifies an epoch's
// stream completely and keeps it pending (nothing is applied); Commit applies
// the pending epochs up to the one acknowledged, in order, and syncs the
// image; Failover applies every epoch up to the last committed one and
// discards the rest. Before the first epoch, ApplySync applies the initial
// sync's blocks.
//
// Concurrency: one Receive or ApplySync at a time, which may run
// concurrently with one Commit, Failover or Stats.
type Replica struct {
	img  Disk
	size int64
	dir  string
	mem  budget

	rmu  sync.Mutex // one stream read at a time; owns rdec
	rdec decoder
	amu  sync.Mutex // applying to the image; owns adec
	adec decoder

	mu        sync.Mutex
	next      uint64 // the epoch Receive expects
	committed uint64 // the last epoch applied; 0 before the first
	applied   bool   // an epoch has been applied
	pending   []*pendingEpoch
	closed    bool
}

type pendingEpoch struct {
	sp  spool
	sum Summary
}

// NewReplica returns a Replica over the backup image img for a primary that
// declares an image of size bytes. An image of another size is refused
// (ErrImageSize), and nothing is written to it.
func NewReplica(img Disk, size int64, cfg ReplicaConfig) (*Replica, error) {
	if err := checkSize(size); err != nil {
		return nil, fmt.Errorf("new replica: %w", err)
	}
	have, err := DiskSize(img)
	if err != nil {
		return nil, fmt.Errorf("new replica: %w", err)
	}
	if have != size {
		return nil, fmt.Errorf("new replica: %w: the primary's image has %d bytes, the backup image %d (make it %d bytes)",
			ErrImageSize, size, have, size)
	}
	first := cfg.FirstEpoch
	if first == 0 {
		first = 1
	}
	return &Replica{
		img: img, size: size, dir: cfg.SpillDir,
		mem:       budget{limit: Config{MemoryLimit: cfg.MemoryLimit}.memoryLimit()},
		next:      first,
		committed: first - 1,
	}, nil
}

// Size is the image size in bytes.
func (r *Replica) Size() int64 { return r.size }

// Hashes hashes the backup image in blocks of block bytes, for the initial
// sync (send them with EncodeHashes).
func (r *Replica) Hashes(block int) ([]Hash, error) {
	return HashImage(r.img, r.size, block)
}

// Receive reads one epoch's stream from rd and verifies all of it (format,
// the epoch is the one after the last received, every record inside the
// image, every checksum, the end record) before it keeps it pending. A stream
// that fails is dropped whole, with an error naming the problem, and the
// same epoch is expected again; the image is never touched by Receive.
func (r *Replica) Receive(rd io.Reader) (Summary, error) {
	r.rmu.Lock()
	defer r.rmu.Unlock()
	r.mu.Lock()
	next, closed := r.next, r.closed
	r.mu.Unlock()
	if closed {
		return Summary{}, fmt.Errorf("receive epoch %d: %w", next, ErrClosed)
	}
	p := &pendingEpoch{sp: spool{b: &r.mem, dir: r.dir}}
	sum, err := r.rdec.read(rd, kindEpoch, r.size, next, &p.sp, nil)
	if err != nil {
		p.sp.free()
		return Summary{}, fmt.Errorf("receive epoch %d: %w", next, err)
	}
	p.sum = sum
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		p.sp.free()
		return Summary{}, fmt.Errorf("receive epoch %d: %w", next, ErrClosed)
	}
	r.pending = append(r.pending, p)
	r.next++
	return sum, nil
}

// ApplySync reads one sync stream from rd, verifies all of it, then applies
// its blocks to the image (not synced: the first Commit syncs). It is refused
// once an epoch has been committed: a sync block would then overwrite newer
// data. A stream that fails verification leaves the image untouched.
func (r *Replica) ApplySync(rd io.Reader) (Summary, error) {
	r.rmu.Lock()
	defer r.rmu.Unlock()
	if err := r.syncAllowed(); err != nil {
		return Summary{}, err
	}
	sp := spool{b: &r.mem, dir: r.dir}
	defer sp.free()
	sum, err := r.rdec.read(rd, kindSync, r.size, 0, &sp, nil)
	if err != nil {
		return Summary{}, fmt.Errorf("apply sync stream: %w", err)
	}
	r.amu.Lock()
	defer r.amu.Unlock()
	if err := r.syncAllowed(); err != nil {
		return Summary{}, err
	}
	if _, err := r.adec.read(sp.reader(), kindSync, r.size, 0, nil, r.write); err != nil {
		return Summary{}, fmt.Errorf("apply sync stream from its spool: %w", err)
	}
	return sum, nil
}

func (r *Replica) syncAllowed() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return fmt.Errorf("apply sync stream: %w", ErrClosed)
	}
	if r.applied {
		return fmt.Errorf("apply sync stream: epoch %d is already committed (the sync must end before the first commit)", r.committed)
	}
	return nil
}

func (r *Replica) write(off int64, data []byte) error {
	if _, err := r.img.WriteAt(data, off); err != nil {
		return fmt.Errorf("write backup image: %w", err)
	}
	return nil
}

// Commit applies every pending epoch up to and including n, in epoch order
// and each in the order its writes were made, then syncs the image: the
// primary's epoch n is acknowledged. Epochs already applied are skipped.
// Committing an epoch that has not arrived is refused (ErrEpoch) and applies
// nothing.
func (r *Replica) Commit(n uint64) error {
	r.amu.Lock()
	defer r.amu.Unlock()
	r.mu.Lock()
	if err := r.arrived(n); err != nil {
		r.mu.Unlock()
		return fmt.Errorf("commit epoch %d: %w", n, err)
	}
	take := r.takeUpTo(n)
	r.mu.Unlock()
	return r.apply(take, fmt.Sprintf("commit epoch %d", n))
}

// Failover ends replication on the primary's loss: it applies every epoch up
// to and including n (the last the backup acknowledged), discards the
// pending epochs after n, syncs the image, and closes the Replica. n must
// have arrived, and must not be older than an epoch already applied; else
// nothing is applied or discarded and the Replica stays open.
func (r *Replica) Failover(n uint64) error {
	r.amu.Lock()
	defer r.amu.Unlock()
	r.mu.Lock()
	if err := r.arrived(n); err != nil {
		r.mu.Unlock()
		return fmt.Errorf("failover to epoch %d: %w", n, err)
	}
	if n < r.committed {
		r.mu.Unlock()
		return fmt.Errorf("failover to epoch %d: %w: epoch %d is already applied", n, ErrEpoch, r.committed)
	}
	take := r.takeUpTo(n)
	r.drop()
	r.mu.Unlock()
	return r.apply(take, fmt.Sprintf("failover to epoch %d", n))
}

// arrived checks that r is open and epoch n has arrived. The caller holds
// r.mu.
func (r *Replica) arrived(n uint64) error {
	if r.closed {
		return ErrClosed
	}
	if n >= r.next {
		return fmt.Errorf("%w: epochs up to %d have arrived", ErrEpoch, r.next-1)
	}
	return nil
}

// drop discards every pending epoch and closes r. The caller holds r.mu.
func (r *Replica) drop() {
	for _, p := range r.pending {
		p.sp.free()
	}
	r.pending = nil
	r.closed = true
}

// takeUpTo removes the pending epochs up to n from the list. The caller
// holds r.mu.
func (r *Replica) takeUpTo(n uint64) []*pendingEpoch {
	i := 0
	for i < len(r.pending) && r.pending[i].sum.Epoch <= n {
		i++
	}
	take := append([]*pendingEpoch(nil), r.pending[:i]...)
	r.pending = append(r.pending[:0], r.pending[i:]...)
	return take
}

// apply writes the epochs in order, re-reading each from its spool (the
// checksums are checked again: a spill file that changed is an error, not a
// silent divergence), then syncs. The caller holds r.amu.
func (r *Replica) apply(eps []*pendingEpoch, what string) error {
	defer func() {
		for _, p := range eps {
			p.sp.free()
		}
	}()
	for _, p := range eps {
		if _, err := r.adec.read(p.sp.reader(), kindEpoch, r.size, p.sum.Epoch, nil, r.write); err != nil {
			return fmt.Errorf("%s: apply epoch %d: %w", what, p.sum.Epoch, err)
		}
		r.mu.Lock()
		r.committed, r.applied = p.sum.Epoch, true
		r.mu.Unlock()
	}
	if err := r.img.Sync(); err != nil {
		return fmt.Errorf("%s: sync backup image: %w", what, err)
	}
	return nil
}

// ReplicaStats is a snapshot of a Replica.
type ReplicaStats struct {
	// Next is the epoch Receive expects; Committed, the last one applied.
	Next, Committed uint64
	// Pending is the number of epochs received and not yet applied; Held,
	// their encoded bytes; Memory, the memory they take (at most
	// ReplicaConfig.MemoryLimit); Spilled, the part of Held in spill files.
	Pending int
	Held    int64
	Memory  int64
	Spilled int64
}

// Stats reports the Replica's state.
func (r *Replica) Stats() ReplicaStats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := ReplicaStats{Next: r.next, Committed: r.committed, Pending: len(r.pending), Memory: r.mem.inUse()}
	for _, p := range r.pending {
		s.Held += p.sp.size()
		s.Spilled += p.sp.spilled()
	}
	return s
}

// Close discards every pending epoch without applying it and closes the
// Replica. It does not close the image.
func (r *Replica) Close() error {
	r.amu.Lock()
	defer r.amu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.drop()
	return nil
}
