// Package testvm is a minimal VMM for repagent's experiments and tests: a tiny
// guest whose work can be measured and verified exactly, on raw KVM.
//
// # The machine
//
// Guest memory is one memfd, mapped shared, spread over two KVM memory slots:
// slot 0 at guest-physical 0 and slot 1 at 4 GiB, with KVM's TSS and identity
// map pages in the hole between. The guest never sees that split: the VMM's
// page tables (2 MiB pages, accessed and dirty bits preset so the MMU never
// writes them) map guest-virtual address V to byte V of the memfd. Memory is
// 8 MiB to 64 GiB, a multiple of 2 MiB.
//
// Each of 1 to 4 vCPUs runs on its own goroutine locked to an OS thread, in
// explicit states (created, running, paused, stopped). Pause sets every vCPU's
// immediate_exit and signals its thread, so a vCPU in the guest leaves KVM_RUN
// and one about to enter does not; Pause returns once all of them are parked,
// and they stay parked until Resume.
//
// # The guest
//
// The guest (guest/, freestanding C and a little assembly, built by
// `make guest` into guest.bin and embedded) starts directly in 64-bit mode at
// CPL3: on PVM, CPL0 code is emulated at about a million instructions a second.
// It never halts (HLT is #GP at CPL3) and signals through two ports, allowed by
// the TSS I/O bitmap: the console (a line left in its status page) and the
// control port (ready, phase done, error). Its contract with the VMM is
// guest/abi.h, which abi_test.go checks against abi.go.
//
// Each vCPU runs its own instance of one workload over its own region:
//   - Idle paces itself with rdtsc and writes only its status page.
//   - Dirty writes pages of a working set, in order (Seq), uniformly
//     (Random) or mostly to a hot set (HotCold), at full speed or a set rate.
//     Every write stamps the page with the vCPU, the page index and a version,
//     and fills the rest from them, so VerifyPages checks every byte against the
//     status page. Config.Content says what a write changes: the whole page
//     with bytes that do not compress (Stamp), the whole page with text-like
//     words that do (Text), or one 64-byte line of it (Sparse), so that
//     compression and deduplication have something real to find.
//   - Counter counts with a running hash of its history (CounterHash), so a
//     restored guest proves it continued from exactly the saved value.
//   - UDPEcho and UDPStream (on vCPU 0) use the network device: echo answers
//     each UDP datagram with a sequence number and its payload, stream sends
//     numbered datagrams at a set rate to whoever subscribed with a datagram.
//     Both answer ARP for the guest's IP. With Net.Service, vCPU 0 runs one
//     of them between the operations of another workload (a guest that
//     dirties memory and serves clients). Sequence numbers live in guest
//     memory, so a client can check that a restored guest went on from its
//     checkpoint: no number repeats, none goes back.
//   - Disk (on vCPU 0) uses the block device: batches of block writes (a
//     sequential sweep of its working set, then as Pattern says), each block
//     stamped with its number and a version, each batch followed by reads
//     of random earlier blocks that it checks, and a flush now and then.
//     The version of every block lives in a table in guest memory, so
//     VerifyDisk and VerifyDiskImage check a disk image block by block
//     against a memory image of the same checkpoint.
//
// # The network device
//
// With Config.Net the machine has a paravirtual NIC on a tap (OpenTap): a TX
// and an RX ring of 256 slots of 2 KiB in guest memory (guest/abi.h). The
// guest polls its RX ring; it kicks the TX side through an ioeventfd (a port
// write that KVM turns into an eventfd signal without leaving the kernel)
// only when the device said it sleeps, so a busy device takes frames without
// any exit. The device's writes into guest memory (RX frames, ring indices)
// are reported like all VMM writes (below). Pause waits for the device to
// finish the batch it is on and holds it until Resume, so a saved state
// never splits a frame from its ring update: every frame on the tap before
// a checkpoint is recorded as sent in it, and none after. Save and Restore
// carry the ring positions and check them against the memory image.
//
// # The block device
//
// With Config.Disk the machine has a paravirtual block device of 4 KiB
// blocks on a DiskBackend (Config.DiskIO: an image file, or a writer that
// mirrors it): a ring of 128 request descriptors (read, write with optional
// FUA, flush) and a 512 KiB buffer area in guest memory (guest/abi.h), and
// the same doorbell as the NIC's TX side on its own port. After a burst the
// device polls its ring for a while (Config.DiskPoll) before it sleeps, as
// waking its thread costs far more than the doorbell. It executes requests
// in order and completes each with a status; a request the device cannot
// execute (unknown op, blocks outside the disk, buffer outside the area) or
// that the backend fails completes with an error status and changes
// nothing else. Reads into guest memory are reported like all VMM writes.
// Every batch, and so every call into the backend, runs under the device's
// lock, which Pause takes and holds until Resume: a write is on the image if
// and only if the saved ring position says it completed, and no write
// reaches the backend during a pause. Save and Restore carry the ring
// position and check it against the memory image; the restored device
// executes the requests the guest had published after it.
//
// With Config.PhaseOps the guest stops after every PhaseOps operations until
// Machine.Go lets it go on; tests use phases to know exactly what the guest
// did between two points.
//
// The status page of each vCPU (Status) is read by the host from memory,
// without an exit.
//
// # State
//
// Save returns the complete machine state (every vCPU, the in-kernel irqchip,
// PIT and clock, device state and the guest configuration) with magic, version,
// length and CRC32C. Restore checks it completely, then builds a fresh VM that
// maps a given memory file directly, so a backup resumes from its replica
// memfd without a copy. WriteSnapshot and ReadSnapshot put a state and a
// sparse memory image in one file for the CLI.
//
// The state is composed of one part per checkpointed component, each with
// its encoding and its checks beside the component: the guest configuration
// and memory layout (config_state.go), the network device (net_state.go),
// the block device (disk_state.go), and kvm.VMState and kvm.VCPUState for
// what KVM holds. A device saves its ring positions into its part and, on
// Restore, checks them against the memory image before it takes them.
// state.go frames the parts and checks what spans them; the format is
// described there. All of them decode with internal/le, whose errors name
// the field a truncated state ends in.
//
// # Writes the VMM makes
//
// KVM's dirty log only sees guest writes. Every write the VMM itself makes into
// guest memory (WriteGuest, Go, and the devices' DMA: received frames, blocks
// read, ring updates) reports the guest-physical range to the recorder set
// with SetWriteRecorder; dirty tracking merges those ranges into its harvest.
// Before each such write the machine calls the guard set with SetWriteGuard
// (replicate.WriteGuard), so that lazy capture copies a write-protected page
// of the epoch being captured before the device changes it.
//
// # As a replicated VM
//
// Machine implements replicate.VM (DirtySlots, DirtySource, Pause, Save,
// Resume) and replicate.MemoryBacking (SlotFile: the memfd, whose holes,
// memory the guest never touched, the initial sync sends unread). Pause
// polls for the kicked vCPUs to park where the host has a CPU to spare
// beyond one per vCPU, and sleeps on a condition variable otherwise.
package testvm
