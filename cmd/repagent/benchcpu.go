package main

// The engine's CPU per replicated page, against its floor: a plain copy of
// as many scattered pages, timed on this process's thread clock in the same
// run.

import (
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"time"

	"github.com/repagent/repagent/internal/cpuclock"
	"github.com/repagent/repagent/replicate"
)

// Goals of the engine's CPU per page for incompressible (stamp) pages (not
// assertions).
const (
	goalCPUPerPage       = 3 * time.Microsecond // primary side
	goalBackupCPUPerPage = 2 * time.Microsecond // backup side
)

// The plain copy's repetitions: at least copyFloorMinReps copies of N pages
// each, until copyFloorPages pages are copied, at most copyFloorMaxReps.
const (
	copyFloorMinReps = 5
	copyFloorMaxReps = 200
	copyFloorPages   = 200000
)

// copySource is the plain copy's source: a buffer of at least size bytes
// whose every page is resident (not the shared zero page), kept for the
// run.
func (b *benchRun) copySource(size uint64) []byte {
	if uint64(len(b.copySrc)) < size {
		b.copySrc = nil
		src := make([]byte, size)
		for off := 0; off < len(src); off += replicate.PageSize {
			src[off] = byte(off/replicate.PageSize) | 1
		}
		b.copySrc = src
	}
	return b.copySrc[:size]
}

// plainCopyPerPage is the floor of the engine's CPU per page: the thread
// CPU time of copying n pages, picked at random from a buffer of memSize
// bytes and copied in ascending order (as a harvest lists them) into a
// staging buffer of n pages, per page. It is the median over repetitions,
// each with pages picked anew.
func (b *benchRun) plainCopyPerPage(memSize uint64, n int) time.Duration {
	const ps = replicate.PageSize
	src := b.copySource(memSize)
	pages := int(memSize / ps)
	n = max(1, min(n, pages))
	dst := make([]byte, n*ps)
	for off := 0; off < len(dst); off += ps {
		dst[off] = 1 // resident, as staging is
	}
	rng := rand.New(rand.NewPCG(uint64(n), memSize))
	idx := make([]int, n)
	reps := min(max(copyFloorMinReps, copyFloorPages/n), copyFloorMaxReps)
	per := make([]time.Duration, 0, reps)
	var m cpuclock.Meter
	for range reps {
		for i := range idx {
			idx[i] = rng.IntN(pages)
		}
		slices.Sort(idx)
		m.Start()
		for i, p := range idx {
			copy(dst[i*ps:(i+1)*ps], src[p*ps:(p+1)*ps])
		}
		per = append(per, m.Stop()/time.Duration(n))
	}
	return benchMedian(per)
}

// benchCPUPerPage fills r's engine CPU per page, primary and backup side,
// from the epochs of its window, and its floor.
func (b *benchRun) benchCPUPerPage(r *benchMode, memSize uint64) {
	if r.agg.Dirty == 0 {
		return
	}
	// From the sums, not cpuPerPage's whole nanoseconds: a page costs about
	// a microsecond.
	r.CPUPageUS = benchUS(r.agg.CPU) / float64(r.agg.Dirty)
	r.BackupCPUPageUS = benchUS(r.agg.BackupCPU) / float64(r.agg.Dirty)
	r.CopyPages = min(max(1, int(r.DirtyPages+0.5)), int(memSize/replicate.PageSize))
	r.CopyPageUS = float64(b.plainCopyPerPage(memSize, r.CopyPages)) / float64(time.Microsecond)
	r.CPUVsCopy = benchRatio(r.CPUPageUS, r.CopyPageUS)
	r.BackupVsCopy = benchRatio(r.BackupCPUPageUS, r.CopyPageUS)
}

// benchUSf formats microseconds with two decimals: "1.23 µs".
func benchUSf(x float64) string { return fmt.Sprintf("%.2f µs", x) }

// benchPrintCPU prints the replicated modes' engine CPU per page beside the
// plain copy of as many pages.
func benchPrintCPU(w io.Writer, modes []*benchMode) {
	var rows [][]string
	for _, m := range modes {
		if m.IntervalMS == 0 || m.Mode == "floor" {
			continue
		}
		if m.CopyPageUS == 0 {
			rows = append(rows, []string{"replicated " + m.Mode, "-", "-", "-", "-", "-", "-"})
			continue
		}
		rows = append(rows, []string{"replicated " + m.Mode, fmt.Sprintf("%.0f", m.DirtyPages),
			benchUSf(m.CPUPageUS), benchUSf(m.BackupCPUPageUS), benchUSf(m.CopyPageUS),
			fmt.Sprintf("%.2f", m.CPUVsCopy), fmt.Sprintf("%.2f", m.BackupVsCopy)})
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintf(w, "\nEngine CPU per dirty page (primary: pause, copy, workers, sender; backup: receive, check, apply), "+
		"against a plain copy of as many scattered pages (thread CPU, this process):\n\n")
	benchTable(w, []string{"mode", "dirty pages/epoch", "primary/page", "backup/page", "plain copy/page", "primary/copy", "backup/copy"}, rows)
}

// benchCPUGoal is one rate's goal line for the engine's CPU per page: the
// worst of its replicated modes, each side.
func benchCPUGoal(rr *benchRate, verdict func(bool) string) benchGoal {
	var worst, bworst *benchMode
	for _, m := range rr.Modes {
		if m.IntervalMS == 0 || m.Mode == "floor" || m.CopyPageUS == 0 {
			continue
		}
		if worst == nil || m.CPUPageUS > worst.CPUPageUS {
			worst = m
		}
		if bworst == nil || m.BackupCPUPageUS > bworst.BackupCPUPageUS {
			bworst = m
		}
	}
	goal := fmt.Sprintf("(goal primary <= %.0f µs, backup <= %.0f µs)", benchUS(goalCPUPerPage), benchUS(goalBackupCPUPerPage))
	if worst == nil {
		return benchGoal{Text: fmt.Sprintf("engine CPU per page, rate %s: not measured (no replicated epochs) %s: NOT MET", benchRateName(rr.Rate), goal)}
	}
	ok := worst.CPUPageUS <= benchUS(goalCPUPerPage) && bworst.BackupCPUPageUS <= benchUS(goalBackupCPUPerPage)
	return benchGoal{Met: ok, Text: fmt.Sprintf("engine CPU per page, rate %s, stamp pages: primary %.2f µs at %s (%.2fx a plain copy), "+
		"backup %.2f µs at %s (%.2fx), worst of the replicated modes %s: %s",
		benchRateName(rr.Rate), worst.CPUPageUS, worst.Mode, worst.CPUVsCopy, bworst.BackupCPUPageUS, bworst.Mode, bworst.BackupVsCopy,
		goal, verdict(ok))}
}
