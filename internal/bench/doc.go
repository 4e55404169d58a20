// Package bench is the harness behind `repagent bench`: whole-system figures
// of replication on this machine, every mode side by side from one run.
//
// The machines it runs on are shared and noisy, so absolute figures mean
// little: each section measures its own floor in the same run, right before
// or after the modes it judges, and reports the modes as ratios against it.
// A mode boots a fresh test VM, lets it warm up (the initial sync done and a
// few checkpoints acknowledged), then measures a window of Options.ModeTime;
// the replicated modes aggregate the epochs whose pause starts in the window
// (internal/epochstat).
//
// The sections, in the order Run measures and prints them, one file each:
//
//   - run.go: per rate of the dirty workload, the guest alone (none), dirty
//     logging harvested without pauses (floor), and replication at each
//     interval to a backup in this process over loopback TCP; the 10k check.
//   - cpu.go: the engine's CPU per dirty page against a plain copy of as
//     many scattered pages in this process.
//   - pause.go: the 10k check's pause copy, default goroutines against one,
//     and the pause tails at a moderate rate (p99 against p50).
//   - failover.go: a primary process (the primary command) killed with
//     SIGKILL and frozen with SIGSTOP, timed from the signal to the guest's
//     progress on the backup, at each guest size; the last size against the
//     first.
//   - sync.go: the initial sync of a large guest against a plain copy of its
//     memory over loopback TCP.
//   - disk.go: the disk workload through a plain image, a mirror alone and
//     replicated, against the plain image; the disk's initial sync against
//     hashing the image and a plain copy of it.
//   - net.go: output commit in a network of its own (internal/netlab): echo
//     round trips and hold times against no replication, the main job's
//     shape against a prediction, held-frame throughput against none.
//   - goals.go: the goal lines, each MET or NOT MET; they never fail a run.
//
// Run returns a Result, the figures the tables print (and the JSON the
// command's --json writes); tests assert on it. mem.go decides which guest
// sizes fit in free memory, table.go prints the tables.
package bench
