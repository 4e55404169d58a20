package replicate_test

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// TestLayering: the engine knows VMs, devices and ecosystems only through
// its interfaces. It must not depend on the disk mirror, the output gate,
// the test VM, the embedder's layer, the metrics or Prometheus: they depend
// on it.
func TestLayering(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "github.com/repagent/repagent/replicate").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	for _, p := range []string{
		"github.com/repagent/repagent/diskmirror",
		"github.com/repagent/repagent/ebpf",
		"github.com/repagent/repagent/testvm",
		"github.com/repagent/repagent/replicate/protect",
		"github.com/repagent/repagent/replicate/metrics",
		"github.com/prometheus/client_golang/prometheus",
	} {
		if slices.Contains(deps, p) {
			t.Errorf("package replicate depends on %s", p)
		}
	}
}
