package replicate

import (
	"context"
	"crypto/tls"
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

	"github.com/repagent/repagent/internal/cpuclock"
	"github.com/repagent/repagent/internal/faultpoint"
	"github.com/repagent/repagent/internal/hostsys"
)

// errPrimaryLost marks a session that ended because the primary went away.
var errPrimaryLost = errors.New("primary lost")

// BackupConfig configures a Backup.
type BackupConfig struct {
	// NewMemory returns a zero-filled file of size bytes for a replica
	// (testvm.NewMemFile makes a memfd). Required.
	NewMemory func(size uint64) (*os.File, error)
	// Resume restores the VM from a checkpoint and runs it: the failover.
	// It owns cp.Memory from the call on. Required.
	Resume func(cp *Checkpoint) error
	// Prepare, when set, is called once per session with its first
	// checkpoint, after its ack, on a goroutine of its own (a failover
	// waits for it to return): the VMM may build the VM a failover would
	// restore (its KVM VM, memory slots over cp.Memory, vCPUs), so that the
	// failover only loads the state (testvm.Prepare). cp.Memory stays the
	// backup's, which keeps writing it: map it shared, do not close it. A
	// Resume whose cp.Memory is the same file may use what Prepare built;
	// one of another file (a later session's) may not. An error is logged,
	// and the failover builds the VM.
	Prepare func(cp *Checkpoint) error
	// Claim, when set, is the failover's first step: it returns once this
	// backup may resume cp (with fencing, once it owns the VM and the
	// standby record names cp's session: protect does it with
	// replicate/fence), or with an error, and then nothing is resumed: the
	// replica and the disk stay as they are. It may wait as long as the
	// primary holds the VM, until ctx ends.
	Claim func(ctx context.Context, cp *Checkpoint) error
	// Expect, when set, is the only VM shape accepted.
	Expect *Shape
	// MaxMemory is the largest guest memory a primary may declare (default
	// DefaultMaxMemory): the backup's allocations follow it (the replica, a
	// 4-byte CRC and a bit per page, staging up to about its size).
	MaxMemory uint64
	// HeartbeatTimeout is how long silence from the primary means it is gone;
	// 0 means 5 of its intervals, at least MinHeartbeatTimeout.
	HeartbeatTimeout time.Duration
	// NewSink, when set, makes the backup's half of a primary's device
	// stream (Config.Stream) for each session: diskmirror.NewSink keeps a
	// disk image equal to the primary's at the checkpoint the replica holds,
	// and at failover it holds the disk of the checkpoint resumed (the VMM's
	// Resume opens it). A primary with a stream is refused by a backup
	// without NewSink, and the other way round.
	NewSink NewSink
	// VerifyReplica digests the whole replica before resuming it and refuses
	// to resume one that does not match its checkpoint (ErrReplicaCorrupt).
	// Failover then grows with memory (about 80 ms at 256 MiB here), so it is
	// off by default: every epoch was verified as it arrived (each page
	// against its CRC, the epoch against its checksum and the primary's
	// memory digest, kept page by page), which already makes the replica the
	// checkpoint bit for bit unless the backup's own memory failed since.
	VerifyReplica bool
	// OnEpoch is told of every checkpoint applied.
	OnEpoch func(epoch uint64, pages int, digest uint64)
	// OnApply, when set, is called after every checkpoint is applied (and
	// its stream committed), on the session's goroutine, before the next
	// epoch is read: with the checkpoint (cp.Memory is the replica's file:
	// do not close it), the replica's memory as it is at that checkpoint
	// (read it only, and only during the call) and the indices of the
	// pages the checkpoint wrote (reused after the call). It is how a
	// history keeps points (replicate/history.Intake); what it takes, the
	// next epoch waits for, not the ack of this one.
	OnApply func(cp *Checkpoint, mem []byte, pages []int64)
	// TLS, when set, is the server side of a TLS session that every
	// connection must complete before its hello: protect.LoadTLS makes one
	// that requires, and verifies, the primary's certificate. Without it
	// the link is plaintext and anyone who reaches the port is served.
	TLS *tls.Config
	// HandshakeTimeout bounds a connection's handshake, TLS and hello
	// together, as a whole: bytes that trickle in do not extend it
	// (default DefaultHandshakeTimeout).
	HandshakeTimeout time.Duration
	// MaxHandshakes is how many connections Serve takes through their
	// handshake at once (default DefaultMaxHandshakes); one more evicts the
	// oldest, counted (ServeStats).
	MaxHandshakes int
	// Once makes Serve return after its first session, however it ended;
	// by default a session that ends before its first checkpoint (refused,
	// lost, stopped) leaves Serve waiting for the next primary.
	Once bool
	// Log receives the backup's messages; nil means slog.Default().
	Log *slog.Logger
}

// Failover describes a failover the backup carried out.
type Failover struct {
	Epoch    uint64        // the checkpoint resumed
	Digest   uint64        // its memory digest
	Verified bool          // the replica was digested and matched
	Stream   bool          // the stream's sink (a disk) was brought to the checkpoint's epoch
	Cause    error         // why the primary was deemed lost
	Claim    time.Duration // waiting for BackupConfig.Claim: with fencing, to own the VM
	Handover bool          // the primary handed the VM over (a planned migration), not lost
	Verify   time.Duration // digesting the replica, and bringing the sink to its epoch
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

	counts serveCounters // Serve's
	// claiming is set while a failover waits for BackupConfig.Claim.
	claiming atomic.Bool

	// speak is the protocol versions the backup accepts (unset: all this
	// build speaks); tests narrow it to play an older backup.
	speak versions
}

// replica is guest memory on the backup and the checkpoint it holds.
type replica struct {
	shape Shape
	lay   layout
	mem   *os.File
	// mapped is mem mapped shared, which the session writes pages into (a
	// copy per page, no system call); written marks the pages ever written
	// there, so that a zero page on a page still zero costs nothing.
	mapped  []byte
	written []uint64
	table   *digestTable
	session SessionID // the session that fills it (zero in versions 2 and 3)
	epoch   uint64    // last checkpoint applied (0: none)
	state   []byte
	digest  uint64
	sink    Sink // the session's stream sink; nil without one
	// prepared, once BackupConfig.Prepare runs for this replica, closes
	// when it returns.
	prepared chan struct{}
}

// close frees the replica's memory and drops its sink's pending epochs.
func (r *replica) close() error {
	r.waitPrepared()
	if r.sink != nil {
		r.sink.Close()
	}
	r.unmap()
	return r.mem.Close()
}

// waitPrepared waits for BackupConfig.Prepare, if it runs for r.
func (r *replica) waitPrepared() {
	if r.prepared != nil {
		<-r.prepared
	}
}

// openReplica makes a replica of shape in mem, a zero-filled file.
func openReplica(shape Shape, mem *os.File, sink Sink) (*replica, error) {
	if st, err := mem.Stat(); err != nil || uint64(st.Size()) < shape.MemSize {
		return nil, fmt.Errorf("replica memory: the file is smaller than the %d bytes asked (%v)", shape.MemSize, err)
	}
	mapped, err := hostsys.MapShared(mem, int(shape.MemSize))
	if err != nil {
		return nil, fmt.Errorf("replica memory: %w", err)
	}
	return &replica{shape: shape, lay: layoutFor(shape), mem: mem, mapped: mapped, written: make([]uint64, (shape.Pages()+63)/64),
		table: newDigestTable(shape.Pages()), sink: sink}, nil
}

// unmap drops the session's mapping of the memory (before Resume owns it).
func (r *replica) unmap() {
	if r.mapped != nil {
		hostsys.Unmap(r.mapped)
		r.mapped = nil
	}
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

// Handle runs one session with a primary over conn, which it closes, and
// fails over if the primary is lost: the handshake (TLS with
// BackupConfig.TLS, then the hello) within BackupConfig.HandshakeTimeout,
// then the session. Errors are as for Serve; a refused handshake or session
// wraps ErrProtocol.
func (b *Backup) Handle(ctx context.Context, conn net.Conn) (*Failover, error) {
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	pc, err := b.handshake(ctx, conn)
	if err != nil {
		conn.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	return b.runSession(ctx, pc)
}

// runSession serves a connection through its handshake until the session
// ends, and fails over if the primary is lost.
func (b *Backup) runSession(ctx context.Context, pc *pending) (*Failover, error) {
	stop := context.AfterFunc(ctx, func() { pc.s.conn.Close() })
	s := pc.s
	s.conn.until = time.Time{} // the heartbeat timeout from now on
	err := s.serve(pc.rd, pc.hello)
	ho, handedOver := errors.AsType[*handoverError](err)
	if !handedOver {
		close(s.done) // a handover keeps heartbeating until it answers
	}
	stop()
	if errors.Is(err, ErrProtocol) {
		lingerClose(s.conn)
	}
	if !handedOver {
		s.conn.Close() // a handover answers on it once the VM runs
	}
	if s.rep != nil && s.rep.epoch == 0 {
		b.dropReplica(s.rep) // nothing to keep; failover then finds no checkpoint
	}
	if ctx.Err() != nil {
		if handedOver {
			close(s.done)
		}
		s.conn.Close()
		return nil, ctx.Err()
	}
	if handedOver {
		return b.handover(ctx, s, ho)
	}
	if !errors.Is(err, errPrimaryLost) {
		return nil, err
	}
	return b.failover(ctx, s.rep, err)
}

// handoverError ends a session whose primary handed its VM over: the
// backup resumes epoch at once (a planned migration).
type handoverError struct{ epoch uint64 }

func (e *handoverError) Error() string {
	return fmt.Sprintf("primary handed the VM over at epoch %d", e.epoch)
}

// handover resumes the checkpoint the primary handed over, and tells it the
// VM runs here (or why it does not).
// The session's heartbeats go on meanwhile: the primary, waiting with its
// VM paused, must not take a long restore for a dead backup and resume its
// own copy while this one starts.
func (b *Backup) handover(ctx context.Context, s *session, ho *handoverError) (*Failover, error) {
	defer s.conn.Close()
	fo, err := b.failover(ctx, s.rep, ho)
	close(s.done) // no heartbeat after the answer
	if err != nil {
		s.reject(fmt.Errorf("handover of epoch %d failed: %w", ho.epoch, err))
		lingerClose(s.conn)
		return fo, err
	}
	fo.Handover = true
	if werr := s.write(MsgResumed, ho.epoch, nil); werr != nil {
		b.log.Warn("tell the primary the VM runs here", "epoch", ho.epoch, "err", werr)
	}
	lingerClose(s.conn)
	return fo, nil
}

// dropReplica frees rep if it is the backup's replica: a session that ended
// before its first checkpoint leaves nothing to keep.
func (b *Backup) dropReplica(rep *replica) {
	b.mu.Lock()
	if b.rep != rep {
		b.mu.Unlock()
		return
	}
	b.rep = nil
	b.mu.Unlock()
	rep.close()
}

// failover resumes the session's last checkpoint.
func (b *Backup) failover(ctx context.Context, rep *replica, cause error) (*Failover, error) {
	t0 := time.Now()
	b.mu.Lock()
	if b.rep != rep {
		rep = nil // closed or replaced meanwhile
	}
	b.mu.Unlock()
	if rep == nil || rep.epoch == 0 {
		return nil, fmt.Errorf("%w (%w)", ErrNoCheckpoint, cause)
	}
	fo := &Failover{Epoch: rep.epoch, Digest: rep.digest, Cause: cause}
	if _, ok := cause.(*handoverError); ok {
		b.log.Info("handover: resuming the VM", "epoch", rep.epoch)
	} else {
		b.log.Warn("PRIMARY LOST: failing over", "cause", cause, "epoch", rep.epoch)
	}
	if b.cfg.Claim != nil {
		cp := &Checkpoint{Epoch: rep.epoch, Digest: rep.digest, Shape: rep.shape, Session: rep.session}
		b.claiming.Store(true)
		err := b.cfg.Claim(ctx, cp)
		b.claiming.Store(false)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("claim the VM: %w", err)
		}
		fo.Claim = time.Since(t0)
	}
	if b.cfg.VerifyReplica {
		d, err := DigestMemory(rep.mem, rep.shape.MemSize)
		if err != nil {
			return nil, fmt.Errorf("verify replica: %w", err)
		}
		if d != rep.digest {
			return nil, fmt.Errorf("%w: epoch %d digest %s, memory digests to %s", ErrReplicaCorrupt, rep.epoch, FormatDigest(rep.digest), FormatDigest(d))
		}
		fo.Verified = true
	}
	if rep.sink != nil {
		// Every epoch up to the checkpoint is applied as it is verified;
		// Failover makes sure of it, drops anything later, and syncs.
		if err := rep.sink.Failover(rep.epoch); err != nil {
			return nil, fmt.Errorf("bring the stream's sink to epoch %d: %w", rep.epoch, err)
		}
		fo.Stream = true
	}
	t := time.Now()
	fo.Verify = t.Sub(t0) - fo.Claim
	cp := &Checkpoint{Epoch: rep.epoch, State: rep.state, Memory: rep.mem, Digest: rep.digest, Shape: rep.shape, Verified: fo.Verified,
		Session: rep.session}
	b.mu.Lock()
	b.rep = nil // the memory is Resume's now
	b.mu.Unlock()
	// The session's mapping of the memory goes once the VM runs: unmapping
	// a large replica takes milliseconds, and the VM has its own mapping.
	defer rep.unmap()
	rep.waitPrepared() // what it builds, Resume uses
	if err := b.cfg.Resume(cp); err != nil {
		return fo, fmt.Errorf("resume epoch %d: %w", rep.epoch, err)
	}
	fo.Restore = time.Since(t)
	fo.Took = time.Since(t0)
	b.log.Info("failed over", "epoch", fo.Epoch, "digest", FormatDigest(fo.Digest), "verified", fo.Verified, "took", fo.Took)
	return fo, nil
}

// session is one primary's connection. Its receive path, page by page: a
// checkpoint's Pages payloads are read from the socket straight into
// staging (buf); each page is checked once as it arrives, raw pages by the
// CRC of their bytes where they lie, LZ4 pages by the CRC of their
// decompression into dec, zero pages by their entry; once the end record
// verifies, runs of consecutive pages are written into the replica from
// where they lie, one write per run. No page is copied between the socket
// and the replica but by its decompression, and no page is read for a CRC
// twice.
type session struct {
	b       *Backup
	conn    *idleConn
	wmu     sync.Mutex
	done    chan struct{}
	timeout time.Duration
	acked   atomic.Uint64
	// applied counts the pages written into the replica, for heartbeats'
	// progress (with the bytes read).
	applied atomic.Uint64

	rep       *replica
	version   uint32    // the protocol version the session speaks
	id        SessionID // the session's ID, chosen here (version 4; zero before)
	st        recvState // where the session is in the protocol (wire.go's table)
	round     uint32    // next pre-copy round expected
	epoch     uint64    // next checkpoint epoch expected
	crc       uint32
	pages     uint64      // pages of the epoch (or pre-copy round) so far
	arena     recvArena   // the epoch's Pages payloads, as received, and its LZ4 pages decoded
	recs      []pageRec   // its pages, in stream order
	applied64 []int64     // their indices, for BackupConfig.OnApply
	ents      []pageEntry // the entries of the Pages message being handled
	state     []byte
	seen      []uint64 // bitmap of pages sent in this epoch
	seenList  []uint64
	maxStaged int
	recvd     int         // bytes of the epoch's pages messages so far
	srecv     *streamRecv // the epoch's stream part, while it arrives

	// meter sums the CPU time of the session's reads from the primary and
	// its handling of memory, state and end messages, from the first
	// checkpoint on (the stream's receiver is not metered: the engine's
	// CPU figures are the memory path's).
	meter cpuclock.Meter
}

// pageRec is a page of the epoch being received: its replica index and CRC,
// and where its bytes are in the arena (raw, or LZ4 decoded; none if zero).
type pageRec struct {
	idx        uint64
	crc        uint32
	enc        uint16
	chunk, off int
}

// streamRecv feeds an epoch's stream messages, as they arrive, to the
// sink's Receive, which verifies and keeps them.
type streamRecv struct {
	pw    *io.PipeWriter
	done  chan struct{}
	epoch uint64 // the epoch the part says it carries
	err   error
}

func (s *session) write(t MsgType, epoch uint64, payload []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	_, err := s.conn.Write(encodeMsg(nil, t, epoch, payload))
	return err
}

// reject tells the primary why the session ends and returns err. In the
// handshake, whose deadline may be what ended it, the reject has a second
// of its own.
func (s *session) reject(err error) error {
	if !s.conn.until.IsZero() {
		s.conn.until = time.Now().Add(time.Second)
	}
	s.write(MsgReject, 0, appendReject(nil, err.Error()))
	return err
}

// cpu is the engine CPU the session spent on checkpoints so far (0 before
// the first). Only the session's goroutine calls it.
func (s *session) cpu() time.Duration {
	if s.st < ckptData {
		return 0
	}
	return s.meter.Total()
}

// greet reads and checks the primary's hello, the session's first message;
// a hello the backup cannot serve is refused (ErrProtocol).
func (s *session) greet(rd *msgReader) (Hello, error) {
	h, payload, err := rd.ReadMsg()
	if err != nil {
		if isTimeout(err) {
			return Hello{}, s.reject(protoErr("no complete hello within the handshake's %v", s.b.handshakeTimeout()))
		}
		return Hello{}, s.reject(protoErr("read hello: %v", err))
	}
	if !s.st.accepts(h.Type) {
		return Hello{}, s.reject(protoErr("first message is %v, want hello", h.Type))
	}
	hello, v, err := decodeHello(payload, s.b.speak.orDefault())
	if err != nil {
		return Hello{}, s.reject(err)
	}
	s.version = v
	if e := s.b.cfg.Expect; e != nil && !e.Equal(hello.Shape) {
		return Hello{}, s.reject(protoErr("VM shape mismatch: primary has %v (regions %v), this backup expects %v (regions %v)",
			hello.Shape, hello.Shape.Regions, *e, e.Regions))
	}
	return hello, nil
}

// serve runs the session after its hello until it ends. It runs on its own
// thread, so that its CPU clock is the receiving's cost (the meter locks it).
func (s *session) serve(rd *msgReader, hello Hello) error {
	v := s.version
	if v >= 4 {
		s.id = newSessionID()
	}
	sink, err := s.newSink(hello)
	if err != nil {
		return s.reject(err)
	}
	if err := s.newReplica(hello.Shape, sink); err != nil {
		if sink != nil {
			sink.Close()
		}
		return s.reject(protoErr("backup cannot hold a replica of %v: %v", hello.Shape, err))
	}
	s.timeout = s.b.cfg.HeartbeatTimeout
	if s.timeout == 0 {
		// hello's timing is bounded by decodeHello, so this cannot overflow.
		s.timeout = max(5*hello.Interval, MinHeartbeatTimeout, 4*hello.Heartbeat)
	}
	s.conn.timeout = s.timeout
	// A write to the primary (an ack, a heartbeat) that the full link holds
	// up waits while the primary is heard from.
	s.conn.alive = func() bool { return s.conn.heardWithin(s.timeout) }
	if err := s.write(MsgWelcome, 0, appendWelcome(nil, v, s.id)); err != nil {
		return fmt.Errorf("%w: send welcome: %w", errPrimaryLost, err)
	}
	s.b.log.Info("primary connected", "from", s.conn.RemoteAddr(), "vmm", hello.VMM, "shape", hello.Shape,
		"interval", hello.Interval, "version", v, "session", s.id.String(), "heartbeat-timeout", s.timeout)
	go s.heartbeats(min(hello.Heartbeat, s.timeout/4))
	defer s.abortStream()
	if sink != nil {
		if err := s.sendReply(sink); err != nil {
			return err
		}
	}
	s.st, s.epoch = syncRound, 1
	defer func() { s.st = closed }()
	s.maxStaged = stagingLimit(hello.Shape.MemSize)
	for {
		err := s.next(rd)
		if err == nil {
			continue
		}
		if errors.Is(err, ErrProtocol) {
			return s.reject(err)
		}
		if errors.Is(err, errRead) {
			err = errors.Unwrap(err)
			if isTimeout(err) {
				err = fmt.Errorf("no word from the primary for %v", s.timeout)
			}
			if err == io.ErrUnexpectedEOF {
				err = errors.New("stream ended inside a message")
			}
			return fmt.Errorf("%w: %w (epoch %d in progress dropped)", errPrimaryLost, err, s.current())
		}
		return err
	}
}

// errRead marks a failure to read the stream (wrapping the read's error):
// the primary is lost, unless the stream itself broke the protocol.
var errRead = errors.New("read")

type readError struct{ err error }

func (e readError) Error() string        { return e.err.Error() }
func (e readError) Unwrap() error        { return e.err }
func (e readError) Is(target error) bool { return target == errRead }

// next reads and handles one message. A checkpoint's pages are read straight
// into staging.
func (s *session) next(rd *msgReader) error {
	h, err := rd.ReadHeader()
	if err != nil {
		if errors.Is(err, ErrProtocol) {
			return err
		}
		return readError{err}
	}
	if h.Type != MsgPages {
		payload, err := rd.Payload(h)
		if err != nil {
			return readError{err}
		}
		if h.Type == MsgStreamEpoch || h.Type == MsgStreamSync {
			return s.handle(h, rd.rawHeader(), payload) // waits for the stream's receiver
		}
		s.meter.Start()
		defer s.meter.Stop()
		return s.handle(h, rd.rawHeader(), payload)
	}
	if err := s.admit(h); err != nil {
		return err
	}
	// The limit is on what the stream brings (the LZ4 pages decoded beside
	// it are bounded anyway: a page appears once per epoch).
	if s.st != syncRound && s.recvd+int(h.Length) > s.maxStaged {
		return protoErr("epoch %d exceeds the staging limit of %d bytes", s.epoch, s.maxStaged)
	}
	s.recvd += int(h.Length)
	payload, chunk, off := s.arena.alloc(int(h.Length))
	if err := rd.ReadPayload(payload); err != nil {
		return readError{err}
	}
	s.meter.Start()
	defer s.meter.Stop()
	return s.handlePages(rd.rawHeader(), payload, chunk, off)
}

// stagingLimit bounds what one checkpoint's pages messages may bring to a
// backup of memSize bytes: every page once, raw, with its entry, and a
// message's worth more.
func stagingLimit(memSize uint64) int {
	return int(memSize + memSize/8 + MaxPayload)
}

func (s *session) current() uint64 {
	if s.st == syncRound {
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
		hb := Heartbeat{Sent: time.Now().UnixNano(), Epoch: s.acked.Load(), Progress: s.conn.read.Load() + s.applied.Load()}
		if s.write(MsgHeartbeat, 0, appendHeartbeat(nil, s.version, hb)) != nil {
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

// newSink makes the session's stream sink for the primary's stream; nil
// without one. An error refuses the session.
func (s *session) newSink(hello Hello) (Sink, error) {
	newSink := s.b.cfg.NewSink
	switch in := hello.Stream; {
	case in.Size == 0 && newSink == nil:
		return nil, nil
	case newSink == nil:
		return nil, protoErr("the primary replicates a device stream of %d bytes (a disk), and this backup has no sink for it (BackupConfig.NewSink)", in.Size)
	case in.Size == 0:
		return nil, protoErr("this backup has a sink for a device stream (a disk), and the primary replicates none (Config.Stream)")
	}
	sink, err := newSink(hello.Stream)
	if err != nil {
		return nil, protoErr("stream: %v", err)
	}
	return sink, nil
}

// sendReply makes the sink's reply to the hello and sends it in pieces.
// Heartbeats go out meanwhile.
func (s *session) sendReply(sink Sink) error {
	t0 := time.Now()
	reply, err := sink.Reply()
	if err != nil {
		return s.reject(fmt.Errorf("stream reply: %w", err))
	}
	for b := reply; len(b) > 0; {
		k := min(len(b), streamChunk)
		if err := s.write(MsgStreamReply, 0, b[:k]); err != nil {
			return fmt.Errorf("%w: send the stream reply: %w", errPrimaryLost, err)
		}
		b = b[k:]
	}
	s.b.log.Info("stream reply sent", "bytes", len(reply), "took", time.Since(t0))
	return nil
}

// sinkErr keeps an error of the sink a protocol error when the primary's
// data was at fault, and names the sink otherwise (its own I/O error).
func sinkErr(err error) error {
	if err == nil || errors.Is(err, ErrProtocol) {
		return err
	}
	return fmt.Errorf("stream sink: %w", err)
}

// streamWrite passes a piece of the epoch's stream part to the sink.
func (s *session) streamWrite(payload []byte) error {
	if s.srecv == nil {
		pr, pw := io.Pipe()
		r := &streamRecv{pw: pw, done: make(chan struct{})}
		sink := s.rep.sink
		go func() {
			defer close(r.done)
			r.epoch, r.err = sink.Receive(pr)
			pr.CloseWithError(errors.New("stream part already ended"))
		}()
		s.srecv = r
	}
	if _, err := s.srecv.pw.Write(payload); err != nil {
		r := s.srecv
		s.srecv = nil
		<-r.done
		if r.err != nil {
			return sinkErr(r.err)
		}
		return protoErr("epoch %d: stream data after the end of its part", s.epoch)
	}
	return nil
}

// finishStream ends the epoch's stream part: every checkpoint after the
// first carries one, complete and verified, before its end record.
func (s *session) finishStream() error {
	r := s.srecv
	if r == nil {
		return protoErr("checkpoint epoch %d has no stream part (a stream sends one every epoch)", s.epoch)
	}
	s.srecv = nil
	r.pw.Close()
	<-r.done
	if r.err != nil {
		return sinkErr(r.err)
	}
	if r.epoch != s.epoch {
		return protoErr("epoch %d carries the stream part of epoch %d", s.epoch, r.epoch)
	}
	return nil
}

// abortStream stops a stream part in progress; the sink drops it.
func (s *session) abortStream() {
	if r := s.srecv; r != nil {
		s.srecv = nil
		r.pw.CloseWithError(errors.New("epoch dropped"))
		<-r.done
	}
}

// newReplica makes the session's replica memory. It replaces any replica of
// an earlier session: that session's primary went on unprotected, so its
// checkpoint may be older than what the outside world has seen, and resuming
// it could step back.
func (s *session) newReplica(shape Shape, sink Sink) error {
	if limit := s.b.maxMemory(); shape.MemSize > limit {
		return fmt.Errorf("its %d MiB exceed this backup's limit of %d MiB (BackupConfig.MaxMemory)", shape.MemSize>>20, limit>>20)
	}
	mem, err := s.b.cfg.NewMemory(shape.MemSize)
	if err != nil {
		return fmt.Errorf("replica memory: %w", err)
	}
	if s.rep, err = openReplica(shape, mem, sink); err != nil {
		mem.Close()
		return err
	}
	s.rep.session = s.id
	s.seen = make([]uint64, (shape.Pages()+63)/64)
	s.b.setReplica(s.rep)
	return nil
}

// handle takes one message of the stream other than pages.
func (s *session) handle(h Header, hdr, payload []byte) error {
	if err := s.admit(h); err != nil {
		return err
	}
	switch h.Type {
	case MsgHeartbeat:
		_, err := decodeHeartbeat(s.version, payload)
		return err
	case MsgBye:
		return fmt.Errorf("%w after epoch %d", ErrPrimaryStopped, h.Epoch)
	case MsgHandover:
		return &handoverError{epoch: h.Epoch}
	case MsgReject:
		reason, err := decodeReject(payload)
		if err != nil {
			return err
		}
		return fmt.Errorf("%w: %s", ErrPrimaryStopped, reason)
	case MsgStreamSync, MsgStreamEpoch:
		return s.handleStream(h, hdr, payload)
	case MsgState:
		s.crc = crc32.Update(crc32.Update(s.crc, castagnoli, hdr), castagnoli, payload)
		s.state, s.st = append(s.state[:0], payload...), ckptState
		return nil
	}
	end, err := decodeEnd(payload)
	if err != nil {
		return err
	}
	return s.end(end)
}

// admit checks that a message is legal now: its type in the receiver's
// state, and a data message's epoch the one in progress; the first data
// message of epoch 1 ends the sync (syncRound → ckptData). A message that
// is not is a protocol error naming it and the state.
func (s *session) admit(h Header) error {
	if !isData(h.Type) {
		switch {
		case h.Type == MsgBye && (!s.st.accepts(MsgBye) || h.Epoch != s.epoch-1 || s.pages != 0 || len(s.recs) != 0 || s.srecv != nil):
			return protoErr("bye at epoch %d while epoch %d is in progress (%v)", h.Epoch, s.current(), s.st)
		case h.Type == MsgHandover && s.version < 4:
			return protoErr("handover in a session of version %d (it came with version 4)", s.version)
		case h.Type == MsgHandover && (!s.st.accepts(MsgHandover) || h.Epoch == 0 || h.Epoch != s.epoch-1 || h.Epoch != s.acked.Load() ||
			s.pages != 0 || len(s.recs) != 0 || s.srecv != nil):
			return protoErr("handover of epoch %d while epoch %d is in progress, %d acknowledged (%v)", h.Epoch, s.current(), s.acked.Load(), s.st)
		case !s.st.accepts(h.Type):
			return protoErr("primary sent %v in the middle of the stream (%v)", h.Type, s.st)
		}
		return nil
	}
	if err := s.enter(h); err != nil {
		return err
	}
	if (h.Type == MsgStreamSync || h.Type == MsgStreamEpoch) && s.rep.sink == nil {
		return protoErr("%v message, and the session has no stream", h.Type)
	}
	if s.st.accepts(h.Type) {
		return nil
	}
	switch {
	case h.Type == MsgState:
		return protoErr("unexpected state message in epoch %d (%v)", s.current(), s.st)
	case h.Type == MsgStreamEpoch && s.st == syncRound:
		return protoErr("stream part of epoch %d in the initial sync", h.Epoch)
	case s.st == ckptState:
		return protoErr("%v message after the state of epoch %d", h.Type, s.epoch)
	}
	return protoErr("%v message of epoch %d in state %v", h.Type, h.Epoch, s.st)
}

// enter checks that a data message (pages, state, end, stream) belongs to the
// epoch in progress; the first checkpoint's first message ends the sync.
func (s *session) enter(h Header) error {
	if s.st == syncRound && h.Epoch == 1 && s.pages == 0 {
		s.st = ckptData // the first checkpoint follows the last pre-copy round
		s.meter.Take()
	}
	if want := s.current(); h.Epoch != want {
		return protoErr("%v message of epoch %d while epoch %d is in progress (reordered or foreign stream)", h.Type, h.Epoch, want)
	}
	return nil
}

// handlePages takes a Pages payload, read into the arena at chunk, off: it
// decodes it (its structure, once), then checks each page's place in memory
// (once per epoch) and its bytes against the CRC in its entry (version 3;
// in version 2 the page's CRC is computed here, and the epoch's checksum
// covers the bytes). A pre-copy round's pages go into the replica at once
// (until the first checkpoint the replica is no checkpoint); a checkpoint's
// wait in staging for the end record.
func (s *session) handlePages(hdr, payload []byte, chunk, off int) error {
	ents, err := decodePages(s.version, payload, s.ents)
	s.ents = ents
	if err != nil {
		return err
	}
	n := len(ents)
	s.crc = crc32.Update(crc32.Update(s.crc, castagnoli, hdr), castagnoli, pagesCovered(s.version, payload, n))
	checked := s.version != 2 // the entries carry CRCs to check
	for _, e := range ents {
		idx, err := s.markSeen(e.GPA)
		if err != nil {
			return err
		}
		r := pageRec{idx: idx, crc: e.CRC, enc: e.Enc, chunk: chunk}
		switch e.Enc {
		case encZero:
			if e.CRC != zeroCRC {
				return protoErr("epoch %d: zero page at GPA %#x with checksum %08x, a zero page's is %08x (corrupted)", s.current(), e.GPA, e.CRC, zeroCRC)
			}
		case encRaw:
			r.off = off + e.Off
			c := pageCRC(e.Data)
			if checked && c != e.CRC {
				return protoErr("epoch %d: page at GPA %#x sums to %08x, its entry's checksum is %08x (corrupted)", s.current(), e.GPA, c, e.CRC)
			}
			r.crc = c
		case encLZ4:
			var page []byte
			page, r.chunk, r.off = s.arena.alloc(PageSize)
			if k, err := lz4.UncompressBlock(e.Data, page); err != nil || k != PageSize {
				return protoErr("epoch %d: page at GPA %#x: LZ4 data does not decode to a page", s.current(), e.GPA)
			}
			c := pageCRC(page)
			if checked && c != e.CRC {
				return protoErr("epoch %d: page at GPA %#x decodes to bytes that sum to %08x, its entry's checksum is %08x (corrupted)", s.current(), e.GPA, c, e.CRC)
			}
			r.crc = c
		}
		s.recs = append(s.recs, r)
	}
	s.pages += uint64(n)
	if s.st != syncRound && s.epoch != 1 {
		return nil
	}
	// Until the first checkpoint is complete the replica holds none, so
	// nothing is lost by applying at once: pre-copy rounds, and checkpoint 1
	// (often most of memory, when the sync did not converge: staged, it would
	// fault in as much fresh memory again as the replica itself).
	err = s.apply(false)
	s.arena.reset()
	s.recs = s.recs[:0]
	return err
}

// handleStream takes a stream message. Sync messages come between pre-copy
// rounds (outside their checksums: the sink checks each) and, for the
// residual, in the first checkpoint; every later checkpoint carries its
// epoch's part. In a checkpoint both come before the state, under the
// checksum.
func (s *session) handleStream(h Header, hdr, payload []byte) error {
	// admit checked the state: no stream part in the sync, nothing after
	// the state; what is left are the epochs each kind belongs to.
	switch {
	case h.Type == MsgStreamSync && s.st == syncRound:
		if s.pages != 0 {
			return protoErr("stream sync message inside pre-copy round %d", s.round)
		}
		return sinkErr(s.rep.sink.ApplySync(payload))
	case h.Type == MsgStreamSync && s.epoch != 1:
		return protoErr("stream sync message in checkpoint epoch %d (only the first carries the sync's residual)", s.epoch)
	case h.Type == MsgStreamEpoch && s.epoch == 1:
		return protoErr("stream part in checkpoint epoch 1 (it carries the sync's residual; parts start with epoch 2)")
	}
	s.crc = crc32.Update(crc32.Update(s.crc, castagnoli, hdr), castagnoli, payload)
	if h.Type == MsgStreamSync {
		return sinkErr(s.rep.sink.ApplySync(payload))
	}
	return s.streamWrite(payload)
}

// end closes an epoch: verify, ack, apply.
func (s *session) end(e End) error {
	defer s.resetEpoch()
	precopy := s.st == syncRound
	switch {
	case precopy && e.Kind != kindPrecopy:
		return protoErr("checkpoint end record in the initial sync, with no checkpoint data")
	case precopy && e.Round != s.round:
		return protoErr("end of pre-copy round %d, expected round %d", e.Round, s.round)
	case !precopy && e.Kind != kindCheckpoint:
		return protoErr("pre-copy round after the first checkpoint")
	case e.Checksum != s.crc:
		return protoErr("epoch %d: checksum %08x, the stream sums to %08x (corrupted)", s.current(), e.Checksum, s.crc)
	case s.st == ckptData:
		return protoErr("checkpoint epoch %d has no machine state", s.epoch)
	}
	if !precopy && s.rep.sink != nil && s.epoch > 1 {
		if err := s.finishStream(); err != nil {
			return err
		}
	}
	if e.Pages != s.pages {
		if precopy {
			return protoErr("pre-copy round %d: end says %d pages, %d arrived", s.round, e.Pages, s.pages)
		}
		return protoErr("epoch %d: end says %d pages, %d arrived", s.epoch, e.Pages, s.pages)
	}
	if precopy {
		if e.Digest != s.rep.table.digest {
			return protoErr("pre-copy round %d: digest %s, replica digests to %s", s.round, FormatDigest(e.Digest), FormatDigest(s.rep.table.digest))
		}
		s.round++
		return nil
	}
	d := s.rep.table.digest
	for _, r := range s.recs {
		d += s.rep.table.delta(r.idx, r.crc)
	}
	if d != e.Digest {
		return protoErr("epoch %d: digest %s, the replica would digest to %s", s.epoch, FormatDigest(e.Digest), FormatDigest(d))
	}
	if err := s.write(MsgAck, s.epoch, appendAck(nil, s.version, Ack{Digest: d, CPU: s.cpu()})); err != nil {
		// The epoch is verified and complete: apply it anyway, so the replica
		// is the newest complete checkpoint; the read that follows notices.
		s.b.log.Warn("send ack", "epoch", s.epoch, "err", err)
	}
	if err := s.apply(true); err != nil {
		return err
	}
	if s.rep.sink != nil && s.epoch > 1 {
		if err := s.rep.sink.Commit(s.epoch); err != nil {
			return sinkErr(err)
		}
	}
	s.b.mu.Lock()
	s.rep.state, s.rep.epoch, s.rep.digest = append(s.rep.state[:0], s.state...), s.epoch, d
	s.b.mu.Unlock()
	s.acked.Store(s.epoch)
	if s.b.cfg.OnEpoch != nil {
		s.b.cfg.OnEpoch(s.epoch, int(s.pages), d)
	}
	if s.b.cfg.OnApply != nil {
		s.applied64 = s.applied64[:0]
		for _, r := range s.recs {
			s.applied64 = append(s.applied64, int64(r.idx))
		}
		cp := &Checkpoint{Epoch: s.epoch, State: s.rep.state, Memory: s.rep.mem, Digest: d, Shape: s.rep.shape, Session: s.rep.session}
		s.b.cfg.OnApply(cp, s.rep.mapped, s.applied64)
	}
	if s.epoch == 1 && s.b.cfg.Prepare != nil {
		// Once per session, after the first ack, beside the session: a
		// handover's rounds may follow at once. A failover, and the
		// replica's close, wait for it.
		cp := &Checkpoint{Epoch: 1, State: append([]byte(nil), s.rep.state...), Memory: s.rep.mem, Digest: d, Shape: s.rep.shape, Session: s.rep.session}
		done := make(chan struct{})
		s.rep.prepared = done
		go func() {
			defer close(done)
			if err := s.b.cfg.Prepare(cp); err != nil {
				s.b.log.Warn("prepare the VM for a failover: a failover will build it", "err", err)
			}
		}()
	}
	s.epoch++
	return nil
}

func (s *session) resetEpoch() {
	s.abortStream()
	s.crc, s.pages = 0, 0
	if s.st == ckptState {
		s.st = ckptData // the next checkpoint
	}
	s.arena.reset()
	s.recs, s.state, s.recvd = s.recs[:0], s.state[:0], 0
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

// apply copies the pages received (s.recs) into the replica's mapping and
// records their CRCs. A zero page is written only where the replica page was
// ever written (a fresh replica is zero). For a checkpoint (hook) it calls
// the fault point faultpoint.Apply halfway.
func (s *session) apply(hook bool) error {
	n := len(s.recs)
	hook = hook && faultpoint.Attached(s.b)
	if n == 0 && hook {
		faultpoint.Hit(s.b, faultpoint.Apply, s.epoch) // an empty epoch is half applied at once
	}
	rep := s.rep
	for i, r := range s.recs {
		dst := rep.mapped[r.idx*PageSize : (r.idx+1)*PageSize]
		w, bit := &rep.written[r.idx/64], uint64(1)<<(r.idx%64)
		if r.enc == encZero {
			if *w&bit != 0 {
				clear(dst)
			}
		} else {
			copy(dst, s.arena.bytes(r.chunk, r.off, PageSize))
			*w |= bit
		}
		rep.table.set(r.idx, r.crc)
		if i&63 == 63 {
			s.applied.Add(64)
		}
		if hook && i == n/2 {
			faultpoint.Hit(s.b, faultpoint.Apply, s.epoch)
		}
	}
	s.applied.Add(uint64(n & 63))
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
