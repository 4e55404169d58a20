package track

import (
	"testing"
	"time"

	"github.com/repagent/repagent/testvm"
)

func TestExpectedDirty(t *testing.T) {
	const iv = 100 * time.Millisecond
	region := (uint64(256<<20) - testvm.DataAddr) / 4096
	for _, tc := range []struct {
		name string
		cfg  testvm.Config
		want uint64
	}{
		{"idle", testvm.Config{MemSize: 256 << 20, VCPUs: 2, Workload: testvm.Idle}, 8},
		{"counter", testvm.Config{MemSize: 256 << 20, VCPUs: 1, Workload: testvm.Counter}, 4},
		{"dirty full speed", testvm.Config{MemSize: 256 << 20, VCPUs: 1, Workload: testvm.Dirty}, region + 4},
		{"dirty working set", testvm.Config{MemSize: 256 << 20, VCPUs: 2, Workload: testvm.Dirty, WorkingSet: 1000}, 2000 + 8},
		{"dirty rate", testvm.Config{MemSize: 256 << 20, VCPUs: 2, Workload: testvm.Dirty, Rate: 1000}, 200 + 1 + 8},
		{"disk", testvm.Config{MemSize: 256 << 20, VCPUs: 1, Workload: testvm.Disk, Disk: &testvm.DiskConfig{Blocks: 16384}}, 4 + 130 + 32},
		{"idle with a disk", testvm.Config{MemSize: 256 << 20, VCPUs: 1, Workload: testvm.Idle, Disk: &testvm.DiskConfig{Blocks: 16384}}, 4},
	} {
		if got := ExpectedDirty(tc.cfg, iv); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
	}
}
