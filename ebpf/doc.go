// Package ebpf is repagent's network output gate: TC programs on a VM's tap
// that hold every frame the VM sends, tagged with the epoch that produced
// it, and let an epoch's frames out only when the epoch has committed, that
// is when the backup holds a checkpoint that includes everything the frames
// could reveal. Frames towards the VM are never held. A Gate implements
// replicate.OutputGate.
//
// # Where frames are held
//
// The tap's ingress carries what the VM sends (the VMM writes a frame into
// the tap's file descriptor; the kernel receives it as if it came from a
// wire), its egress what is sent to the VM. This kernel has no sch_plug,
// netem or BPF qdisc, so a frame cannot be parked inside the kernel;
// instead the frame is copied out and dropped, and later sent back in.
//
// Two programs (bpf/hold.c, compiled by bpf2go into hold_x86_bpfel.o) are
// attached with TCX links at the head of the tap's ingress and egress, so
// they run before any other TCX program there:
//
//   - hold, at ingress. In pass mode it returns TCX_NEXT at once: no copy.
//     In hold mode it copies the frame into a BPF ring buffer record
//     {epoch, sequence number, CLOCK_MONOTONIC time, length, flags, frame}
//     and returns TCX_DROP. bpf_ringbuf_reserve takes a constant size, so a
//     frame goes into the smallest of five record classes that fits (96,
//     480, 1536, 9216 or 65544 bytes of frame), each copied with a bounded
//     bpf_skb_load_bytes. A frame that fits no class, or finds the ring
//     full, is dropped and counted (per epoch and in total); in hold mode no
//     frame ever passes unheld. The kernel moves a VLAN tag out of the frame
//     into skb metadata before tc ingress; hold puts it back
//     (bpf_skb_vlan_push) before the copy, so the held bytes are the bytes
//     the VM sent.
//   - release, at egress. A frame sent by one of the gate's own AF_PACKET
//     sockets (bpf_get_socket_cookie equals the socket's SO_COOKIE) gets a
//     mark, a random 32-bit value chosen per attachment, and is redirected
//     with bpf_redirect(tap, BPF_F_INGRESS), so it enters the host at the
//     tap's ingress, exactly where the VM's frame entered. Every other frame
//     (towards the VM) returns TCX_NEXT at once.
//
// Back at ingress, hold recognises the mark, clears it (a frame from a
// tap has mark 0) and returns TCX_NEXT: bridges, routing, netfilter and
// later tc programs see the VM's frame as they would have without the gate.
//
// The two programs and the gate share a control block, an ARRAY map with
// BPF_F_MMAPABLE that the gate maps into its memory: mode, open epoch,
// socket cookies and mark are written by the gate, the counters by the
// programs with atomic adds, in separate cache lines so that neither side
// ever overwrites the other's fields. A second mappable array keeps the
// tap program's drop counters of the last 1024 epochs.
//
// # Release and order
//
// One goroutine, the gate's owner, reads the ring buffer (cilium/ebpf's
// ringbuf.Reader), keeps the held frames in a FIFO queue with per-epoch
// bookkeeping, and sends released frames, one write per frame on an
// AF_PACKET SOCK_RAW socket bound to the tap. Gate methods are requests the
// owner serves between ring reads, after Reader.Flush: Flush makes the
// reader return every record already in the ring before the request is
// served, which is the barrier Commit needs (every frame held for the
// epoch is in the queue).
//
// A frame redirected to ingress is queued on the sending CPU's backlog
// (netif_rx) and processed from there. Frames sent from two CPUs could land
// on two backlogs and overtake each other, so the owner's goroutine is
// locked to its OS thread and the thread is pinned to one CPU
// (Config.ReleaseCPU) for the gate's life, and only it sends. The backlog is
// bounded (net.core.netdev_max_backlog) and drops when full, so the owner
// keeps at most 256 released frames between its send and the ingress hook,
// counting the ones that came back (the hold program counts marked frames).
// In practice the frame has passed ingress before the send returns: the
// send re-enables softirqs on the CPU, which processes the backlog at once
// (measured: 20000 frames released back to back, none ever behind).
// Commit returns once its frames have passed the tap's ingress; one that
// has not after a second is counted as lost.
//
// Releases keep the VM's order; frames the VM sends from several queues
// of a multi-queue tap have no order between them to begin with.
//
// # Modes
//
//   - pass (after New, after Release): frames pass without a copy.
//   - hold (from the first Open): every frame is held, tagged with the
//     epoch of the last Open. Commit(n) releases the frames of epochs up to
//     n in order; Discard(n) drops those of epochs after n.
//   - draining (after Release): the mode is pass, but while some frame held
//     earlier has not yet come back to ingress (the held count exceeds the
//     count of frames that came back plus those the gate gave up: dropped,
//     discarded, failed), hold still holds a new frame, flagged as a drain
//     record, and the owner releases it as soon as it reads it, after
//     everything held before it. No frame overtakes an older one; once the
//     gate has caught up, frames pass directly again.
//
// Open writes the control block directly (it is called during the
// engine's pause and must be quick); the other methods go through the
// owner. A frame whose epoch tag is older than the newest frame already
// queued (a frame that raced with Open on another CPU) or than the last
// commit joins the next epoch: it is delayed, never released early.
//
// # Bounds
//
// Memory is bounded twice: by the ring (Config.RingSize, 4 MiB by default)
// and by the queue in userspace (Config.HoldLimit, 32 MiB by default, one
// buffer allocated at the first held frame and used as a ring). When either
// is full a frame is dropped and counted against its epoch (DroppedRingFull
// in the kernel, DroppedHoldLimit in userspace), never released early. At
// most MaxOpenEpochs epochs are held at once. Ring records that do not
// decode are counted (Stats.Malformed) and skipped.
//
// # Statistics
//
// Each epoch's EpochStats (held, released, dropped for each reason,
// discarded, failed; hold latency p50/p99/max from the ring record's
// bpf_ktime_get_ns to the release) reach Config.OnEpoch when the epoch
// ends. Stats is a snapshot of the totals, with the overall latency and the
// protocols of the held frames, decoded with gopacket's DecodingLayerParser.
// Config.Pcap receives every released frame in pcap format (gopacket's
// pcapgo), stamped with its release time.
//
// # Failover
//
// GratuitousARP builds the announcement a VM's new host sends with
// gopacket, and Announce sends it into the host from the tap as if the VM
// had sent it (through the same egress-to-ingress path, attached only for
// the call). Gate.Inject does the same on a gate's tap; injected frames are
// never held.
//
// # What others see
//
// Packet sockets (tcpdump) on the tap are served before tc ingress, so they
// see a held frame twice: when the VM sends it, and again when it is
// released. Packet sockets on the bridge or other devices after the tap see
// it once, at release. The released frame carries the gate's release
// socket as its owner (skb->sk survives the redirect; IP input orphans it
// as it does a tap's frames).
//
// # Requirements and limits
//
//   - Linux 6.6 or later (TCX links), BPF ring buffers, mappable arrays;
//     root (CAP_BPF, CAP_NET_ADMIN). New and Announce work in the network
//     namespace of the calling thread.
//   - A tap (tun driver in tap mode); tun devices and other devices are
//     refused (ErrNotTap).
//   - The VMM must not use tap offloads (IFF_VNET_HDR with partial
//     checksums or GSO frames): the gate copies frame bytes only, so a
//     partial checksum would be released unfinished. A frame longer than the
//     tap's MTU allows (MTU + 14 + 4 bytes) cannot be sent back by the packet
//     socket and is counted as failed (EpochStats.Failed).
//   - Release sockets must never set PACKET_QDISC_BYPASS: that path skips tc
//     egress and would deliver released frames to the VM.
//   - Close detaches the programs: from then on the VM's frames pass
//     unheld; frames still held are dropped, never released.
package ebpf
