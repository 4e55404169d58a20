package replicate_test

import (
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/vmtest"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/replicate/replicatetest"
	"github.com/repagent/repagent/testvm"
)

// sneakyVM writes one byte of guest memory behind dirty tracking's back
// during its tenth resume, which ends epoch 10: the audit of epoch 11 must
// find the page and name it.
type sneakyVM struct {
	*testvm.Machine
	resumes int
}

func (v *sneakyVM) Resume() error {
	if v.resumes++; v.resumes == 10 {
		v.Memory()[0x10]++ // page 0, which the guest never uses
	}
	return v.Machine.Resume()
}

// An audit that finds guest memory differing from what was replicated stops
// replication with an error that names the page: GPA, slot, offset and what
// the VMM says it holds.
func TestAuditNamesMissedPage(t *testing.T) {
	m := vmtest.Boot(t, testvm.Config{MemSize: 32 << 20, VCPUs: 1, Workload: testvm.Counter}, nil)
	pair := replicatetest.NewPair(t, replicate.Config{VM: &sneakyVM{Machine: m}, Interval: 20 * time.Millisecond, AuditEvery: 1},
		replicate.BackupConfig{NewMemory: testvm.NewMemFile})
	err := pair.PrimaryErr()
	if err == nil {
		t.Fatal("replication ended without an error; want an audit failure")
	}
	for _, want := range []string{"audit of epoch 11", "1 page(s) differ", "GPA 0x0 (slot 0 +0x0, page 0 (unused); last sent in epoch"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
}
