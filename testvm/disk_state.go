package testvm

import (
	"fmt"

	"github.com/repagent/repagent/internal/le"
)

// diskState is the block device's part of a machine state (the disk section
// of the format in state.go): the guest's view of its disk and the device's
// req_cons, which is in guest memory too.
type diskState struct {
	cfg DiskConfig
	// reqCons is the request ring's consumer index: every request before it
	// completed, none after started.
	reqCons uint32
}

// save records the device's ring position in s. Pause holds the device's
// lock (or it never ran): it is the value in guest memory too.
func (d *diskDev) save(s *diskState) {
	s.reqCons = d.cons
}

// restore sets the device's ring position from s, after checking it against
// the memory image: a state and an image that disagree are not from the same
// checkpoint. The requests after req_cons (up to req_prod) were not started
// when the state was saved: the restored device executes them.
func (d *diskDev) restore(s *diskState) error {
	c, p := load32(d.m.mem, diskAddr+dkReqCons), load32(d.m.mem, diskAddr+dkReqProd)
	if c != s.reqCons || p-c > diskSlots {
		return fmt.Errorf("%w: block device ring at req_cons %d in the state, req_cons %d and req_prod %d in memory (not the same checkpoint)",
			ErrBadState, s.reqCons, c, p)
	}
	d.cons = s.reqCons
	return nil
}

// appendBinary appends the disk section after its present flag.
func (s *diskState) appendBinary(b []byte) []byte {
	d := &s.cfg
	b = appendU64(b, d.Blocks, d.WorkingSet, d.FlushEvery)
	return appendU32(b, s.reqCons, 0) // reserved
}

// decode reads what appendBinary writes, and checks what the rest of the
// guest configuration does not (Config.Validate does the rest).
func (s *diskState) decode(r *le.Reader) {
	d := &s.cfg
	d.Blocks, d.WorkingSet, d.FlushEvery = r.U64("disk blocks"), r.U64("disk workingSet"), r.U64("disk flushEvery")
	s.reqCons = r.U32("disk reqCons")
	reserved := r.U32("disk reserved")
	switch { // Fail keeps an earlier error: a short section is reported as short
	case reserved != 0:
		r.Fail(fmt.Errorf("block device reserved field %d", reserved))
	case d.WorkingSet == 0 || d.FlushEvery == 0:
		// Saved configurations have their defaults filled in.
		r.Fail(fmt.Errorf("block device working set %d, flush every %d: want both set", d.WorkingSet, d.FlushEvery))
	}
}
