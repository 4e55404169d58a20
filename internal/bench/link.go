package bench

// The link section: the same guest replicated over the plaintext link and
// over TLS 1.3 with mutual authentication (protect.LoadTLS over a lab PKI,
// internal/labcert), side by side in one run; plaintext is the baseline.

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"time"

	"github.com/repagent/repagent/internal/labcert"
	"github.com/repagent/repagent/internal/report"
)

// linkInterval is the link section's epoch.
const linkInterval = 100 * time.Millisecond

// LinkResult is the link section: a mode per link, plaintext first.
type LinkResult struct {
	Links []*LinkMode `json:"links"`
}

// LinkMode is one link's replicated mode.
type LinkMode struct {
	Link string `json:"link"` // plaintext or tls
	Mode *Mode  `json:"mode"`
}

func (b *runner) measureLink(ctx context.Context) (*LinkResult, error) {
	pt, bt, err := labcert.LoadPair()
	if err != nil {
		return nil, err
	}
	client, server := pt.Client(), bt.Server()
	res := &LinkResult{}
	cfg := b.guestConfig(0)
	for _, l := range []struct {
		name           string
		client, server *tls.Config
	}{{"plaintext", nil, nil}, {"tls", client, server}} {
		b.progressf("link: %s, %s at full speed, %v", l.name, cfg.Pattern, linkInterval)
		m, err := b.measureReplicatedWith(ctx, cfg, linkInterval, repl{tlsClient: l.client, tlsServer: l.server})
		if err != nil {
			return nil, fmt.Errorf("link %s: %w", l.name, err)
		}
		res.Links = append(res.Links, &LinkMode{Link: l.name, Mode: m})
	}
	return res, nil
}

func printLink(w io.Writer, lr *LinkResult) {
	fmt.Fprintf(w, "Link: plaintext and TLS 1.3 (mutual authentication, a lab PKI) on loopback, the dirty workload at full speed, %v; TLS also over plaintext:\n\n", linkInterval)
	header := []string{"link", "dirty pages/epoch", "pause p50", "pause p99", "wire MB/s", "ack p50", "primary CPU/page", "backup CPU/page",
		"guest writes/s", "vs plaintext"}
	var rows [][]string
	base := lr.Links[0].Mode
	for _, l := range lr.Links {
		r := l.Mode
		rows = append(rows, []string{l.Link, fmt.Sprintf("%.0f", r.DirtyPages), fmtUS(r.PauseP50US), fmtUS(r.PauseP99US),
			fmt.Sprintf("%.0f", r.WireMBps), fmtUS(r.AckP50US),
			fmt.Sprintf("%.2fµs (%.2fx)", r.CPUPageUS, ratio(r.CPUPageUS, base.CPUPageUS)),
			fmt.Sprintf("%.2fµs (%.2fx)", r.BackupCPUPageUS, ratio(r.BackupCPUPageUS, base.BackupCPUPageUS)),
			report.SI(r.GuestRate), fmt.Sprintf("%.2f", ratio(r.GuestRate, base.GuestRate))})
	}
	table(w, header, rows)
}
