package dirtylog

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

// naive is the obvious implementation the Set is cross-checked against: a map
// of page addresses.
type naive map[uint64]bool

func (n naive) runs(slots []Slot) []Range {
	var pages []uint64
	for p := range n {
		pages = append(pages, p)
	}
	slices.Sort(pages)
	slotOf := func(p uint64) int {
		for i, s := range slots {
			if p >= s.GPA && p < s.GPA+s.Size {
				return i
			}
		}
		return -1
	}
	var out []Range
	for _, p := range pages {
		if k := len(out) - 1; k >= 0 && out[k].GPA+out[k].Len == p && slotOf(out[k].GPA) == slotOf(p) {
			out[k].Len += PageSize
			continue
		}
		out = append(out, Range{p, PageSize})
	}
	return out
}

var testSlots = []Slot{
	{ID: 0, GPA: 0, Size: 1000 * PageSize},             // not a multiple of 64 pages
	{ID: 1, GPA: 1000 * PageSize, Size: 64 * PageSize}, // adjacent to slot 0: runs must split
	{ID: 2, GPA: 1 << 32, Size: 300 * PageSize},
}

// check compares s with n in every observable way.
func check(t *testing.T, s *Set, n naive) {
	t.Helper()
	if s.Count() != len(n) {
		t.Fatalf("Count = %d, naive has %d", s.Count(), len(n))
	}
	got := s.Ranges(nil)
	want := n.runs(testSlots)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Ranges:\n got %v\nwant %v", got, want)
	}
	for p := range n {
		if !s.Has(p) {
			t.Fatalf("Has(%#x) = false", p)
		}
	}
}

// ops drives a Set and a naive set with the same random operations.
func ops(t *testing.T, seed uint64, steps int) {
	r := rand.New(rand.NewPCG(seed, 1))
	s, n := NewSet(testSlots), naive{}
	pick := func() uint64 {
		sl := testSlots[r.IntN(len(testSlots))]
		return sl.GPA + uint64(r.IntN(int(sl.Size/PageSize)))*PageSize
	}
	for i := 0; i < steps; i++ {
		switch r.IntN(10) {
		case 0, 1, 2, 3:
			p := pick()
			s.Add(p + uint64(r.IntN(PageSize)))
			n[p] = true
		case 4, 5:
			p := pick()
			length := uint64(1 + r.IntN(200*PageSize))
			if err := s.AddRange(p, length); err != nil {
				// Must be the range running off its slot into no slot.
				for q := p; q < p+length; q += PageSize {
					if s.slotFor(q) < 0 {
						goto refused
					}
				}
				t.Fatalf("AddRange(%#x, %d) refused: %v", p, length, err)
			refused:
				continue
			}
			for q := p &^ (PageSize - 1); q < p+length; q += PageSize {
				n[q] = true
			}
		case 6:
			o, on := NewSet(testSlots), naive{}
			for j := 0; j < r.IntN(50); j++ {
				p := pick()
				o.Add(p)
				on[p] = true
			}
			if err := s.Union(o); err != nil {
				t.Fatal(err)
			}
			for p := range on {
				n[p] = true
			}
		case 7:
			if r.IntN(20) == 0 {
				s.Clear()
				n = naive{}
			}
		default:
			p := pick()
			if s.Has(p) != n[p] {
				t.Fatalf("Has(%#x) = %v, naive %v", p, s.Has(p), n[p])
			}
		}
		if i%50 == 0 {
			check(t, s, n)
		}
	}
	check(t, s, n)
}

func TestSetAgainstNaive(t *testing.T) {
	for seed := uint64(0); seed < 50; seed++ {
		ops(t, seed, 2000)
	}
}

func FuzzSetAgainstNaive(f *testing.F) {
	f.Add(uint64(1), uint16(500)) // a typical mix
	f.Add(uint64(7), uint16(5))   // very few operations
	f.Fuzz(func(t *testing.T, seed uint64, steps uint16) {
		ops(t, seed, int(steps))
	})
}

func TestSetEdges(t *testing.T) {
	s := NewSet(testSlots)
	if s.Add(2000 * PageSize) {
		t.Error("Add outside every slot succeeded")
	}
	if err := s.AddRange(1060*PageSize, 10*PageSize); err == nil {
		t.Error("AddRange running past slot 1 into no slot succeeded")
	}
	if s.Count() != 0 {
		t.Errorf("a refused AddRange changed the set: %d pages", s.Count())
	}
	// A run that fills slot 0's last word and slot 1 entirely stays two runs.
	if err := s.AddRange(960*PageSize, 104*PageSize); err != nil {
		t.Fatal(err)
	}
	want := []Range{{960 * PageSize, 40 * PageSize}, {1000 * PageSize, 64 * PageSize}}
	if got := s.Ranges(nil); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Ranges = %v, want %v", got, want)
	}
	if err := s.Union(NewSet(testSlots[:2])); err == nil {
		t.Error("Union of differently shaped sets succeeded")
	}
	n := 0
	s.ForEachRun(func(gpa, pages uint64) bool { n++; return false })
	if n != 1 {
		t.Errorf("ForEachRun did not stop when f returned false: %d calls", n)
	}
}
