// Package metrics exports a replicating agent's figures as Prometheus
// metrics: the primary's epochs (pauses and their parts, pages and bytes,
// ack latency), its network output gates, whether the VM is protected, and
// the backup's checkpoints and failovers.
//
// The package is for embedders of replicate; replicate does not import it.
// An agent:
//
//  1. Makes a PrimaryCollector (NewPrimaryCollector) on the primary, a
//     BackupCollector (NewBackupCollector) on the backup, or both where one
//     process runs both sides.
//  2. Registers them in a registry of its own (prometheus.NewRegistry,
//     Register): they register nothing globally, so several can live in
//     one process, each in its registry.
//  3. Calls their Observe methods from the engine's callbacks:
//     PrimaryCollector.ObserveEpoch from replicate.Config.OnEpoch,
//     ObserveGateEpoch from ebpf.Config.OnEpoch, ObserveBackupLost when
//     Primary.Run returns replicate.ErrBackupLost, and SetProtected(false)
//     when replication stops on purpose; BackupCollector.ObserveCheckpoint
//     from replicate.BackupConfig.OnEpoch (the signatures match) and
//     ObserveFailover with the Failover that Backup.Serve returned. A nil
//     collector ignores every call, so the calls need no guard.
//  4. Serves the registry, with Serve (at http://ADDR/metrics) or its own
//     HTTP server (promhttp.HandlerFor).
//
// Durations are in seconds; histograms have the bucket bounds of Buckets
// (100µs doubling to 3.2768s). The metrics are counted from acknowledged
// epochs only: an epoch the backup never acknowledged is not in them.
//
// # Primary (PrimaryCollector)
//
//	repagent_epochs_total                          counter    epochs the backup acknowledged
//	repagent_last_acked_epoch                      gauge      the latest of them
//	repagent_epoch_pause_seconds                   histogram  how long each epoch stopped the vCPUs (EpochStats.Pause)
//	repagent_epoch_pause_part_seconds{part}        histogram  the parts of the pause: part is kick, harvest, save,
//	                                                          stall, copy, gates, resume or audit (audit only in the
//	                                                          epochs that audited memory)
//	repagent_epoch_wait_seconds                    histogram  back-pressure wait before the pause (the guest ran on)
//	repagent_epoch_transfer_seconds                histogram  end of the pause to the epoch's end record written
//	repagent_ack_latency_seconds                   histogram  end record written to the backup's ack
//	repagent_oversize_epochs_total                 counter    epochs whose pages overflowed staging (stop-and-copy)
//	repagent_dirty_pages_total                     counter    dirty pages captured
//	repagent_zero_pages_total                      counter    of them, pages that were all zero
//	repagent_lz4_pages_total                       counter    of them, pages sent LZ4-compressed
//	repagent_raw_bytes_total                       counter    the captured pages' size
//	repagent_wire_bytes_total                      counter    bytes the epochs took on the wire (pages, state, disk, headers)
//	repagent_state_bytes_total                     counter    machine state sent
//	repagent_disk_writes_total                     counter    disk write records mirrored (EpochStats.StreamRecords)
//	repagent_disk_bytes_total                      counter    their data
//	repagent_disk_wire_bytes_total                 counter    their messages on the wire (part of repagent_wire_bytes_total)
//	repagent_engine_cpu_seconds_total{side}        counter    the engine's CPU time, side primary or backup (EpochStats.CPU, BackupCPU)
//	repagent_protected                             gauge      1 while the backup holds an acknowledged checkpoint and is
//	                                                          reachable; 0 before the first ack, once the backup is lost,
//	                                                          and once replication stopped
//	repagent_backup_losses_total                   counter    times the backup was lost (the VM ran on unprotected)
//
// Output gates (PrimaryCollector.ObserveGateEpoch, one call per gate epoch):
//
//	repagent_gate_epochs_total{outcome}            counter    gate epochs ended: outcome is committed, discarded,
//	                                                          released or closed (ebpf.Outcome)
//	repagent_gate_held_frames_total                counter    frames held until their epoch was acknowledged
//	repagent_gate_held_bytes_total                 counter    their bytes
//	repagent_gate_released_frames_total            counter    held frames sent on
//	repagent_gate_dropped_frames_total{reason}     counter    frames dropped for lack of room: reason is ring_full,
//	                                                          too_big or hold_limit
//	repagent_gate_discarded_frames_total           counter    held frames discarded (epoch abandoned, gate closed)
//	repagent_gate_failed_frames_total              counter    held frames whose release the kernel refused
//	repagent_gate_epoch_hold_median_seconds        histogram  each epoch's median hold time of its released frames:
//	                                                          the latency output commit adds (one observation per
//	                                                          epoch that released frames; the gate keeps no per-frame
//	                                                          times to export)
//	repagent_gate_epoch_hold_max_seconds           histogram  each such epoch's longest hold time
//
// # Backup (BackupCollector)
//
//	repagent_backup_checkpoints_total              counter    checkpoints received, verified and applied
//	repagent_backup_checkpoint_epoch               gauge      the latest of them: the one a failover resumes
//	repagent_backup_applied_bytes_total            counter    guest memory applied to the replica (its pages × 4096)
//	repagent_failovers_total                       counter    failovers: the primary was lost and the VM resumed here
//	repagent_failover_duration_seconds             gauge      how long the latest failover took (Failover.Took)
package metrics
