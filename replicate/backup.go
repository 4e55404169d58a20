package replicate

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pierrec/lz4/v4"

	"github.com/repagent/repagent/diskmirror"
)

// Errors a Backup returns.
var (
	// ErrPrimaryStopped: the primary ended the session on purpose (it said
	// bye, or that its VM stopped). There is nothing to fail over.
	ErrPrimaryStopped = errors.New("primary stopped replication")
	// ErrNoCheckpoint: the primary was lost before the first checkpoint of its
	// session completed, so there is no VM state to resume.
	ErrNoCheckpoint = errors.New("primary lost before its first checkpoint: nothing to resume")
	// ErrReplicaCorrupt: at failover the replica's memory does not match the
	// digest of its checkpoint; it is not resumed.
	ErrReplicaCorrupt = errors.New("replica memory does not match its checkpoint")
)

// errPrimaryLost marks a session that ended because the primary went away.
var errPrimaryLost = errors.New("primary lost")

// HookApply is the backup's hook point: half of an epoch's pages are applied.
const HookApply = "apply"

// BackupConfig configures a Backup.
type BackupConfig struct {
	// NewMemory returns a zero-filled file of size bytes for a replica
	// (testvm.NewMemFile makes a memfd). Required.
	NewMemory func(size uint64) (*os.File, error)
	// Resume restores the VM from a checkpoint and runs it: the failover.
	// It owns cp.Memory from the call on. Required.
	Resume func(cp *Checkpoint) error
	// Expect, when set, is the only VM shape accepted.
	Expect *Shape
	// MaxMemory is the largest guest memory a primary may declare (default
	// DefaultMaxMemory): the backup's allocations follow it (the replica, a
	// 4-byte CRC and a bit per page, staging up to about its size).
	MaxMemory uint64
	// HeartbeatTimeout is how long silence from the primary means it is gone;
	// 0 means 5 of its intervals, at least MinHeartbeatTimeout.
	HeartbeatTimeout time.Duration
	// Disk, when set, is the backup's disk image: a primary that mirrors a
	// disk (Config.Disk) of the same size keeps it equal to its own at the
	// checkpoint the replica holds. The backup hashes it when a session
	// starts, so the sync sends only the blocks that differ; the sync and
	// every epoch's writes are applied to it, and at failover it holds the
	// disk of the checkpoint resumed (the VMM's Resume opens it). A primary
	// with a disk is refused by a backup without one, and the other way
	// round; an image of another size is refused, untouched.
	Disk diskmirror.Disk
	// DiskConfig bounds the memory held for disk writes received and not yet
	// applied (past it they spill to a file). Its FirstEpoch is the engine's.
	DiskConfig diskmirror.ReplicaConfig
	// SkipVerify skips digesting the whole replica before resuming it.
	SkipVerify bool
	// OnEpoch is told of every checkpoint applied.
	OnEpoch func(epoch uint64, pages int, digest uint64)
	// Hook, when set, is called at HookApply (fault injection for tests).
	Hook func(point string, epoch uint64)
	// Log receives the backup's messages; nil means slog.Default().
	Log *slog.Logger
}

// Failover describes a failover the backup carried out.
type Failover struct {
	Epoch    uint64        // the checkpoint resumed
	Digest   uint64        // its memory digest
	Verified bool          // the replica was digested and matched
	Disk     bool          // the disk image was brought to the checkpoint's epoch
	Cause    error         // why the primary was deemed lost
	Verify   time.Duration // digesting the replica, and bringing the disk to its epoch
	Restore  time.Duration // the Resume call
	Took     time.Duration // from detecting the loss to Resume returning
}

// Backup receives a primary's epochs into a replica and, when the primary is
// lost, resumes the VM from the last complete checkpoint.
type Backup struct {
	cfg BackupConfig
	log *slog.Logger

	mu  sync.Mutex
	rep *replica // the current session's replica
}

// replica is guest memory on the backup and the checkpoint it holds.
type replica struct {
	shape  Shape
	lay    layout
	mem    *os.File
	table  *digestTable
	epoch  uint64 // last checkpoint applied (0: none)
	state  []byte
	digest uint64
	disk   *diskmirror.Replica // the session's disk; nil without one
}

// close frees the replica's memory and drops its disk's pending epochs.
func (r *replica) close() error {
	if r.disk != nil {
		r.disk.Close()
	}
	return r.mem.Close()
}

// DefaultMaxMemory is BackupConfig.MaxMemory's default.
const DefaultMaxMemory = 64 << 30

func (b *Backup) maxMemory() uint64 {
	if b.cfg.MaxMemory != 0 {
		return b.cfg.MaxMemory
	}
	return DefaultMaxMemory
}

// NewBackup checks cfg and makes a backup.
func NewBackup(cfg BackupConfig) (*Backup, error) {
	if cfg.NewMemory == nil || cfg.Resume == nil {
		return nil, errors.New("replicate: backup config needs NewMemory and Resume")
	}
	if cfg.HeartbeatTimeout != 0 && cfg.HeartbeatTimeout < 10*time.Millisecond {
		return nil, fmt.Errorf("backup heartbeat timeout %v is too short (at least 10ms)", cfg.HeartbeatTimeout)
	}
	if cfg.Expect != nil {
		if err := cfg.Expect.check(); err != nil {
			return nil, fmt.Errorf("expected shape: %w", err)
		}
	}
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	return &Backup{cfg: cfg, log: log}, nil
}

// LastCheckpoint returns the epoch and digest of the checkpoint the replica
// holds (epoch 0: none).
func (b *Backup) LastCheckpoint() (epoch, digest uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.rep == nil {
		return 0, 0
	}
	return b.rep.epoch, b.rep.digest
}

// ReplicaDigest digests the replica's memory as it is now.
func (b *Backup) ReplicaDigest() (uint64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.rep == nil {
		return 0, errors.New("no replica")
	}
	return DigestMemory(b.rep.mem, b.rep.shape.MemSize)
}

// Close frees the replica, unless a failover handed it on.
func (b *Backup) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.rep == nil {
		return nil
	}
	err := b.rep.close()
	b.rep = nil
	return err
}

// Serve accepts primaries on ln, one session at a time. A session the backup
// refuses (a protocol error: corrupt, truncated, reordered or foreign data, a
// wrong version or shape) is logged and the next primary awaited; the replica
// keeps its last good checkpoint. When a primary is lost after its first
// checkpoint, Serve fails over and returns what it did. It returns
// ErrPrimaryStopped when the primary stopped on purpose, an error wrapping
// ErrNoCheckpoint when it was lost too early, and ctx's error when ctx ends.
func (b *Backup) Serve(ctx context.Context, ln net.Listener) (*Failover, error) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("accept primary: %w", err)
		}
		fo, err := b.Handle(ctx, conn)
		if errors.Is(err, ErrProtocol) {
			epoch, _ := b.LastCheckpoint()
			b.log.Error("refused primary", "from", conn.RemoteAddr(), "err", err, "replica-epoch", epoch)
			continue
		}
		return fo, err
	}
}

// Handle runs one session with a primary over conn, which it closes, and
// fails over if the primary is lost. Errors are as for Serve; a protocol
// error wraps ErrProtocol.
func (b *Backup) Handle(ctx context.Context, conn net.Conn) (*Failover, error) {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	ic := &idleConn{Conn: conn, timeout: max(b.cfg.HeartbeatTimeout, 5*time.Second)}
	s := &session{b: b, conn: ic, bw: bufio.NewWriter(ic), done: make(chan struct{})}
	err := s.run()
	close(s.done)
	stop()
	if errors.Is(err, ErrProtocol) {
		lingerClose(ic)
	}
	conn.Close()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if !errors.Is(err, errPrimaryLost) {
		return nil, err
	}
	return b.failover(s.rep, err)
}

// failover resumes the session's last checkpoint.
func (b *Backup) failover(rep *replica, cause error) (*Failover, error) {
	t0 := time.Now()
	b.mu.Lock()
	if b.rep != rep {
		rep = nil // closed or replaced meanwhile
	}
	b.mu.Unlock()
	if rep == nil || rep.epoch == 0 {
		return nil, fmt.Errorf("%w (%v)", ErrNoCheckpoint, cause)
	}
	fo := &Failover{Epoch: rep.epoch, Digest: rep.digest, Cause: cause}
	b.log.Warn("PRIMARY LOST: failing over", "cause", cause, "epoch", rep.epoch)
	if !b.cfg.SkipVerify {
		d, err := DigestMemory(rep.mem, rep.shape.MemSize)
		if err != nil {
			return nil, fmt.Errorf("verify replica: %w", err)
		}
		if d != rep.digest {
			return nil, fmt.Errorf("%w: epoch %d digest %s, memory digests to %s", ErrReplicaCorrupt, rep.epoch, FormatDigest(rep.digest), FormatDigest(d))
		}
		fo.Verified = true
	}
	if rep.disk != nil {
		// Every epoch up to the checkpoint is applied as it is verified;
		// Failover makes sure of it, drops anything later, and syncs.
		if err := rep.disk.Failover(rep.epoch); err != nil {
			return nil, fmt.Errorf("bring the disk to epoch %d: %w", rep.epoch, err)
		}
		fo.Disk = true
	}
	t := time.Now()
	fo.Verify = t.Sub(t0)
	cp := &Checkpoint{Epoch: rep.epoch, State: rep.state, Memory: rep.mem, Digest: rep.digest, Shape: rep.shape}
	b.mu.Lock()
	b.rep = nil // the memory is Resume's now
	b.mu.Unlock()
	if err := b.cfg.Resume(cp); err != nil {
		return fo, fmt.Errorf("resume epoch %d: %w", rep.epoch, err)
	}
	fo.Restore = time.Since(t)
	fo.Took = time.Since(t0)
	b.log.Info("failed over", "epoch", fo.Epoch, "digest", FormatDigest(fo.Digest), "verified", fo.Verified, "took", fo.Took)
	return fo, nil
}

// session is one primary's connection.
type session struct {
	b       *Backup
	conn    *idleConn
	wmu     sync.Mutex
	bw      *bufio.Writer
	done    chan struct{}
	timeout time.Duration
	acked   atomic.Uint64

	rep       *replica
	precopy   bool   // still in the initial sync
	round     uint32 // next pre-copy round expected
	epoch     uint64 // next checkpoint epoch expected
	crc       uint32
	pages     uint64
	staged    []byte // a checkpoint epoch's Pages messages, payloads back to back
	state     []byte
	hasState  bool
	seen      []uint64 // bitmap of pages sent in this epoch
	seenList  []uint64
	maxStaged int
	pageBuf   []byte
	idxs      []uint64
	crcs      []uint32
	drecv     *diskRecv // the epoch's disk stream, while it arrives
}

// diskRecv feeds an epoch's disk messages, as they arrive, to
// diskmirror.Replica.Receive, which verifies and spools them.
type diskRecv struct {
	pw   *io.PipeWriter
	done chan struct{}
	sum  diskmirror.Summary
	err  error
}

func (s *session) write(t MsgType, epoch uint64, payload []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if _, err := s.bw.Write(encodeMsg(nil, t, epoch, payload)); err != nil {
		return err
	}
	return s.bw.Flush()
}

// reject tells the primary why the session ends and returns err.
func (s *session) reject(err error) error {
	s.write(MsgReject, 0, appendReject(nil, err.Error()))
	return err
}

// run handles the session until it ends.
func (s *session) run() error {
	s.timeout = s.conn.timeout
	rd := newMsgReader(s.conn)
	h, payload, err := rd.ReadMsg()
	if err != nil {
		return s.reject(protoErr("read hello: %v", err))
	}
	if h.Type != MsgHello {
		return s.reject(protoErr("first message is %v, want hello", h.Type))
	}
	hello, err := decodeHello(payload)
	if err != nil {
		return s.reject(err)
	}
	v, err := negotiate(hello)
	if err != nil {
		return s.reject(err)
	}
	if e := s.b.cfg.Expect; e != nil && !e.Equal(hello.Shape) {
		return s.reject(protoErr("VM shape mismatch: primary has %v (regions %v), this backup expects %v (regions %v)",
			hello.Shape, hello.Shape.Regions, *e, e.Regions))
	}
	disk, err := s.newDisk(hello)
	if err != nil {
		return s.reject(err)
	}
	if err := s.newReplica(hello.Shape, disk); err != nil {
		if disk != nil {
			disk.Close()
		}
		return s.reject(protoErr("backup cannot hold a replica of %v: %v", hello.Shape, err))
	}
	s.timeout = s.b.cfg.HeartbeatTimeout
	if s.timeout == 0 {
		// hello's timing is bounded by decodeHello, so this cannot overflow.
		s.timeout = max(5*hello.Interval, MinHeartbeatTimeout, 4*hello.Heartbeat)
	}
	s.conn.timeout = s.timeout
	if err := s.write(MsgWelcome, 0, appendWelcome(nil, v)); err != nil {
		return fmt.Errorf("%w: send welcome: %v", errPrimaryLost, err)
	}
	s.b.log.Info("primary connected", "from", s.conn.RemoteAddr(), "vmm", hello.VMM, "shape", hello.Shape,
		"interval", hello.Interval, "version", v, "heartbeat-timeout", s.timeout)
	go s.heartbeats(min(hello.Heartbeat, s.timeout/4))
	defer s.abortDisk()
	if disk != nil {
		if err := s.sendHashes(disk, int(hello.DiskBlock)); err != nil {
			return err
		}
	}
	s.precopy, s.epoch = true, 1
	s.maxStaged = int(hello.Shape.MemSize + hello.Shape.MemSize/8 + MaxPayload)
	for {
		h, payload, err := rd.ReadMsg()
		if err != nil {
			if errors.Is(err, ErrProtocol) {
				return s.reject(err)
			}
			if isTimeout(err) {
				err = fmt.Errorf("no word from the primary for %v", s.timeout)
			}
			if err == io.ErrUnexpectedEOF {
				err = errors.New("stream ended inside a message")
			}
			return fmt.Errorf("%w: %v (epoch %d in progress dropped)", errPrimaryLost, err, s.current())
		}
		if err := s.handle(h, rd.rawHeader(), payload); err != nil {
			if errors.Is(err, ErrProtocol) {
				return s.reject(err)
			}
			return err
		}
	}
}

func (s *session) current() uint64 {
	if s.precopy {
		return 0
	}
	return s.epoch
}

func (s *session) heartbeats(every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.done:
			return
		case <-t.C:
		}
		if s.write(MsgHeartbeat, 0, appendHeartbeat(nil, Heartbeat{Sent: time.Now().UnixNano(), Epoch: s.acked.Load()})) != nil {
			return
		}
	}
}

func (b *Backup) setReplica(r *replica) {
	b.mu.Lock()
	old := b.rep
	b.rep = r
	b.mu.Unlock()
	if old != nil {
		old.close()
	}
}

// newDisk checks the primary's disk against this backup's and makes the
// session's disk replica; nil without a disk. Nothing is written to the
// image.
func (s *session) newDisk(hello Hello) (*diskmirror.Replica, error) {
	img := s.b.cfg.Disk
	switch {
	case hello.DiskSize == 0 && img == nil:
		return nil, nil
	case img == nil:
		return nil, protoErr("the primary mirrors a disk of %d bytes, and this backup has no disk image (BackupConfig.Disk)", hello.DiskSize)
	case hello.DiskSize == 0:
		return nil, protoErr("this backup has a disk image, and the primary mirrors no disk (Config.Disk)")
	case diskmirror.HashListSize(hello.DiskSize, int(hello.DiskBlock)) < 0:
		return nil, protoErr("disk of %d bytes in %d-byte sync blocks: want blocks of a power of two from %d to %d, at most %d of them",
			hello.DiskSize, hello.DiskBlock, diskmirror.MinBlockSize, diskmirror.MaxBlockSize, diskmirror.MaxBlocks)
	}
	cfg := s.b.cfg.DiskConfig
	cfg.FirstEpoch = 2 // the first checkpoint carries the sync's residual, not writes
	disk, err := diskmirror.NewReplica(img, hello.DiskSize, cfg)
	if err != nil {
		return nil, protoErr("disk: %v", err)
	}
	return disk, nil
}

// sendHashes hashes the backup image for the disk sync and sends the list in
// pieces. Heartbeats go out meanwhile.
func (s *session) sendHashes(disk *diskmirror.Replica, block int) error {
	t0 := time.Now()
	hs, err := disk.Hashes(block) // the block size was checked at hello: an error here is the image's
	if err != nil {
		return s.reject(fmt.Errorf("hash the backup disk image: %w", err))
	}
	var buf bytes.Buffer
	if err := diskmirror.EncodeHashes(&buf, hs, disk.Size(), block); err != nil {
		return s.reject(fmt.Errorf("disk hash list: %w", err))
	}
	for b := buf.Bytes(); len(b) > 0; {
		k := min(len(b), diskChunk)
		if err := s.write(MsgDiskHashes, 0, b[:k]); err != nil {
			return fmt.Errorf("%w: send the disk hash list: %v", errPrimaryLost, err)
		}
		b = b[k:]
	}
	s.b.log.Info("disk image hashed", "blocks", len(hs), "block-size", block, "took", time.Since(t0))
	return nil
}

// diskErr makes an error of the disk replica a protocol error when the data
// was at fault (ErrFormat), and leaves it as it is (an I/O error) otherwise.
func diskErr(err error) error {
	if errors.Is(err, diskmirror.ErrFormat) {
		return protoErr("disk: %v", err)
	}
	return fmt.Errorf("disk: %w", err)
}

// applySync applies a disk sync stream at once (it is verified whole first):
// before the first checkpoint the replica holds no checkpoint, and the first
// checkpoint's residual must land before any epoch's writes.
func (s *session) applySync(payload []byte) error {
	if _, err := s.rep.disk.ApplySync(bytes.NewReader(payload)); err != nil {
		return diskErr(err)
	}
	return nil
}

// diskWrite passes a piece of the epoch's disk stream to the disk replica.
func (s *session) diskWrite(payload []byte) error {
	if s.drecv == nil {
		pr, pw := io.Pipe()
		r := &diskRecv{pw: pw, done: make(chan struct{})}
		disk := s.rep.disk
		go func() {
			defer close(r.done)
			r.sum, r.err = disk.Receive(pr)
			pr.CloseWithError(errors.New("disk stream already ended"))
		}()
		s.drecv = r
	}
	if _, err := s.drecv.pw.Write(payload); err != nil {
		r := s.drecv
		s.drecv = nil
		<-r.done
		if r.err != nil {
			return diskErr(r.err)
		}
		return protoErr("epoch %d: disk data after the end of its disk stream", s.epoch)
	}
	return nil
}

// finishDisk ends the epoch's disk stream: every checkpoint after the first
// carries one, complete and verified, before its end record.
func (s *session) finishDisk() error {
	r := s.drecv
	if r == nil {
		return protoErr("checkpoint epoch %d has no disk writes (a mirrored disk sends a stream every epoch)", s.epoch)
	}
	s.drecv = nil
	r.pw.Close()
	<-r.done
	if r.err != nil {
		return diskErr(r.err)
	}
	if r.sum.Epoch != s.epoch {
		return protoErr("epoch %d carries the disk writes of epoch %d", s.epoch, r.sum.Epoch)
	}
	return nil
}

// abortDisk stops a disk stream in progress; the disk replica drops it.
func (s *session) abortDisk() {
	if r := s.drecv; r != nil {
		s.drecv = nil
		r.pw.CloseWithError(errors.New("epoch dropped"))
		<-r.done
	}
}

// newReplica makes the session's replica memory. It replaces any replica of
// an earlier session: that session's primary went on unprotected, so its
// checkpoint may be older than what the outside world has seen, and resuming
// it could step back.
func (s *session) newReplica(shape Shape, disk *diskmirror.Replica) error {
	if limit := s.b.maxMemory(); shape.MemSize > limit {
		return fmt.Errorf("its %d MiB exceed this backup's limit of %d MiB (BackupConfig.MaxMemory)", shape.MemSize>>20, limit>>20)
	}
	mem, err := s.b.cfg.NewMemory(shape.MemSize)
	if err != nil {
		return fmt.Errorf("replica memory: %w", err)
	}
	s.rep = &replica{shape: shape, lay: layoutFor(shape), mem: mem, table: newDigestTable(shape.Pages()), disk: disk}
	s.seen = make([]uint64, (shape.Pages()+63)/64)
	s.b.setReplica(s.rep)
	return nil
}

// handle takes one message of the stream.
func (s *session) handle(h Header, hdr, payload []byte) error {
	switch h.Type {
	case MsgHeartbeat:
		_, err := decodeHeartbeat(payload)
		return err
	case MsgBye:
		if h.Epoch != s.epoch-1 || s.pages != 0 || s.hasState || len(s.staged) != 0 || s.drecv != nil {
			return protoErr("bye at epoch %d while epoch %d is in progress", h.Epoch, s.current())
		}
		return fmt.Errorf("%w after epoch %d", ErrPrimaryStopped, h.Epoch)
	case MsgReject:
		reason, err := decodeReject(payload)
		if err != nil {
			return err
		}
		return fmt.Errorf("%w: %s", ErrPrimaryStopped, reason)
	case MsgPages, MsgState, MsgEnd, MsgDiskSync, MsgDisk:
	default:
		return protoErr("primary sent %v in the middle of the stream", h.Type)
	}
	if s.precopy && h.Epoch == 1 && s.pages == 0 {
		s.precopy = false // the first checkpoint follows the last pre-copy round
	}
	if want := s.current(); h.Epoch != want {
		return protoErr("%v message of epoch %d while epoch %d is in progress (reordered or foreign stream)", h.Type, h.Epoch, want)
	}
	switch h.Type {
	case MsgDiskSync, MsgDisk:
		return s.handleDisk(h, hdr, payload)
	case MsgPages:
		s.crc = crc32.Update(crc32.Update(s.crc, castagnoli, hdr), castagnoli, payload)
		if !s.precopy && len(s.staged)+len(payload) > s.maxStaged {
			return protoErr("epoch %d exceeds the staging limit of %d bytes", s.epoch, s.maxStaged)
		}
		// Check every entry now, so a stream repeating pages or naming pages
		// outside memory is refused before it fills staging.
		if err := decodePages(payload, func(e pageEntry) error { _, err := s.markSeen(e.GPA); return err }); err != nil {
			return err
		}
		if s.precopy {
			// Until the first checkpoint the replica is no checkpoint, so a
			// pre-copy batch goes straight in.
			s.idxs, s.crcs = s.idxs[:0], s.crcs[:0]
			if err := s.decode(payload); err != nil {
				return err
			}
			s.pages += uint64(len(s.idxs))
			return s.writeRuns(false)
		}
		s.staged = append(s.staged, hdr[4:8]...) // the payload length, to split them again
		s.staged = append(s.staged, payload...)
		return nil
	case MsgState:
		if s.precopy || s.hasState {
			return protoErr("unexpected state message in epoch %d", s.current())
		}
		s.crc = crc32.Update(crc32.Update(s.crc, castagnoli, hdr), castagnoli, payload)
		s.state, s.hasState = append([]byte(nil), payload...), true
		return nil
	}
	end, err := decodeEnd(payload)
	if err != nil {
		return err
	}
	return s.end(end)
}

// handleDisk takes a disk message. Sync streams come between pre-copy rounds
// (outside their checksums: each stream has its own) and, for the residual,
// in the first checkpoint; every later checkpoint carries its epoch's disk
// stream. In a checkpoint both come before the state, under the checksum.
func (s *session) handleDisk(h Header, hdr, payload []byte) error {
	if s.rep.disk == nil {
		return protoErr("%v message, and the session mirrors no disk", h.Type)
	}
	switch {
	case h.Type == MsgDiskSync && s.precopy:
		if s.pages != 0 {
			return protoErr("disk sync stream inside pre-copy round %d", s.round)
		}
		return s.applySync(payload)
	case s.precopy:
		return protoErr("disk writes of epoch %d in the initial sync", h.Epoch)
	case s.hasState:
		return protoErr("%v message after the state of epoch %d", h.Type, s.epoch)
	case h.Type == MsgDiskSync && s.epoch != 1:
		return protoErr("disk sync stream in checkpoint epoch %d (only the first carries the sync's residual)", s.epoch)
	case h.Type == MsgDisk && s.epoch == 1:
		return protoErr("disk writes in checkpoint epoch 1 (it carries the sync's residual; writes start with epoch 2)")
	}
	s.crc = crc32.Update(crc32.Update(s.crc, castagnoli, hdr), castagnoli, payload)
	if h.Type == MsgDiskSync {
		return s.applySync(payload)
	}
	return s.diskWrite(payload)
}

// end closes an epoch: verify, ack, apply.
func (s *session) end(e End) error {
	defer s.resetEpoch()
	switch {
	case s.precopy && e.Kind != kindPrecopy:
		return protoErr("checkpoint end record in the initial sync, with no checkpoint data")
	case s.precopy && e.Round != s.round:
		return protoErr("end of pre-copy round %d, expected round %d", e.Round, s.round)
	case !s.precopy && e.Kind != kindCheckpoint:
		return protoErr("pre-copy round after the first checkpoint")
	case e.Checksum != s.crc:
		return protoErr("epoch %d: checksum %08x, the stream sums to %08x (corrupted)", s.current(), e.Checksum, s.crc)
	case !s.precopy && !s.hasState:
		return protoErr("checkpoint epoch %d has no machine state", s.epoch)
	}
	if !s.precopy && s.rep.disk != nil && s.epoch > 1 {
		if err := s.finishDisk(); err != nil {
			return err
		}
	}
	if s.precopy {
		if e.Pages != s.pages {
			return protoErr("pre-copy round %d: end says %d pages, %d arrived", s.round, e.Pages, s.pages)
		}
		if e.Digest != s.rep.table.digest {
			return protoErr("pre-copy round %d: digest %s, replica digests to %s", s.round, FormatDigest(e.Digest), FormatDigest(s.rep.table.digest))
		}
		s.round++
		return nil
	}
	// Decode the staged epoch completely before touching the replica.
	if err := s.decodeStaged(); err != nil {
		return err
	}
	if uint64(len(s.idxs)) != e.Pages {
		return protoErr("epoch %d: end says %d pages, %d arrived", s.epoch, e.Pages, len(s.idxs))
	}
	d := s.rep.table.digest
	for k, idx := range s.idxs {
		d += s.rep.table.delta(idx, s.crcs[k])
	}
	if d != e.Digest {
		return protoErr("epoch %d: digest %s, the replica would digest to %s", s.epoch, FormatDigest(e.Digest), FormatDigest(d))
	}
	if err := s.write(MsgAck, s.epoch, appendAck(nil, d)); err != nil {
		// The epoch is verified and complete: apply it anyway, so the replica
		// is the newest complete checkpoint; the read that follows notices.
		s.b.log.Warn("send ack", "epoch", s.epoch, "err", err)
	}
	if err := s.writeRuns(true); err != nil {
		return err
	}
	if s.rep.disk != nil && s.epoch > 1 {
		if err := s.rep.disk.Commit(s.epoch); err != nil {
			return diskErr(err)
		}
	}
	s.b.mu.Lock()
	s.rep.state, s.rep.epoch, s.rep.digest = s.state, s.epoch, d
	s.b.mu.Unlock()
	s.acked.Store(s.epoch)
	if s.b.cfg.OnEpoch != nil {
		s.b.cfg.OnEpoch(s.epoch, len(s.idxs), d)
	}
	s.epoch++
	return nil
}

func (s *session) resetEpoch() {
	s.abortDisk()
	s.crc, s.pages, s.staged, s.state, s.hasState = 0, 0, s.staged[:0], nil, false
	for _, i := range s.seenList {
		s.seen[i/64] = 0
	}
	s.seenList = s.seenList[:0]
}

// markSeen checks that a page appears once per epoch and lies in memory.
func (s *session) markSeen(gpa uint64) (uint64, error) {
	idx, ok := s.rep.lay.index(gpa)
	if !ok {
		return 0, protoErr("page at GPA %#x is outside guest memory", gpa)
	}
	if s.seen[idx/64]&(1<<(idx%64)) != 0 {
		return 0, protoErr("page at GPA %#x sent twice in epoch %d", gpa, s.current())
	}
	s.seen[idx/64] |= 1 << (idx % 64)
	s.seenList = append(s.seenList, idx)
	return idx, nil
}

// decodePage decodes one entry into dst (a page).
func decodePage(e pageEntry, dst []byte) error {
	switch e.Enc {
	case encZero:
		clear(dst)
	case encRaw:
		copy(dst, e.Data)
	case encLZ4:
		n, err := lz4.UncompressBlock(e.Data, dst)
		if err != nil || n != PageSize {
			return protoErr("page at GPA %#x: LZ4 data does not decode to a page", e.GPA)
		}
	}
	return nil
}

// page returns page k of the session's decode buffer, growing it.
func (s *session) page(k int) []byte {
	if need := (k + 1) * PageSize; need > len(s.pageBuf) {
		s.pageBuf = append(s.pageBuf, make([]byte, max(need, 2*len(s.pageBuf))-len(s.pageBuf))...)
	}
	return s.pageBuf[k*PageSize : (k+1)*PageSize]
}

// decodeStaged decodes every staged page into the page buffer, with its
// replica index and CRC.
func (s *session) decodeStaged() error {
	s.idxs, s.crcs = s.idxs[:0], s.crcs[:0]
	for st := s.staged; len(st) > 0; {
		n := int(uint32(st[0]) | uint32(st[1])<<8 | uint32(st[2])<<16 | uint32(st[3])<<24)
		if err := s.decode(st[4 : 4+n]); err != nil {
			return err
		}
		st = st[4+n:]
	}
	return nil
}

// decode appends a Pages payload's pages, checked on arrival, to the decode
// buffer, with their replica indexes and CRCs.
func (s *session) decode(payload []byte) error {
	return decodePages(payload, func(e pageEntry) error {
		idx, _ := s.rep.lay.index(e.GPA)
		p := s.page(len(s.idxs))
		if err := decodePage(e, p); err != nil {
			return err
		}
		s.idxs = append(s.idxs, idx)
		s.crcs = append(s.crcs, pageCRC(p))
		return nil
	})
}

// writeRuns writes the decode buffer's pages into the replica, a run of
// consecutive replica pages per write, and records their CRCs. For a
// checkpoint (hook) it calls Hook at HookApply halfway.
func (s *session) writeRuns(hook bool) error {
	n := len(s.idxs)
	hook = hook && s.b.cfg.Hook != nil
	if n == 0 && hook {
		s.b.cfg.Hook(HookApply, s.epoch) // an empty epoch is half applied at once
	}
	for i := 0; i < n; {
		j := i + 1
		for j < n && s.idxs[j] == s.idxs[j-1]+1 {
			j++
		}
		if _, err := s.rep.mem.WriteAt(s.pageBuf[i*PageSize:j*PageSize], int64(s.idxs[i]*PageSize)); err != nil {
			return fmt.Errorf("epoch %d: write replica: %w", s.current(), err)
		}
		for k := i; k < j; k++ {
			s.rep.table.set(s.idxs[k], s.crcs[k])
		}
		if i <= n/2 && n/2 < j && hook {
			s.b.cfg.Hook(HookApply, s.epoch)
		}
		i = j
	}
	return nil
}

// lingerClose lets a reject reach the primary: half-close (closeWrite), and
// drain what the primary still sends until it closes too (it does on reading
// the reject) or a second has passed, however much it sends.
func lingerClose(c *idleConn) {
	c.closeWrite()
	c.Conn.SetReadDeadline(time.Now().Add(time.Second))
	io.Copy(io.Discard, c.Conn)
}
