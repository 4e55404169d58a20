package diskmirror

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
)

const testBlock = 64 << 10

// syncPair makes a primary of random bytes and a backup that differs from it
// in the given blocks, and the backup's hash list as the primary decodes it.
func syncPair(t testing.TB, blocks int, differ func(i int) bool) (*pair, []Hash) {
	return syncPairWith(t, blocks, differ, Config{})
}

func syncPairWith(t testing.TB, blocks int, differ func(i int) bool, cfg Config) (*pair, []Hash) {
	t.Helper()
	size := int64(blocks) * testBlock
	p := newPair(t, size, cfg, ReplicaConfig{})
	for i := range blocks {
		if differ(i) {
			if _, err := p.bimg.WriteAt([]byte{^p.initial[int64(i)*testBlock+100]}, int64(i)*testBlock+100); err != nil {
				t.Fatal(err)
			}
		}
	}
	hs, err := p.r.Hashes(testBlock)
	if err != nil {
		t.Fatal(err)
	}
	var list bytes.Buffer
	if err := EncodeHashes(&list, hs, size, testBlock); err != nil {
		t.Fatal(err)
	}
	remote, block, err := DecodeHashes(&list, size)
	if err != nil || block != testBlock {
		t.Fatalf("DecodeHashes = block %d, %v", block, err)
	}
	return p, remote
}

func (p *pair) applySync(t testing.TB) func([]byte) error {
	return func(stream []byte) error {
		_, err := p.r.ApplySync(bytes.NewReader(stream))
		return err
	}
}

// Only the blocks the backup lacks are sent.
func TestInitialSync(t *testing.T) {
	const blocks = 32
	for _, c := range []struct {
		name     string
		differ   func(i int) bool
		wantSent int
	}{
		{"identical=0%", func(int) bool { return true }, blocks},
		{"identical=50%", func(i int) bool { return i%2 == 0 }, blocks / 2},
		{"identical=100%", func(int) bool { return false }, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, remote := syncPair(t, blocks, c.differ)
			st, err := p.m.Precopy(remote, testBlock, SyncConfig{Batch: 4 * testBlock}, p.applySync(t))
			if err != nil {
				t.Fatal(err)
			}
			want := SyncStats{Blocks: blocks, Identical: blocks - c.wantSent, Rounds: 1, Sent: c.wantSent,
				Bytes: int64(c.wantSent) * testBlock, Streams: (c.wantSent + 3) / 4}
			want.Encoded = int64(want.Streams)*(StreamHeaderSize+RecordHeaderSize) + int64(c.wantSent)*RecordHeaderSize + want.Bytes
			if st != want {
				t.Fatalf("Precopy = %+v, want %+v", st, want)
			}
			if err := p.m.Open(1); err != nil {
				t.Fatal(err)
			}
			if rs, err := p.m.SendResidual(0, p.applySync(t)); err != nil || rs.Sent != 0 {
				t.Fatalf("SendResidual = %+v, %v; want nothing", rs, err)
			}
			p.wantBackup(t, p.initial, "after the sync")
		})
	}
}

// Blocks written during a round are sent again in the next; the blocks left
// at the first Open reach the backup as they were at that Open, even if
// epoch 1 writes them before they are sent (their old contents saved in
// memory, or in a spill file when the memory budget is spent); then epoch 1
// applies on top.
func TestSyncWritesResent(t *testing.T) {
	t.Run("in memory", func(t *testing.T) { testSyncWritesResent(t, Config{}) })
	t.Run("spilled", func(t *testing.T) { testSyncWritesResent(t, Config{MemoryLimit: 1, SpillDir: t.TempDir()}) })
}

func testSyncWritesResent(t *testing.T, cfg Config) {
	const blocks = 32
	p, remote := syncPairWith(t, blocks, func(i int) bool { return i < 8 }, cfg)
	r := rand.New(rand.NewPCG(4, 4))
	calls := 0
	send := func(stream []byte) error {
		calls++
		if calls <= 2 { // the guest writes while round 0 runs
			for _, b := range []int64{0, 1, 20, 31} { // sent, about to be, identical, last
				p.write(t, randBytes(r, 100), b*testBlock+int64(calls)*1000)
			}
		}
		return p.applySync(t)(stream)
	}
	st, err := p.m.Precopy(remote, testBlock, SyncConfig{Threshold: 1, Batch: 4 * testBlock}, send)
	if err != nil {
		t.Fatal(err)
	}
	if st.Rounds != 2 || st.Sent != 8+4 || st.Residual != 0 {
		t.Fatalf("Precopy = %+v, want 2 rounds sending 8 + 4 blocks and no residual", st)
	}
	p.wantBackup(t, contents(t, p.pimg, p.size), "after the rounds")

	// Now a write while the sync has no round left to run: a residual.
	if err := p.m.StartSync(testBlock); err != nil {
		t.Fatal(err)
	}
	p.write(t, randBytes(r, 3000), 5*testBlock-1000) // blocks 4 and 5
	p.write(t, randBytes(r, 10), 9*testBlock)
	if d := p.m.Dirty(); d != 3 {
		t.Fatalf("Dirty = %d, want 3", d)
	}
	if err := p.m.Open(1); err != nil {
		t.Fatal(err)
	}
	if err := p.m.StartSync(testBlock); err == nil {
		t.Fatal("StartSync with an epoch open: no error")
	}
	cut := contents(t, p.pimg, p.size)
	p.write(t, randBytes(r, 2*testBlock), 4*testBlock+7) // residual blocks 4, 5, 6
	p.write(t, randBytes(r, 50), 30*testBlock)
	// A bad sync stream is refused and changes nothing.
	bad := craft(kindSync, p.size, testBlock, 0, Write{testBlock, make([]byte, testBlock-1)})
	if _, err := p.r.ApplySync(bytes.NewReader(bad)); !errors.Is(err, ErrFormat) || !strings.Contains(err.Error(), "not one whole 65536-byte block") {
		t.Fatalf("ApplySync of a partial block = %v", err)
	}
	rs, err := p.m.SendResidual(0, p.applySync(t))
	if err != nil || rs.Sent != 3 {
		t.Fatalf("SendResidual = %+v, %v; want 3 blocks", rs, err)
	}
	p.wantBackup(t, cut, "the residual, as at the first Open")
	if err := p.m.Open(2); err != nil {
		t.Fatal(err)
	}
	p.ship(t, 1)
	if err := p.r.Commit(1); err != nil {
		t.Fatal(err)
	}
	p.wantBackup(t, contents(t, p.pimg, p.size), "epoch 1 committed")
	if _, err := p.r.ApplySync(bytes.NewReader(craft(kindSync, p.size, testBlock, 0))); err == nil ||
		!strings.Contains(err.Error(), "already committed") {
		t.Fatalf("ApplySync after a commit = %v, want a refusal", err)
	}
}

// CatchUp sends what was written after Precopy's rounds, and needs a sync.
func TestSyncCatchUp(t *testing.T) {
	const blocks = 16
	p, remote := syncPair(t, blocks, func(i int) bool { return false })
	if _, err := p.m.CatchUp(testBlock, SyncConfig{}, p.applySync(t)); err == nil || !strings.Contains(err.Error(), "no sync") {
		t.Fatalf("CatchUp before Precopy = %v, want a refusal", err)
	}
	if st, err := p.m.Precopy(remote, testBlock, SyncConfig{}, p.applySync(t)); err != nil || st.Sent != 0 {
		t.Fatalf("Precopy of identical images = %+v, %v", st, err)
	}
	r := rand.New(rand.NewPCG(5, 5))
	for _, b := range []int64{1, 2, 3, 9} { // the engine syncs memory meanwhile
		p.write(t, randBytes(r, 10), b*testBlock)
	}
	st, err := p.m.CatchUp(testBlock, SyncConfig{Threshold: 1}, p.applySync(t))
	if err != nil || st.Sent != 4 || st.Residual != 0 || st.Rounds != 1 {
		t.Fatalf("CatchUp = %+v, %v; want one round of 4 blocks", st, err)
	}
	p.wantBackup(t, contents(t, p.pimg, p.size), "after the catch-up")
	p.write(t, randBytes(r, 10), 5*testBlock)
	if st, err := p.m.CatchUp(testBlock, SyncConfig{Threshold: 1}, p.applySync(t)); err != nil || st.Sent != 0 || st.Residual != 1 {
		t.Fatalf("CatchUp under the threshold = %+v, %v; want nothing sent, 1 residual", st, err)
	}
	if _, err := p.m.CatchUp(2*testBlock, SyncConfig{}, p.applySync(t)); err == nil {
		t.Fatal("CatchUp with another block size: no error")
	}
}

// The hashes and the plan cross-checked against a naive version.
func TestHashImage(t *testing.T) {
	r := rand.New(rand.NewPCG(8, 8))
	size := int64(10*MinBlockSize + 123) // a short last block
	img := &memDisk{b: randBytes(r, int(size))}
	clear(img.b[MinBlockSize : 2*MinBlockSize]) // a zero block
	hs, err := HashImage(img, size, MinBlockSize)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 11 {
		t.Fatalf("%d hashes, want 11", len(hs))
	}
	for i, h := range hs {
		if want := sumBlock(img.b[i*MinBlockSize : min(int64(i+1)*MinBlockSize, size)]); h != want {
			t.Fatalf("block %d: hash %x, want %x", i, h, want)
		}
	}
	for _, c := range []struct {
		name  string
		size  int64
		block int
	}{
		{"block not a power of two", size, 5000},
		{"block too small", size, 1024},
		{"block too large", size, 2 << 20},
		{"too many blocks", 1 << 40, MinBlockSize},
		{"empty image", 0, MinBlockSize},
	} {
		if _, err := HashImage(img, c.size, c.block); err == nil {
			t.Errorf("%s: no error", c.name)
		}
	}
	if _, err := DiffBlocks(hs, hs[1:]); err == nil {
		t.Error("DiffBlocks of lists of different lengths: no error")
	}
}
