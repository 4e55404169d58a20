package bench

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/repagent/repagent/internal/report"
	"github.com/repagent/repagent/testvm"
)

// table prints rows as an aligned Markdown table; columns from the second on
// are right-aligned.
func table(w io.Writer, header []string, rows [][]string) {
	width := make([]int, len(header))
	for _, row := range append([][]string{header}, rows...) {
		for i, c := range row {
			width[i] = max(width[i], len([]rune(c)), 3)
		}
	}
	line := func(cells []string) {
		var sb strings.Builder
		sb.WriteString("|")
		for i, c := range cells {
			pad := strings.Repeat(" ", width[i]-len([]rune(c)))
			if i == 0 {
				sb.WriteString(" " + c + pad + " |")
			} else {
				sb.WriteString(" " + pad + c + " |")
			}
		}
		fmt.Fprintln(w, sb.String())
	}
	line(header)
	sep := make([]string, len(header))
	for i := range sep {
		sep[i] = strings.Repeat("-", width[i])
		if i > 0 {
			sep[i] = strings.Repeat("-", width[i]-1) + ":"
		}
	}
	line(sep)
	for _, r := range rows {
		line(r)
	}
}

// rateHeader is the per-rate table's header.
var rateHeader = []string{"mode", "track", "guest writes/s", "vs floor", "vs none", "epochs", "pause p50", "p99",
	"kick", "harvest", "save", "copy", "stall", "resume", "dirty pages/epoch", "raw KiB/epoch", "wire KiB/epoch",
	"wire/raw", "wire MB/s", "ack p50", "wait"}

func fmtUS(x float64) string { return report.Dur(time.Duration(x * float64(time.Microsecond))) }

// modeRow is one mode's row of the per-rate table.
func modeRow(m *Mode) []string {
	name := m.Mode
	switch m.Mode {
	case "none", "floor":
	default:
		name = "replicated " + m.Mode
	}
	row := []string{name, m.Track, report.SI(m.GuestRate), fmt.Sprintf("%.2f", m.VsFloor), fmt.Sprintf("%.2f", m.VsNone)}
	switch m.Mode {
	case "none":
		return append(row, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-")
	case "floor":
		// The floor's harvests: their count, mean time and pages.
		return append(row, fmt.Sprintf("(%d)", m.Harvests), "-", "-", "-", fmtUS(m.HarvestMeanUS), "-", "-", "-", "-",
			fmt.Sprintf("%.0f", m.HarvestPages), "-", "-", "-", "-", "-", "-")
	}
	if m.Epochs == 0 {
		return append(row, "0", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-")
	}
	return append(row, strconv.FormatUint(m.Epochs, 10), fmtUS(m.PauseP50US), fmtUS(m.PauseP99US),
		fmtUS(m.KickUS), fmtUS(m.HarvestUS), fmtUS(m.SaveUS), fmtUS(m.CopyUS), fmtUS(m.StallUS), fmtUS(m.ResumeUS),
		fmt.Sprintf("%.0f", m.DirtyPages), fmt.Sprintf("%.0f", m.RawKiB), fmt.Sprintf("%.0f", m.WireKiB),
		fmt.Sprintf("%.3f", m.WireRatio), fmt.Sprintf("%.1f", m.WireMBps), fmtUS(m.AckP50US), fmtUS(m.WaitUS))
}

func printRate(w io.Writer, rr *Rate) {
	fmt.Fprintf(w, "Rate %s per vCPU:\n\n", rateName(rr.Rate))
	var rows [][]string
	for _, m := range rr.Modes {
		rows = append(rows, modeRow(m))
	}
	table(w, rateHeader, rows)
	printCPU(w, rr.Modes)
}

func print10k(w io.Writer, cfg testvm.Config, m *Mode, c Check10k) {
	fmt.Fprintf(w, "10k check: seq over %d pages, full speed, %v, %s, 1 vCPU, %d epochs:\n\n", cfg.WorkingSet, check10kInterval,
		testvm.FormatSize(cfg.MemSize), m.Epochs)
	table(w, []string{"dirty pages/epoch", "pause p50", "pause p99", "kick+harvest+save+copy p50", "p99 / (k+h+s+c)", "kick", "harvest", "save", "copy", "stall", "resume", "guest writes/s"},
		[][]string{{fmt.Sprintf("%.0f", c.DirtyPages), fmtUS(m.PauseP50US), fmtUS(c.PauseP99US), fmtUS(c.BaseP50US), fmt.Sprintf("%.2f", c.Ratio),
			fmtUS(m.KickUS), fmtUS(m.HarvestUS), fmtUS(m.SaveUS), fmtUS(m.CopyUS), fmtUS(m.StallUS), fmtUS(m.ResumeUS), report.SI(m.GuestRate)}})
	if m.CopyPageUS > 0 {
		fmt.Fprintf(w, "\nengine CPU per page: primary %s (%.2fx a plain copy of %d scattered pages, %s), backup %s (%.2fx)\n",
			fmtUSf(m.CPUPageUS), m.CPUVsCopy, m.CopyPages, fmtUSf(m.CopyPageUS), fmtUSf(m.BackupCPUPageUS), m.BackupVsCopy)
	}
}

// withNotes is table with a last column of notes (a failed run's error),
// left out when no row has one.
func withNotes(w io.Writer, header []string, rows [][]string) {
	for _, r := range rows {
		if r[len(r)-1] != "" {
			table(w, header, rows)
			return
		}
	}
	out := make([][]string, len(rows))
	for i, r := range rows {
		out[i] = r[:len(r)-1]
	}
	table(w, header[:len(header)-1], out)
}
