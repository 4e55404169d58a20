package testvm

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// GuestState is a vCPU's guest-side state, from its status page.
type GuestState uint32

const (
	GuestBoot    GuestState = gsBoot
	GuestRunning GuestState = gsRunning
	GuestWaiting GuestState = gsWaiting
	GuestFailed  GuestState = gsError
)

func (s GuestState) String() string {
	switch s {
	case GuestBoot:
		return "boot"
	case GuestRunning:
		return "running"
	case GuestWaiting:
		return "waiting"
	case GuestFailed:
		return "error"
	}
	return fmt.Sprintf("state(%d)", uint32(s))
}

// Status is what a vCPU's guest reports in its status page. The host reads it
// from memory, without an exit.
type Status struct {
	Started    bool       // the guest initialised its status page
	State      GuestState // boot, running, waiting (between phases), error
	Error      uint32     // the guest's error code in state error
	Iterations uint64     // operations done: page writes, counter steps, idle ticks or block writes
	Writes     uint64     // Dirty: page writes completed (= the last version used)
	Phase      uint64     // the last phase completed
	CurPage    uint64     // Dirty: 1 + the index of the page being written, 0 = none
	Counter    uint64     // Counter: the latest published count c
	Hash       uint64     // Counter: the running hash at c
	TSC        uint64     // guest TSC at its last status update

	// Network workloads (vCPU 0).
	NetRx      uint64         // frames the guest took from its RX ring
	NetTx      uint64         // frames the guest put on its TX ring (ARP replies included)
	NetSeq     uint64         // the last sequence number sent (echo replies or stream datagrams)
	NetIgnored uint64         // frames received that were not for the guest, or malformed
	StreamPeer netip.AddrPort // UDPStream: the subscriber, invalid while there is none

	// Disk workload (vCPU 0).
	DiskWrites    uint64 // block writes completed and in the version table (= the last version used)
	DiskReads     uint64 // blocks read back and verified against the version table
	DiskFlushes   uint64 // flush requests completed
	DiskErrors    uint64 // failed requests and reads that did not verify (the guest stops at the first)
	DiskInFlight  uint64 // descriptors of the write batch in flight, 0 = none
	DiskBadBlock  uint64 // 1 + the block of the last error, 0 = none
	DiskBadStatus uint32 // the DISK_S_* status of the last failed request, 0 for a verify mismatch
}

// Status reads vCPU i's status page. While the machine runs, each field is an
// atomic read of a value the guest may be changing; the counter pair is read
// consistently. While it is paused, the status is exact. After Close it is
// the zero Status.
func (m *Machine) Status(i int) Status {
	m.memMu.RLock()
	defer m.memMu.RUnlock()
	if m.mem == nil {
		return Status{}
	}
	return readStatus(m.mem, i)
}

func readStatus(mem []byte, i int) Status {
	b := StatusOffset(i)
	st := Status{
		Started:    load64(mem, b+sMagic) == statusMagic,
		State:      GuestState(load32(mem, b+sState)),
		Error:      load32(mem, b+sError),
		Iterations: load64(mem, b+sIterations),
		Writes:     load64(mem, b+sWrites),
		Phase:      load64(mem, b+sPhase),
		CurPage:    load64(mem, b+sCurPage),
		TSC:        load64(mem, b+sTSC),
		NetRx:      load64(mem, b+sNetRx),
		NetTx:      load64(mem, b+sNetTx),
		NetSeq:     load64(mem, b+sNetSeq),
		NetIgnored: load64(mem, b+sNetIgnored),

		DiskWrites:    load64(mem, b+sDiskWrites),
		DiskReads:     load64(mem, b+sDiskReads),
		DiskFlushes:   load64(mem, b+sDiskFlushes),
		DiskErrors:    load64(mem, b+sDiskErrors),
		DiskInFlight:  load64(mem, b+sDiskBatchN),
		DiskBadBlock:  load64(mem, b+sDiskBadBlk),
		DiskBadStatus: uint32(load64(mem, b+sDiskBadStat)),
	}
	if ip := load32(mem, b+sNetPeerIP); ip != 0 {
		var a [4]byte
		binary.LittleEndian.PutUint32(a[:], ip)
		st.StreamPeer = netip.AddrPortFrom(netip.AddrFrom4(a), uint16(load32(mem, b+sNetPeerPort)))
	}
	// The guest writes slot[c&1] = {c, h} and then counter_seq = c, so slot
	// [seq&1] is complete unless the guest has since gone two steps on and is
	// rewriting it; re-read in that case.
	for tries := 0; tries < 1000; tries++ {
		seq := load64(mem, b+sCounterSeq)
		slot := b + sCounterSlot + (seq&1)*16
		c := load64(mem, slot)
		h := load64(mem, slot+8)
		if seq == 0 {
			st.Counter, st.Hash = 0, CounterStart
			break
		}
		if c == seq && load64(mem, slot) == seq {
			st.Counter, st.Hash = c, h
			break
		}
	}
	return st
}

// PageStamp is what a Dirty workload page says about itself.
type PageStamp struct {
	VCPU    int
	Index   uint64
	Version uint64 // 0: never written
}

// ReadStamp reads the stamp of working-set page index of vCPU i.
func (m *Machine) ReadStamp(i int, index uint64) PageStamp {
	m.memMu.RLock()
	defer m.memMu.RUnlock()
	if m.mem == nil {
		return PageStamp{}
	}
	off := m.layout.regionBase(i) + index*pageSize
	w0 := load64(m.mem, off)
	return PageStamp{VCPU: int(w0 >> 56), Index: w0 & (1<<48 - 1), Version: load64(m.mem, off+8)}
}

// PageReport summarises a verification of a vCPU's working set.
type PageReport struct {
	Written    uint64 // pages with a stamp
	MaxVersion uint64 // the highest version found
}

// VerifyPages checks every page of vCPU i's working set against its own
// contents and the status page, by the workload's Content (abi.h):
//   - Stamp and Text: a written page carries its vCPU and index, a version no
//     newer than status.writes, and in every other word what that version
//     implies (the fill, or the text words);
//   - Sparse: every 64-byte line is either all zero (never written) or holds
//     a version v no newer than status.writes, with v % 64 naming the line,
//     and the fill that v and the page's vCPU and index imply; the page's
//     version is its newest line's;
//
// a page never written is zero. With the Seq pattern the version of every
// Stamp or Text page is known exactly and checked too. In every content the
// newest version found must be status.writes, unless a write is in progress.
// Call it while the machine is paused. The page being written when the guest
// was paused (CurPage) may be torn and is only counted.
func (m *Machine) VerifyPages(i int) (PageReport, error) {
	m.memMu.RLock()
	defer m.memMu.RUnlock()
	if m.mem == nil {
		return PageReport{}, fmt.Errorf("verify pages: %w", ErrStopped)
	}
	return verifyPages(m.mem, m.layout, m.cfg, i)
}

func verifyPages(mem []byte, l layout, cfg Config, i int) (PageReport, error) {
	var rep PageReport
	st := readStatus(mem, i)
	ws := cfg.WorkingSet
	if ws == 0 {
		ws = l.regionPages
	}
	torn := uint64(0) // 1 + index of a page that may be torn
	if st.CurPage != 0 {
		torn = st.CurPage
	}
	seq := cfg.Pattern == Seq && cfg.Workload == Dirty
	base := l.regionBase(i)
	for idx := uint64(0); idx < ws; idx++ {
		w := pageWords(mem, base+idx*pageSize)
		var v uint64
		var err error
		if cfg.Content == Sparse {
			v, err = checkSparsePage(w[:], i, idx, st.Writes, torn == idx+1)
		} else {
			v, err = checkStampedPage(w[:], cfg.Content, i, idx, st.Writes, torn == idx+1)
		}
		if err != nil {
			return rep, err
		}
		if v == 0 {
			if seq && cfg.Content != Sparse && idx < st.Writes && torn != idx+1 {
				return rep, fmt.Errorf("vCPU %d page %d: never written, but %d sequential writes should have reached it", i, idx, st.Writes)
			}
			continue
		}
		rep.Written++
		rep.MaxVersion = max(rep.MaxVersion, v)
		if seq && cfg.Content != Sparse && torn != idx+1 {
			// Write number v went to page (v-1) mod ws; the newest such v <= writes.
			want := st.Writes - (st.Writes-1-idx)%ws
			if st.Writes <= idx {
				want = 0
			}
			if v != want {
				return rep, fmt.Errorf("vCPU %d page %d: version %d, sequential writes imply %d", i, idx, v, want)
			}
		}
	}
	if st.CurPage == 0 && st.Writes > 0 && rep.MaxVersion != st.Writes {
		return rep, fmt.Errorf("vCPU %d: newest page version %d, but the status page reports %d writes", i, rep.MaxVersion, st.Writes)
	}
	return rep, nil
}

// checkStampedPage checks a Stamp or Text page (words w) of vCPU i at index
// idx against writes, the vCPU's completed writes, and returns its version
// (0: never written). A torn page is not checked, only read.
func checkStampedPage(w []uint64, c Content, i int, idx, writes uint64, torn bool) (uint64, error) {
	v := w[1]
	if torn {
		return v, nil
	}
	if v == 0 {
		for k, x := range w {
			if x != 0 {
				return 0, fmt.Errorf("vCPU %d page %d: never written (version 0) but word %d is %#x", i, idx, k, x)
			}
		}
		return 0, nil
	}
	if want := stampWord0(i, idx); w[0] != want {
		return 0, fmt.Errorf("vCPU %d page %d: stamp word %#x, want %#x (vCPU %d, index %d)", i, idx, w[0], want, i, idx)
	}
	if v > writes {
		return 0, fmt.Errorf("vCPU %d page %d: version %d is newer than the %d writes the status page reports", i, idx, v, writes)
	}
	if c == Text {
		x := fillBase(w[0], v) | 1
		for k := 2; k < 512; k++ {
			x = xorshift64(x)
			if want := textWord(x); w[k] != want {
				return 0, fmt.Errorf("vCPU %d page %d version %d (text): word %d is %#x, want %#x", i, idx, v, k, w[k], want)
			}
		}
		return v, nil
	}
	fb := fillBase(w[0], v)
	for k := 2; k < 512; k++ {
		if want := fb + uint64(k)*fillK; w[k] != want {
			return 0, fmt.Errorf("vCPU %d page %d version %d: word %d is %#x, want %#x", i, idx, v, k, w[k], want)
		}
	}
	return v, nil
}

// checkSparsePage checks a Sparse page line by line and returns its newest
// line's version (0: no line written). A torn page is only read.
func checkSparsePage(w []uint64, i int, idx, writes uint64, torn bool) (uint64, error) {
	var newest uint64
	w0 := stampWord0(i, idx)
	for l := uint64(0); l < 64; l++ {
		line := w[8*l : 8*l+8]
		v := line[0]
		if torn {
			newest = max(newest, v)
			continue
		}
		if v == 0 {
			for j, x := range line {
				if x != 0 {
					return 0, fmt.Errorf("vCPU %d page %d line %d: never written (version 0) but word %d is %#x", i, idx, l, j, x)
				}
			}
			continue
		}
		if v > writes {
			return 0, fmt.Errorf("vCPU %d page %d line %d: version %d is newer than the %d writes the status page reports", i, idx, l, v, writes)
		}
		if v%64 != l {
			return 0, fmt.Errorf("vCPU %d page %d line %d: holds version %d, which writes line %d", i, idx, l, v, v%64)
		}
		f := fillBase(w0^l<<48, v)
		for j := uint64(1); j < 8; j++ {
			if want := f + j*fillK; line[j] != want {
				return 0, fmt.Errorf("vCPU %d page %d line %d version %d: word %d is %#x, want %#x", i, idx, l, v, j, line[j], want)
			}
		}
		newest = max(newest, v)
	}
	return newest, nil
}
