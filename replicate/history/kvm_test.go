package history_test

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/hostsys"
	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/history"
	"github.com/repagent/repagent/replicate/replicatetest"
	"github.com/repagent/repagent/testvm"
)

// TestKVMRestorePoints replicates a running guest to a backup that keeps
// every checkpoint as a point, then restores points out of order: each is
// the guest at its own epoch (the vCPUs' operation counts grow with the
// epoch) and runs on from there exactly (the counter's hash chain, the
// dirty workload's stamps).
func TestKVMRestorePoints(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  testvm.Config
	}{
		{"counter", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Counter}},
		{"dirty-hotcold-text", testvm.Config{MemSize: 32 << 20, VCPUs: 2, Workload: testvm.Dirty, Pattern: testvm.HotCold, Content: testvm.Text, WorkingSet: 2000, Rate: 20000}},
		{"dirty-random-sparse", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Random, Content: testvm.Sparse, WorkingSet: 2000, Rate: 20000}},
		{"dirty-seq-stamp", testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Seq, Content: testvm.Stamp, WorkingSet: 1000, Rate: 20000}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := vmtest.Boot(t, tc.cfg, nil)
			st, err := history.Open(t.TempDir(), history.Options{Log: replicatetest.Logger(t)})
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			in := &history.Intake{Store: st, Policy: history.Policy{Name: "all", Tiers: []history.Tier{{Age: time.Hour}}}, Log: replicatetest.Logger(t)}
			defer in.Close()
			pair := replicatetest.NewPair(t, replicate.Config{VM: m, Interval: 20 * time.Millisecond}, replicate.BackupConfig{
				NewMemory: testvm.NewMemFile,
				OnApply:   in.Apply,
			})
			pair.WaitAcked(30)
			if err := pair.Stop(); err != nil {
				t.Fatal(err)
			}
			pts, err := st.Points()
			if err != nil {
				t.Fatal(err)
			}
			// The primary counts an ack before the backup applied the
			// epoch (the ack goes out first), so the last may be missing.
			if len(pts) < 29 || in.Stats.Failed != 0 {
				t.Fatalf("%d points kept (%v): every checkpoint applied was to be", len(pts), in.Stats)
			}
			t.Logf("%d points, store %d bytes, intake %v", len(pts), st.Size(), in.Stats)
			rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
			ops := map[uint64]uint64{} // epoch -> total operations at restore
			for _, i := range rng.Perm(len(pts))[:8] {
				p := pts[i]
				ops[p.Epoch] = restoreAndRun(t, st, p, tc.cfg.Workload)
			}
			var last, lastOps uint64
			for e := uint64(1); e <= pts[len(pts)-1].Epoch; e++ {
				if n, ok := ops[e]; ok {
					if last != 0 && n < lastOps {
						t.Errorf("epoch %d restores with %d operations done, epoch %d with %d: points out of order", e, n, last, lastOps)
					}
					last, lastOps = e, n
				}
			}
		})
	}
}

// restoreAndRun restores p, checks the guest, runs it and checks it again.
// It returns the operations the guest had done at p.
func restoreAndRun(t *testing.T, st *history.Store, p history.Point, wl testvm.Workload) uint64 {
	t.Helper()
	mem, err := testvm.NewMemFile(p.MemSize)
	if err != nil {
		t.Fatal(err)
	}
	mapped, err := hostsys.MapShared(mem, int(p.MemSize))
	if err != nil {
		t.Fatal(err)
	}
	r, err := st.Restore(p.ID, mapped, nil)
	hostsys.Unmap(mapped)
	if err != nil {
		mem.Close()
		t.Fatalf("restore point %d (epoch %d): %v", p.ID, p.Epoch, err)
	}
	rm, err := testvm.Restore(r.State, mem, testvm.RestoreOptions{})
	if err != nil {
		t.Fatalf("point %d (epoch %d): %v", p.ID, p.Epoch, err)
	}
	defer rm.Close()
	before := vmtest.Iterations(rm)
	var total uint64
	for _, n := range before {
		total += n
	}
	check := func(when string) {
		for i := 0; i < rm.NumVCPUs(); i++ {
			s := rm.Status(i)
			if wl == testvm.Dirty {
				if _, err := rm.VerifyPages(i); err != nil {
					t.Fatalf("point of epoch %d, %s: vCPU %d: %v", p.Epoch, when, i, err)
				}
			} else if testvm.CounterHash(testvm.CounterStart, 0, s.Counter) != s.Hash {
				t.Fatalf("point of epoch %d, %s: vCPU %d: counter %d hash %x breaks the chain", p.Epoch, when, i, s.Counter, s.Hash)
			}
		}
	}
	check("as restored")
	if err := rm.Start(); err != nil {
		t.Fatal(err)
	}
	vmtest.WaitProgress(t, rm, before)
	if err := rm.Pause(); err != nil {
		t.Fatal(err)
	}
	check(fmt.Sprintf("after running on from %v operations", before))
	return total
}
