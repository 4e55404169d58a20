package replicate

import "github.com/repagent/repagent/dirtylog"

// layout maps guest-physical pages to replica pages: the regions of a VM's
// shape lie back to back in the replica, in the order the VM lists them.
type layout struct {
	shape   Shape
	regions []layoutRegion
}

type layoutRegion struct {
	gpa, size uint64
	first     uint64 // replica page index of the region's first page
	host      []byte // the primary's mapping; nil on the backup
}

// layoutOf is the layout of a VM's regions, with their host mappings.
func layoutOf(slots []dirtylog.Slot, vcpus int) layout {
	var l layout
	l.shape.VCPUs = uint32(vcpus)
	for _, s := range slots {
		l.regions = append(l.regions, layoutRegion{gpa: s.GPA, size: s.Size, first: l.shape.MemSize / PageSize, host: s.Host})
		l.shape.Regions = append(l.shape.Regions, Region{Slot: s.ID, GPA: s.GPA, Size: s.Size})
		l.shape.MemSize += s.Size
	}
	return l
}

// layoutFor is the layout of a shape, without host mappings (the backup's).
func layoutFor(s Shape) layout {
	l := layout{shape: s}
	var first uint64
	for _, r := range s.Regions {
		l.regions = append(l.regions, layoutRegion{gpa: r.GPA, size: r.Size, first: first})
		first += r.Size / PageSize
	}
	return l
}

// find returns the region holding gpa, or nil.
func (l *layout) find(gpa uint64) *layoutRegion {
	for i := range l.regions {
		r := &l.regions[i]
		if gpa-r.gpa < r.size && gpa >= r.gpa {
			return r
		}
	}
	return nil
}

// index returns the replica page index of the page at gpa.
func (l *layout) index(gpa uint64) (uint64, bool) {
	r := l.find(gpa)
	if r == nil || gpa%PageSize != 0 {
		return 0, false
	}
	return r.first + (gpa-r.gpa)/PageSize, true
}

// gpaAt returns the guest-physical address of replica page index i, its
// slot and its offset in the slot; ok is false past the last region.
func (l *layout) gpaAt(i uint64) (gpa uint64, slot uint32, off uint64, ok bool) {
	for k, r := range l.regions {
		if i >= r.first && i-r.first < r.size/PageSize {
			off = (i - r.first) * PageSize
			return r.gpa + off, l.shape.Regions[k].Slot, off, true
		}
	}
	return 0, 0, 0, false
}

// page returns the host bytes of the page at gpa (primary only); gpa must be
// inside a region.
func (l *layout) page(gpa uint64) []byte {
	r := l.find(gpa)
	off := gpa - r.gpa
	return r.host[off : off+PageSize : off+PageSize]
}

// hosts returns every region's host mapping.
func (l *layout) hosts() [][]byte {
	out := make([][]byte, len(l.regions))
	for i, r := range l.regions {
		out[i] = r.host
	}
	return out
}
