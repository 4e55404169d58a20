package history

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/repagent/repagent/replicate"
)

// guest is a deterministic memory and disk history: epoch e's contents are
// a function of e alone (replayed from epoch 1), so a test, or a process
// after a crash, knows what every point must restore to.
type guest struct {
	mem, disk   []byte
	epoch       uint64
	changed     []int64
	diskChanged []int64
	rng         *rand.Rand
}

const testPages = 512 // 2 MiB

func newGuest() *guest {
	return &guest{mem: make([]byte, testPages*leafSize), disk: make([]byte, 64*leafSize+512), rng: rand.New(rand.NewPCG(1, 2))}
}

var words = strings.Fields("the quick brown fox jumps over a lazy dog while epochs pass and pages change")

// step advances to the next epoch: a hot region is rewritten often, a cold
// one rarely, some pages go back to zero; pages hold text, so they compress.
func (g *guest) step() {
	g.epoch++
	g.changed, g.diskChanged = g.changed[:0], g.diskChanged[:0]
	n := 1 + g.rng.IntN(40)
	for range n {
		var i int64
		if g.rng.IntN(10) < 8 {
			i = int64(g.rng.IntN(32)) // hot
		} else {
			i = 32 + int64(g.rng.IntN(testPages-32))
		}
		page := g.mem[i*leafSize : (i+1)*leafSize]
		if g.rng.IntN(8) == 0 {
			clear(page)
		} else {
			var b bytes.Buffer
			fmt.Fprintf(&b, "epoch %d page %d: ", g.epoch, i)
			for b.Len() < leafSize {
				b.WriteString(words[g.rng.IntN(len(words))])
				b.WriteByte(' ')
			}
			copy(page, b.Bytes())
		}
		g.changed = append(g.changed, i)
	}
	for range g.rng.IntN(4) {
		blk := int64(g.rng.IntN(len(g.disk)/leafSize + 1))
		end := min(int64(len(g.disk)), (blk+1)*leafSize)
		for j := blk * leafSize; j < end; j++ {
			g.disk[j] = byte(g.epoch)
		}
		g.diskChanged = append(g.diskChanged, blk)
	}
}

func (g *guest) capture(t testing.TB, full bool) *Capture {
	d, err := replicate.DigestMemory(bytes.NewReader(g.mem), uint64(len(g.mem)))
	if err != nil {
		t.Fatal(err)
	}
	c := &Capture{Epoch: g.epoch, Time: time.Unix(1e9, 0).Add(time.Duration(g.epoch) * 100 * time.Millisecond),
		Digest: d, State: []byte(fmt.Sprintf("state of epoch %d", g.epoch)), Memory: g.mem,
		MemChanged: g.changed, Disk: bytes.NewReader(g.disk), DiskSize: int64(len(g.disk)), DiskChanged: g.diskChanged}
	if full {
		c.MemChanged, c.DiskChanged = nil, nil
	}
	return c
}

// expected replays the guest to epoch e.
func expected(e uint64) (mem, disk []byte) {
	g := newGuest()
	for g.epoch < e {
		g.step()
	}
	return g.mem, g.disk
}

type memDisk struct{ b []byte }

func (d *memDisk) WriteAt(p []byte, off int64) (int, error) { return copy(d.b[off:], p), nil }

func restoreCheck(t testing.TB, s *Store, p Point) error {
	mem := make([]byte, p.MemSize)
	disk := &memDisk{b: make([]byte, p.DiskSize)}
	r, err := s.Restore(p.ID, mem, disk)
	if err != nil {
		return err
	}
	wantMem, wantDisk := expected(p.Epoch)
	if !bytes.Equal(mem, wantMem) {
		t.Errorf("point %d (epoch %d): memory differs from the epoch's", p.ID, p.Epoch)
	}
	if !bytes.Equal(disk.b, wantDisk) {
		t.Errorf("point %d (epoch %d): disk differs from the epoch's", p.ID, p.Epoch)
	}
	if want := fmt.Sprintf("state of epoch %d", p.Epoch); string(r.State) != want {
		t.Errorf("point %d: state %q, want %q", p.ID, r.State, want)
	}
	return nil
}

func fill(t *testing.T, s *Store, epochs int) []Point {
	t.Helper()
	g := newGuest()
	var pts []Point
	for range epochs {
		g.step()
		p, err := s.Add(g.capture(t, false))
		if err != nil {
			t.Fatal(err)
		}
		pts = append(pts, p)
	}
	return pts
}

func TestRestoreOutOfOrder(t *testing.T) {
	s, err := Open(t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pts := fill(t, s, 60)
	order := rand.New(rand.NewPCG(3, 4)).Perm(len(pts))
	for _, i := range order {
		if err := restoreCheck(t, s, pts[i]); err != nil {
			t.Fatal(err)
		}
	}
	// A point costs about what changed: well under a full image each.
	full := int64(len(pts)) * testPages * leafSize
	if size := s.Size(); size*4 > full {
		t.Errorf("store holds %d bytes for %d points, a quarter of full images is %d", size, len(pts), full/4)
	}
}

// The roots from changed lists equal the roots from hashing everything.
func TestChangedListsMatchFullScan(t *testing.T) {
	a, _ := Open(t.TempDir(), Options{})
	b, _ := Open(t.TempDir(), Options{})
	defer a.Close()
	defer b.Close()
	g := newGuest()
	for range 30 {
		g.step()
		pa, err := a.Add(g.capture(t, false))
		if err != nil {
			t.Fatal(err)
		}
		pb, err := b.Add(g.capture(t, true))
		if err != nil {
			t.Fatal(err)
		}
		if pa.Mem != pb.Mem || pa.Disk != pb.Disk || pa.State != pb.State {
			t.Fatalf("epoch %d: incremental roots %s/%s, full %s/%s", g.epoch, pa.Mem, pa.Disk, pb.Mem, pb.Disk)
		}
	}
}

func TestDeleteAndGC(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir, Options{PackSize: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pts := fill(t, s, 80)
	before := s.Size()
	var del []uint64
	var keep []Point
	for i, p := range pts {
		if i%10 != 0 && i != len(pts)-1 {
			del = append(del, p.ID)
		} else {
			keep = append(keep, p)
		}
	}
	if err := s.Delete(del...); err != nil {
		t.Fatal(err)
	}
	st, err := s.GC()
	if err != nil {
		t.Fatal(err)
	}
	if st.Dropped == 0 || st.Removed == 0 || st.Reclaimed <= 0 {
		t.Errorf("gc reclaimed nothing: %+v", st)
	}
	if after := s.Size(); after >= before {
		t.Errorf("store %d bytes before gc, %d after", before, after)
	}
	for _, p := range keep {
		if err := restoreCheck(t, s, p); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.Points()
	if err != nil || len(got) != len(keep) {
		t.Fatalf("%d points listed (%v), %d kept", len(got), err, len(keep))
	}
	// And again after reopening.
	s.Close()
	s, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if p := s.Problems(); len(p) != 0 {
		t.Errorf("problems after a clean close: %q", p)
	}
	for _, p := range keep {
		if err := restoreCheck(t, s, p); err != nil {
			t.Fatal(err)
		}
	}
}

// GC beside intake: points added while it marks survive it.
func TestGCBesideAdd(t *testing.T) {
	s, err := Open(t.TempDir(), Options{PackSize: 32 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	g := newGuest()
	var pts []Point
	done := make(chan error)
	stop := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := s.GC(); err != nil {
				done <- err
				return
			}
		}
	}()
	for range 150 {
		g.step()
		p, err := s.Add(g.capture(t, false))
		if err != nil {
			t.Fatal(err)
		}
		pts = append(pts, p)
		if len(pts) > 5 {
			if err := s.Delete(pts[len(pts)-6].ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	left, err := s.Points()
	if err != nil || len(left) != 5 {
		t.Fatalf("%d points left (%v), want 5", len(left), err)
	}
	for _, p := range left {
		if err := restoreCheck(t, s, p); err != nil {
			t.Fatal(err)
		}
	}
}

func packs(t *testing.T, dir string) []string {
	m, _ := filepath.Glob(filepath.Join(dir, "pack-*.dat"))
	if len(m) == 0 {
		t.Fatal("no packs")
	}
	return m
}

// restoreAll restores every point and returns the ones refused.
func restoreAll(t *testing.T, s *Store) (ok, refused []Point) {
	pts, err := s.Points()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pts {
		if err := restoreCheck(t, s, p); err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("point %d refused, but not as corrupt: %v", p.ID, err)
			}
			refused = append(refused, p)
			continue
		}
		ok = append(ok, p)
	}
	return ok, refused
}

func TestCorruptPackByte(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, Options{PackSize: 32 << 10})
	fill(t, s, 40)
	s.Close()
	pk := packs(t, dir)
	f := pk[len(pk)/2]
	b, _ := os.ReadFile(f)
	b[len(b)/2] ^= 0x40
	os.WriteFile(f, b, 0o644)
	s, _ = Open(dir, Options{})
	defer s.Close()
	ok, refused := restoreAll(t, s)
	if len(refused) == 0 || len(ok) == 0 {
		t.Fatalf("%d points restored, %d refused: a flipped byte must refuse some, not all", len(ok), len(refused))
	}
	mem := make([]byte, refused[0].MemSize)
	_, err := s.Restore(refused[0].ID, mem, nil)
	if err == nil || !strings.Contains(err.Error(), filepath.Base(f)) {
		t.Errorf("error does not name the pack %s: %v", filepath.Base(f), err)
	}
}

func TestTruncatedPack(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, Options{PackSize: 32 << 10})
	fill(t, s, 40)
	s.Close()
	// A late pack: the points before it do not need it.
	pk := packs(t, dir)
	f := pk[len(pk)-2]
	st, _ := os.Stat(f)
	os.Truncate(f, st.Size()/2)
	s, _ = Open(dir, Options{})
	defer s.Close()
	if p := s.Problems(); len(p) != 1 || !strings.Contains(p[0], filepath.Base(f)) || !strings.Contains(p[0], "truncated") {
		t.Errorf("problems %q, want one naming %s as truncated", p, filepath.Base(f))
	}
	ok, refused := restoreAll(t, s)
	if len(refused) == 0 || len(ok) == 0 {
		t.Fatalf("%d restored, %d refused", len(ok), len(refused))
	}
}

func TestTornTail(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, Options{})
	fill(t, s, 20)
	s.Close()
	f := packs(t, dir)[0]
	fh, _ := os.OpenFile(f, os.O_WRONLY|os.O_APPEND, 0)
	fh.Write([]byte("RPBL half a blob, then the crash"))
	fh.Close()
	os.WriteFile(filepath.Join(dir, packName(99)), []byte("RPBL"), 0o644)
	s, _ = Open(dir, Options{})
	defer s.Close()
	if p := s.Problems(); len(p) != 2 {
		t.Errorf("problems %q, want the torn tail and the unnamed pack", p)
	}
	if _, err := os.Stat(filepath.Join(dir, packName(99))); err == nil {
		t.Error("unnamed pack not removed")
	}
	if _, refused := restoreAll(t, s); len(refused) != 0 {
		t.Errorf("%d points refused after a torn tail was cut", len(refused))
	}
	fill(t, s, 5) // intake goes on
}

func TestDamagedIndexEntry(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, Options{})
	pts := fill(t, s, 20)
	// Damage one point's entry and one blob's entry through bbolt itself.
	victim := pts[7]
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketPoints)
		k := u64key(victim.ID)
		v := append([]byte(nil), b.Get(k)...)
		v[3] ^= 1
		return b.Put(k, v)
	})
	if err != nil {
		t.Fatal(err)
	}
	var blobVictim Hash = pts[12].State
	err = s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketBlobs)
		v := append([]byte(nil), b.Get(blobVictim[:])...)
		v[5] ^= 1
		return b.Put(blobVictim[:], v)
	})
	if err != nil {
		t.Fatal(err)
	}
	listed, err := s.Points()
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("points/%016x", victim.ID)) {
		t.Errorf("listing does not report the damaged point entry: %v", err)
	}
	if len(listed) != len(pts)-1 {
		t.Errorf("%d listed, want %d", len(listed), len(pts)-1)
	}
	mem := make([]byte, pts[12].MemSize)
	if _, err := s.Restore(pts[12].ID, mem, nil); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "blobs/") {
		t.Errorf("restore over a damaged blob entry: %v", err)
	}
	for _, p := range listed {
		if p.ID == pts[12].ID {
			continue
		}
		if err := restoreCheck(t, s, p); err != nil {
			t.Errorf("point %d: %v", p.ID, err)
		}
	}
	s.Close()
}
