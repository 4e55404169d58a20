package replicate_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/repagent/repagent/diskmirror"
	"github.com/repagent/repagent/internal/faultpoint"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
)

// P5: a backup fed a corrupted, truncated, reordered or foreign stream, a
// wrong protocol version or a mismatched VM shape rejects it with an error
// naming the problem, and its replica keeps its last good checkpoint.
//
// The streams come from a real primary (replicating the toy VM of the
// package example) through a proxy that parses the documented framing (a
// 16-byte little-endian header: type u16, flags u16, length u32, epoch u64)
// and mangles chosen messages.

// Message types, as documented in doc.go.
const (
	tHello = 1
	tPages = 4
	tState = 5
	tEnd   = 6
)

type frame struct {
	hdr     [16]byte
	payload []byte
}

func (f frame) typ() uint16   { return binary.LittleEndian.Uint16(f.hdr[0:]) }
func (f frame) epoch() uint64 { return binary.LittleEndian.Uint64(f.hdr[8:]) }
func (f frame) bytes() []byte { return append(f.hdr[:], f.payload...) }

// covered is what the end record's checksum covers of the message (doc.go):
// all of it, but of a Pages message only the header, count and entries (the
// data is covered by the entries' CRCs).
func (f frame) covered() []byte {
	b := f.bytes()
	if f.typ() == tPages && len(f.payload) >= 8 {
		if n := 16 + 8 + 16*int(binary.LittleEndian.Uint32(f.payload)); n <= len(b) {
			return b[:n]
		}
	}
	return b
}

// mangler sees every primary→backup frame in order and returns what to send
// instead; cut ends the stream after that.
type mangler func(f frame) (out []frame, cut bool)

// badEpoch is the epoch the manglers corrupt; the ones before it go through.
const badEpoch = 5

// onEpoch applies f to the frames of badEpoch only.
func onEpoch(f func(frame) ([]frame, bool)) mangler {
	return func(fr frame) ([]frame, bool) {
		if fr.epoch() == badEpoch && fr.typ() != 8 /* heartbeat */ {
			return f(fr)
		}
		return []frame{fr}, false
	}
}

func flipLast(fr frame) frame {
	fr.payload = append([]byte(nil), fr.payload...)
	fr.payload[len(fr.payload)-1] ^= 0x40
	return fr
}

type streamResult struct {
	primaryErr error
	backupErr  error
	failover   *replicate.Failover
	backup     *replicate.Backup
	acked      map[uint64]uint64 // epoch → digest, as the primary recorded them
	counts     map[uint64]uint64 // epoch → the toy's count at its pause (acknowledged or not)
	diskSync   []replicate.StreamSyncProgress
	oversize   int // epochs acknowledged that were sent during their pause
}

// through configures replicateThrough beyond the mangler.
type through struct {
	expect *replicate.Shape
	// disk and backupDisk, when set, are the toy's disk (it writes a block
	// per step through it) and the backup's image.
	disk       *diskmirror.Mirror
	backupDisk *os.File
	diskBlock  int
	staging    uint64 // the primary's StagingBytes (0: default)
}

// replicateThrough runs a toy primary and a backup with the proxy between
// them until the backup's session ends, then waits for the primary.
func replicateThrough(t *testing.T, m mangler, expect *replicate.Shape) streamResult {
	t.Helper()
	return replicateThroughWith(t, m, through{expect: expect})
}

func replicateThroughWith(t *testing.T, m mangler, o through) streamResult {
	t.Helper()
	vm := newToyVM(1 << 20)
	vm.disk = o.disk
	vm.start()
	defer vm.close()

	var res streamResult
	var mu sync.Mutex
	res.acked, res.counts = map[uint64]uint64{}, map[uint64]uint64{}
	bcfg := replicate.BackupConfig{
		VerifyReplica: true,
		Resume: func(cp *replicate.Checkpoint) error {
			defer cp.Memory.Close()
			if err := checkToyReplica(cp); err != nil {
				return err
			}
			if o.backupDisk != nil {
				return checkToyDisk(binary.LittleEndian.Uint64(cp.State), o.backupDisk, o.disk.Size())
			}
			return nil
		},
		Expect: o.expect,
	}
	if o.backupDisk != nil {
		bcfg.NewSink = diskmirror.NewSink(o.backupDisk, diskmirror.ReplicaConfig{})
	}
	var stream replicate.Stream
	if o.disk != nil {
		var err error
		if stream, err = diskmirror.NewSource(o.disk, diskmirror.SourceConfig{Block: o.diskBlock}); err != nil {
			t.Fatal(err)
		}
	}
	pair := replicatetest.NewUnstartedPair(t, replicate.Config{VM: vm, Interval: 10 * time.Millisecond,
		Stream: stream, StagingBytes: o.staging,
		OnEpoch: func(s *replicate.EpochStats) {
			mu.Lock()
			res.acked[s.Epoch] = s.Digest
			if s.Oversize {
				res.oversize++
			}
			mu.Unlock()
		},
		OnStreamSync: func(d replicate.StreamSyncProgress) {
			mu.Lock()
			res.diskSync = append(res.diskSync, d)
			mu.Unlock()
		}}, bcfg)
	res.backup = pair.Backup
	pair.Proxy = proxy(m)
	defer faultpoint.Attach(pair.Primary, func(point string, epoch uint64) {
		if point == faultpoint.Pause { // the vCPU is stopped
			mu.Lock()
			res.counts[epoch] = vm.count
			mu.Unlock()
		}
	})()
	pair.Start()
	res.failover, res.backupErr = pair.BackupResult()
	// The primary must notice on its own: the backup's reject, or the
	// connection closing.
	res.primaryErr = pair.PrimaryErr()
	mu.Lock()
	defer mu.Unlock()
	return res
}

func tempMemory(size uint64) (*os.File, error) {
	f, err := os.CreateTemp("", "replica")
	if err == nil {
		os.Remove(f.Name())
		err = f.Truncate(int64(size))
	}
	return f, err
}

func listen(t *testing.T) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// proxy relays the primary's frames to the backup through m.
func proxy(m mangler) func(from io.Reader, to io.Writer) {
	return func(from io.Reader, to io.Writer) {
		for {
			var f frame
			if _, err := io.ReadFull(from, f.hdr[:]); err != nil {
				return
			}
			f.payload = make([]byte, binary.LittleEndian.Uint32(f.hdr[4:]))
			if _, err := io.ReadFull(from, f.payload); err != nil {
				return
			}
			frames, cut := m(f)
			for _, o := range frames {
				if _, err := to.Write(o.bytes()); err != nil {
					return
				}
			}
			if cut {
				return
			}
		}
	}
}

func TestStreamRejected(t *testing.T) {
	var held *frame
	tests := []struct {
		name string
		m    mangler
		// wantErr names the problem; wantKept is the checkpoint the replica
		// must keep (-1: the one before badEpoch).
		wantErr string
	}{
		{"corrupted page batch", onEpoch(func(f frame) ([]frame, bool) {
			if f.typ() == tPages {
				return []frame{flipLast(f)}, false
			}
			return []frame{f}, false
		}), "checksum"},
		{"corrupted state", onEpoch(func(f frame) ([]frame, bool) {
			if f.typ() == tState {
				return []frame{flipLast(f)}, false
			}
			return []frame{f}, false
		}), "checksum"},
		{"corrupted digest in end record", onEpoch(func(f frame) ([]frame, bool) {
			if f.typ() == tEnd {
				f.payload = append([]byte(nil), f.payload...)
				f.payload[8] ^= 1
			}
			return []frame{f}, false
		}), "digest"},
		{"dropped page batch", onEpoch(func(f frame) ([]frame, bool) {
			if f.typ() == tPages {
				return nil, false
			}
			return []frame{f}, false
		}), "checksum"},
		{"reordered: state before pages", onEpoch(func(f frame) ([]frame, bool) {
			switch {
			case f.typ() == tPages && held == nil:
				held = &f
				return nil, false
			case f.typ() == tState && held != nil:
				h := *held
				held = nil
				return []frame{f, h}, false
			}
			return []frame{f}, false
		}), "checksum"},
		{"reordered: next epoch before end", func() mangler {
			var end *frame
			return func(f frame) ([]frame, bool) {
				if f.typ() == tEnd && f.epoch() == badEpoch {
					end = &f
					return nil, false
				}
				if end != nil && f.epoch() == badEpoch+1 {
					return []frame{f, *end}, false
				}
				return []frame{f}, false
			}
		}(), "epoch 6 while epoch 5 is in progress"},
		{"replayed epoch", func() mangler {
			var saved []frame
			return func(f frame) ([]frame, bool) {
				if f.epoch() == badEpoch-1 && f.typ() != 8 {
					saved = append(saved, f)
					if f.typ() == tEnd {
						return append([]frame{f}, saved...), false
					}
				}
				return []frame{f}, false
			}
		}(), "epoch 4 while epoch 5 is in progress"},
		{"oversized message", onEpoch(func(f frame) ([]frame, bool) {
			binary.LittleEndian.PutUint32(f.hdr[4:], replicate.MaxPayload+1)
			return []frame{f}, false
		}), "exceeds"},
		{"unknown message type", onEpoch(func(f frame) ([]frame, bool) {
			binary.LittleEndian.PutUint16(f.hdr[0:], 77)
			return []frame{f}, false
		}), "unknown message type 77"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			held = nil
			r := replicateThrough(t, tt.m, nil)
			if !errors.Is(r.backupErr, replicate.ErrProtocol) || !strings.Contains(r.backupErr.Error(), tt.wantErr) {
				t.Fatalf("backup: %v, want a protocol error naming %q", r.backupErr, tt.wantErr)
			}
			if !errors.Is(r.primaryErr, replicate.ErrBackupLost) || !strings.Contains(r.primaryErr.Error(), tt.wantErr) {
				t.Errorf("primary: %v, want ErrBackupLost with the backup's reason", r.primaryErr)
			}
			checkKept(t, r, badEpoch-1)
		})
	}
}

// checkKept checks that the backup's replica holds checkpoint epoch, exactly
// as the primary recorded it.
func checkKept(t *testing.T, r streamResult, epoch uint64) {
	t.Helper()
	got, digest := r.backup.LastCheckpoint()
	if got != epoch || digest != r.acked[epoch] {
		t.Fatalf("replica keeps epoch %d digest %x, want epoch %d digest %x", got, digest, epoch, r.acked[epoch])
	}
	d, err := r.backup.ReplicaDigest()
	if err != nil {
		t.Fatal(err)
	}
	if d != digest {
		t.Fatalf("replica memory digests to %x, its checkpoint says %x", d, digest)
	}
}

// A stream that ends mid-message is a dead primary: the partial epoch is
// dropped and the backup resumes the last complete one.
func TestStreamTruncated(t *testing.T) {
	r := replicateThrough(t, onEpoch(func(f frame) ([]frame, bool) {
		if f.typ() == tPages {
			f.payload = f.payload[:len(f.payload)/2]
			binary.LittleEndian.PutUint32(f.hdr[4:], uint32(2*len(f.payload)+1))
			return []frame{f}, true
		}
		return []frame{f}, false
	}), nil)
	if r.backupErr != nil {
		t.Fatalf("backup: %v, want a failover", r.backupErr)
	}
	if r.failover.Epoch != badEpoch-1 || r.failover.Digest != r.acked[badEpoch-1] || !r.failover.Verified {
		t.Fatalf("failover to epoch %d digest %x verified %v, want epoch %d digest %x", r.failover.Epoch, r.failover.Digest,
			r.failover.Verified, badEpoch-1, r.acked[badEpoch-1])
	}
	if !strings.Contains(r.failover.Cause.Error(), "inside a message") {
		t.Errorf("cause %v does not say the stream was cut", r.failover.Cause)
	}
}

func TestStreamRefusedAtHello(t *testing.T) {
	other := replicate.Shape{MemSize: 2 << 20, VCPUs: 1, Regions: []replicate.Region{{Slot: 0, GPA: 0, Size: 2 << 20}}}
	hello := func(f func(p []byte)) mangler {
		return func(fr frame) ([]frame, bool) {
			if fr.typ() == tHello {
				fr.payload = append([]byte(nil), fr.payload...)
				f(fr.payload)
			}
			return []frame{fr}, false
		}
	}
	tests := []struct {
		name    string
		m       mangler
		expect  *replicate.Shape
		wantErr string
	}{
		{"wrong protocol version", hello(func(p []byte) {
			binary.LittleEndian.PutUint32(p[8:], 9)
			binary.LittleEndian.PutUint32(p[12:], 7)
		}), nil, "protocol version: primary speaks 7..9"},
		{"foreign stream", func(fr frame) ([]frame, bool) {
			var f frame
			copy(f.hdr[:], "GET / HTTP/1.1\r\n")
			return []frame{f}, true
		}, nil, "unknown message type"},
		{"not a repagent hello", hello(func(p []byte) { copy(p, "XXXXXXXX") }), nil, "bad magic"},
		{"mismatched VM shape", func(fr frame) ([]frame, bool) { return []frame{fr}, false }, &other, "VM shape mismatch"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := replicateThrough(t, tt.m, tt.expect)
			if !errors.Is(r.backupErr, replicate.ErrProtocol) || !strings.Contains(r.backupErr.Error(), tt.wantErr) {
				t.Fatalf("backup: %v, want a protocol error naming %q", r.backupErr, tt.wantErr)
			}
			if e, _ := r.backup.LastCheckpoint(); e != 0 {
				t.Fatalf("backup holds epoch %d from a refused session", e)
			}
		})
	}
}

// crafted writes messages as a hostile or broken primary would: correct
// framing and checksums around wrong content.
type crafted struct {
	t    *testing.T
	conn net.Conn
	crc  uint32
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func (c *crafted) send(typ uint16, epoch uint64, payload []byte, sum bool) {
	var h [16]byte
	binary.LittleEndian.PutUint16(h[0:], typ)
	binary.LittleEndian.PutUint32(h[4:], uint32(len(payload)))
	binary.LittleEndian.PutUint64(h[8:], epoch)
	f := frame{hdr: h, payload: payload}
	if sum {
		c.crc = crc32.Update(c.crc, castagnoli, f.covered())
	}
	c.conn.Write(f.bytes())
}

func (c *crafted) end(epoch, pages, digest uint64, kind, round uint32) {
	p := binary.LittleEndian.AppendUint64(nil, pages)
	p = binary.LittleEndian.AppendUint64(p, digest)
	p = binary.LittleEndian.AppendUint32(p, c.crc)
	p = binary.LittleEndian.AppendUint32(p, kind)
	p = binary.LittleEndian.AppendUint32(p, round)
	p = binary.LittleEndian.AppendUint32(p, 0)
	c.send(tEnd, epoch, p, false)
	c.crc = 0
}

// zeroCRC is the CRC32C of a zero page, as a zero page's entry carries it.
var zeroCRC = crc32.Checksum(make([]byte, 4096), castagnoli)

// zeroPages is a Pages payload (doc.go: count, pad, then per page GPA u64,
// CRC u32, encoding u16, length u16, then the data) of zero pages.
func zeroPages(gpas ...uint64) []byte {
	p := binary.LittleEndian.AppendUint32(nil, uint32(len(gpas)))
	p = binary.LittleEndian.AppendUint32(p, 0)
	for _, g := range gpas {
		p = binary.LittleEndian.AppendUint64(p, g)
		p = binary.LittleEndian.AppendUint32(p, zeroCRC)
		p = binary.LittleEndian.AppendUint16(p, 3) // zero page
		p = binary.LittleEndian.AppendUint16(p, 0)
	}
	return p
}

func TestStreamCraftedContent(t *testing.T) {
	const mem = 1 << 20
	tests := []struct {
		name    string
		stream  func(c *crafted)
		wantErr string
	}{
		{"page outside guest memory", func(c *crafted) {
			c.send(tPages, 1, zeroPages(mem), true)
			c.send(tState, 1, []byte("state"), true)
			c.end(1, 1, 0, 2, 0)
		}, "outside guest memory"},
		{"page twice in one epoch", func(c *crafted) {
			c.send(tPages, 1, zeroPages(0, 4096, 0), true)
			c.send(tState, 1, []byte("state"), true)
			c.end(1, 3, 0, 2, 0)
		}, "sent twice"},
		{"checkpoint without state", func(c *crafted) {
			c.send(tPages, 1, zeroPages(0), true)
			c.end(1, 1, 0, 2, 0)
		}, "no machine state"},
		{"two states", func(c *crafted) {
			c.send(tState, 1, []byte("a"), true)
			c.send(tState, 1, []byte("b"), true)
		}, "unexpected state"},
		{"pre-copy round out of order", func(c *crafted) {
			c.send(tPages, 0, zeroPages(0), true)
			c.end(0, 1, 0, 1, 3)
		}, "expected round 0"},
		{"bad LZ4 data", func(c *crafted) {
			p := binary.LittleEndian.AppendUint32(nil, 1)
			p = binary.LittleEndian.AppendUint32(p, 0)
			p = binary.LittleEndian.AppendUint64(p, 0)
			p = binary.LittleEndian.AppendUint32(p, 0) // the page's CRC
			p = binary.LittleEndian.AppendUint16(p, 2) // lz4
			p = binary.LittleEndian.AppendUint16(p, 4)
			p = append(p, 0xff, 0xff, 0xff, 0xff)
			c.send(tPages, 1, p, true)
			c.send(tState, 1, []byte("state"), true)
			c.end(1, 1, 0, 2, 0)
		}, "LZ4 data does not decode"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Not a replicatetest.Pair: the primary here is the test,
			// writing crafted bytes on a raw connection to the backup.
			b := noResumeBackup(t, tempMemory)
			pc, bc := tcpPair(t)
			errc := make(chan error, 1)
			go func() { _, err := b.Handle(context.Background(), bc); errc <- err }()
			c := &crafted{t: t, conn: pc}
			hello := append([]byte("REPAGENT"), make([]byte, 64)...) // no disk: 56..72 stay 0
			le := binary.LittleEndian
			le.PutUint32(hello[8:], 3)
			le.PutUint32(hello[12:], 3)
			le.PutUint32(hello[16:], 4096)
			le.PutUint32(hello[20:], 1)
			le.PutUint64(hello[24:], mem)
			le.PutUint64(hello[32:], uint64(10*time.Millisecond))
			le.PutUint64(hello[40:], uint64(10*time.Millisecond))
			le.PutUint32(hello[48:], 1)
			hello = le.AppendUint32(le.AppendUint32(hello, 0), 0)
			hello = le.AppendUint64(le.AppendUint64(hello, 0), mem)
			c.send(tHello, 0, hello, false)
			tt.stream(c)
			select {
			case err := <-errc:
				if !errors.Is(err, replicate.ErrProtocol) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("backup: %v, want a protocol error naming %q", err, tt.wantErr)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("backup did not reject the stream")
			}
			if e, _ := b.LastCheckpoint(); e != 0 {
				t.Fatalf("backup applied epoch %d of a rejected stream", e)
			}
			// The rejection reached the primary, with its reason.
			pc.SetReadDeadline(time.Now().Add(5 * time.Second))
			all, _ := io.ReadAll(pc)
			if !bytes.Contains(all, []byte(tt.wantErr)) {
				t.Errorf("primary side got no reject naming %q", tt.wantErr)
			}
		})
	}
}

// noResumeBackup is a backup, closed with the test, for sessions that must
// not end in a failover.
func noResumeBackup(t *testing.T, newMemory func(uint64) (*os.File, error)) *replicate.Backup {
	t.Helper()
	b, err := replicate.NewBackup(replicate.BackupConfig{NewMemory: newMemory, Log: testLog(t),
		Resume: func(cp *replicate.Checkpoint) error { cp.Memory.Close(); return errors.New("must not resume") }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func tcpPair(t *testing.T) (net.Conn, net.Conn) {
	ln := listen(t)
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	a, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b := <-acc
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// A backup's refusal reaches Run's caller as a RefusedError with the
// backup's reason.
func TestRefusedIsTyped(t *testing.T) {
	shape := replicate.Shape{MemSize: 64 << 20, VCPUs: 1, Regions: []replicate.Region{{GPA: 0, Size: 64 << 20}}}
	vm := newToyVM(32 << 20)
	pair := replicatetest.NewPair(t, replicate.Config{VM: vm, Interval: 20 * time.Millisecond},
		replicate.BackupConfig{NewMemory: func(uint64) (*os.File, error) { return nil, errors.New("unused") }, Expect: &shape})
	err := pair.PrimaryErr()
	var refused *replicate.RefusedError
	if !errors.As(err, &refused) || !strings.Contains(refused.Reason, "VM shape mismatch") {
		t.Fatalf("Run: %v; want a RefusedError saying the shape does not match", err)
	}
}
