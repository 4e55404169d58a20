package agent

import (
	"testing"

	"github.com/repagent/repagent/internal/privileged"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

// TestTestVMShape checks that the shape --expect-mem and --expect-vcpus
// describe is the one a primary running the test VM declares.
func TestTestVMShape(t *testing.T) {
	privileged.Require(t, privileged.KVM)
	for _, tc := range []struct {
		mem   uint64
		vcpus int
	}{{8 << 20, 1}, {64 << 20, 2}, {256 << 20, 4}, {8 << 30, 1}} {
		got, err := testVMShape(tc.mem, tc.vcpus)
		if err != nil {
			t.Fatal(err)
		}
		m, err := testvm.New(testvm.Config{MemSize: tc.mem, VCPUs: tc.vcpus, Workload: testvm.Dirty})
		if err != nil {
			t.Fatal(err)
		}
		p, err := replicate.NewPrimary(replicate.Config{VM: m})
		if err != nil {
			m.Close()
			t.Fatal(err)
		}
		want := p.Shape()
		m.Close()
		if !got.Equal(want) {
			t.Errorf("mem %d vcpus %d: %v %v, the primary declares %v %v", tc.mem, tc.vcpus, got, got.Regions, want, want.Regions)
		}
	}
}
