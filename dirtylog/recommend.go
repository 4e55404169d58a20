package dirtylog

import "github.com/repagent/repagent/kvm"

// Per-page and per-GiB harvest costs on the project's machines, from
// ../shared/PLATFORM.md (PVM, 2 cores); the dirtylog benchmarks re-measure them.
const (
	costManualGetPerGiB = 5000 // ns: KVM_GET_DIRTY_LOG scans the slot's bitmap
	costManualPerPage   = 31   // ns: KVM_CLEAR_DIRTY_LOG re-protects a page
	costRingPerPage     = 48   // ns: reading an entry plus KVM_RESET_DIRTY_RINGS
	maxRingEntries      = 65536
	minRingEntries      = 4096 / 16 // one page of struct kvm_dirty_gfn
)

// Recommend picks a mechanism for a VM about to be built: the choice must be
// made before the vCPUs exist, because the dirty ring has to be enabled first,
// and once it is, the bitmap mechanisms are off limits for that VM.
//
// dirtyPerHarvest is the expected number of pages dirtied between harvests (an
// observed rate times the interval); 0 means unknown. The ring wins only where
// its per-page cost beats the manual bitmap's scan of all of memory: sparse
// writes over large memory. Otherwise Manual, or Bitmap on a kernel without
// manual protect. For Ring it also returns a ring size (entries per vCPU) that
// holds twice a vCPU's share of a harvest, so ring-full exits stay rare.
func Recommend(sys *kvm.System, memBytes, dirtyPerHarvest uint64, vcpus int) (Mechanism, uint32) {
	manual := sys.CheckExtension(kvm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) != 0
	ring := sys.CheckExtension(kvm.KVM_CAP_DIRTY_LOG_RING) != 0 || sys.CheckExtension(kvm.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) != 0
	if ring && dirtyPerHarvest > 0 && vcpus > 0 {
		gib := float64(memBytes) / (1 << 30)
		manualCost := costManualGetPerGiB*gib + costManualPerPage*float64(dirtyPerHarvest)
		ringCost := costRingPerPage * float64(dirtyPerHarvest)
		perVCPU := 2 * dirtyPerHarvest / uint64(vcpus)
		if ringCost < manualCost && perVCPU <= maxRingEntries {
			entries := uint32(minRingEntries)
			for uint64(entries) < perVCPU {
				entries *= 2
			}
			return Ring, entries
		}
	}
	if manual {
		return Manual, 0
	}
	return Bitmap, 0
}
