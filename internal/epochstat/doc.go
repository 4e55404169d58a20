// Package epochstat aggregates the figures of replication epochs, once, for
// every command that reports them: Hist, a fixed-size log-linear histogram
// of durations whose percentiles are within 1/128 of the truth whatever the
// number of samples, and Agg, the sums and histograms of the
// replicate.EpochStats of a window (the main job's status line's second, its
// summary's whole run, a bench mode's measuring window).
//
// Neither is safe for concurrent use: the caller holds its own lock.
package epochstat
