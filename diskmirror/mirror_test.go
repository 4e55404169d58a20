package diskmirror

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
)

// Writes reach the local image at once, and the backup only when their epoch
// commits.
func TestMirrorAppliesOnCommit(t *testing.T) {
	p := newPair(t, 1<<20, Config{}, ReplicaConfig{})
	model := bytes.Clone(p.initial)
	w := func(b []byte, off int64) {
		p.write(t, b, off)
		copy(model[off:], b)
	}
	// Before the first Open, writes pass through unlogged.
	if err := p.m.Open(1); err != nil {
		t.Fatal(err)
	}
	w(bytes.Repeat([]byte{1}, 5000), 100)
	w([]byte("epoch one"), 1<<19)
	if !bytes.Equal(contents(t, p.pimg, p.size), model) {
		t.Fatal("local image does not hold the write at once")
	}
	at1 := bytes.Clone(model)
	if err := p.m.Open(2); err != nil {
		t.Fatal(err)
	}
	w([]byte("epoch two"), 1<<19)
	sum := p.ship(t, 1)
	if sum.Writes != 2 || sum.Bytes != 5009 || sum.Epoch != 1 {
		t.Fatalf("epoch 1 summary %+v, want 2 writes of 5009 bytes", sum)
	}
	p.wantBackup(t, p.initial, "epoch 1 received, not committed")
	if err := p.r.Commit(1); err != nil {
		t.Fatal(err)
	}
	p.wantBackup(t, at1, "epoch 1 committed")
	if err := p.m.Commit(1); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.m.Epoch(1); err == nil {
		t.Fatal("Epoch(1) after Commit(1): no error")
	}
	if _, _, err := p.m.Epoch(2); err == nil {
		t.Fatal("Epoch(2) while open: no error")
	}
	if err := p.m.Commit(2); err == nil {
		t.Fatal("Commit(2) while open: no error")
	}
	if err := p.m.Open(4); err == nil {
		t.Fatal("Open(4) after 2: no error")
	}
	if err := p.m.Open(3); err != nil {
		t.Fatal(err)
	}
	p.ship(t, 2)
	if err := p.r.Commit(2); err != nil {
		t.Fatal(err)
	}
	p.wantBackup(t, model, "epoch 2 committed")
	if s := p.m.Stats(); s.Epochs != 2 {
		t.Fatalf("mirror holds %d epochs, want 2 (2 and the open 3)", s.Epochs)
	}
	// Release frees everything; writes pass through.
	if err := p.m.Release(); err != nil {
		t.Fatal(err)
	}
	w([]byte("unprotected"), 0)
	if s := p.m.Stats(); s.Epochs != 0 || s.Held != 0 || s.Memory != 0 {
		t.Fatalf("after Release: %+v, want nothing held", s)
	}
}

// A write beyond the end is refused and writes nothing; a FUA write is
// synced; a large write is split into records and arrives whole.
func TestMirrorWrites(t *testing.T) {
	p := newPair(t, 4<<20, Config{}, ReplicaConfig{})
	if err := p.m.Open(1); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		n    int
		off  int64
	}{
		{"past the end", 10, 4<<20 - 5},
		{"at the end", 1, 4 << 20},
		{"negative", 1, -1},
		{"huge", 8 << 20, 0},
	} {
		n, err := p.m.WriteAt(make([]byte, c.n), c.off)
		if !errors.Is(err, ErrRange) || n != 0 {
			t.Errorf("%s: WriteAt = %d, %v, want 0 and ErrRange", c.name, n, err)
		}
	}
	if !bytes.Equal(contents(t, p.pimg, p.size), p.initial) {
		t.Fatal("a refused write changed the local image")
	}
	big := randBytes(rand.New(rand.NewPCG(3, 4)), 3*MaxRecordData+17)
	p.write(t, big, 1000)
	if _, err := p.m.WriteAtFUA([]byte("fua"), 0); err != nil {
		t.Fatal(err)
	}
	if err := p.m.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := p.m.Open(2); err != nil {
		t.Fatal(err)
	}
	sum := p.ship(t, 1)
	if sum.Writes != 5 || sum.Bytes != int64(len(big)+3) {
		t.Fatalf("summary %+v, want 5 records (4 for the big write) of %d bytes", sum, len(big)+3)
	}
	if err := p.r.Commit(1); err != nil {
		t.Fatal(err)
	}
	p.wantBackup(t, contents(t, p.pimg, p.size), "commit 1")
}

// workload runs epochs of random, often overlapping writes (some larger than
// a record) and returns the primary's image at the end of each epoch:
// snaps[n] is the image when epoch n closed (snaps[0] the start).
func workload(t testing.TB, p *pair, epochs int, seed uint64) [][]byte {
	r := rand.New(rand.NewPCG(seed, 7))
	snaps := [][]byte{bytes.Clone(p.initial)}
	if err := p.m.Open(1); err != nil {
		t.Fatal(err)
	}
	for n := 1; n <= epochs; n++ {
		hot := r.Int64N(p.size - 64<<10) // a hot spot: overlapping writes
		for range r.IntN(40) {
			var off int64
			var size int
			switch r.IntN(4) {
			case 0:
				size = 1 + r.IntN(MaxRecordData+MaxRecordData/2)
				off = r.Int64N(p.size - int64(size) + 1)
			case 1, 2:
				size = 1 + r.IntN(8<<10)
				off = hot + r.Int64N(64<<10-int64(size)+1)
			default:
				size = 512 * (1 + r.IntN(16))
				off = 512 * r.Int64N((p.size-int64(size))/512+1)
			}
			p.write(t, randBytes(r, size), off)
		}
		snaps = append(snaps, contents(t, p.pimg, p.size))
		if err := p.m.Open(uint64(n + 1)); err != nil {
			t.Fatal(err)
		}
	}
	return snaps
}

// Epochs of overlapping writes, committed at random points, leave the backup
// equal to the primary at the committed epoch, byte for byte.
func TestOverlappingWritesInOrder(t *testing.T) {
	p := newPair(t, 8<<20, Config{}, ReplicaConfig{})
	snaps := workload(t, p, 20, 1)
	r := rand.New(rand.NewPCG(9, 9))
	committed := 0
	for n := 1; n <= 20; n++ {
		p.ship(t, uint64(n))
		if r.IntN(3) == 0 || n == 20 {
			if err := p.r.Commit(uint64(n)); err != nil {
				t.Fatal(err)
			}
			if err := p.m.Commit(uint64(n)); err != nil {
				t.Fatal(err)
			}
			committed = n
			p.wantBackup(t, snaps[n], "commit")
		}
	}
	if s := p.r.Stats(); s.Pending != 0 || s.Committed != uint64(committed) || s.Memory != 0 {
		t.Fatalf("replica after the last commit: %+v", s)
	}
}

// Failover applies every epoch up to the last committed one and discards
// the rest.
func TestFailover(t *testing.T) {
	p := newPair(t, 4<<20, Config{}, ReplicaConfig{})
	snaps := workload(t, p, 6, 2)
	for n := 1; n <= 5; n++ { // epoch 6 is lost with the primary
		p.ship(t, uint64(n))
	}
	if err := p.r.Commit(2); err != nil {
		t.Fatal(err)
	}
	p.wantBackup(t, snaps[2], "commit 2")
	for _, n := range []uint64{6, 1} { // never arrived; older than applied
		if err := p.r.Failover(n); !errors.Is(err, ErrEpoch) {
			t.Fatalf("Failover(%d) = %v, want ErrEpoch", n, err)
		}
		p.wantBackup(t, snaps[2], "refused failover")
	}
	if err := p.r.Failover(4); err != nil {
		t.Fatal(err)
	}
	p.wantBackup(t, snaps[4], "failover to 4")
	if s := p.r.Stats(); s.Pending != 0 || s.Committed != 4 || s.Memory != 0 {
		t.Fatalf("replica after failover: %+v, want nothing pending, 4 committed", s)
	}
	if _, err := p.r.Receive(bytes.NewReader(p.epochBytes(t, 5))); !errors.Is(err, ErrClosed) {
		t.Fatalf("Receive after Failover = %v, want ErrClosed", err)
	}
	// Discard on the primary drops the epochs after n.
	if err := p.m.Discard(4); err != nil {
		t.Fatal(err)
	}
	for n := uint64(5); n <= 7; n++ {
		if _, _, err := p.m.Epoch(n); err == nil {
			t.Fatalf("Epoch(%d) after Discard(4): no error", n)
		}
	}
	if _, _, err := p.m.Epoch(4); err != nil {
		t.Fatalf("Epoch(4) after Discard(4): %v", err)
	}
}

// Past the memory bound, both sides spill to files: memory stays within the
// bound and nothing is dropped.
func TestSpill(t *testing.T) {
	const limit = 1 << 20
	p := newPair(t, 16<<20, Config{MemoryLimit: limit}, ReplicaConfig{MemoryLimit: limit})
	snaps := workload(t, p, 8, 3)
	ms := p.m.Stats()
	if ms.Spilled == 0 || ms.Memory > limit || ms.Held <= limit {
		t.Fatalf("mirror %+v: want more than %d held, at most %d in memory, the rest spilled", ms, limit, limit)
	}
	for n := 1; n <= 8; n++ {
		p.ship(t, uint64(n))
	}
	rs := p.r.Stats()
	if rs.Spilled == 0 || rs.Memory > limit || rs.Pending != 8 {
		t.Fatalf("replica %+v: want 8 pending, at most %d in memory, the rest spilled", rs, limit)
	}
	p.wantBackup(t, p.initial, "nothing committed")
	if err := p.r.Commit(8); err != nil {
		t.Fatal(err)
	}
	p.wantBackup(t, snaps[8], "commit 8")
	if err := p.m.Commit(8); err != nil {
		t.Fatal(err)
	}
	// The open epoch 9 holds its stream header (in its spill file: it opened
	// when memory was full, and a spool that spilled stays in its file).
	if ms := p.m.Stats(); ms.Memory != 0 || ms.Epochs != 1 || ms.Held != StreamHeaderSize {
		t.Fatalf("mirror after commit: %+v, want only the open epoch's header", ms)
	}
}

// The engine's pattern, under the race detector: a device goroutine writes
// all the time; the engine pauses it to open the next epoch; a transport
// ships closed epochs, commits them on both sides, concurrently with Open.
func TestConcurrentEngine(t *testing.T) {
	p := newPair(t, 4<<20, Config{MemoryLimit: 512 << 10}, ReplicaConfig{MemoryLimit: 512 << 10})
	const epochs = 30
	var device sync.RWMutex // held for writing = the device is quiesced
	// Writes before the first Open are not mirrored (the initial sync's
	// business), so the device starts in epoch 1.
	if err := p.m.Open(1); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		r := rand.New(rand.NewPCG(5, 5))
		for {
			select {
			case <-stop:
				return
			default:
			}
			device.RLock()
			size := 1 + r.IntN(64<<10)
			off := r.Int64N(p.size - int64(size))
			_, err := p.m.WriteAt(randBytes(r, size), off)
			if r.IntN(10) == 0 {
				err = errors.Join(err, p.m.Sync())
			}
			device.RUnlock()
			if err != nil {
				t.Error(err)
				return
			}
		}
	})
	snaps := make([][]byte, epochs+1)
	closed := make(chan uint64, epochs)
	var tr sync.WaitGroup
	tr.Go(func() {
		for n := range closed {
			rd, _, err := p.m.Epoch(n)
			if err == nil {
				_, err = p.r.Receive(rd)
			}
			if err == nil {
				err = p.r.Commit(n)
			}
			if err == nil {
				err = p.m.Commit(n)
			}
			if err == nil && !bytes.Equal(contents(t, p.bimg, p.size), snaps[n]) {
				err = fmt.Errorf("epoch %d committed: the backup differs from the primary at that epoch", n)
			}
			if err != nil {
				t.Error(err)
				return
			}
			_ = p.m.Stats()
		}
	})
	for n := 1; n <= epochs; n++ {
		device.Lock()
		snaps[n] = contents(t, p.pimg, p.size)
		err := p.m.Open(uint64(n + 1))
		device.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		closed <- uint64(n)
	}
	close(closed)
	tr.Wait()
	close(stop)
	wg.Wait()
	p.wantBackup(t, snaps[epochs], "all committed")
}
