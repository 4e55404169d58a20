// Package protect makes a VMM's VM fault tolerant: it joins the checkpoint
// engine (package replicate), the output gate on the VM's tap (package
// ebpf) and the disk mirror (package diskmirror) in the order they need, on
// the primary and on the backup. The package example makes a toy VMM, not
// testvm, fault tolerant with network output commit and disk mirroring.
//
// # Usage
//
// On the primary host:
//
//  1. NewPrimary with the VM's tap name (and the network namespace it is
//     in), its disk image and the engine's options. It opens the tap and
//     puts the output gate on it, in that namespace, and puts a
//     diskmirror.Mirror on the image.
//  2. Build the VM over Primary.Tap (its NIC's frames) and Primary.Disk (its
//     block device's writes: WriteAt, WriteAtFUA, Sync). Nothing may write
//     the image except through the Mirror.
//  3. Primary.Protect(vm) makes the engine; Primary.Run (or RunConn) dials
//     the backup, retrying while it starts, and replicates until its
//     context ends. A lost backup ends Run with replicate.ErrBackupLost:
//     the VM runs on, unprotected, its held output released.
//  4. After Run returned and the VM stopped, Primary.Close closes the gate,
//     then the tap. The image is the caller's to close.
//
// The VM (replicate.VM) is the embedder's. Its responsibilities:
//
//   - Report every guest page the VMM itself writes (DMA, device rings, a
//     NIC's receive buffers) in its dirty source: KVM's log sees only the
//     vCPUs' writes (dirtylog.Tracker.MarkWritten does it for a KVM VM).
//   - With a dirty ring, handle KVM_EXIT_DIRTY_RING_FULL by calling the
//     tracker's RingFull for that vCPU and entering the guest again.
//   - Pause must return only once no vCPU runs guest code and no device
//     writes guest memory or the tap; Save must then return the whole
//     machine state, which Restore on the backup checks before it builds
//     anything.
//   - For lazy capture (Engine.Capture lazy or auto), implement
//     replicate.WriteGuard and call its guard before every write of the
//     VMM's own into guest memory: the page may be write-protected, and a Go
//     copy() that faults on it can deadlock the process (replicate/lazy.go).
//     Guest memory must be writable only through the mapping DirtySlots
//     returns (protection is per mapping).
//   - For auto capture to weigh what lazy capture costs the guest beyond
//     the pause, run each vCPU on an OS thread of its own and name the
//     threads (replicate.VCPUThreads); without it auto weighs the pause
//     alone, and says so in the log.
//   - Send guest frames only on Primary.Tap and write the disk only through
//     Primary.Disk, from the first epoch on: the gate and the mirror
//     assign them to the epoch that produced them.
//
// On the backup host:
//
//  1. NewBackup with a Restore function, the tap name (and namespace) the
//     resumed VM uses, and the backup's disk image.
//  2. Backup.Serve on a listener: it receives checkpoints until the
//     primary is lost, then fails over. It serves on through connections
//     it refuses and sessions that end before their first checkpoint
//     (replicate/serve.go); BackupConfig.Engine.Once ends it after one.
//  3. At failover the Backup opens the tap, and calls Restore with the
//     checkpoint and the devices: the disk image already holds the
//     checkpoint's disk. Restore owns cp.Memory from the call on (map it as
//     guest memory: no copy; close it if Restore fails) and returns the VM
//     built and paused, with its NIC's MAC and IP. The Backup announces
//     them on the tap (a gratuitous ARP, so the network learns where the VM
//     is now) and only then starts the VM.
//  4. Backup.Close after the resumed VM stopped: it closes the engine and
//     the tap.
//
// A failover's restore is mostly building the VM (its KVM VM, memory
// slots, vCPUs); with BackupConfig.Engine.Prepare the VMM builds it when a
// session's first checkpoint arrives, over the replica's memory file, and
// Restore only loads the state into it (testvm.Prepare does it for the
// test VM). With Reprotect, the resumed VM gets an output gate and a disk
// mirror before it starts, and Backup.Primary protects it to the next
// backup.
//
// Between two hosts the link should be TLS: LoadTLS reads each end's
// certificate, key and CA (and the names it allows of the other end), and
// its Client and Server configurations go in Config.Engine.TLS and
// BackupConfig.Engine.TLS. Both ends are then authenticated by the CA and
// everything after the handshake is encrypted (SECURITY.md); without it
// anyone who reaches the backup's port can feed it a VM to resume.
//
// Against partitions, give both sides a Fence (Config.Fence,
// BackupConfig.Fence): the VM's ownership becomes a lease in etcd
// (replicate/fence). NewPrimary then acquires the VM (a *fence.HeldError if
// another agent owns it); the engine releases output only while the lease
// is valid, records which backup session holds the VM before it releases
// anything, and fences the VM (pauses it, releases nothing more: Run
// returns replicate.ErrFenced) when the lease is lost. After Run returned
// with the backup lost, the VM runs unprotected: watch
// Primary.Ownership().Lost() and pause it when that closes; Protect and
// Run again to protect it again once the backup is back (the backup,
// waiting to own the VM, takes the new session instead). The backup's
// failover first claims the VM (fence.Claim): it waits while the primary
// holds its lease, and refuses a replica the primary ran on past. Its
// resumed VM is then the owner: pause it when Backup.Ownership().Lost()
// closes. Close gives the VM up on either side.
//
// Config.Metrics and BackupConfig.Metrics take Prometheus collectors
// (package replicate/metrics) that the Primary and the Backup feed
// themselves; the embedder registers them in its own registry.
package protect
