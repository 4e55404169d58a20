package ebpf

import (
	"bufio"
	"errors"
	"fmt"
	"math"
	"os"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
	"golang.org/x/sys/unix"
)

const (
	// inflightWindow is the most released frames allowed between the send
	// and the tap's ingress hook. A frame redirected to ingress waits in
	// the CPU's backlog (net.core.netdev_max_backlog, 1000 by default),
	// which drops when full; the sender waits rather than overfill it.
	// Normally the frame has passed ingress before the send returns (the
	// backlog is processed when the send re-enables softirqs), so the
	// window is only reached when softirq work was deferred to ksoftirqd.
	inflightWindow = 256
	// lostAfter is how long a released frame may take to come back to the
	// tap's ingress before the gate counts it lost.
	lostAfter = time.Second
	// injectTimeout is how long Inject waits for its frame at ingress.
	injectTimeout = time.Second
	// pcapSnaplen covers the largest frame the gate holds.
	pcapSnaplen = 1 << 18
	// publishEvery is how many ring records may be taken between two
	// updates of the Stats snapshot while the ring is busy.
	publishEvery = 256
)

// epochState is the owner's record of one open epoch.
type epochState struct {
	s       EpochStats
	hist    histogram
	pending Counter // frames of the epoch in the hold queue
	first   uint64  // queue position of its first frame, if pending.Frames > 0
}

// owner is the gate's goroutine, on an OS thread pinned to one CPU. It is
// the only reader of the ring buffer, the only user of the hold queue and
// the epoch states, and the only sender of released frames, so frames
// leave in the order they were held. Gate methods hand it requests (see
// Gate.call).
type owner struct {
	g         *Gate
	ctl       *holdGateCtl
	drops     []holdEpochDrops
	releaseFD int
	injectFD  int
	holdLimit int
	onEpoch   func(EpochStats)

	// err is why run returned other than by Close; read after g.done.
	err error

	rec         ringbuf.Record
	q           *holdQueue
	states      []*epochState // open epochs, oldest first
	free        []*epochState
	committed   uint64 // highest epoch committed
	tailEpoch   uint64 // epoch of the newest frame queued (or a lower bound)
	passThrough bool   // released: whatever comes from the ring goes on at once
	opensSeen   uint64
	opensSpare  []uint64

	// beforeSend, if set, runs before each release (tests use it to send
	// frames while a release is under way).
	beforeSend func()

	sent uint64 // frames sent on the release socket
	lost uint64 // of those, given up as lost

	cls       *classifier
	pcap      *pcapgo.Writer
	pcapBuf   *bufio.Writer
	clockBase time.Time
	monoBase  uint64

	t            Stats // the owner's counters; published to g.snap
	hist         histogram
	read         uint64 // ring records taken
	sincePublish int
}

func newOwner(g *Gate) *owner {
	return &owner{
		g:         g,
		ctl:       g.att.ctl,
		drops:     g.att.drops,
		releaseFD: g.att.releaseFD,
		injectFD:  g.att.injectFD,
		holdLimit: g.cfg.HoldLimit,
		onEpoch:   g.cfg.OnEpoch,
		cls:       newClassifier(),
	}
}

// run is the owner goroutine. It pins its thread, reports on ready, then
// takes ring records and serves requests until Close.
func (o *owner) run(cpu int, ready chan<- error) {
	defer close(o.g.done)
	if err := pinThread(cpu); err != nil {
		ready <- err
		return
	}
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		ready <- fmt.Errorf("read CLOCK_MONOTONIC: %w", err)
		return
	}
	o.clockBase, o.monoBase = time.Now(), uint64(ts.Nano())
	if w := o.g.cfg.Pcap; w != nil {
		o.pcapBuf = bufio.NewWriterSize(w, 64<<10)
		o.pcap = pcapgo.NewWriterNanos(o.pcapBuf)
		err := o.pcap.WriteFileHeader(pcapSnaplen, layers.LinkTypeEthernet)
		if err == nil {
			err = o.pcapBuf.Flush()
		}
		if err != nil {
			ready <- fmt.Errorf("write pcap header: %w", err)
			return
		}
	}
	ready <- nil

	for {
		err := o.g.rd.ReadInto(&o.rec)
		switch {
		case err == nil:
			o.take(o.rec.RawSample)
			if o.rec.Remaining == 0 || o.sincePublish >= publishEvery {
				o.flushPcap()
				o.publish()
			}
		case errors.Is(err, ringbuf.ErrFlushed):
			select {
			case req := <-o.g.reqs:
				rerr := req.do()
				o.publish()
				req.done <- rerr
				if rerr == errStop {
					return
				}
			default:
			}
		case errors.Is(err, os.ErrClosed):
			o.err = errors.New("ring buffer reader closed")
			return
		default:
			o.err = fmt.Errorf("read ring buffer: %w", err)
			o.publish()
			return
		}
	}
}

// take handles one ring record.
func (o *owner) take(raw []byte) {
	o.read++
	o.sincePublish++
	o.syncOpens()
	r, err := decodeRecord(raw)
	if err != nil {
		o.t.Malformed++
		o.skip(1)
		return
	}
	n := len(r.frame)
	o.cls.count(r.frame, &o.t.Protocols)
	// A drain record, or anything after Release, goes on at once: the
	// queue is empty then (Release emptied it before anything after it was
	// read). Were it not, the frame waits in the queue like any other, which
	// may delay it but never lets it overtake an older frame.
	if (r.flags&recDrain != 0 || o.passThrough) && (o.q == nil || o.q.empty()) {
		o.t.Held.add(n)
		if r.flags&recDrain != 0 {
			o.t.Drained.add(n)
		}
		o.send(r.frame, r.ktime, nil)
		return
	}
	st := o.stateFor(r.epoch)
	if st == nil {
		o.t.DroppedHoldLimit.add(n)
		o.skip(1)
		return
	}
	if o.q == nil {
		o.q = newHoldQueue(o.holdLimit)
	}
	pos, ok := o.q.push(st.s.Epoch, r.ktime, r.flags, r.frame)
	if !ok {
		st.s.DroppedHoldLimit.add(n)
		o.t.DroppedHoldLimit.add(n)
		o.skip(1)
		return
	}
	if st.pending.Frames == 0 {
		st.first = pos
	}
	o.tailEpoch = st.s.Epoch
	st.pending.add(n)
	st.s.Held.add(n)
	o.t.Held.add(n)
	o.t.Pending.add(n)
}

// syncOpens creates the states of the epochs Open started since the last
// call.
func (o *owner) syncOpens() {
	if o.g.opensN.Load() == o.opensSeen {
		return
	}
	o.g.openMu.Lock()
	o.opensSeen = o.g.opensN.Load()
	opens := o.g.opens
	o.g.opens = o.opensSpare[:0]
	o.g.openMu.Unlock()
	for _, n := range opens {
		o.passThrough = false
		if k := len(o.states); k == 0 || n > o.states[k-1].s.Epoch {
			o.newState(n)
		}
	}
	o.opensSpare = opens[:0]
}

// stateFor returns the state a frame held in epoch e goes to. Frames of
// one epoch stay together in the queue and epochs only move forward in it,
// so a frame joins the first open epoch at or after the latest of: its own,
// the one after the last commit, and that of the newest frame queued. A
// frame that raced with Open on another CPU, or one held for an epoch
// already committed, is thus delayed to a later epoch, never released
// early. nil: MaxOpenEpochs are open and the frame must be dropped.
func (o *owner) stateFor(e uint64) *epochState {
	e = max(e, o.committed+1, o.tailEpoch)
	i := len(o.states)
	for i > 0 && o.states[i-1].s.Epoch >= e {
		i--
	}
	if i < len(o.states) {
		return o.states[i]
	}
	if i >= MaxOpenEpochs {
		return nil // never file a frame under an older epoch: drop it
	}
	return o.newState(e)
}

func (o *owner) newState(e uint64) *epochState {
	var st *epochState
	if k := len(o.free); k > 0 {
		st, o.free = o.free[k-1], o.free[:k-1]
	} else {
		st = new(epochState)
	}
	st.s.Epoch = e
	o.states = append(o.states, st)
	o.g.nstates.Store(int64(len(o.states)))
	return st
}

// commit releases the epochs up to n.
func (o *owner) commit(n uint64) {
	o.syncOpens()
	o.releaseQueue(n)
	o.settle()
	o.finishUpTo(n, OutcomeCommitted)
	o.committed = max(o.committed, n)
	o.flushPcap()
}

// release lets everything out and switches to pass mode.
func (o *owner) release() {
	// From here the tap program holds a new frame only while frames held
	// before it are still on their way out (drain records).
	atomic.StoreUint64(&o.ctl.Mode, modePass)
	o.syncOpens()
	o.releaseQueue(math.MaxUint64)
	o.settle()
	o.finishUpTo(math.MaxUint64, OutcomeReleased)
	o.passThrough = true
	o.flushPcap()
}

// discard drops the epochs after n.
func (o *owner) discard(n uint64) {
	o.syncOpens()
	i := len(o.states)
	for i > 0 && o.states[i-1].s.Epoch > n {
		i--
	}
	for _, st := range o.states[i:] {
		if st.pending.Frames > 0 {
			o.q.truncate(st.first)
			break
		}
	}
	for _, st := range o.states[i:] {
		o.drop(st)
		o.finish(st, OutcomeDiscarded)
	}
	clear(o.states[i:])
	o.states = o.states[:i]
	o.g.nstates.Store(int64(len(o.states)))
	o.tailEpoch = min(o.tailEpoch, n)
}

// close drops everything held.
func (o *owner) close() {
	o.syncOpens()
	if o.q != nil {
		o.q.clear()
		o.q = nil
	}
	for _, st := range o.states {
		o.drop(st)
		o.finish(st, OutcomeClosed)
	}
	clear(o.states)
	o.states = o.states[:0]
	o.g.nstates.Store(0)
	o.flushPcap()
}

// drop counts st's pending frames as discarded; the queue entries are
// removed by the caller.
func (o *owner) drop(st *epochState) {
	st.s.Discarded.addCounter(st.pending)
	o.t.Discarded.addCounter(st.pending)
	o.t.Pending.subCounter(st.pending)
	o.skip(st.pending.Frames)
	st.pending = Counter{}
}

// releaseQueue sends every queued frame of the epochs up to n, oldest
// first.
func (o *owner) releaseQueue(n uint64) {
	if o.q == nil {
		return
	}
	si := 0
	for {
		e, ok := o.q.front()
		if !ok || e.epoch > n {
			return
		}
		for si < len(o.states) && o.states[si].s.Epoch < e.epoch {
			si++
		}
		var st *epochState
		if si < len(o.states) && o.states[si].s.Epoch == e.epoch {
			st = o.states[si]
			st.pending.sub(len(e.frame))
		}
		o.t.Pending.sub(len(e.frame))
		o.send(e.frame, e.ktime, st)
		o.q.pop(e)
	}
}

// finishUpTo ends the states of the epochs up to n.
func (o *owner) finishUpTo(n uint64, outcome Outcome) {
	i := 0
	for i < len(o.states) && o.states[i].s.Epoch <= n {
		o.finish(o.states[i], outcome)
		i++
	}
	k := copy(o.states, o.states[i:])
	clear(o.states[k:])
	o.states = o.states[:k]
	o.g.nstates.Store(int64(len(o.states)))
}

// finish completes st's statistics with the tap program's drop counts,
// reports them and recycles st.
func (o *owner) finish(st *epochState, outcome Outcome) {
	e := st.s.Epoch
	d := &o.drops[e%epochSlots]
	if atomic.LoadUint64(&d.Epoch) == e {
		st.s.DroppedRingFull = Counter{atomic.LoadUint64(&d.RingFull), atomic.LoadUint64(&d.RingFullBytes)}
		st.s.DroppedTooBig = Counter{atomic.LoadUint64(&d.TooBig), atomic.LoadUint64(&d.TooBigBytes)}
	}
	st.s.Outcome = outcome
	l := st.hist.latency()
	st.s.LatencyP50, st.s.LatencyP99, st.s.LatencyMax = l.P50, l.P99, l.Max
	if o.onEpoch != nil {
		o.onEpoch(st.s)
	}
	*st = epochState{}
	o.free = append(o.free, st)
}

// send releases one held frame: it leaves on the release socket, the
// tap's egress program turns it around to the tap's ingress, and the
// ingress program lets it pass. st is the frame's epoch, nil for frames
// released while draining.
func (o *owner) send(frame []byte, ktime uint64, st *epochState) {
	n := len(frame)
	if o.beforeSend != nil {
		o.beforeSend()
	}
	o.throttle(inflightWindow)
	if err := sendFrame(o.releaseFD, frame); err != nil {
		o.skip(1)
		o.t.Failed.add(n)
		o.t.LastFailure = fmt.Errorf("release frame on %s: %w", o.g.cfg.Interface, err)
		if st != nil {
			st.s.Failed.add(n)
		}
		return
	}
	o.sent++
	var lat uint64
	if now := o.monoBase + uint64(time.Since(o.clockBase)); now > ktime {
		lat = now - ktime
	}
	o.hist.add(lat)
	o.t.Released.add(n)
	if st != nil {
		st.hist.add(lat)
		st.s.Released.add(n)
	}
	if o.pcap != nil && o.t.PcapErr == nil {
		ci := gopacket.CaptureInfo{Timestamp: time.Now(), CaptureLength: n, Length: n}
		if err := o.pcap.WritePacket(ci, frame); err != nil {
			o.t.PcapErr = fmt.Errorf("write pcap: %w", err)
		}
	}
}

// inflight is the number of released frames not yet seen at ingress.
func (o *owner) inflight() uint64 {
	back := atomic.LoadUint64(&o.ctl.Reentered) + o.lost
	if back >= o.sent {
		return 0
	}
	return o.sent - back
}

// throttle waits until at most limit released frames are in flight. After
// lostAfter it gives the missing ones up as lost: the host dropped them.
func (o *owner) throttle(limit uint64) {
	if o.inflight() <= limit {
		return
	}
	deadline := time.Now().Add(lostAfter)
	for o.inflight() > limit {
		if time.Now().After(deadline) {
			n := o.inflight()
			o.lost += n
			o.t.Lost += n
			o.skip(n)
			return
		}
		// Sleep, not spin: the backlog is processed on this CPU.
		time.Sleep(20 * time.Microsecond)
	}
}

// settle waits until every released frame has passed the tap's ingress.
func (o *owner) settle() { o.throttle(0) }

// skip tells the tap program that n held frames will never come back, so
// that in pass mode it does not wait for them.
func (o *owner) skip(n uint64) {
	if n > 0 {
		atomic.AddUint64(&o.ctl.Skipped, n)
	}
}

// inject sends frame on the inject socket and waits for it at ingress.
func (o *owner) inject(frame []byte) error {
	return injectFrame(o.ctl, o.injectFD, o.g.cfg.Interface, frame)
}

// injectFrame sends frame on an attachment's inject socket and waits until
// the ingress program has seen it.
func injectFrame(ctl *holdGateCtl, fd int, ifname string, frame []byte) error {
	before := atomic.LoadUint64(&ctl.Injected)
	if err := sendFrame(fd, frame); err != nil {
		return fmt.Errorf("inject frame into %s: %w", ifname, err)
	}
	deadline := time.Now().Add(injectTimeout)
	for atomic.LoadUint64(&ctl.Injected) == before {
		if time.Now().After(deadline) {
			return fmt.Errorf("inject frame into %s: it did not reach the tap's ingress within %v", ifname, injectTimeout)
		}
		time.Sleep(20 * time.Microsecond)
	}
	return nil
}

func (o *owner) flushPcap() {
	if o.pcapBuf != nil && o.t.PcapErr == nil {
		if err := o.pcapBuf.Flush(); err != nil {
			o.t.PcapErr = fmt.Errorf("write pcap: %w", err)
		}
	}
}

// publish copies the owner's counters to the Stats snapshot.
func (o *owner) publish() {
	o.sincePublish = 0
	s := o.t
	s.Latency = o.hist.latency()
	s.CommittedEpoch = o.committed
	o.g.mu.Lock()
	o.g.snap = s
	o.g.snapRead = o.read
	o.g.mu.Unlock()
}
