package replicate

import "github.com/repagent/repagent/internal/hostsys"

// holeMap returns a bitmap, by replica page index, of the guest pages that
// lie in holes of the VM's memory file (see MemoryBacking), or nil if the VM
// has no such file or the file cannot say. It is read after dirty logging
// started: a page the guest writes after the map was made is dirty, and
// the next round sends it whatever the map said.
func (p *Primary) holeMap() (holes []uint64, n int) {
	mb, ok := p.cfg.VM.(MemoryBacking)
	if !ok {
		return nil, 0
	}
	holes = make([]uint64, (p.lay.shape.Pages()+63)/64)
	for i, r := range p.lay.regions {
		f, base := mb.SlotFile(i)
		if f == nil {
			continue
		}
		mark := func(from, to int64) { // file offsets, [from, to)
			for off := (from - base + PageSize - 1) / PageSize * PageSize; off+PageSize <= to-base; off += PageSize {
				idx := r.first + uint64(off)/PageSize
				holes[idx/64] |= 1 << (idx % 64)
				n++
			}
		}
		if err := hostsys.Holes(f, base, base+int64(r.size), mark); err != nil {
			return nil, 0 // the file cannot say: read every page
		}
	}
	return holes, n
}
