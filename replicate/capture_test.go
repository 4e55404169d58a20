package replicate

import "testing"

// The copier measures before it chooses: each sharer count once, then the
// cheapest, with another one tried every copyExplore copies; small copies
// stay on one goroutine.
func TestCopierSharers(t *testing.T) {
	c := &copier{helpers: 1}
	if k := c.sharers(copyMinPages - 1); k != 1 {
		t.Fatalf("a copy of %d pages got %d sharers", copyMinPages-1, k)
	}
	n := 4 * copyMinPages
	if k := c.sharers(n); k != 1 {
		t.Fatalf("first large copy: %d sharers, want 1 (unmeasured, first)", k)
	}
	c.record(1, 500)
	if k := c.sharers(n); k != 2 {
		t.Fatalf("with 1 measured: %d sharers, want 2 (unmeasured)", k)
	}
	c.record(2, 700) // two goroutines measured slower on this host
	ones, twos := 0, 0
	for range 4 * copyExplore {
		switch c.sharers(n) {
		case 1:
			ones++
		case 2:
			twos++
		}
	}
	if twos != 4 || ones != 4*copyExplore-4 {
		t.Fatalf("1 cheaper: %d copies on 1, %d on 2; want 2 tried once every %d", ones, twos, copyExplore)
	}
	for range 20 {
		c.record(2, 300) // the host changed: two pay now
	}
	twos = 0
	for range copyExplore {
		if c.sharers(n) == 2 {
			twos++
		}
	}
	if twos != copyExplore-1 {
		t.Fatalf("2 cheaper: %d of %d copies on 2", twos, copyExplore)
	}
	if e := c.estimate(n); e.Nanoseconds() > int64(n)*400 {
		t.Fatalf("estimate %v for %d pages at about 300 ns each", e, n)
	}
}
