package dirtylog

import (
	"fmt"
	"math/bits"
)

// PageSize is the dirty-tracking granularity: KVM logs 4 KiB pages.
const PageSize = 4096

// Range is a run of dirty guest memory: a guest-physical address and a length
// in bytes, both multiples of PageSize. It is the form the wire carries.
type Range struct {
	GPA uint64
	Len uint64
}

// Set is a set of guest pages: one bitmap per memory slot, bit i of a slot
// meaning the page at slot GPA + i*PageSize. It is compact (one bit per page),
// its operations walk words, not pages, and it is not safe for concurrent use.
type Set struct {
	slots []setSlot
}

type setSlot struct {
	id    uint32
	gpa   uint64
	pages uint64
	bits  []uint64
}

// NewSet returns an empty set over the given slots.
func NewSet(slots []Slot) *Set {
	s := &Set{slots: make([]setSlot, len(slots))}
	for i, sl := range slots {
		pages := sl.Size / PageSize
		s.slots[i] = setSlot{id: sl.ID, gpa: sl.GPA, pages: pages, bits: make([]uint64, (pages+63)/64)}
	}
	return s
}

// slotFor returns the index of the slot holding gpa, or -1.
func (s *Set) slotFor(gpa uint64) int {
	for i := range s.slots {
		sl := &s.slots[i]
		if gpa >= sl.gpa && gpa-sl.gpa < sl.pages*PageSize {
			return i
		}
	}
	return -1
}

// Add adds the page holding gpa. It reports false, adding nothing, when no
// slot holds gpa.
func (s *Set) Add(gpa uint64) bool {
	i := s.slotFor(gpa)
	if i < 0 {
		return false
	}
	p := (gpa - s.slots[i].gpa) / PageSize
	s.slots[i].bits[p/64] |= 1 << (p % 64)
	return true
}

// AddRange adds every page that [gpa, gpa+length) touches. It returns an error,
// adding nothing, if part of the range lies outside every slot.
func (s *Set) AddRange(gpa, length uint64) error {
	if length == 0 {
		return nil
	}
	if gpa+length < gpa {
		return fmt.Errorf("add range [%#x, +%d): wraps around", gpa, length)
	}
	// Check first, so a bad range changes nothing.
	for p, end := gpa&^(PageSize-1), gpa+length; p < end; {
		i := s.slotFor(p)
		if i < 0 {
			return fmt.Errorf("add range [%#x, +%d): %#x is in no memory slot", gpa, length, p)
		}
		sl := &s.slots[i]
		p = sl.gpa + sl.pages*PageSize
	}
	for p, end := gpa&^(PageSize-1), gpa+length; p < end; {
		i := s.slotFor(p)
		sl := &s.slots[i]
		first := (p - sl.gpa) / PageSize
		last := (min(end, sl.gpa+sl.pages*PageSize) - sl.gpa + PageSize - 1) / PageSize // exclusive
		setBits(sl.bits, first, last)
		p = sl.gpa + last*PageSize
	}
	return nil
}

// setBits sets bits [from, to) of b.
func setBits(b []uint64, from, to uint64) {
	for from < to {
		w, off := from/64, from%64
		n := min(64-off, to-from)
		mask := ^uint64(0)
		if n < 64 {
			mask = (1<<n - 1) << off
		}
		b[w] |= mask
		from += n
	}
}

// Has reports whether the page holding gpa is in the set.
func (s *Set) Has(gpa uint64) bool {
	i := s.slotFor(gpa)
	if i < 0 {
		return false
	}
	p := (gpa - s.slots[i].gpa) / PageSize
	return s.slots[i].bits[p/64]&(1<<(p%64)) != 0
}

// Count returns the number of pages in the set.
func (s *Set) Count() int {
	n := 0
	for i := range s.slots {
		for _, w := range s.slots[i].bits {
			n += bits.OnesCount64(w)
		}
	}
	return n
}

// Clear empties the set, keeping its memory.
func (s *Set) Clear() {
	for i := range s.slots {
		clear(s.slots[i].bits)
	}
}

// fill adds every page of every slot.
func (s *Set) fill() {
	for i := range s.slots {
		sl := &s.slots[i]
		clear(sl.bits)
		setBits(sl.bits, 0, sl.pages)
	}
}

// Union adds every page of o, which must be over the same slots.
func (s *Set) Union(o *Set) error {
	if !s.sameShape(o) {
		return fmt.Errorf("union of dirty sets over different memory slots")
	}
	for i := range s.slots {
		a, b := s.slots[i].bits, o.slots[i].bits
		for w := range a {
			a[w] |= b[w]
		}
	}
	return nil
}

func (s *Set) sameShape(o *Set) bool {
	if len(s.slots) != len(o.slots) {
		return false
	}
	for i := range s.slots {
		if s.slots[i].gpa != o.slots[i].gpa || s.slots[i].pages != o.slots[i].pages {
			return false
		}
	}
	return true
}

// ForEachRun calls f for every maximal run of consecutive set pages within a
// slot, in slot order and ascending address, with the run's first address and
// its length in pages. It stops early when f returns false. It walks words,
// so its cost follows the number of runs and of bitmap words, not of pages.
func (s *Set) ForEachRun(f func(gpa, pages uint64) bool) {
	for i := range s.slots {
		sl := &s.slots[i]
		start, inRun := uint64(0), false
		for w, word := range sl.bits {
			base := uint64(w) * 64
			if inRun {
				if word == ^uint64(0) {
					continue
				}
				ones := uint64(bits.TrailingZeros64(^word)) // < 64 here
				if !f(sl.gpa+start*PageSize, base+ones-start) {
					return
				}
				inRun = false
				word &^= 1<<ones - 1
			}
			for word != 0 {
				tz := uint64(bits.TrailingZeros64(word))
				ones := uint64(bits.TrailingZeros64(^(word >> tz)))
				start = base + tz
				if tz+ones == 64 {
					inRun = true // the run goes on into the next word
					break
				}
				if !f(sl.gpa+start*PageSize, ones) {
					return
				}
				word &^= (1<<ones - 1) << tz
			}
		}
		if inRun && !f(sl.gpa+start*PageSize, sl.pages-start) {
			return
		}
	}
}

// Ranges appends the set's runs to dst as byte ranges and returns it.
func (s *Set) Ranges(dst []Range) []Range {
	s.ForEachRun(func(gpa, pages uint64) bool {
		dst = append(dst, Range{GPA: gpa, Len: pages * PageSize})
		return true
	})
	return dst
}

func popcount(v uint64) int { return bits.OnesCount64(v) }
