package dirtylog

// Slot is a KVM memory slot as dirty tracking sees it.
type Slot struct {
	ID   uint32 // KVM slot id
	GPA  uint64 // guest-physical base, page aligned
	Size uint64 // bytes, a multiple of PageSize
	// Host is the slot's host mapping, needed to re-register the slot when
	// dirty logging is turned on and off. Sets ignore it.
	Host []byte
}
