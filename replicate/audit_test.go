package replicate

import (
	"testing"

	"github.com/repagent/repagent/dirtylog"
)

// An audit failure names the differing pages by GPA: diffPages finds them in
// the CRC tables, gpaAt maps a replica index back across the regions.
func TestAuditNamesMissedPages(t *testing.T) {
	lay := layoutOf([]dirtylog.Slot{
		{ID: 0, GPA: 0, Size: 4 * PageSize, Host: make([]byte, 4*PageSize)},
		{ID: 1, GPA: 4 << 30, Size: 4 * PageSize, Host: make([]byte, 4*PageSize)},
	}, 1)
	a := make([]uint32, 8)
	b := make([]uint32, 8)
	b[1], b[5], b[6] = 1, 1, 1
	idxs, n := diffPages(a, b, 2)
	if n != 3 || len(idxs) != 2 || idxs[0] != 1 || idxs[1] != 5 {
		t.Fatalf("diffPages = %v, %d; want [1 5], 3", idxs, n)
	}
	tests := []struct {
		name     string
		idx      uint64
		wantGPA  uint64
		wantSlot uint32
		wantOff  uint64
		wantOK   bool
	}{
		{name: "first slot", idx: 1, wantGPA: PageSize, wantSlot: 0, wantOff: PageSize, wantOK: true},
		{name: "second slot", idx: 5, wantGPA: 4<<30 + PageSize, wantSlot: 1, wantOff: PageSize, wantOK: true},
		{name: "past the end", idx: 8},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			gpa, slot, off, ok := lay.gpaAt(tt.idx)
			if gpa != tt.wantGPA || slot != tt.wantSlot || off != tt.wantOff || ok != tt.wantOK {
				t.Errorf("gpaAt(%d) = %#x, %d, %#x, %v; want %#x, %d, %#x, %v", tt.idx, gpa, slot, off, ok, tt.wantGPA, tt.wantSlot, tt.wantOff, tt.wantOK)
			}
			if ok {
				if back, _ := lay.index(gpa); back != tt.idx {
					t.Errorf("index(gpaAt(%d)) = %d", tt.idx, back)
				}
			}
		})
	}
}
