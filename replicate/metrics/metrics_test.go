package metrics

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/repagent/repagent/ebpf"
	"github.com/repagent/repagent/replicate"
)

const ms = time.Millisecond

// testEpoch is an acknowledged epoch with every field the metrics read set.
func testEpoch(epoch uint64) *replicate.EpochStats {
	return &replicate.EpochStats{
		Epoch: epoch, Wait: 3 * ms,
		Pause: 2 * ms, Kick: 100 * time.Microsecond, Harvest: 300 * time.Microsecond, Save: 200 * time.Microsecond,
		Stall: 0, Copy: 1200 * time.Microsecond, Gates: 50 * time.Microsecond, Resume: 150 * time.Microsecond,
		DirtyPages: 100, ZeroPages: 10, LZ4Pages: 40,
		RawBytes: 100 * replicate.PageSize, WireBytes: 250000, StateBytes: 5000,
		StreamRecords: 3, StreamBytes: 3 * 4096, StreamWireBytes: 3*4096 + 96,
		Transfer: 4 * ms, AckLatency: 1 * ms, CPU: 5 * ms, BackupCPU: 2 * ms,
	}
}

func testGateEpoch() ebpf.EpochStats {
	return ebpf.EpochStats{
		Epoch: 7, Outcome: ebpf.OutcomeCommitted,
		Held: ebpf.Counter{Frames: 12, Bytes: 1200}, Released: ebpf.Counter{Frames: 10, Bytes: 1000},
		DroppedHoldLimit: ebpf.Counter{Frames: 2, Bytes: 200}, Discarded: ebpf.Counter{Frames: 1, Bytes: 100},
		LatencyP50: 60 * ms, LatencyP99: 95 * ms, LatencyMax: 99 * ms,
	}
}

// family gathers reg and returns the family called name, or nil.
func family(t *testing.T, reg prometheus.Gatherer, name string) *dto.MetricFamily {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf
		}
	}
	return nil
}

// metric returns the metric of family name whose labels are labels (name,
// value pairs).
func metric(t *testing.T, reg prometheus.Gatherer, name string, labels ...string) *dto.Metric {
	t.Helper()
	mf := family(t, reg, name)
	if mf == nil {
		t.Fatalf("no metric %s", name)
	}
next:
	for _, m := range mf.GetMetric() {
		if len(m.GetLabel())*2 != len(labels) {
			continue
		}
		for i, l := range m.GetLabel() {
			if l.GetName() != labels[2*i] || l.GetValue() != labels[2*i+1] {
				continue next
			}
		}
		return m
	}
	t.Fatalf("no metric %s with labels %v", name, labels)
	return nil
}

// value is a counter's or gauge's value.
func value(t *testing.T, reg prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	m := metric(t, reg, name, labels...)
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	t.Fatalf("%s is neither a counter nor a gauge", name)
	return 0
}

// hist is a histogram's count and sum.
func hist(t *testing.T, reg prometheus.Gatherer, name string, labels ...string) (uint64, float64) {
	t.Helper()
	h := metric(t, reg, name, labels...).GetHistogram()
	if h == nil {
		t.Fatalf("%s is not a histogram", name)
	}
	return h.GetSampleCount(), h.GetSampleSum()
}

func near(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }

func TestPrimaryObserveEpoch(t *testing.T) {
	c := NewPrimaryCollector()
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)

	if v := value(t, reg, "repagent_protected"); v != 0 {
		t.Errorf("repagent_protected before any epoch = %v, want 0", v)
	}
	c.ObserveEpoch(testEpoch(1))
	s := testEpoch(2)
	s.Oversize, s.Audited, s.Audit = true, true, 7*ms
	c.ObserveEpoch(s)

	for _, tc := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{name: "repagent_epochs_total", want: 2},
		{name: "repagent_last_acked_epoch", want: 2},
		{name: "repagent_oversize_epochs_total", want: 1},
		{name: "repagent_dirty_pages_total", want: 200},
		{name: "repagent_zero_pages_total", want: 20},
		{name: "repagent_lz4_pages_total", want: 80},
		{name: "repagent_raw_bytes_total", want: 200 * replicate.PageSize},
		{name: "repagent_wire_bytes_total", want: 500000},
		{name: "repagent_state_bytes_total", want: 10000},
		{name: "repagent_disk_writes_total", want: 6},
		{name: "repagent_disk_bytes_total", want: 6 * 4096},
		{name: "repagent_disk_wire_bytes_total", want: 2 * (3*4096 + 96)},
		{name: "repagent_engine_cpu_seconds_total", labels: []string{"side", "primary"}, want: 0.010},
		{name: "repagent_engine_cpu_seconds_total", labels: []string{"side", "backup"}, want: 0.004},
		{name: "repagent_protected", want: 1},
		{name: "repagent_backup_losses_total", want: 0},
	} {
		if got := value(t, reg, tc.name, tc.labels...); !near(got, tc.want) {
			t.Errorf("%s%v = %v, want %v", tc.name, tc.labels, got, tc.want)
		}
	}
	for _, tc := range []struct {
		name      string
		labels    []string
		wantCount uint64
		wantSum   float64
	}{
		{name: "repagent_epoch_pause_seconds", wantCount: 2, wantSum: 0.004},
		{name: "repagent_epoch_pause_part_seconds", labels: []string{"part", "kick"}, wantCount: 2, wantSum: 0.0002},
		{name: "repagent_epoch_pause_part_seconds", labels: []string{"part", "harvest"}, wantCount: 2, wantSum: 0.0006},
		{name: "repagent_epoch_pause_part_seconds", labels: []string{"part", "save"}, wantCount: 2, wantSum: 0.0004},
		{name: "repagent_epoch_pause_part_seconds", labels: []string{"part", "stall"}, wantCount: 2, wantSum: 0},
		{name: "repagent_epoch_pause_part_seconds", labels: []string{"part", "copy"}, wantCount: 2, wantSum: 0.0024},
		{name: "repagent_epoch_pause_part_seconds", labels: []string{"part", "gates"}, wantCount: 2, wantSum: 0.0001},
		{name: "repagent_epoch_pause_part_seconds", labels: []string{"part", "resume"}, wantCount: 2, wantSum: 0.0003},
		{name: "repagent_epoch_pause_part_seconds", labels: []string{"part", "audit"}, wantCount: 1, wantSum: 0.007}, // audited epochs only
		{name: "repagent_epoch_wait_seconds", wantCount: 2, wantSum: 0.006},
		{name: "repagent_epoch_transfer_seconds", wantCount: 2, wantSum: 0.008},
		{name: "repagent_ack_latency_seconds", wantCount: 2, wantSum: 0.002},
	} {
		n, sum := hist(t, reg, tc.name, tc.labels...)
		if n != tc.wantCount || !near(sum, tc.wantSum) {
			t.Errorf("%s%v: count %d sum %v, want %d and %v", tc.name, tc.labels, n, sum, tc.wantCount, tc.wantSum)
		}
	}

	// A 2ms pause falls in the buckets from 3.2ms up, not in 1.6ms's.
	for _, b := range metric(t, reg, "repagent_epoch_pause_seconds").GetHistogram().GetBucket() {
		want := uint64(0)
		if b.GetUpperBound() >= 0.002 {
			want = 2
		}
		if b.GetCumulativeCount() != want {
			t.Errorf("pause bucket le=%v: %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), want)
		}
	}

	c.ObserveBackupLost()
	if v := value(t, reg, "repagent_protected"); v != 0 {
		t.Errorf("repagent_protected after the backup was lost = %v, want 0", v)
	}
	if v := value(t, reg, "repagent_backup_losses_total"); v != 1 {
		t.Errorf("repagent_backup_losses_total = %v, want 1", v)
	}
	c.SetProtected(true)
	c.SetProtected(false)
	if v := value(t, reg, "repagent_protected"); v != 0 {
		t.Errorf("repagent_protected after SetProtected(false) = %v, want 0", v)
	}
}

func TestPrimaryObserveGateEpoch(t *testing.T) {
	c := NewPrimaryCollector()
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	c.ObserveGateEpoch(testGateEpoch())
	empty := ebpf.EpochStats{Epoch: 8, Outcome: ebpf.OutcomeDiscarded}
	c.ObserveGateEpoch(empty) // released nothing: no hold times
	c.ObserveGateEpoch(ebpf.EpochStats{Outcome: ebpf.Outcome(99)})

	for _, tc := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{name: "repagent_gate_epochs_total", labels: []string{"outcome", "committed"}, want: 1},
		{name: "repagent_gate_epochs_total", labels: []string{"outcome", "discarded"}, want: 1},
		{name: "repagent_gate_epochs_total", labels: []string{"outcome", "released"}, want: 0},
		{name: "repagent_gate_epochs_total", labels: []string{"outcome", "closed"}, want: 0},
		{name: "repagent_gate_epochs_total", labels: []string{"outcome", "Outcome(99)"}, want: 1},
		{name: "repagent_gate_held_frames_total", want: 12},
		{name: "repagent_gate_held_bytes_total", want: 1200},
		{name: "repagent_gate_released_frames_total", want: 10},
		{name: "repagent_gate_dropped_frames_total", labels: []string{"reason", "hold_limit"}, want: 2},
		{name: "repagent_gate_dropped_frames_total", labels: []string{"reason", "ring_full"}, want: 0},
		{name: "repagent_gate_dropped_frames_total", labels: []string{"reason", "too_big"}, want: 0},
		{name: "repagent_gate_discarded_frames_total", want: 1},
		{name: "repagent_gate_failed_frames_total", want: 0},
	} {
		if got := value(t, reg, tc.name, tc.labels...); got != tc.want {
			t.Errorf("%s%v = %v, want %v", tc.name, tc.labels, got, tc.want)
		}
	}
	if n, sum := hist(t, reg, "repagent_gate_epoch_hold_median_seconds"); n != 1 || !near(sum, 0.060) {
		t.Errorf("hold median: count %d sum %v, want 1 and 0.060", n, sum)
	}
	if n, sum := hist(t, reg, "repagent_gate_epoch_hold_max_seconds"); n != 1 || !near(sum, 0.099) {
		t.Errorf("hold max: count %d sum %v, want 1 and 0.099", n, sum)
	}
}

func TestBackupObserve(t *testing.T) {
	c := NewBackupCollector()
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	c.ObserveCheckpoint(1, 100, 0xabc)
	c.ObserveCheckpoint(2, 5, 0xdef)
	c.ObserveFailover(nil) // Serve returned no failover
	c.ObserveFailover(&replicate.Failover{Epoch: 2, Took: 250 * ms})

	for _, tc := range []struct {
		name string
		want float64
	}{
		{"repagent_backup_checkpoints_total", 2},
		{"repagent_backup_checkpoint_epoch", 2},
		{"repagent_backup_applied_bytes_total", 105 * replicate.PageSize},
		{"repagent_failovers_total", 1},
		{"repagent_failover_duration_seconds", 0.25},
	} {
		if got := value(t, reg, tc.name); got != tc.want {
			t.Errorf("%s = %v, want %v", tc.name, got, tc.want)
		}
	}
	// The signature is BackupConfig.OnEpoch's.
	_ = replicate.BackupConfig{OnEpoch: c.ObserveCheckpoint}

	// Serve's counts, read at each scrape.
	st := replicate.ServeStats{Accepted: 12, RefusedFull: 3, RefusedBusy: 1, Failed: 6, Sessions: 2, Early: 1}
	c.WatchServe(func() replicate.ServeStats { return st })
	for outcome, want := range map[string]float64{"accepted": 12, "evicted": 3, "busy": 1, "failed": 6, "session": 2, "early": 1} {
		if got := value(t, reg, "repagent_backup_connections_total", "outcome", outcome); got != want {
			t.Errorf("backup_connections_total{outcome=%q} = %v, want %v", outcome, got, want)
		}
	}
}

// TestNilCollectors: an agent without metrics calls the methods all the same.
func TestNilCollectors(t *testing.T) {
	var p *PrimaryCollector
	p.ObserveEpoch(testEpoch(1))
	p.ObserveGateEpoch(testGateEpoch())
	p.ObserveBackupLost()
	p.SetProtected(true)
	var b *BackupCollector
	b.WatchServe(nil)
	b.ObserveCheckpoint(1, 1, 1)
	b.ObserveFailover(&replicate.Failover{})
}

// TestObserveAllocs: the calls are made once per epoch from the engine's
// goroutines, which allocate nothing per epoch.
func TestObserveAllocs(t *testing.T) {
	p, b := NewPrimaryCollector(), NewBackupCollector()
	s, g := testEpoch(1), testGateEpoch()
	if n := testing.AllocsPerRun(100, func() {
		p.ObserveEpoch(s)
		p.ObserveGateEpoch(g)
		b.ObserveCheckpoint(1, 10, 0)
	}); n != 0 {
		t.Errorf("%v allocations per epoch, want 0", n)
	}
}

// TestNotGlobal: the collectors register nothing themselves, and two of
// them live in two registries.
func TestNotGlobal(t *testing.T) {
	a, b := NewPrimaryCollector(), NewPrimaryCollector()
	NewBackupCollector()
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if strings.HasPrefix(mf.GetName(), Namespace+"_") {
			t.Errorf("%s is in the default registry", mf.GetName())
		}
	}
	ra, rb := prometheus.NewRegistry(), prometheus.NewRegistry()
	ra.MustRegister(a)
	rb.MustRegister(b)
	a.ObserveEpoch(testEpoch(1))
	if va, vb := value(t, ra, "repagent_epochs_total"), value(t, rb, "repagent_epochs_total"); va != 1 || vb != 0 {
		t.Errorf("epochs: %v and %v, want 1 and 0", va, vb)
	}
	// Both sides in one registry, as the main job has them: no name clashes.
	both := prometheus.NewRegistry()
	if err := both.Register(NewPrimaryCollector()); err != nil {
		t.Fatal(err)
	}
	if err := both.Register(NewBackupCollector()); err != nil {
		t.Errorf("register a backup's beside a primary's: %v", err)
	}
	var already prometheus.AlreadyRegisteredError
	if err := both.Register(NewBackupCollector()); !errors.As(err, &already) {
		t.Errorf("register a second backup's: %v, want AlreadyRegisteredError", err)
	}
	problems, err := testutil.GatherAndLint(both)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

// docLine is a metric in doc.go's lists: its name, its labels and its type.
var docLine = regexp.MustCompile(`(?m)^//\t(repagent_\w+)(\{\w+\})?\s+(counter|gauge|histogram)\s`)

// TestDocListsEveryMetric checks doc.go's lists against what the
// collectors export: every metric with its labels and type, nothing more.
func TestDocListsEveryMetric(t *testing.T) {
	src, err := os.ReadFile("doc.go")
	if err != nil {
		t.Fatal(err)
	}
	doc := map[string]string{} // name{label} -> type
	for _, m := range docLine.FindAllStringSubmatch(string(src), -1) {
		doc[m[1]+m[2]] = m[3]
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewPrimaryCollector(), NewBackupCollector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, mf := range mfs {
		key := mf.GetName()
		if ls := mf.GetMetric()[0].GetLabel(); len(ls) > 0 {
			var names []string
			for _, l := range ls {
				names = append(names, l.GetName())
			}
			key += "{" + strings.Join(names, ",") + "}"
		}
		got[key] = strings.ToLower(mf.GetType().String())
	}
	for k, typ := range got {
		if doc[k] != typ {
			t.Errorf("%s: a %s, doc.go says %q", k, typ, doc[k])
		}
	}
	for k := range doc {
		if _, ok := got[k]; !ok {
			t.Errorf("doc.go lists %s, which is not exported", k)
		}
	}
	if len(got) < 30 {
		t.Errorf("only %d metrics gathered", len(got))
	}
}

func TestServe(t *testing.T) {
	c := NewPrimaryCollector()
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := Serve(ctx, "127.0.0.1:0", reg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !strings.HasPrefix(s.URL(), "http://127.0.0.1:") || strings.HasSuffix(s.URL(), ":0/metrics") || !strings.HasSuffix(s.URL(), "/metrics") {
		t.Errorf("URL %s: want http://127.0.0.1:PORT/metrics with the bound port", s.URL())
	}
	c.ObserveEpoch(testEpoch(1))
	body := scrape(t, s.URL())
	for _, want := range []string{
		"# TYPE repagent_epoch_pause_seconds histogram\n",
		"\nrepagent_epoch_pause_seconds_count 1\n",
		`repagent_epoch_pause_seconds_bucket{le="0.0001"} 0` + "\n",
		`repagent_epoch_pause_seconds_bucket{le="+Inf"} 1` + "\n",
		"\nrepagent_epochs_total 1\n",
		"\nrepagent_protected 1\n",
		"\nrepagent_wire_bytes_total 250000\n",
		`repagent_epoch_pause_part_seconds_count{part="copy"} 1` + "\n",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("scrape lacks %q:\n%s", want, body)
		}
	}
	if resp, err := http.Get(strings.TrimSuffix(s.URL(), "/metrics") + "/other"); err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET /other: %s, want 404", resp.Status)
		}
	}

	// The run's context ending stops the server.
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		conn, err := net.Dial("tcp", s.Addr().String())
		if err != nil {
			break
		}
		conn.Close()
		if time.Now().After(deadline) {
			t.Fatal("still listening 5s after the context ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v", url, resp.Status, err)
	}
	return string(b)
}

// TestServeAddressInUse: an address that cannot be listened on is an error
// at once, naming it.
func TestServeAddressInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	for _, tc := range []struct {
		name, addr, want string
	}{
		{"in use", addr, addr},
		{"no port", "127.0.0.1", "127.0.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Serve(context.Background(), tc.addr, prometheus.NewRegistry())
			if err == nil {
				s.Close()
				t.Fatalf("Serve(%s): no error", tc.addr)
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "serve metrics: ") {
				t.Errorf("Serve(%s): %v; want it to name %s", tc.addr, err, tc.want)
			}
		})
	}
}
