package replicate

import (
	"bytes"
	"testing"

	"github.com/repagent/repagent/internal/cpuclock"
)

// The pause's copy is exact whoever takes part: with helpers that join, and
// with helpers that never get to run (their channel full, as when they are
// descheduled), in which case the pausing goroutine copies it all alone
// instead of waiting.
func TestCopierChunks(t *testing.T) {
	const pages = 5000
	mem := pageContents("stamp", pages, 1)
	for _, tc := range []struct {
		name    string
		helpers int
		run     bool
	}{{"alone", 0, false}, {"helpers", 3, true}, {"helpers asleep", 2, false}} {
		t.Run(tc.name, func(t *testing.T) {
			p := testPrimary(mem, CompressNever)
			c := &copier{p: p, helpers: tc.helpers, tasks: make(chan *copyWork, tc.helpers)}
			if tc.run {
				for range tc.helpers {
					go c.helper()
				}
				defer c.stop()
			}
			var m cpuclock.Meter
			for round := range 20 {
				gpas := someGPAs(pages, 3000+round*50, uint64(round))
				job := &epochJob{gpas: gpas, start: p.stage.alloc(uint64(len(gpas))), staged: true}
				m.Start()
				k := c.copy(job, &m)
				m.Stop()
				if k < 1 || k > tc.helpers+1 || (!tc.run && k != 1) {
					t.Fatalf("round %d: %d copiers with %d helpers (running %v)", round, k, tc.helpers, tc.run)
				}
				for i, g := range gpas {
					if !bytes.Equal(p.stage.page(job.start, uint64(i)), mem[g:g+PageSize]) {
						t.Fatalf("round %d: staged page %d (GPA %#x) is not the guest's", round, i, g)
					}
				}
				p.stage.free(uint64(len(gpas)))
				if !tc.run {
					for len(c.tasks) > 0 { // what sleeping helpers would find: nothing left
						w := <-c.tasks
						if c.claim(w) != 0 {
							t.Fatalf("round %d: a late helper found pages to copy", round)
						}
					}
				}
			}
			if c.perPage <= 0 || c.estimate(4000) <= 0 {
				t.Fatalf("no cost measured: perPage %v", c.perPage)
			}
		})
	}
}
