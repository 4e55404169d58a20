// Package track picks the dirty tracking mechanism for a test VM about to be
// replicated, as the primary command and the bench do: from the pages its
// workload is expected to dirty per interval (ExpectedDirty), with
// dirtylog.Recommend, and the dirty ring's size when the ring is asked for
// (RingEntries).
package track
