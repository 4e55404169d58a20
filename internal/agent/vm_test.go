package agent

import (
	"testing"
	"time"

	"github.com/repagent/repagent/testvm"
)

func TestProgressString(t *testing.T) {
	for _, tc := range []struct {
		p    progress
		want string
	}{
		{progress{elapsed: 3 * time.Second, workload: testvm.Dirty, vcpus: 2, rate: 2.31e6, total: 6.9e6},
			"   3.0s  dirty    2.31M writes/s  total 6.90M  vcpus 2"},
		{progress{elapsed: 12500 * time.Millisecond, workload: testvm.Counter, vcpus: 2, rate: 9.6e8, total: 2e9,
			counters: []uint64{1_020_000_000, 968_000_000}},
			"  12.5s  counter  960M steps/s  counters 1.02G 968M"},
		{progress{elapsed: time.Second, workload: testvm.Idle, vcpus: 1, rate: 999, total: 999},
			"   1.0s  idle     999 ticks/s  total 999  vcpus 1"},
		{progress{elapsed: 3 * time.Second, workload: testvm.Disk, vcpus: 1, rate: 41.2e3, total: 124e3, diskReads: 15234},
			"   3.0s  disk     41.2k block writes/s  total 124k  verified reads 15234  errors 0  vcpus 1"},
	} {
		if got := tc.p.String(); got != tc.want {
			t.Errorf("got  %q\nwant %q", got, tc.want)
		}
	}
}
