package main

import (
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/repagent/repagent/dirtylog"
	"github.com/repagent/repagent/internal/agent"
	"github.com/repagent/repagent/internal/faultpoint"
	"github.com/repagent/repagent/replicate"
	"github.com/repagent/repagent/testvm"
)

func TestParseJobArgsDefaults(t *testing.T) {
	o, err := parseJobArgs(nil)
	if err != nil {
		t.Fatal(err)
	}
	wantCfg := testvm.Config{MemSize: testvm.DefaultMemSize, VCPUs: 1, Workload: testvm.Dirty, Pattern: testvm.Random, Seed: 1}
	if !sameConfig(o.Guest, wantCfg) {
		t.Errorf("config: %+v, want %+v", o.Guest, wantCfg)
	}
	wantRepl := agent.Repl{Interval: 100 * time.Millisecond, Mech: dirtylog.Auto, SyncPause: replicate.DefaultSyncPause}
	if o.Repl != wantRepl {
		t.Errorf("replication options: %+v, want %+v", o.Repl, wantRepl)
	}
	// The job builds its own network by default, and vCPU 0 answers its
	// client between page writes.
	if n := o.Guest.Net; !o.Net || o.ClientRate != 200 || n == nil || n.Service != testvm.UDPEcho ||
		n.MAC.String() != defaultGuestMAC || n.IP.String() != defaultGuestIP || n.Port != testvm.DefaultNetPort {
		t.Errorf("network: net %v, client rate %d, guest %+v", o.Net, o.ClientRate, n)
	}
	if o, err := parseJobArgs([]string{"--no-net"}); err != nil || o.Net || o.Guest.Net != nil {
		t.Errorf("--no-net: %v, net %v, guest %+v", err, o.Net, o.Guest.Net)
	}
	if o, err := parseJobArgs([]string{"--workload", "udp-echo", "--port", "9000", "--hold-limit", "1M", "--pcap", t.TempDir() + "/x.pcap"}); err != nil ||
		o.Guest.Net.Service != testvm.UDPEcho || o.Guest.Net.Port != 9000 || o.Repl.HoldLimit != 1<<20 || o.Repl.Pcap == "" {
		t.Errorf("network flags: %v, %+v, %+v", err, o.Guest.Net, o.Repl)
	}

	o, err = parseJobArgs([]string{"--interval", "5ms", "--dirty-track", "ring", "--stats", t.TempDir() + "/s.jsonl",
		"--heartbeat-timeout", "2s", "--workers", "3", "--staging", "64M", "--audit-every", "10", "--duration", "3s",
		"--compress", "never", "--copy-threads", "2", "--sync-threshold", "7", "--capture", "auto", "--capture-calibration", "300ms",
		"--quiet", "--mem", "64M", "--vcpus", "2", "--workload", "counter"})
	if err != nil {
		t.Fatal(err)
	}
	r := o.Repl
	if r.Interval != 5*time.Millisecond || r.Mech != dirtylog.Ring || !strings.HasSuffix(r.Stats, "/s.jsonl") ||
		r.HeartbeatTimeout != 2*time.Second || r.Workers != 3 || r.Staging != 64<<20 || r.AuditEvery != 10 ||
		r.Duration != 3*time.Second || !r.Quiet || r.Compress != replicate.CompressNever || r.CopyThreads != 2 || r.SyncThreshold != 7 ||
		r.Capture != replicate.CaptureAuto || r.CaptureCalib != 300*time.Millisecond {
		t.Errorf("parsed: %+v", r)
	}
	if o.Guest.MemSize != 64<<20 || o.Guest.VCPUs != 2 || o.Guest.Workload != testvm.Counter {
		t.Errorf("parsed config: %+v", o.Guest)
	}
	for _, mech := range []string{"auto", "bitmap", "manual", "ring"} {
		o, err := parseJobArgs([]string{"--dirty-track", mech})
		if err != nil || o.Repl.Mech.String() != mech {
			t.Errorf("--dirty-track %s: %v, %v", mech, o.Repl.Mech, err)
		}
	}
	for _, iv := range []string{"5ms", "10s"} {
		if _, err := parseJobArgs([]string{"--interval", iv}); err != nil {
			t.Errorf("--interval %s: %v", iv, err)
		}
	}
	if _, err := parseJobArgs([]string{"--help"}); !errors.Is(err, pflag.ErrHelp) {
		t.Errorf("--help: %v, want pflag.ErrHelp", err)
	}
}

// TestJobUsageErrors checks that bad flags of the main job are one line on
// stderr and exit code 2; none gets as far as building a VM.
func TestJobUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"interval too short", []string{"--interval", "4ms"}, "--interval 4ms: want 5ms to 10s"},
		{"interval too long", []string{"--interval", "11s"}, "--interval 11s: want 5ms to 10s"},
		{"interval zero", []string{"--interval", "0"}, "--interval 0s: want 5ms to 10s"},
		{"interval not a duration", []string{"--interval", "fast"}, `invalid argument "fast"`},
		{"bad dirty-track", []string{"--dirty-track", "magic"}, `--dirty-track: unknown dirty tracking mechanism "magic" (want auto, bitmap, manual or ring)`},
		{"heartbeat too short", []string{"--heartbeat-timeout", "150ms"}, "--heartbeat-timeout 150ms: want 0 (the default) or at least 200ms"},
		{"heartbeat short at 5ms", []string{"--interval", "5ms", "--heartbeat-timeout", "9ms"}, "at least 10ms"},
		{"negative workers", []string{"--workers", "-1"}, "--workers -1: must not be negative"},
		{"bad compress", []string{"--compress", "zstd"}, `--compress: unknown compression "zstd" (want auto, always or never)`},
		{"too many copy threads", []string{"--copy-threads", "5"}, "--copy-threads 5: want 0 (the default) or 1 to 4"},
		{"negative capture calibration", []string{"--capture", "auto", "--capture-calibration", "-1s"}, "--capture-calibration -1s: must not be negative"},
		{"negative sync threshold", []string{"--sync-threshold", "-1"}, "--sync-threshold -1: must not be negative"},
		{"staging too small", []string{"--staging", "4K"}, "--staging 4K: want 0 (the default) or at least 256KiB"},
		{"staging bad unit", []string{"--staging", "4X"}, `--staging: size "4X": unknown unit`},
		{"negative duration", []string{"--duration", "-1s"}, "--duration -1s: must not be negative"},
		{"stats dir missing", []string{"--stats", "/nonexistent/dir/s.jsonl"}, "--stats /nonexistent/dir/s.jsonl: directory /nonexistent/dir does not exist"},
		{"bad vcpus", []string{"--vcpus", "9"}, "--vcpus 9: want 1 to 4"},
		{"bad mem", []string{"--mem", "4M"}, "outside 8MiB..64GiB"},
		{"unknown flag", []string{"--backup", "x:1"}, "unknown flag: --backup"},
		{"own tap", []string{"--tap", "tap0"}, "--tap: the main job builds its own tap"},
		{"client rate", []string{"--client-rate", "0"}, "--client-rate 0: want 1 to 100000"},
		{"pcap without net", []string{"--no-net", "--pcap", "/tmp/x.pcap"}, "--pcap and --hold-limit are about the job's network: drop --no-net"},
		{"service without net", []string{"--no-net", "--net-service", "udp-echo"}, "--no-net: the guest's network workload or service needs the job's network"},
		{"bad service", []string{"--net-service", "http"}, `--net-service "http": want udp-echo or udp-stream`},
		{"bad mac", []string{"--mac", "zz"}, "--mac: address zz: invalid MAC address"},
		{"multicast mac", []string{"--mac", "01:00:5e:00:00:01"}, "is a multicast address"},
		{"bad ip", []string{"--ip", "10.0.0"}, `--ip: ParseAddr("10.0.0")`},
		{"ipv6", []string{"--ip", "::1"}, "is not an IPv4 address"},
		{"job stream", []string{"--workload", "udp-stream"}, "the main job's client speaks udp-echo"},
		{"job stream service", []string{"--net-service", "udp-stream"}, "the main job's client speaks udp-echo"},
		{"hold limit", []string{"--hold-limit", "1K"}, "--hold-limit 1K: want 4KiB to 16GiB"},
		{"metrics without port", []string{"--metrics", "localhost"}, "--metrics localhost: address localhost: missing port in address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkUsageError(t, run, "repagent: ", tc.args, tc.want)
		})
	}
}

func TestPrimaryArgs(t *testing.T) {
	o, err := parsePrimaryArgs([]string{"--backup", "10.0.0.2:7070", "--mem", "64M"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if o.Backup != "10.0.0.2:7070" || o.ConnectTimeout != 10*time.Second || o.Fault != nil || o.Guest.MemSize != 64<<20 ||
		o.Repl.Interval != replicate.DefaultInterval {
		t.Errorf("parsed: %+v", o)
	}
	o, err = parsePrimaryArgs([]string{"--backup", "[::1]:7070", "--connect-timeout", "1s"}, "sent:12")
	if err != nil {
		t.Fatal(err)
	}
	if o.ConnectTimeout != time.Second || o.Fault == nil || *o.Fault != (agent.Fault{Point: faultpoint.Sent, N: 12}) {
		t.Errorf("parsed: %+v, fault %+v", o, o.Fault)
	}
	for _, tc := range []struct {
		name  string
		args  []string
		fault string
		want  string
	}{
		{"no backup", nil, "", "--backup is required"},
		{"backup without port", []string{"--backup", "host"}, "", "--backup host: address host: missing port in address"},
		{"zero connect timeout", []string{"--backup", "h:1", "--connect-timeout", "0"}, "", "--connect-timeout 0s: must be positive"},
		{"bad interval", []string{"--backup", "h:1", "--interval", "1ms"}, "", "--interval 1ms: want 5ms to 10s"},
		{"bad dirty-track", []string{"--backup", "h:1", "--dirty-track", "log"}, "", `unknown dirty tracking mechanism "log"`},
		{"fault without epoch", []string{"--backup", "h:1"}, "sent", `REPAGENT_FAULT="sent": want POINT:N with POINT one of sync, pause, send, sent`},
		{"fault unknown point", []string{"--backup", "h:1"}, "boom:3", `REPAGENT_FAULT="boom:3": unknown point "boom" here`},
		{"pcap without tap", []string{"--backup", "h:1", "--pcap", "/tmp/x.pcap"}, "", "--pcap and --hold-limit are about the guest's network: they need --tap"},
		{"stream bytes", []string{"--backup", "h:1", "--tap", "t0", "--workload", "udp-stream", "--stream-bytes", "4"}, "", "stream datagrams of 4 bytes: want 16 to 1472"},
		{"fault backup point", []string{"--backup", "h:1"}, "apply:3", `unknown point "apply" here`},
		{"fault bad epoch", []string{"--backup", "h:1"}, "pause:x", `REPAGENT_FAULT="pause:x": "x" is not an epoch number`},
		{"fault negative epoch", []string{"--backup", "h:1"}, "send:-1", `"-1" is not an epoch number`},
		{"metrics without port", []string{"--backup", "h:1", "--metrics", "9100"}, "", "--metrics 9100: address 9100: missing port in address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parsePrimaryArgs(tc.args, tc.fault)
			if !errors.As(err, new(usageError)) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%v with REPAGENT_FAULT=%q: %v; want a usage error saying %q", tc.args, tc.fault, err, tc.want)
			}
		})
	}
}

// TestPrimaryBadFaultExit checks that a bad REPAGENT_FAULT stops the primary
// command before it builds anything, with exit code 2.
func TestPrimaryBadFaultExit(t *testing.T) {
	t.Setenv(envFault, "sent:soon")
	var stdout, stderr bytes.Buffer
	code := run([]string{"primary", "--backup", "127.0.0.1:1"}, &stdout, &stderr)
	if code != 2 || !strings.Contains(stderr.String(), `repagent primary: REPAGENT_FAULT="sent:soon"`) {
		t.Errorf("exit %d, stderr %q", code, stderr.String())
	}
}

func TestParseFault(t *testing.T) {
	for _, tc := range []struct {
		name, env, pid string
		points         []string
		want           *agent.Fault
	}{
		{"unset", "", "", primaryFaultPoints, nil},
		{"sync round", "sync:0", "", primaryFaultPoints, &agent.Fault{Point: "sync", N: 0}},
		{"pause", "pause:7", "", primaryFaultPoints, &agent.Fault{Point: "pause", N: 7}},
		{"send", "send:1", "", primaryFaultPoints, &agent.Fault{Point: "send", N: 1}},
		{"apply", "apply:4", "1234", backupFaultPoints, &agent.Fault{Point: "apply", N: 4, KillPID: 1234}},
	} {
		got, err := parseFault(tc.env, tc.pid, tc.points)
		if err != nil || (got == nil) != (tc.want == nil) || (got != nil && *got != *tc.want) {
			t.Errorf("%s: %+v, %v; want %+v", tc.name, got, err, tc.want)
		}
	}
}

// A backup other hosts can reach serves plaintext only with --insecure, and
// with TLS files that load it serves TLS.
func TestBackupArgsTLS(t *testing.T) {
	o, err := parseBackupArgs([]string{"--listen", ":7070", "--insecure", "--once"}, "", "")
	if err != nil || o.TLS != nil || !o.Once {
		t.Fatalf("--insecure --once: %+v, %v", o, err)
	}
	for _, l := range []string{"127.0.0.1:7070", "[::1]:7070", "localhost:7070"} {
		if _, err := parseBackupArgs([]string{"--listen", l}, "", ""); err != nil {
			t.Errorf("--listen %s without TLS: %v; loopback needs no TLS", l, err)
		}
	}
	dir := t.TempDir()
	if code := run([]string{"certs", dir}, io.Discard, io.Discard); code != 0 {
		t.Fatalf("certs: exit %d", code)
	}
	o, err = parseBackupArgs([]string{"--listen", ":7070", "--tls-cert", dir + "/backup.crt", "--tls-key", dir + "/backup.key",
		"--tls-ca", dir + "/ca.crt", "--tls-allow", "primary"}, "", "")
	if err != nil || o.TLS == nil || o.TLS.MinVersion != tls.VersionTLS13 {
		t.Fatalf("TLS: %+v, %v", o, err)
	}
	p, err := parsePrimaryArgs([]string{"--backup", "10.0.0.1:7070", "--tls-cert", dir + "/primary.crt", "--tls-key", dir + "/primary.key",
		"--tls-ca", dir + "/ca.crt", "--tls-allow", "backup"}, "")
	if err != nil || p.Repl.TLS == nil {
		t.Fatalf("primary TLS: %+v, %v", p, err)
	}
}

func TestBackupArgs(t *testing.T) {
	o, err := parseBackupArgs([]string{"--listen", "127.0.0.1:0"}, "", "")
	if err != nil {
		t.Fatal(err)
	}
	if o.Listen != "127.0.0.1:0" || o.ExpectMem != 0 || o.RunAfter != 0 || o.HeartbeatTimeout != 0 || o.Fault != nil {
		t.Errorf("defaults: %+v", o)
	}
	o, err = parseBackupArgs([]string{"--listen", "127.0.0.1:7070", "--expect-mem", "64M", "--expect-vcpus", "2",
		"--heartbeat-timeout", "2s", "--run-after-failover", "1s", "--skip-verify", "--quiet"}, "apply:3", "99")
	if err != nil {
		t.Fatal(err)
	}
	if o.ExpectMem != 64<<20 || o.ExpectVCPUs != 2 || o.HeartbeatTimeout != 2*time.Second || o.RunAfter != time.Second ||
		!o.SkipVerify || !o.Quiet || o.Fault == nil || *o.Fault != (agent.Fault{Point: "apply", N: 3, KillPID: 99}) {
		t.Errorf("parsed: %+v", o)
	}
	for _, tc := range []struct {
		name      string
		args      []string
		fault, pi string
		want      string
	}{
		{"no listen", nil, "", "", "--listen is required"},
		{"listen without port", []string{"--listen", "localhost"}, "", "", "--listen localhost: address localhost: missing port"},
		{"mem without vcpus", []string{"--listen", "127.0.0.1:1", "--expect-mem", "64M"}, "", "", "--expect-mem and --expect-vcpus go together"},
		{"vcpus without mem", []string{"--listen", "127.0.0.1:1", "--expect-vcpus", "2"}, "", "", "--expect-mem and --expect-vcpus go together"},
		{"bad expect-mem", []string{"--listen", "127.0.0.1:1", "--expect-mem", "4M", "--expect-vcpus", "1"}, "", "", "--expect-mem: "},
		{"bad expect-vcpus", []string{"--listen", "127.0.0.1:1", "--expect-mem", "64M", "--expect-vcpus", "0"}, "", "", "--expect-vcpus 0: want 1 to 4"},
		{"negative run-after", []string{"--listen", "127.0.0.1:1", "--run-after-failover", "-1s"}, "", "", "--run-after-failover -1s: must not be negative"},
		{"fault without pid", []string{"--listen", "127.0.0.1:1"}, "apply:3", "", `REPAGENT_FAULT="apply:3" needs REPAGENT_FAULT_KILL_PID`},
		{"fault bad pid", []string{"--listen", "127.0.0.1:1"}, "apply:3", "me", `REPAGENT_FAULT_KILL_PID="me": want a process id`},
		{"fault primary point", []string{"--listen", "127.0.0.1:1"}, "sent:3", "", `unknown point "sent" here (want POINT:N with POINT one of apply)`},
		{"empty tap", []string{"--listen", "127.0.0.1:1", "--tap", ""}, "", "", `--tap "": not a network interface name`},
		{"long tap", []string{"--listen", "127.0.0.1:1", "--tap", "abcdefghijklmnop"}, "", "", `--tap "abcdefghijklmnop": not a network interface name`},
		{"tap with slash", []string{"--listen", "127.0.0.1:1", "--tap", "a/b"}, "", "", `--tap "a/b": not a network interface name`},
		{"metrics without port", []string{"--listen", "127.0.0.1:1", "--metrics", "localhost"}, "", "", "--metrics localhost: address localhost: missing port in address"},
		{"reachable without TLS", []string{"--listen", ":7070"}, "", "", "--listen :7070 is reachable from other hosts, and without TLS"},
		{"reachable on an address", []string{"--listen", "10.0.0.1:7070"}, "", "", "or accept that with --insecure"},
		{"TLS cert alone", []string{"--listen", ":7070", "--tls-cert", "c.pem"}, "", "", "TLS needs --tls-cert, --tls-key and --tls-ca together"},
		{"TLS allow alone", []string{"--listen", "127.0.0.1:1", "--tls-allow", "primary"}, "", "", "TLS needs --tls-cert, --tls-key and --tls-ca together"},
		{"TLS files missing", []string{"--listen", ":7070", "--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem", "--tls-ca", "/nonexistent/ca.pem"}, "", "", "/nonexistent/"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseBackupArgs(tc.args, tc.fault, tc.pi)
			if !errors.As(err, new(usageError)) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%v: %v; want a usage error saying %q", tc.args, err, tc.want)
			}
		})
	}
}

// TestHelp checks that every flag and command is documented where it belongs.
func TestHelp(t *testing.T) {
	for _, tc := range []struct {
		args []string
		fs   *pflag.FlagSet
		want []string
	}{
		{[]string{"--help"}, newJobFlags().fs, []string{"Usage: repagent [flags]", "Commands:", "  primary ", "  backup ",
			"  vm ", "  help ", "(default 100ms)", `(default "auto")`, "UNPROTECTED", "--metrics ADDR "}},
		{[]string{"help", "primary"}, newPrimaryFlags().fs, []string{"Usage: repagent primary", "(default 10s)", "backup lost: VM running UNPROTECTED", "--metrics ADDR "}},
		{[]string{"help", "backup"}, newBackupFlags().fs, []string{"Usage: repagent backup", "--expect-mem size", "3 when the primary was lost", "--metrics ADDR "}},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(tc.args, &stdout, &stderr); code != 0 {
			t.Errorf("%v: exit %d, stderr %q", tc.args, code, stderr.String())
		}
		out := stdout.String()
		tc.fs.VisitAll(func(f *pflag.Flag) {
			if !strings.Contains(out, "--"+f.Name+" ") || f.Usage == "" {
				t.Errorf("%v: flag --%s is not documented", tc.args, f.Name)
			}
		})
		for _, w := range tc.want {
			if !strings.Contains(out, w) {
				t.Errorf("%v: usage lacks %q:\n%s", tc.args, w, out)
			}
		}
		if strings.Contains(out, envFault) {
			t.Errorf("%v: usage mentions %s, which is for tests only", tc.args, envFault)
		}
	}
}

func TestEtcdArgs(t *testing.T) {
	p, err := parsePrimaryArgs([]string{"--backup", "h:1", "--etcd", "http://10.0.0.9:2379,http://10.0.0.10:2379", "--name", "web1",
		"--lease-ttl", "3s", "--on-etcd-loss", "run"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if f := p.Fencing; f == nil || len(f.Endpoints) != 2 || f.Name != "web1" || f.TTL != 3*time.Second || !f.RunOnLoss || f.TLS != nil {
		t.Fatalf("fencing: %+v", f)
	}
	if p, err := parsePrimaryArgs([]string{"--backup", "h:1"}, ""); err != nil || p.Fencing != nil {
		t.Fatalf("no --etcd: %+v, %v", p.Fencing, err)
	}
	b, err := parseBackupArgs([]string{"--listen", "127.0.0.1:1", "--etcd", "http://10.0.0.9:2379", "--name", "web1"}, "", "")
	if err != nil || b.Fencing == nil || b.Fencing.TTL != 2*time.Second || b.Fencing.RunOnLoss {
		t.Fatalf("backup fencing: %+v, %v", b.Fencing, err)
	}
	dir := t.TempDir()
	if code := run([]string{"certs", dir}, io.Discard, io.Discard); code != 0 {
		t.Fatalf("certs: exit %d", code)
	}
	b, err = parseBackupArgs([]string{"--listen", "127.0.0.1:1", "--etcd", "https://10.0.0.9:2379", "--name", "web1",
		"--etcd-ca", dir + "/ca.crt", "--etcd-cert", dir + "/backup.crt", "--etcd-key", dir + "/backup.key"}, "", "")
	if err != nil || b.Fencing.TLS == nil || len(b.Fencing.TLS.Certificates) != 1 {
		t.Fatalf("TLS to etcd: %+v, %v", b.Fencing, err)
	}
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--name", "web1"}, "--name is about fencing through etcd: it needs --etcd"},
		{[]string{"--on-etcd-loss", "run"}, "--on-etcd-loss is about fencing"},
		{[]string{"--etcd", "http://e:2379"}, "--etcd needs --name"},
		{[]string{"--etcd", "http://e:2379", "--name", "a/b"}, `--name "a/b": want at most 128 bytes and no '/'`},
		{[]string{"--etcd", "e:2379", "--name", "a"}, `--etcd "e:2379": want a URL`},
		{[]string{"--etcd", "http://e:2379", "--name", "a", "--lease-ttl", "1500ms"}, "--lease-ttl 1.5s: want whole seconds"},
		{[]string{"--etcd", "http://e:2379", "--name", "a", "--on-etcd-loss", "maybe"}, `--on-etcd-loss "maybe": want fence or run`},
		{[]string{"--etcd", "https://e:2379", "--name", "a"}, "TLS to etcd needs --etcd-ca"},
		{[]string{"--etcd", "http://e:2379", "--name", "a", "--etcd-cert", "x"}, "--etcd-cert and --etcd-key go together"},
		{[]string{"--etcd", "http://e:2379", "--name", "a", "--etcd-ca", dir + "/nope"}, "--etcd-ca: open"},
	} {
		_, err := parsePrimaryArgs(append([]string{"--backup", "h:1"}, tt.args...), "")
		var ue agent.UsageError
		if !errors.As(err, &ue) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("primary %v: %v, want a usage error with %q", tt.args, err, tt.want)
		}
	}
	if _, err := parseBackupArgs([]string{"--listen", "127.0.0.1:1", "--etcd", "http://e:2379", "--name", "a", "--on-etcd-loss", "run"}, "", ""); err == nil ||
		!strings.Contains(err.Error(), "unknown flag: --on-etcd-loss") {
		t.Errorf("backup --on-etcd-loss: %v, want it unknown (the resumed VM always fences)", err)
	}
}
