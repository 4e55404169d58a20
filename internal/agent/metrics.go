package agent

import (
	"context"
	"fmt"
	"io"
	"net"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/repagent/repagent/replicate/metrics"
)

// MetricsHelp is the --metrics flag's help, the same for every command.
const MetricsHelp = "serve Prometheus metrics at http://`ADDR`/metrics, host:port (port 0 picks one, and the line \"metrics on URL\" says which; default: none)"

// CheckMetricsAddr checks a --metrics value; any error is a usage error.
func CheckMetricsAddr(addr string) error {
	if addr == "" {
		return nil
	}
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return Usagef("--metrics %s: %w", addr, err)
	}
	return nil
}

// newBackupMetrics returns a backup's metrics for --metrics addr, or nil (no
// metrics) when addr is empty.
func newBackupMetrics(addr string) *metrics.BackupCollector {
	if addr == "" {
		return nil
	}
	return metrics.NewBackupCollector()
}

// serveMetrics serves the collectors, with the Go runtime's and the
// process's, at http://addr/metrics until ctx ends or close is called, and
// prints "metrics on URL" on stdout (the bound address, for port 0). With
// no addr it does nothing.
func serveMetrics(ctx context.Context, addr string, stdout io.Writer, cs ...prometheus.Collector) (close func() error, err error) {
	if addr == "" {
		return func() error { return nil }, nil
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(cs...)
	s, err := metrics.Serve(ctx, addr, reg)
	if err != nil {
		return nil, fmt.Errorf("--metrics %s: %w (pick another address, or port 0)", addr, err)
	}
	fmt.Fprintf(stdout, "metrics on %s\n", s.URL())
	return s.Close, nil
}
