package hostsys

import (
	"os"
	"testing"
)

func TestHolesAndMapping(t *testing.T) {
	f, err := os.CreateTemp("", "hostsys")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	defer f.Close()
	const page, size = 4096, 64 * 4096
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	b, err := MapShared(f, size)
	if err != nil {
		t.Fatal(err)
	}
	defer Unmap(b)
	// Data in pages 10 and 40..41; the rest are holes.
	b[10*page] = 1
	b[40*page+5] = 2
	b[41*page] = 3
	var holes [][2]int64
	if err := Holes(f, 0, size, func(from, to int64) { holes = append(holes, [2]int64{from / page, to / page}) }); err != nil {
		t.Fatal(err)
	}
	// A file system may report data in coarser units than a page, but a
	// written page is never in a hole.
	for _, h := range holes {
		for _, p := range []int64{10, 40, 41} {
			if p >= h[0] && p < h[1] {
				t.Fatalf("written page %d reported in hole %v (holes %v)", p, h, holes)
			}
		}
	}
	if len(holes) == 0 {
		t.Logf("this file system reports no holes (%s)", f.Name())
	}
	if CanPopulate(b) {
		Populate(b)
		if b[10*page] != 1 || b[41*page] != 3 || b[0] != 0 {
			t.Fatal("Populate changed the memory")
		}
	}
}
