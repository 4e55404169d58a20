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
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/internal/faultpoint"
)

// Interval limits and defaults.
const (
	MinInterval     = 5 * time.Millisecond
	MaxInterval     = 10 * time.Second
	DefaultInterval = 100 * time.Millisecond
	// MinHeartbeatTimeout is the floor of the default heartbeat timeout. A
	// dead process closes its connections, which both sides notice at once;
	// the timeout only catches a host that froze or a link that went silent,
	// so it errs long: on a loaded 2-core machine a side was seen silent for
	// over 500 ms, and a false alarm means a failover while the primary lives.
	MinHeartbeatTimeout = 2 * time.Second
)

// Config configures a Primary.
type Config struct {
	// VM is the VM to protect.
	VM VM
	// Interval is the epoch length, MinInterval to MaxInterval; 0 means
	// DefaultInterval.
	Interval time.Duration
	// DirtyTrack is the dirty tracking mechanism asked of VM.DirtySource.
	DirtyTrack dirtylog.Mechanism
	// Workers is the number of compression goroutines; 0 means one per CPU
	// but one (left to the vCPUs and the pause), at least 1, at most 4.
	Workers int
	// Compress says when pages are compressed with LZ4 (default
	// CompressAuto: where it has been paying).
	Compress Compression
	// CopyThreads bounds the goroutines that copy an epoch's pages into
	// staging during its pause; 0 means one per CPU, at most 4. Helpers
	// beyond the pausing goroutine take chunks of the copy if they get a
	// CPU in time; the pause never waits for one to start (capture.go).
	CopyThreads int
	// Capture says how a checkpoint's dirty pages are captured (lazy.go):
	// copied in the pause (CaptureEager, the default), write-protected in
	// the pause and copied behind the running guest (CaptureLazy), or
	// either, run by run, from costs measured on this host (CaptureAuto).
	// Lazy and auto need userfaultfd and a VM implementing WriteGuard; lazy
	// without them is an error from Run wrapping ErrLazyUnsupported, auto
	// falls back to eager and says so in the log.
	Capture Capture
	// CaptureCalibration is how long auto capture copies every page in the
	// pause at the start, to measure what eager capture costs the guest
	// (lazyguest.go); 0 means 2 s. It is at least 8 epochs whatever it says.
	// A shorter one lets a short run try lazy capture sooner, on a noisier
	// baseline.
	CaptureCalibration time.Duration
	// StagingBytes bounds the memory holding captured pages not yet sent.
	// 0 means the guest memory size, capped at 1 GiB. An epoch whose pages do
	// not fit even with nothing else in flight is sent from guest memory
	// during its pause (stop-and-copy; EpochStats.Oversize).
	StagingBytes uint64
	// MaxInFlight bounds the epochs captured and not yet acknowledged
	// (default 4): the next pause waits for the oldest ack. It bounds how far
	// the backup, and so the release of held output, may lag behind.
	MaxInFlight int
	// Heartbeat is how often each side says it is alive (default: the
	// interval, at most 100 ms). HeartbeatTimeout is how long silence means
	// the other side is gone (default 5 intervals, at least
	// MinHeartbeatTimeout). Each write must also complete within it.
	Heartbeat, HeartbeatTimeout time.Duration
	// PrecopyThreshold ends the initial sync once a round leaves at most this
	// many dirty pages (default 1024). A round that shrinks the dirty set by
	// less than a quarter ends it too, once what is left fits a first
	// checkpoint's pause of SyncPause (default DefaultSyncPause), estimated
	// from the copy cost measured on this host; while it does not fit, the
	// engine throttles the vCPUs for the next rounds (auto-converge, see
	// converge.go) unless NoThrottle. MaxPrecopyRounds (default 30) ends it
	// regardless. SyncProgress reports each round, the throttle and the
	// estimate.
	PrecopyThreshold int
	MaxPrecopyRounds int
	SyncPause        time.Duration
	NoThrottle       bool
	// Gates hold output until its epoch is acknowledged.
	Gates []OutputGate
	// Stream, when set, is a device replicated with the memory (property P4
	// for a disk: diskmirror.Source). The engine syncs it to the backup's
	// sink (BackupConfig.NewSink) before the first checkpoint, ships each
	// epoch's part inside the epoch, covered by its end record, and the
	// backup applies it when it applies the epoch's memory. The engine drives
	// it as a gate, except that its first epoch opens at the first
	// checkpoint, not at Run: what it holds before is the sync's.
	Stream Stream
	// OnStreamSync receives the stream sync's progress after each phase.
	OnStreamSync func(StreamSyncProgress)
	// AuditEvery, when not 0, digests all of guest memory in the pause of
	// every AuditEvery-th epoch and checks it against the incremental digest
	// sent to the backup: proof that dirty tracking missed no page, at the
	// price of a longer pause. A mismatch stops replication with an error.
	AuditEvery uint64
	// Note, when set, is called in each pause; its result goes into
	// EpochStats.Note (the CLI records guest counters there).
	Note func() any
	// OnEpoch receives each epoch's stats when the backup acknowledges it.
	OnEpoch func(*EpochStats)
	// OnSync receives the initial sync's progress after each round.
	OnSync func(SyncProgress)
	// VMM names the VMM to the backup, for its messages.
	VMM string
	// TLS, when set, is the client side of the TLS session Run opens on its
	// connection before anything else: protect.LoadTLS makes one that
	// presents the primary's certificate and verifies the backup's. A
	// backup that refuses the certificate makes Run return a
	// *RefusedError naming the TLS alert.
	TLS *tls.Config
	// Lease, when set, is the VM's ownership in a coordination service
	// (protect makes one from replicate/fence): output is released only
	// while it is valid, the backup session that may resume the VM is
	// recorded under it, and its loss fences the VM (lease.go). It needs a
	// backup of protocol version 4 or later, which names its session.
	Lease Lease
	// Log receives the engine's messages; nil means slog.Default().
	Log *slog.Logger
}

// withDefaults fills defaults and checks the config.
func (c Config) withDefaults() (Config, error) {
	if c.VM == nil {
		return c, errors.New("replicate: config has no VM")
	}
	if c.Interval == 0 {
		c.Interval = DefaultInterval
	}
	if c.Interval < MinInterval || c.Interval > MaxInterval {
		return c, fmt.Errorf("interval %v out of range (%v to %v)", c.Interval, MinInterval, MaxInterval)
	}
	if c.Workers <= 0 {
		c.Workers = max(1, min(4, runtime.NumCPU()-1))
	}
	if c.CopyThreads <= 0 {
		c.CopyThreads = max(1, min(MaxCopyThreads, runtime.NumCPU()))
	}
	if c.Capture < CaptureEager || c.Capture > CaptureAuto {
		return c, fmt.Errorf("capture %v: want eager, lazy or auto", c.Capture)
	}
	if c.CaptureCalibration < 0 {
		return c, fmt.Errorf("capture calibration %v: must not be negative", c.CaptureCalibration)
	}
	if c.CaptureCalibration == 0 {
		c.CaptureCalibration = lazyCalibrateTime
	}
	if c.CopyThreads > MaxCopyThreads {
		return c, fmt.Errorf("%d copy threads: at most %d", c.CopyThreads, MaxCopyThreads)
	}
	if c.Compress < CompressAuto || c.Compress > CompressNever {
		return c, fmt.Errorf("unknown compression %d", c.Compress)
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = 4
	}
	if c.Heartbeat <= 0 {
		c.Heartbeat = min(c.Interval, 100*time.Millisecond)
	}
	if c.HeartbeatTimeout <= 0 {
		c.HeartbeatTimeout = max(5*c.Interval, MinHeartbeatTimeout)
	}
	if c.HeartbeatTimeout < 2*c.Heartbeat {
		return c, fmt.Errorf("heartbeat timeout %v must be at least twice the heartbeat period %v", c.HeartbeatTimeout, c.Heartbeat)
	}
	if c.PrecopyThreshold <= 0 {
		c.PrecopyThreshold = 1024
	}
	if c.MaxPrecopyRounds <= 0 {
		c.MaxPrecopyRounds = 30
	}
	if c.SyncPause <= 0 {
		c.SyncPause = DefaultSyncPause
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	if c.Stream != nil {
		if in := c.Stream.Info(); in.Size <= 0 || in.Block == 0 {
			return c, fmt.Errorf("stream of %d bytes in %d-byte blocks: want both above 0", in.Size, in.Block)
		}
		if n := c.Stream.ReplySize(); n < 0 {
			return c, fmt.Errorf("stream expects a reply of %d bytes", n)
		}
	}
	return c, nil
}

// streamChunk is the most of an epoch's stream part, or of a sink's reply,
// in one message.
const streamChunk = 1 << 20

// Primary is the engine on the VM's host: it syncs the VM to a backup, then
// checkpoints it every interval and ships each epoch while the guest runs.
type Primary struct {
	cfg    Config
	gates  []OutputGate // cfg.Gates, then cfg.Stream
	lay    layout
	src    dirtylog.Source
	set    *dirtylog.Set
	stage  *arena
	digest *digestTable
	// sentIn is the epoch in which each replica page was last sent (0: the
	// initial sync), and auditCRCs holds page CRC tables for audits in
	// flight: both only to name the pages an audit finds missed.
	sentIn    []uint32
	auditCRCs chan []uint32

	conn *idleConn
	rd   *msgReader
	wmu  sync.Mutex // serialises writes to conn
	// speak is the protocol versions the hello offers (unset: all this
	// build speaks; tests narrow it to play an older primary), version the
	// one the backup chose, which every message after the welcome is in.
	speak   versions
	version uint32
	// session is the session's ID as the backup's welcome named it; nil
	// before the welcome (and zero in a session of version 2 or 3).
	session atomic.Pointer[SessionID]

	work      chan *batch
	jobs      chan *epochJob
	inflight  chan struct{} // a token per epoch captured and not yet acknowledged
	hold      workerHold    // set during pauses: workers wait
	gpaLists  chan []uint64 // page lists of sent epochs, for reuse
	streamBuf []byte        // the sender's buffer for stream messages
	gmu       sync.RWMutex  // Open and Commit share it; Discard and Release hold it alone

	amu  sync.Mutex // guards sent
	sent []pendingEpoch

	lastSent, lastAcked atomic.Uint64
	// backupProgressAt is when the backup last showed its engine works
	// (UnixNano); backupCPU is the cumulative CPU time of its last ack.
	backupProgressAt atomic.Int64
	backupCPU        time.Duration

	policy         *compressPolicy
	copier         *copier
	lastJob        *epochJob    // the last checkpoint captured (the epoch loop's)
	lazy           *lazyCapture // with Config.Capture lazy or auto, once Run has it
	vclock         *vcpuClock   // with a VM that implements VCPUThreads
	lastProgress   uint64       // GuestProgress at the last resume, if progressRead
	progressRead   bool
	endMsg, endPay []byte // the sender's end record buffers
	protected      atomic.Bool

	// With a Lease (lease.go): fenced is set, under gmu held alone, when
	// the engine fenced the VM; standbySet once this session's backup is
	// recorded as the standby (the reader's); lastCommit and lastCommitAt
	// are the last epoch whose output was released, and when.
	fenced     *FencedError
	standbySet bool
	// smu serialises the standby record's writes; standbyCleared is set
	// once "none" was written.
	smu            sync.Mutex
	standbyCleared bool
	lastCommit     atomic.Uint64
	lastCommitAt   atomic.Int64

	// A handover (handover.go): hoReq closes when it is asked for,
	// finalEpoch is the final pause's epoch (the epoch loop's), resumed
	// closes when the backup says the VM runs there.
	hoReq          chan struct{}
	hoOnce         sync.Once
	sessionVersion atomic.Uint32 // p.version, for Handover's callers
	finalEpoch     atomic.Uint64
	finalAcked     chan struct{} // closed by the reader when the final epoch is acknowledged
	resumed        chan struct{}
	handedOver     *Handover

	// sess is the session's state (session.go): running, stopping, ended,
	// unprotected. Its move to unprotected happens under gmu held alone.
	sess *primarySession
}

// NewPrimary checks cfg and prepares a primary for Run.
func NewPrimary(cfg Config) (*Primary, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	p := &Primary{cfg: cfg, lay: layoutOf(cfg.VM.DirtySlots(), cfg.VM.NumVCPUs()), sess: newPrimarySession(),
		hoReq: make(chan struct{}), finalAcked: make(chan struct{}), resumed: make(chan struct{})}
	if err := p.lay.shape.check(); err != nil {
		return nil, fmt.Errorf("VM shape: %w", err)
	}
	if cfg.StagingBytes == 0 {
		cfg.StagingBytes = min(p.lay.shape.MemSize, 1<<30)
	}
	if cfg.StagingBytes < 64*PageSize {
		return nil, fmt.Errorf("staging of %d bytes is too small (at least %d)", cfg.StagingBytes, 64*PageSize)
	}
	p.cfg = cfg
	p.gates = cfg.Gates
	if cfg.Stream != nil {
		p.gates = append(append([]OutputGate(nil), cfg.Gates...), cfg.Stream)
	}
	p.stage = newArena(cfg.StagingBytes / PageSize)
	p.digest = newDigestTable(p.lay.shape.Pages())
	p.policy = newCompressPolicy(cfg.Compress, p.lay.shape.Pages())
	p.endMsg, p.endPay = make([]byte, 0, HeaderSize+endSize), make([]byte, 0, endSize)
	if cfg.AuditEvery > 0 {
		p.sentIn = make([]uint32, p.lay.shape.Pages())
		p.auditCRCs = make(chan []uint32, cfg.MaxInFlight+1)
		p.spareAuditTable()
	}
	p.set = dirtylog.NewSet(cfg.VM.DirtySlots())
	return p, nil
}

// Shape is the VM's shape as the backup will see it.
func (p *Primary) Shape() Shape { return p.lay.shape }

// Protected reports whether the backup holds an acknowledged checkpoint and
// is still reachable.
func (p *Primary) Protected() bool { return p.protected.Load() && !p.sess.ended() }

// Session is the session's ID as the backup's welcome named it: zero before
// the welcome, and in a session of version 2 or 3 (whose welcome names
// none). It may be called from any goroutine.
func (p *Primary) Session() SessionID {
	if id := p.session.Load(); id != nil {
		return *id
	}
	return SessionID{}
}

// LastAcked is the latest epoch the backup acknowledged (0: none yet).
func (p *Primary) LastAcked() uint64 { return p.lastAcked.Load() }

// LastSent is the latest epoch whose end record was sent.
func (p *Primary) LastSent() uint64 { return p.lastSent.Load() }

// Interval is the epoch interval in use.
func (p *Primary) Interval() time.Duration { return p.cfg.Interval }

// Run replicates the VM over conn (to a Backup) until ctx is done, the VM
// stops, or the backup is lost. It takes ownership of conn. The VM must be
// running. On ctx's end it waits (up to the heartbeat timeout) for the epochs
// in flight to be acknowledged, tells the backup it stops on purpose, and
// returns nil. On losing the backup it leaves the guest running, releases the
// gates and returns an error wrapping ErrBackupLost. When replication fails
// here while the link works (the VM's pause, harvest, save or resume, a gate,
// an audit, a replica that diverged), it tells the backup it stops, so the
// backup does not resume a VM that goes on running (or failed) here, releases
// the gates and returns that error. Run is for one session: make a new
// Primary for the next.
func (p *Primary) Run(ctx context.Context, conn net.Conn) (err error) {
	defer func() { err = p.pauseFenced(err) }() // last: after everything stopped
	runStart := time.Now()
	if err := p.checkLease(); err != nil {
		conn.Close()
		return err
	}
	if p.cfg.TLS != nil {
		tc, err := tlsClient(ctx, conn, p.cfg.TLS, max(p.cfg.HeartbeatTimeout, DefaultHandshakeTimeout))
		if err != nil {
			conn.Close()
			return err
		}
		conn = tc
	}
	p.conn = &idleConn{Conn: conn, timeout: p.cfg.HeartbeatTimeout}
	p.conn.alive = p.backupWorking
	p.backupProgressed() // a new connection: the backup is as alive as the timeout allows
	p.rd = newMsgReader(p.conn)
	log := p.cfg.Log
	defer conn.Close()
	stopCtx := context.AfterFunc(ctx, func() { conn.Close() })
	err = p.handshake()
	if !stopCtx() || ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil {
		return err
	}
	if p.cfg.Lease != nil && p.Session().IsZero() {
		return fmt.Errorf("fencing needs a backup that names its session (protocol version 4 or later); this one speaks version %d", p.version)
	}
	p.watchLease()
	defer p.fail(errors.New("replication ended")) // the watch ends with the session
	src, err := p.cfg.VM.DirtySource(p.cfg.DirtyTrack)
	if err != nil {
		return fmt.Errorf("dirty tracking: %w", err)
	}
	p.src = src
	if err := src.Start(); err != nil {
		return fmt.Errorf("start dirty tracking (%v): %w", p.cfg.DirtyTrack, err)
	}
	defer func() {
		if serr := src.Stop(); serr != nil && err == nil {
			err = fmt.Errorf("stop dirty tracking: %w", serr)
		}
	}()
	if p.cfg.Capture != CaptureEager {
		l, err := newLazyCapture(p, p.cfg.Capture)
		switch {
		case err == nil:
			p.lazy = l
			defer l.close()
		case p.cfg.Capture == CaptureLazy:
			return fmt.Errorf("capture lazy: %w", err)
		default:
			log.Warn("capture auto: copying every page in the pause (eager)", "why", err)
		}
	}
	if vt, ok := p.cfg.VM.(VCPUThreads); ok {
		p.vclock = &vcpuClock{vm: vt}
	}
	log.Info("replicating", "backup", conn.RemoteAddr(), "shape", p.lay.shape, "interval", p.cfg.Interval,
		"session", p.Session().String(), "dirty-track", src.Mechanism(),
		"heartbeat-timeout", p.cfg.HeartbeatTimeout)

	p.work = make(chan *batch, 2*p.cfg.Workers)
	p.jobs = make(chan *epochJob, p.cfg.MaxInFlight)
	p.inflight = make(chan struct{}, p.cfg.MaxInFlight)
	p.gpaLists = make(chan []uint64, p.cfg.MaxInFlight+1)
	var workers, loops sync.WaitGroup
	for range p.cfg.Workers {
		workers.Go(p.compressWorker)
	}
	p.copier = newCopier(p, p.cfg.CopyThreads-1)
	senderDone := make(chan struct{})
	go func() { defer close(senderDone); p.sendLoop() }()
	loops.Go(p.readLoop)
	loops.Go(p.heartbeatLoop)
	defer func() {
		p.fail(errors.New("replication ended")) // if nothing else ended it
		loops.Wait()                            // no OnEpoch or gate call after Run
		close(p.jobs)
		<-senderDone
		close(p.work)
		workers.Wait()
		p.copier.stop()
	}()

	// Touch staging while the sync runs, so the first checkpoints copy into
	// resident memory instead of faulting in a page per page copied.
	prefault, concurrent := p.stage.prefault()
	done := make(chan struct{})
	go func() { defer close(done); prefault() }()
	prefaulted := done
	if concurrent {
		prefaulted = nil // the first checkpoint need not wait for it
	}
	// The stream is not opened here: what it holds until the first
	// checkpoint is its sync's, and its epochs start with the first pause's
	// Open(2).
	if err := p.gateCall(p.cfg.Gates, func(g OutputGate) error { return g.Open(1) }); err != nil {
		return p.unprotected(err)
	}
	if err := p.initialSync(ctx); err != nil {
		if ctx.Err() != nil && len(p.inflight) == 0 {
			return p.finish() // stopped between rounds: say bye
		}
		if ctx.Err() != nil {
			// Stopped inside a round: cut it off. The backup has no
			// checkpoint, so it has nothing to fail over to.
			p.fail(fmt.Errorf("stopped during the initial sync: %w", ctx.Err()))
			p.releaseGates()
			return nil
		}
		return p.unprotected(err)
	}
	if prefaulted != nil {
		<-prefaulted
	}
	if err := p.epochLoop(ctx); err != nil {
		if errors.Is(err, errFinal) {
			return p.handover(p.finalEpoch.Load(), p.lastJob.stats, runStart)
		}
		return p.unprotected(err)
	}
	return p.finish()
}

// handshake sends Hello and waits for Welcome or Reject. With a stream, it
// then reads the backup sink's reply (the backup sends heartbeats while it
// makes it) and gives it to the stream.
func (p *Primary) handshake() error {
	speak := p.speak.orDefault()
	hello := Hello{Version: speak.hi, MinVersion: speak.lo, Shape: p.lay.shape, Interval: p.cfg.Interval,
		Heartbeat: p.cfg.Heartbeat, VMM: p.cfg.VMM}
	want := int64(-1)
	if st := p.cfg.Stream; st != nil {
		hello.Stream, want = st.Info(), st.ReplySize()
	}
	if err := p.writeMsg(encodeMsg(nil, MsgHello, 0, appendHello(nil, hello))); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	var reply []byte
	welcomed := false
	for {
		if welcomed && int64(len(reply)) == want {
			if err := p.cfg.Stream.Attach(reply); err != nil {
				return protoErr("stream reply: %v", err)
			}
			return nil
		}
		if welcomed && want < 0 {
			return nil
		}
		h, payload, err := p.rd.ReadMsg()
		if err != nil {
			if alert := tlsAlert(err); alert != "" {
				// TLS 1.3 finishes the client's handshake before the
				// backup checks its certificate: a refusal arrives here.
				return &RefusedError{Reason: "TLS: " + alert}
			}
			if isTimeout(err) {
				err = fmt.Errorf("no answer in %v: %w", p.cfg.HeartbeatTimeout, err)
			}
			if welcomed {
				return fmt.Errorf("wait for the backup sink's reply: %w", err)
			}
			return fmt.Errorf("wait for the backup's welcome: %w", err)
		}
		switch {
		case h.Type == MsgReject:
			reason, err := decodeReject(payload)
			if err != nil {
				return err
			}
			return &RefusedError{Reason: reason}
		case h.Type == MsgWelcome && !welcomed:
			v, id, err := decodeWelcome(payload, speak)
			if err != nil {
				return err
			}
			p.version, welcomed = v, true
			p.sessionVersion.Store(v)
			p.session.Store(&id)
		case h.Type == MsgHeartbeat && welcomed:
			if _, err := decodeHeartbeat(p.version, payload); err != nil {
				return err
			}
		case h.Type == MsgStreamReply && welcomed && want >= 0:
			if int64(len(reply)+len(payload)) > want {
				return protoErr("stream reply longer than the %d bytes the stream expects", want)
			}
			reply = append(reply, payload...)
		default:
			return protoErr("backup answered hello with %v", h.Type)
		}
	}
}

// backupRejected is the backup's reject of a running session, with its
// reason: a word from it, unlike a closed or silent link.
type backupRejected struct{ reason string }

func (e *backupRejected) Error() string { return "backup ended the session: " + e.reason }

// linkError is a failure to write to the backup: the link, not the data.
type linkError struct{ err error }

func (e *linkError) Error() string { return e.err.Error() }
func (e *linkError) Unwrap() error { return e.err }

// writeMsg writes one encoded message.
func (p *Primary) writeMsg(b []byte) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if _, err := p.conn.Write(b); err != nil {
		return &linkError{err}
	}
	return nil
}

// writeFrame writes one message from its header's fields and its payload,
// in one vectored write, without copying the payload into a message first
// (a stream's sync message is up to 4 MiB), and returns the header, for
// checksums.
func (p *Primary) writeFrame(t MsgType, epoch uint64, payload []byte) ([HeaderSize]byte, error) {
	var hb [HeaderSize]byte
	Header{Type: t, Length: uint32(len(payload)), Epoch: epoch}.put(hb[:])
	p.wmu.Lock()
	defer p.wmu.Unlock()
	bufs := net.Buffers{hb[:], payload}
	if err := p.conn.writeBuffers(&bufs); err != nil {
		return hb, &linkError{err}
	}
	return hb, nil
}

// backupWorking reports whether the backup showed, within the heartbeat
// timeout, that its engine works: an ack, or a heartbeat whose progress
// moved. While it does, a write to a full link waits (idleConn).
func (p *Primary) backupWorking() bool {
	return time.Since(time.Unix(0, p.backupProgressAt.Load())) < p.cfg.HeartbeatTimeout
}

// backupProgressed records a sign that the backup's engine works.
func (p *Primary) backupProgressed() { p.backupProgressAt.Store(time.Now().UnixNano()) }

// fail ends the session (the first reason stands; after an abort it is the
// abort's) and wakes everyone: the connection is closed.
func (p *Primary) fail(err error) {
	if p.sess.fire(evEnd, err) {
		p.protected.Store(false)
		p.conn.Close()
	}
}

// abort ends the session from this side while the link still works: it tells
// the backup why with a reject, so that the backup does not fail over to a
// VM that goes on running here, and half-closes the connection so the reject
// is not overtaken by a reset. The readers notice the backup closing in turn.
// Once the session stops or ends for another reason, abort does nothing.
func (p *Primary) abort(reason error) {
	if p.sess.fire(evAbort, reason) {
		p.writeMsg(encodeMsg(nil, MsgReject, 0, appendReject(nil, "primary stopped replication: "+reason.Error())))
		p.conn.closeWrite()
	}
}

// stop aborts the session with reason and waits (a second at most) for the
// backup to hang up, then ends it.
func (p *Primary) stop(reason error) {
	p.abort(reason)
	select {
	case <-p.sess.done:
	case <-time.After(time.Second):
	}
	p.fail(reason)
}

// vmFailure marks an error of the VM itself (pause, save, resume). Its output
// since the last acknowledged epoch comes from a state that neither side
// will run on, so the gates discard it instead of releasing it.
type vmFailure struct{ error }

func (e vmFailure) Unwrap() error { return e.error }

// discardGates drops the output of every epoch after n on every gate.
func (p *Primary) discardGates(n uint64) {
	p.gmu.Lock()
	defer p.gmu.Unlock()
	if p.sess.state() == sessUnprotected {
		return
	}
	for _, g := range p.gates {
		if err := g.Discard(n); err != nil {
			p.cfg.Log.Error("discard output", "after-epoch", n, "err", err)
		}
	}
}

// releaseGates moves an ended session to unprotected and releases the
// gates; it does nothing in any other state. With a lease it first records
// that no backup holds the VM, and fences instead if it cannot, or if the
// engine fenced (lease.go).
func (p *Primary) releaseGates() {
	if p.cfg.Lease != nil && p.fencedErr() == nil && p.sess.state() == sessEnded {
		if err := p.clearStandby(); err != nil {
			p.fence(err)
			return
		}
	}
	p.gmu.Lock()
	defer p.gmu.Unlock()
	if p.cfg.Lease != nil && !p.cfg.Lease.Valid() {
		p.fenceLocked(fmt.Errorf("lease not valid when the held output would be released: %w", leaseCause(p.cfg.Lease)))
	}
	if p.fenced != nil || !p.sess.fire(evRelease, nil) {
		return
	}
	for _, g := range p.gates {
		if err := g.Release(); err != nil {
			p.cfg.Log.Error("release output gate", "err", err)
		}
	}
}

// unprotected ends replication on an error: the guest runs on, the gates let
// output through. A lost link returns an error wrapping ErrBackupLost; any
// other cause (a failed VM, gate or audit, a diverged replica) is told to the
// backup first, so it does not fail over, and is returned as it is.
func (p *Primary) unprotected(cause error) error {
	var le *linkError
	if !p.sess.ended() && !errors.As(cause, &le) {
		p.stop(cause)
	}
	p.fail(cause)
	if errors.As(cause, new(vmFailure)) {
		p.discardGates(p.lastAcked.Load())
	}
	p.releaseGates()
	if f := p.fencedErr(); f != nil {
		return f
	}
	if a := p.sess.aborted(); a != nil {
		p.cfg.Log.Error("REPLICATION STOPPED: the VM runs UNPROTECTED", "cause", a, "last-acked-epoch", p.lastAcked.Load())
		return fmt.Errorf("replication stopped: %w", a)
	}
	cause = p.sess.cause()
	p.cfg.Log.Error("BACKUP LOST: the VM runs UNPROTECTED", "cause", cause, "last-acked-epoch", p.lastAcked.Load())
	return &BackupLostError{Cause: cause}
}

// finish ends a session on purpose: wait for the epochs captured to be
// acknowledged, say bye. It waits as long as the backup shows progress
// (acks, or heartbeats whose progress moves): a large epoch on a slow link
// may take longer than the heartbeat timeout to arrive, and its output is
// released only once it has.
func (p *Primary) finish() error {
	captured := p.lastSent.Load()
	if p.lastJob != nil {
		captured = max(captured, p.lastJob.epoch)
	}
	if p.lastAcked.Load() < captured {
		p.cfg.Log.Info("stopping: waiting for the backup to acknowledge the epochs captured",
			"epochs", fmt.Sprintf("%d..%d", p.lastAcked.Load()+1, captured))
	}
	p.backupProgressed() // the wait starts now, not at the last sign
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for p.lastAcked.Load() < p.lastSent.Load() || len(p.inflight) > 0 {
		select {
		case <-p.sess.done:
			return p.unprotected(p.sess.cause())
		case <-tick.C:
		}
		if !p.backupWorking() {
			return p.unprotected(fmt.Errorf("epochs %d..%d not acknowledged after stopping: the backup showed no progress for %v",
				p.lastAcked.Load()+1, captured, p.cfg.HeartbeatTimeout))
		}
	}
	if !p.sess.fire(evBye, nil) { // aborted or ended meanwhile
		if a := p.sess.aborted(); a != nil {
			return p.unprotected(a)
		}
		return p.unprotected(p.sess.cause())
	}
	err := p.writeMsg(encodeMsg(nil, MsgBye, p.lastSent.Load(), nil))
	if err == nil {
		p.conn.closeWrite()
		select { // the backup hangs up once it has the bye
		case <-p.sess.done:
		case <-time.After(time.Second):
		}
	}
	p.fail(errors.New("primary stopped replication"))
	p.releaseGates()
	if err != nil {
		return fmt.Errorf("say bye to the backup: %w", err)
	}
	p.cfg.Log.Info("replication stopped", "last-acked-epoch", p.lastAcked.Load())
	return nil
}

// gateCall calls f (an Open or a Commit) on every gate of gates, in order,
// unless they were released. Opens and Commits share gmu: the Open in a pause
// does not wait for a Commit that is releasing an earlier epoch's output.
func (p *Primary) gateCall(gates []OutputGate, f func(OutputGate) error) error {
	p.gmu.RLock()
	defer p.gmu.RUnlock()
	if p.sess.state() == sessUnprotected {
		return nil
	}
	for _, g := range gates {
		if err := f(g); err != nil {
			return fmt.Errorf("output gate: %w", err)
		}
	}
	return nil
}

// hook passes a fault-injection point (internal/faultpoint).
func (p *Primary) hook(point string, epoch uint64) { faultpoint.Hit(p, point, epoch) }

// readLoop reads acks and heartbeats from the backup.
func (p *Primary) readLoop() {
	var progress uint64
	for {
		h, payload, err := p.rd.ReadMsg()
		if err != nil {
			if isTimeout(err) {
				err = fmt.Errorf("no word from the backup for %v", p.cfg.HeartbeatTimeout)
			}
			if errors.Is(err, ErrProtocol) {
				p.abort(err)
			}
			p.fail(fmt.Errorf("read from backup: %w", err))
			return
		}
		switch h.Type {
		case MsgAck:
			a, err := decodeAck(p.version, payload)
			if err == nil {
				p.backupProgressed()
				err = p.acked(h.Epoch, a)
			}
			if err != nil {
				p.abort(err) // then read on until the backup hangs up
			}
		case MsgHeartbeat:
			hb, err := decodeHeartbeat(p.version, payload)
			if err != nil {
				p.abort(err)
				break
			}
			if hb.Progress != progress {
				progress = hb.Progress
				p.backupProgressed()
			}
		case MsgReject:
			reason, err := decodeReject(payload)
			if err == nil {
				err = &backupRejected{reason}
			}
			p.fail(err)
			return
		case MsgResumed:
			if f := p.finalEpoch.Load(); f == 0 || h.Epoch != f || p.lastAcked.Load() != h.Epoch || len(payload) != 0 {
				p.abort(protoErr("backup sent resumed for epoch %d, and no handover of it was sent", h.Epoch))
				break
			}
			select {
			case <-p.resumed:
			default:
				close(p.resumed)
			}
		default:
			p.abort(protoErr("backup sent %v", h.Type))
		}
	}
}

// acked handles the ack of epoch n.
func (p *Primary) acked(n uint64, a Ack) error {
	digest := a.Digest
	now := time.Now()
	p.amu.Lock()
	if len(p.sent) == 0 || p.sent[0].st.Epoch != n {
		p.amu.Unlock()
		return protoErr("backup acknowledged epoch %d, which is not the oldest unacknowledged one", n)
	}
	pe := p.sent[0]
	p.sent = p.sent[1:]
	p.amu.Unlock()
	<-pe.ready // the pause that made the epoch has finished writing its stats
	st := pe.st
	st.CPU = time.Duration(pe.cpu.Load())
	if a.CPU >= p.backupCPU {
		st.BackupCPU, p.backupCPU = a.CPU-p.backupCPU, a.CPU
	}
	if digest != st.Digest {
		return fmt.Errorf("backup's replica diverged: epoch %d digest %s, primary's %s", n, FormatDigest(digest), FormatDigest(st.Digest))
	}
	st.AckLatency = now.Sub(st.Start.Add(st.Pause + st.Transfer))
	p.lastAcked.Store(n)
	p.protected.Store(true) // Protected also checks the link
	if err := p.commit(n); err != nil {
		return err
	}
	if n == p.finalEpoch.Load() {
		close(p.finalAcked) // acks come in order, once each
	}
	if p.cfg.OnEpoch != nil {
		p.cfg.OnEpoch(st)
	}
	<-p.inflight // last: finish waits for the tokens
	return nil
}

func (p *Primary) heartbeatLoop() {
	t := time.NewTicker(p.cfg.Heartbeat)
	defer t.Stop()
	var buf, payload []byte
	for {
		select {
		case <-p.sess.done:
			return
		case <-t.C:
		}
		hb := Heartbeat{Sent: time.Now().UnixNano(), Epoch: p.lastSent.Load(), Progress: p.conn.written.Load()}
		buf = encodeMsg(buf[:0], MsgHeartbeat, 0, appendHeartbeat(payload[:0], p.version, hb))
		if err := p.writeMsg(buf); err != nil {
			p.fail(fmt.Errorf("send heartbeat: %w", err))
			return
		}
	}
}

// initialSync copies all of memory while the guest runs, then pre-copy
// rounds of what it dirtied meanwhile, until the dirty set is small or stops
// shrinking. The pages dirty after the last round stay in p.set for the first
// checkpoint. With a stream, its sync comes first (the bulk of it) and last
// (what changed while memory was copied), so that its residual is what the
// guest changes during one short round.
func (p *Primary) initialSync(ctx context.Context) error {
	if p.cfg.Stream != nil {
		if err := p.streamSync(ctx, SyncPrecopy); err != nil {
			return err
		}
	}
	if err := p.memorySync(ctx); err != nil {
		return err
	}
	if p.cfg.Stream != nil {
		return p.streamSync(ctx, SyncCatchUp)
	}
	return nil
}

// streamSync runs one phase of the stream's sync, sending its messages as
// stream-sync messages of epoch 0 (between pre-copy rounds: the sender is
// idle), and reports it.
func (p *Primary) streamSync(ctx context.Context, phase SyncPhase) error {
	t0 := time.Now()
	var wire uint64
	st, err := p.cfg.Stream.Sync(phase, func(msg []byte) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		if p.sess.ended() {
			return p.sess.cause()
		}
		if err := checkStreamMessage(msg); err != nil {
			return err
		}
		wire += HeaderSize + uint64(len(msg))
		_, err := p.writeFrame(MsgStreamSync, 0, msg)
		return err
	})
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if p.sess.ended() {
			return p.sess.cause()
		}
		return fmt.Errorf("stream sync (%v): %w", phase, err)
	}
	p.reportStreamSync(phase, st, wire, t0)
	return nil
}

// checkStreamMessage refuses a stream sync message the backup would refuse.
func checkStreamMessage(msg []byte) error {
	if len(msg) > MaxStreamMessage {
		return fmt.Errorf("stream sync message of %d bytes exceeds MaxStreamMessage (%d)", len(msg), MaxStreamMessage)
	}
	return nil
}

func (p *Primary) reportStreamSync(phase SyncPhase, st StreamSync, wire uint64, t0 time.Time) {
	if p.cfg.OnStreamSync != nil {
		p.cfg.OnStreamSync(StreamSyncProgress{Phase: phase, StreamSync: st, WireBytes: wire, Took: time.Since(t0)})
	}
}

// memorySync is the memory part of initialSync.
func (p *Primary) memorySync(ctx context.Context) (err error) {
	start := time.Now()
	var all []uint64
	for _, r := range p.lay.regions {
		for off := uint64(0); off < r.size; off += PageSize {
			all = append(all, r.gpa+off)
		}
	}
	pages := all
	prev := len(all) + 1
	var thr *throttler
	defer func() {
		if terr := thr.stop(); terr != nil && err == nil {
			err = vmFailure{fmt.Errorf("throttle the VM during the sync: %w", terr)}
		}
	}()
	calibrated := false
	var heldBefore time.Duration
	for round := 0; ; round++ {
		t0 := time.Now()
		job := &epochJob{kind: kindPrecopy, round: uint32(round), gpas: pages, live: true, done: make(chan struct{}),
			sent: make(chan struct{}), stats: &EpochStats{}}
		job.stats.DirtyPages = len(pages)
		holes := 0
		if round == 0 {
			job.holes, holes = p.holeMap()
		}
		if err := p.submit(ctx, job); err != nil {
			return err
		}
		if round == 0 {
			all = nil
		}
		p.set.Clear()
		if _, err := p.src.Harvest(p.set); err != nil {
			return fmt.Errorf("harvest during initial sync: %w", err)
		}
		took := time.Since(t0)
		n := p.set.Count()
		share, held := 0.0, time.Duration(0)
		if thr != nil {
			var total time.Duration
			share, total = thr.get()
			held, heldBefore = total-heldBefore, total
		}
		var end SyncEnd
		var est time.Duration
		switch {
		case n <= p.cfg.PrecopyThreshold:
			end = SyncConverged
		case 4*n < 3*prev && round+1 < p.cfg.MaxPrecopyRounds:
			// Still shrinking well: another round.
		default:
			if !calibrated {
				p.calibrateCopy()
				calibrated = true
			}
			est = p.pauseEstimate(n, float64(len(pages))/took.Seconds())
			switch {
			case round+1 >= p.cfg.MaxPrecopyRounds:
				end = SyncRoundLimit
			case est <= p.cfg.SyncPause:
				end = SyncNotShrinking
			case p.cfg.NoThrottle || share >= maxThrottle:
				end = SyncThrottleLimit
			case thr == nil:
				thr = newThrottler(p.cfg.VM)
				thr.set(throttleFirst)
			default:
				thr.set(min(maxThrottle, share+throttleStep))
			}
		}
		done := end != 0
		if p.cfg.OnSync != nil {
			p.cfg.OnSync(SyncProgress{Round: round, Pages: len(pages), WireBytes: job.stats.WireBytes, Took: took,
				Elapsed: time.Since(start), Remaining: n, Done: done, End: end, CPU: time.Duration(job.cpu.Load()),
				Throttle: share, Held: held, PauseEstimate: est, Holes: holes})
		}
		if done && est > p.cfg.SyncPause {
			p.cfg.Log.Warn("initial sync did not converge: the first checkpoint copies what is left in one pause longer than the bound",
				"why", end, "round", round, "dirty", n, "pause-estimate", est, "bound", p.cfg.SyncPause, "throttle", share)
		}
		if done {
			return nil
		}
		prev = n
		pages = p.gpasOf(make([]uint64, 0, n))
	}
}

// submit hands a synchronous job to the sender and waits until it is sent.
func (p *Primary) submit(ctx context.Context, job *epochJob) error {
	select {
	case p.inflight <- struct{}{}:
	case <-p.sess.done:
		return p.sess.cause()
	case <-ctx.Done():
		return ctx.Err()
	}
	p.jobs <- job
	select {
	case <-job.done:
		return nil
	case <-p.sess.done:
		return p.sess.cause()
	case <-ctx.Done():
		return ctx.Err() // the round is cut off, not waited for
	}
}

// gpaList returns an empty page list for a checkpoint, reusing one a sent
// epoch gave back, so a pause does not allocate one.
func (p *Primary) gpaList() []uint64 {
	select {
	case l := <-p.gpaLists:
		return l[:0]
	default:
		return make([]uint64, 0, p.set.Count())
	}
}

func (p *Primary) putGPAList(l []uint64) {
	select {
	case p.gpaLists <- l:
	default:
	}
}

// gpasOf appends the addresses of p.set's pages to dst.
func (p *Primary) gpasOf(dst []uint64) []uint64 {
	p.set.ForEachRun(func(gpa, n uint64) bool {
		for i := range n {
			dst = append(dst, gpa+i*PageSize)
		}
		return true
	})
	return dst
}

// epochLoop takes a checkpoint every interval until ctx ends or the backup
// is lost. A pause waits until the sender is done with the epoch before it,
// so at most one captured epoch waits unsent while the next one runs: when
// the link (or the backup) cannot keep up, epochs grow longer instead of
// queueing, and the output they hold waits no longer than it must. It also
// waits while Config.MaxInFlight epochs are unacknowledged. Both waits are
// EpochStats.Wait; the guest runs on meanwhile.
func (p *Primary) epochLoop(ctx context.Context) error {
	timer := time.NewTimer(0) // the first checkpoint follows the sync at once
	defer timer.Stop()
	var ho convergence // a handover's rounds
	hoReq := p.hoReq
	for epoch := uint64(1); ; epoch++ {
		select {
		case <-ctx.Done():
			return nil
		case <-p.sess.done:
			return p.sess.cause()
		case <-timer.C:
		}
		if ctx.Err() != nil {
			return nil // the timer and ctx were both ready: stop, take no more
		}
		select {
		case <-hoReq:
			if p.version < 4 { // asked before the welcome
				p.cfg.Log.Warn("handover refused: the backup's protocol has none", "version", p.version)
				hoReq = nil
				break
			}
			if err := p.drain(ctx); err == errStopped {
				return nil // stopped: take no more, as above
			} else if err != nil {
				return err
			}
			if ho.converged(p.lastJob) {
				p.finalEpoch.Store(epoch) // this pause is the last: the VM stays paused
			}
		default:
		}
		st := &EpochStats{Epoch: epoch}
		t0 := time.Now()
		if prev := p.lastJob; prev != nil {
			select {
			case <-prev.sent:
			case <-ctx.Done():
				return nil
			case <-p.sess.done:
				return p.sess.cause()
			}
		}
		select {
		case p.inflight <- struct{}{}:
		case <-ctx.Done():
			return nil
		case <-p.sess.done:
			return p.sess.cause()
		}
		st.Wait = time.Since(t0)
		if err := p.checkpoint(epoch, st); err != nil {
			return err
		}
		if epoch == p.finalEpoch.Load() {
			return errFinal
		}
		if ho.rounds > 0 {
			timer.Reset(0) // converging: the next pause follows this one's ack at once
			continue
		}
		timer.Reset(max(0, p.cfg.Interval-time.Since(st.Start)))
	}
}

// drain waits, the guest running, until every epoch captured is
// acknowledged.
func (p *Primary) drain(ctx context.Context) error {
	for len(p.inflight) > 0 {
		select {
		case <-ctx.Done():
			return errStopped
		case <-p.sess.done:
			return p.sess.cause()
		case <-time.After(200 * time.Microsecond):
		}
	}
	return nil
}

// epochJob is a checkpoint epoch or pre-copy round for the sender.
type epochJob struct {
	epoch       uint64
	kind, round uint32
	gpas        []uint64
	live        bool     // pages are read from guest memory, not staging
	staged      bool     // pages are in staging from start
	holes       []uint64 // pages known zero (holes of the memory file), by replica index; not read
	start       uint64   // first staging page
	state       []byte
	audit       uint64
	audited     bool
	auditCRCs   []uint32 // each page's CRC when audited
	stats       *EpochStats
	done        chan struct{} // closed once sent, for synchronous jobs
	sent        chan struct{} // closed once the sender is done with it
	ready       chan struct{} // closed once the capturing pause wrote its stats
	lazy        *lazyJob      // with lazy capture: the copy behind the guest, which the sender waits for
	cpu         atomic.Int64  // ns of the engine's CPU spent on it: pause, copy helpers, workers, sender
}

// sendStream sends checkpoint n's part of the stream, between its pages and
// its state, covered by the epoch's checksum: for the first checkpoint the
// sync's residual (what was still changed at its pause, as it was then), for
// the others what the epoch wrote, in pieces. It returns the bytes it put on
// the wire.
func (p *Primary) sendStream(n uint64, st *EpochStats, crc *uint32) (uint64, error) {
	var wire uint64
	send := func(t MsgType, payload []byte) error {
		hb, err := p.writeFrame(t, n, payload)
		if err != nil {
			return err
		}
		*crc = crc32.Update(crc32.Update(*crc, castagnoli, hb[:]), castagnoli, payload)
		wire += HeaderSize + uint64(len(payload))
		return nil
	}
	if n == 1 {
		t0 := time.Now()
		rs, err := p.cfg.Stream.Sync(SyncResidual, func(msg []byte) error {
			if err := checkStreamMessage(msg); err != nil {
				return err
			}
			return send(MsgStreamSync, msg)
		})
		if err != nil {
			return wire, fmt.Errorf("send epoch 1's stream residual: %w", err)
		}
		st.StreamRecords, st.StreamBytes, st.StreamWireBytes = rs.Sent, uint64(rs.Bytes), wire
		p.reportStreamSync(SyncResidual, rs, wire, t0)
		return wire, nil
	}
	r, sum, err := p.cfg.Stream.Epoch(n)
	if err != nil {
		return 0, fmt.Errorf("epoch %d's stream part: %w", n, err)
	}
	if p.streamBuf == nil {
		p.streamBuf = make([]byte, streamChunk)
	}
	var total int64
	for {
		k, rerr := io.ReadFull(r, p.streamBuf)
		total += int64(k)
		if k > 0 {
			if err := send(MsgStreamEpoch, p.streamBuf[:k]); err != nil {
				return wire, err
			}
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return wire, fmt.Errorf("read epoch %d's stream part: %w", n, rerr)
		}
	}
	if total != sum.Encoded {
		return wire, fmt.Errorf("epoch %d's stream part: read %d bytes of %d", n, total, sum.Encoded)
	}
	st.StreamRecords, st.StreamBytes, st.StreamWireBytes = sum.Records, uint64(sum.Bytes), wire
	return wire, nil
}

// auditTable returns a page CRC table for an audit, reusing one a sent epoch
// gave back or the spare made after the last audit's pause. It allocates only
// if neither is there.
func (p *Primary) auditTable() []uint32 {
	select {
	case t := <-p.auditCRCs:
		return t
	default:
		return make([]uint32, p.lay.shape.Pages())
	}
}

// spareAuditTable makes sure a page CRC table waits for the next audit, so
// that its pause does not allocate one: called before the first pause and
// after each audited pause has resumed the VM. Tables come back once their
// epoch is sent, so at most one more than the epochs in flight is ever made.
func (p *Primary) spareAuditTable() {
	if len(p.auditCRCs) > 0 {
		return
	}
	select {
	case p.auditCRCs <- make([]uint32, p.lay.shape.Pages()):
	default:
	}
}

// maxMissedNamed is how many missed pages an audit failure names.
const maxMissedNamed = 8

// auditError reports an audit that failed: the digests, and the pages whose
// CRC in guest memory at the pause differs from what was replicated, with
// their slot, offset and (if the VM is a PageNamer) what they hold.
func (p *Primary) auditError(job *epochJob) error {
	var b strings.Builder
	fmt.Fprintf(&b, "audit of epoch %d: guest memory digests to %s, the replicated pages to %s: dirty tracking missed a page",
		job.epoch, FormatDigest(job.audit), FormatDigest(p.digest.digest))
	idxs, n := diffPages(job.auditCRCs, p.digest.crcs, maxMissedNamed)
	fmt.Fprintf(&b, ": %d page(s) differ", n)
	namer, _ := p.cfg.VM.(PageNamer)
	for k, idx := range idxs {
		sep := ", "
		if k == 0 {
			sep = ": "
		}
		gpa, slot, off, _ := p.lay.gpaAt(idx)
		fmt.Fprintf(&b, "%sGPA %#x (slot %d +%#x", sep, gpa, slot, off)
		if namer != nil {
			if name := namer.NamePage(gpa); name != "" {
				fmt.Fprintf(&b, ", %s", name)
			}
		}
		fmt.Fprintf(&b, "; last sent in epoch %d", p.sentIn[idx])
		if p.sentIn[idx] == 0 {
			b.WriteString(" (the initial sync)")
		}
		b.WriteString(")")
	}
	if n > len(idxs) {
		fmt.Fprintf(&b, ", and %d more", n-len(idxs))
	}
	return errors.New(b.String())
}

// pendingEpoch is an epoch sent and not yet acknowledged. ready is closed
// when the pause that captured it has written its part of the stats: an
// oversized epoch is sent, and may be acknowledged, before its pause ends.
type pendingEpoch struct {
	st    *EpochStats
	ready chan struct{}
	cpu   *atomic.Int64
}
