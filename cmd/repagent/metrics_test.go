package main

import (
	"context"
	"io"
	"net/http"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/repagent/repagent/internal/privileged"
)

var metricsLineRE = regexp.MustCompile(`^metrics on (http://127\.0\.0\.1:\d+/metrics)$`)

// sample is the value of the sample called name (with its labels, as in
// `name{le="+Inf"}`) in a scrape, and whether it is there.
func sample(body, name string) (float64, bool) {
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return f, err == nil
		}
	}
	return 0, false
}

func scrapeMetrics(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s %v", url, resp.Status, err)
	}
	return string(b)
}

// TestJobMetrics runs the main job with --metrics on port 0, reads the
// address it prints, and scrapes it twice while it replicates: the epochs,
// the pause histogram and the in-process backup's checkpoints grow between
// the scrapes, the VM is protected, and the output gate held frames.
func TestJobMetrics(t *testing.T) {
	privileged.Require(t, privileged.KVM, privileged.Root, privileged.NetAdmin) // the job builds its own network
	bin := buildRepagent(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "--interval", "100ms", "--duration", "6s", "--mem", "64M", "--heartbeat-timeout", "5s",
		"--metrics", "127.0.0.1:0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &strings.Builder{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := false
	t.Cleanup(func() {
		if !exited {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	out := newLineReader(stdout)

	var url string
	for url == "" {
		select {
		case line := <-out.lines:
			if m := metricsLineRE.FindStringSubmatch(line); m != nil {
				url = m[1]
			}
		case <-out.done:
			t.Fatalf("the job ended without saying where it serves metrics:\n%s\nstderr:\n%s", out, stderr)
		case <-time.After(30 * time.Second):
			t.Fatalf("no metrics line in 30s:\n%s", out)
		}
	}

	// The initial sync first: protected once the first epoch is acknowledged.
	var first string
	for deadline := time.Now().Add(20 * time.Second); ; {
		first = scrapeMetrics(t, url)
		if v, _ := sample(first, "repagent_protected"); v == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("repagent_protected not 1 after 20s:\n%s\noutput:\n%s", first, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(time.Second)
	second := scrapeMetrics(t, url)

	for _, name := range []string{
		"repagent_epochs_total",
		"repagent_epoch_pause_seconds_count",
		`repagent_epoch_pause_seconds_bucket{le="+Inf"}`,
		`repagent_epoch_pause_part_seconds_count{part="copy"}`,
		"repagent_ack_latency_seconds_count",
		"repagent_last_acked_epoch",
		"repagent_wire_bytes_total",
		"repagent_backup_checkpoints_total",
		"repagent_backup_checkpoint_epoch",
		`repagent_gate_epochs_total{outcome="committed"}`,
	} {
		a, okA := sample(first, name)
		b, okB := sample(second, name)
		if !okA || !okB || b <= a {
			t.Errorf("%s: %v then %v a second later (found %v, %v); want it to grow", name, a, b, okA, okB)
		}
	}
	for name, want := range map[string]float64{
		"repagent_protected":           1,
		"repagent_backup_losses_total": 0,
		"repagent_failovers_total":     0,
	} {
		if v, ok := sample(second, name); !ok || v != want {
			t.Errorf("%s = %v (found %v), want %v", name, v, ok, want)
		}
	}
	if v, _ := sample(second, "repagent_gate_held_frames_total"); v == 0 {
		t.Errorf("repagent_gate_held_frames_total is 0: the job's client's echoes go through the gate")
	}
	for _, family := range []string{"# TYPE repagent_epoch_pause_seconds histogram", "# TYPE go_goroutines gauge", "# TYPE process_cpu_seconds_total counter"} {
		if !strings.Contains(second, family) {
			t.Errorf("scrape lacks %q", family)
		}
	}

	err = cmd.Wait()
	exited = true
	<-out.done
	if err != nil || !strings.Contains(out.String(), "\nverification passed\n") {
		t.Fatalf("job: %v\n%s\nstderr:\n%s", err, out, stderr)
	}
	if _, err := http.Get(url); err == nil {
		t.Errorf("metrics still served after the job ended")
	}
}
