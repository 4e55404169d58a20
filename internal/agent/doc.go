// Package agent is the runtime of the repagent command on its built-in test
// VM: what `repagent` (the main job), `repagent primary`, `repagent backup`
// and `repagent vm` do once their flags are parsed. cmd/repagent only parses
// flags into the configurations here (Job, PrimaryJob, BackupJob, VMJob,
// with Repl for the replication flags they share), calls Run, prints the
// error and picks the exit code.
//
// Each side is built on replicate/protect, as an embedder's VMM would be:
// the primary side is a testvm.Machine protected by a protect.Primary (the
// output gate on its tap, the mirror on its disk, the engine, the link); the
// backup side a protect.Backup whose Restore builds the test VM from the
// checkpoint. What this package adds is the test VM's part: building it over
// the devices protect opened, its guest's own record of what it wrote (to
// verify a replica or a failover end to end), and the lines a user reads.
//
// Where things are:
//
//   - config.go: the configurations the command fills, and usage errors.
//   - replicator.go: the primary side of the main job and of `primary`: the
//     engine's callbacks, the sync and status lines, the --stats file, the
//     summary (netstats.go: the network part of the lines; stats.go: the
//     aggregation it uses, internal/epochstat).
//   - job.go: the main job: primary and backup in one process over loopback
//     TCP, with its own network and client (internal/netlab) and disks.
//   - primary.go, backup.go: the two sides as separate processes; backup.go
//     also checks a failover's replica and disk.
//   - vm.go: the test VM alone, with snapshots, and the guest's verification.
//   - disk.go: disk images: sizes, the main job's own images, their check.
//   - metrics.go: serving --metrics (replicate/metrics' collectors).
package agent
