package ebpf

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf/ringbuf"
)

// Defaults and bounds of Config.
const (
	// DefaultRingSize is the ring buffer size when Config.RingSize is 0.
	DefaultRingSize = 4 << 20
	// MinRingSize is the smallest ring: it holds the largest record.
	MinRingSize = 128 << 10
	// MaxRingSize is the largest ring.
	MaxRingSize = 1 << 30

	// DefaultHoldLimit is the userspace hold limit when Config.HoldLimit
	// is 0.
	DefaultHoldLimit = 32 << 20
	// MinHoldLimit is the smallest hold limit.
	MinHoldLimit = 4 << 10
	// MaxHoldLimit is the largest hold limit.
	MaxHoldLimit = 16 << 30

	// MaxOpenEpochs is the most epochs held at once: opened and neither
	// committed nor discarded.
	MaxOpenEpochs = epochSlots

	// AutoCPU as Config.ReleaseCPU pins the releasing thread to the
	// highest-numbered CPU the process may run on.
	AutoCPU = -1
)

var (
	// ErrNotSupported is returned (wrapped) by New and Announce when the
	// kernel lacks something the gate needs: BPF ring buffers, TCX links
	// (Linux 6.6+).
	ErrNotSupported = errors.New("not supported by this kernel")
	// ErrNotTap is returned (wrapped) by New and Announce when the
	// interface is not a tap device.
	ErrNotTap = errors.New("not a tap device")
	// ErrClosed is returned by a Gate's methods after Close.
	ErrClosed = errors.New("gate closed")
	// ErrTooManyEpochs is returned by Open when MaxOpenEpochs epochs are
	// already held: the engine is not committing.
	ErrTooManyEpochs = errors.New("too many open epochs")
)

// Config configures a Gate.
type Config struct {
	// Interface is the VM's tap device, in the network namespace of the
	// thread that calls New.
	Interface string
	// RingSize is the size in bytes of the BPF ring buffer that carries
	// held frames to userspace: a power of two from MinRingSize to
	// MaxRingSize. 0 means DefaultRingSize. When userspace falls behind and
	// the ring fills, frames are dropped and counted (DroppedRingFull).
	RingSize int
	// HoldLimit is the most bytes of held frames (with 24 to 31 bytes of
	// bookkeeping each) kept in userspace, from MinHoldLimit to
	// MaxHoldLimit. 0 means DefaultHoldLimit. Past it, frames are dropped
	// and counted (DroppedHoldLimit), never released early. The buffer is
	// allocated at the first held frame.
	HoldLimit int
	// ReleaseCPU is the CPU the releasing thread is pinned to, so that
	// released frames share one CPU's backlog and keep their order (see the
	// package documentation); AutoCPU picks one. The zero value is CPU 0.
	ReleaseCPU int
	// Pcap, if not nil, receives every released frame as a pcap file
	// (Ethernet, nanosecond timestamps: the release time). The gate buffers
	// writes and flushes after each Commit and Release, and on Close.
	Pcap io.Writer
	// OnEpoch, if not nil, is called with an epoch's statistics when the
	// epoch has ended: committed, discarded, released or closed. It runs on
	// the gate's own goroutine, during the Gate method that ended the
	// epoch: it must return quickly and must not call the Gate's methods
	// (Stats excepted).
	OnEpoch func(EpochStats)
}

func (c *Config) validate() error {
	if c.RingSize == 0 {
		c.RingSize = DefaultRingSize
	}
	if c.RingSize < MinRingSize || c.RingSize > MaxRingSize || c.RingSize&(c.RingSize-1) != 0 {
		return fmt.Errorf("ring size %d: want a power of two from %d to %d", c.RingSize, MinRingSize, MaxRingSize)
	}
	if c.HoldLimit == 0 {
		c.HoldLimit = DefaultHoldLimit
	}
	if c.HoldLimit < MinHoldLimit || c.HoldLimit > MaxHoldLimit {
		return fmt.Errorf("hold limit %d: want %d to %d bytes", c.HoldLimit, MinHoldLimit, MaxHoldLimit)
	}
	if c.ReleaseCPU < AutoCPU {
		return fmt.Errorf("release CPU %d: want a CPU number or AutoCPU", c.ReleaseCPU)
	}
	return nil
}

// Gate is the network output gate of one VM: it holds the frames the VM
// sends on its tap, per epoch, and releases an epoch's frames when the
// epoch commits. It implements replicate.OutputGate.
//
// Open may run while a Commit runs (a Commit can take milliseconds to
// release an epoch, and the engine's pause must not wait for it); otherwise
// Open, Commit, Discard, Release, Inject and Close must be called one at a
// time, as the replication engine does. Stats may be called from any
// goroutine at any time, also after Close.
type Gate struct {
	cfg Config
	att *attachment
	rd  *ringbuf.Reader
	own *owner

	reqs chan request
	done chan struct{} // closed when the owner goroutine has returned

	// openMu guards what Open shares with the owner and with Close.
	openMu    sync.Mutex
	opens     []uint64      // epochs opened, not yet seen by the owner
	floor     uint64        // Open wants an epoch above it
	closed    bool          // Close has begun
	discarded bool          // Discard ran; Open waits for Release
	opensN    atomic.Uint64 // incremented by every Open: the owner's cheap check
	nstates   atomic.Int64  // epochs the owner tracks

	// mu guards snap, snapRead and statsDone; statsDone, set under it,
	// makes Stats stop reading the control block before Close unmaps it.
	mu        sync.Mutex
	snap      Stats
	snapRead  uint64 // ring records the owner has read
	statsDone bool   // snap is final: Close has run
}

// request is a call the owner goroutine carries out between ring reads.
type request struct {
	do   func() error
	done chan error
}

// New attaches a gate to cfg.Interface, a tap in the calling thread's
// network namespace. The gate starts in pass mode: frames pass untouched
// until the first Open. It needs CAP_NET_ADMIN and CAP_BPF (root).
func New(cfg Config) (*Gate, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	cpu, err := releaseCPU(cfg.ReleaseCPU)
	if err != nil {
		return nil, err
	}
	att, err := attach(cfg.Interface, cfg.RingSize, true)
	if err != nil {
		return nil, err
	}
	rd, err := ringbuf.NewReader(att.objs.Ring)
	if err != nil {
		att.close()
		return nil, fmt.Errorf("open ring buffer reader: %w", err)
	}
	g := &Gate{
		cfg:  cfg,
		att:  att,
		rd:   rd,
		reqs: make(chan request, 1),
		done: make(chan struct{}),
	}
	g.own = newOwner(g)
	ready := make(chan error, 1)
	go g.own.run(cpu, ready)
	if err := <-ready; err != nil {
		rd.Close()
		att.close()
		return nil, err
	}
	return g, nil
}

// Interface returns the name of the tap the gate is attached to.
func (g *Gate) Interface() string { return g.cfg.Interface }

// Open starts epoch n: every frame the VM sends from now on is held and
// belongs to n. The first Open (and the first after Release) switches the
// gate from pass to hold mode. n must be above every epoch opened before
// (or above the n of the last Discard). Open does not wait for the gate's
// goroutine: it writes the control block the tap program reads, and is
// meant for the engine's pause, with the VM stopped.
func (g *Gate) Open(n uint64) error {
	g.openMu.Lock()
	defer g.openMu.Unlock()
	if g.closed {
		return ErrClosed
	}
	select {
	case <-g.done:
		return g.stopped() // nothing would read what is held
	default:
	}
	if g.discarded {
		return fmt.Errorf("open epoch %d: epochs were discarded: Release the gate first", n)
	}
	if n <= g.floor {
		return fmt.Errorf("open epoch %d: want an epoch above %d", n, g.floor)
	}
	if g.nstates.Load()+int64(len(g.opens)) >= MaxOpenEpochs {
		return fmt.Errorf("open epoch %d: %w: %d epochs held and none committed", n, ErrTooManyEpochs, MaxOpenEpochs)
	}
	// Zero the epoch's drop slot before the epoch is written: the tap
	// program counts into a slot only while it names the frame's epoch.
	d := &g.att.drops[n%epochSlots]
	atomic.StoreUint64(&d.Epoch, 0)
	atomic.StoreUint64(&d.RingFull, 0)
	atomic.StoreUint64(&d.RingFullBytes, 0)
	atomic.StoreUint64(&d.TooBig, 0)
	atomic.StoreUint64(&d.TooBigBytes, 0)
	atomic.StoreUint64(&d.Epoch, n)

	g.opens = append(g.opens, n)
	g.opensN.Add(1)
	g.floor = n
	atomic.StoreUint64(&g.att.ctl.Epoch, n)
	atomic.StoreUint64(&g.att.ctl.Mode, modeHold)
	return nil
}

// Commit releases every held frame of the epochs up to and including n, in
// the order the VM sent them, into the host's datapath at the tap's
// ingress. It first drains the ring buffer, so every frame the tap program
// held for those epochs is included, and returns once the released frames
// have passed the tap's ingress hook (or, if the host dropped some, after a
// second; see Stats.Lost).
func (g *Gate) Commit(n uint64) error {
	return g.call(func() error { g.own.commit(n); return nil })
}

// Discard drops every held frame of the epochs after n: they will never be
// released. The VM's output after them has no epoch to belong to, so the
// gate takes no Open until Release (as the engine does: a VM whose epochs
// are discarded runs on unprotected, or not at all): what the VM sends
// meanwhile is held and let out by Release, in order. Open after Release
// may reuse the epoch numbers above n.
func (g *Gate) Discard(n uint64) error {
	g.openMu.Lock()
	if !g.closed {
		g.discarded = true
		if g.floor > n {
			g.floor = n
		}
	}
	g.openMu.Unlock()
	return g.call(func() error { g.own.discard(n); return nil })
}

// Release stops holding: it releases everything held, in order, and lets
// frames pass from then on. Frames the VM sends while held ones are still
// on their way out are held behind them and released at once, so nothing
// overtakes an older frame; once the gate has caught up, frames pass
// without a copy. The next Open holds again.
func (g *Gate) Release() error {
	err := g.call(func() error { g.own.release(); return nil })
	g.openMu.Lock()
	defer g.openMu.Unlock()
	if err == nil {
		g.discarded = false
	}
	select {
	case <-g.done:
		// The gate's goroutine has died: nothing will release what is
		// held, but the VM runs on unprotected and must not go dark. Let
		// frames pass from now on; what was held is lost, never released.
		if !g.closed {
			atomic.StoreUint64(&g.att.ctl.Mode, modePass)
		}
	default:
	}
	return err
}

// Inject sends frame into the host's datapath as if the VM had sent it:
// it enters at the tap's ingress, after the gate (it is never held). It
// returns once the frame has passed the tap's ingress hook. For the
// gratuitous ARP a VM's new host sends (see GratuitousARP).
func (g *Gate) Inject(frame []byte) error {
	if len(frame) < ethHeaderLen {
		return fmt.Errorf("inject: %d-byte frame, want at least an Ethernet header (%d bytes)", len(frame), ethHeaderLen)
	}
	return g.call(func() error { return g.own.inject(frame) })
}

// Close detaches the gate and frees its kernel objects. Frames still held
// are dropped (OutcomeClosed), never released; from then on the VM's
// frames pass the tap unheld. Stats still works after Close.
func (g *Gate) Close() error {
	g.openMu.Lock()
	if g.closed {
		g.openMu.Unlock()
		return ErrClosed
	}
	g.closed = true
	g.openMu.Unlock()

	err := g.call(func() error { g.own.close(); return errStop })
	if errors.Is(err, errStop) {
		err = nil
	}
	<-g.done
	if cerr := g.rd.Close(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("close ring buffer reader: %w", cerr))
	}
	g.mu.Lock()
	g.snap = g.readStats()
	g.statsDone = true
	g.mu.Unlock()
	if cerr := g.att.close(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	return err
}

// errStop makes the owner goroutine return after a request.
var errStop = errors.New("stop")

// call runs f on the owner goroutine after draining the ring buffer: Flush
// makes the reader return every record committed so far, then ErrFlushed,
// on which the owner serves the request.
func (g *Gate) call(f func() error) error {
	select {
	case <-g.done:
		return g.stopped()
	default:
	}
	req := request{do: f, done: make(chan error, 1)}
	select {
	case g.reqs <- req:
	case <-g.done:
		return g.stopped()
	}
	if err := g.rd.Flush(); err != nil {
		// Take the request back, so it cannot run at some later flush.
		select {
		case <-g.reqs:
		default:
		}
		return fmt.Errorf("flush ring buffer: %w", err)
	}
	select {
	case err := <-req.done:
		return err
	case <-g.done:
		select {
		case err := <-req.done:
			return err
		default:
		}
		return g.stopped()
	}
}

// stopped is the error of a call after the owner goroutine returned.
func (g *Gate) stopped() error {
	if err := g.own.err; err != nil {
		return fmt.Errorf("gate stopped: %w", err)
	}
	return ErrClosed
}

// Stats returns a snapshot of the gate's counters. Safe from any goroutine.
func (g *Gate) Stats() Stats {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.statsDone {
		return g.snap
	}
	return g.readStats()
}

// readStats merges the owner's last published counters with the tap
// program's. g.mu is held and the control block is mapped.
func (g *Gate) readStats() Stats {
	s := g.snap
	c := g.att.ctl
	s.Mode = Mode(atomic.LoadUint64(&c.Mode))
	s.OpenEpoch = atomic.LoadUint64(&c.Epoch)
	s.DroppedRingFull = Counter{atomic.LoadUint64(&c.RingFull), atomic.LoadUint64(&c.RingFullBytes)}
	s.DroppedTooBig = Counter{atomic.LoadUint64(&c.TooBig), atomic.LoadUint64(&c.TooBigBytes)}
	s.Errors = atomic.LoadUint64(&c.Errors)
	s.Injected = atomic.LoadUint64(&c.Injected)
	if held := atomic.LoadUint64(&c.Held); held > g.snapRead {
		s.InRing = held - g.snapRead
	}
	return s
}
